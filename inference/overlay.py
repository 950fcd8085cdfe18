"""Render a class-activation map over the source mammogram as an RGB picture for humans.

The picture is what the radiologist sees in PACS next to the original views (the CAM secondary
capture), so it is built for reading rather than for measurement:

* the greyscale anatomy stays visible: colour is blended in only where the thresholded map is
  positive, with an opacity proportional to the activation and never above ``MAX_ALPHA``;
* the notice (research use, synthetic training data...) sits on a solid banner *added above* the
  image and the captions (model, probabilities) on a strip *added below* it, so no text ever hides
  breast tissue and the notice cannot be cropped away by a viewer's default zoom;
* text is drawn white with a black outline and sized from the picture width, wrapped when it does
  not fit, so it stays legible from 192-pixel test images to 2048-pixel mammograms.

Only numpy and OpenCV are used; the DICOM wrapping lives in :mod:`inference.writers.sc`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

MAX_ALPHA = 0.5
"""Opacity of the colour at the strongest activation; weaker activations are more transparent."""

COLORMAP = cv2.COLORMAP_TURBO
"""Perceptually smoother than JET and still the familiar blue-to-red heat scale."""

BANNER_RGB = (150, 0, 0)
"""Dark red: a warning colour that cannot be mistaken for part of the greyscale image."""

CAPTION_RGB = (0, 0, 0)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_RGB = (255, 255, 255)
_OUTLINE_RGB = (0, 0, 0)
# Cap height of the text as a fraction of the picture width, clamped to stay legible on tiny test
# images and unobtrusive on full-resolution ones.
_TEXT_HEIGHT_FRACTION = 0.022
_MIN_TEXT_HEIGHT = 9
_MAX_TEXT_HEIGHT = 48
_MAX_LAYOUT_PASSES = 4


@dataclass(frozen=True)
class OverlayLayout:
    """Where the scaled image lands in the rendered picture.

    ``scale`` is overlay pixels per original pixel; the image occupies rows
    ``image_top : image_top + image_shape[0]`` and all columns. Callers use this to map original
    pixel coordinates into the picture (tests do, to find a hot spot again).
    """

    scale: float
    image_shape: tuple[int, int]
    image_top: int
    banner_lines: tuple[str, ...]
    caption_lines: tuple[str, ...]
    font_scale: float
    thickness: int
    line_height: int
    padding: int
    banner_height: int
    caption_height: int

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.banner_height + self.image_shape[0] + self.caption_height, self.image_shape[1], 3)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only; anything else would silently become '?' boxes."""
    return text.encode("ascii", errors="replace").decode("ascii")


def _font_for_width(width: int) -> tuple[float, int, int, int]:
    """Font scale, stroke thickness, line height and padding for a picture ``width`` wide."""
    target = int(np.clip(round(width * _TEXT_HEIGHT_FRACTION), _MIN_TEXT_HEIGHT, _MAX_TEXT_HEIGHT))
    (_, base_h), _ = cv2.getTextSize("Ag", _FONT, 1.0, 1)
    font_scale = target / max(base_h, 1)
    thickness = max(1, round(font_scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    padding = max(3, target // 2)
    line_height = text_h + baseline + thickness + 2 + padding // 2
    return font_scale, thickness, line_height, padding


def _text_width(text: str, font_scale: float, thickness: int) -> int:
    (w, _), _ = cv2.getTextSize(text, _FONT, font_scale, thickness)
    # The outline reaches about one stroke beyond the glyphs on each side.
    return int(w) + 2 * thickness


def _wrap(text: str, max_width: int, font_scale: float, thickness: int) -> list[str]:
    """Greedy word wrap; a single word wider than the picture is cut rather than shrunk."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font_scale, thickness) <= max_width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
        while _text_width(current, font_scale, thickness) > max_width and len(current) > 1:
            # Hard-cut an over-long token (e.g. a hash) so nothing is drawn off the edge.
            cut = len(current) - 1
            while cut > 1 and _text_width(current[:cut], font_scale, thickness) > max_width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    return lines


def overlay_layout(
    height: int,
    width: int,
    *,
    notice: str | None,
    caption_lines: Sequence[str],
    max_size: int = 2048,
) -> OverlayLayout:
    """Compute scale, text wrapping and strip heights so the whole picture fits ``max_size``.

    The text strips are sized from the scaled width, so fitting is iterated: shrink the image until
    image plus strips have their longest side within ``max_size``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be non-empty, got {height}x{width}")
    if max_size < 64:
        raise ValueError(f"max_size must be at least 64, got {max_size}")
    scale = min(1.0, max_size / max(height, width))
    layout: OverlayLayout | None = None
    for _ in range(_MAX_LAYOUT_PASSES):
        h = max(1, round(height * scale))
        w = max(1, round(width * scale))
        font_scale, thickness, line_height, padding = _font_for_width(w)
        usable = max(1, w - 2 * padding)
        banner: list[str] = []
        if notice:
            banner = _wrap(_ascii(notice), usable, font_scale, thickness)
        captions: list[str] = []
        for line in caption_lines:
            captions.extend(_wrap(_ascii(line), usable, font_scale, thickness))
        banner_height = len(banner) * line_height + 2 * padding if banner else 0
        caption_height = len(captions) * line_height + 2 * padding if captions else 0
        layout = OverlayLayout(
            scale=scale,
            image_shape=(h, w),
            image_top=banner_height,
            banner_lines=tuple(banner),
            caption_lines=tuple(captions),
            font_scale=font_scale,
            thickness=thickness,
            line_height=line_height,
            padding=padding,
            banner_height=banner_height,
            caption_height=caption_height,
        )
        total_h = banner_height + h + caption_height
        if max(total_h, w) <= max_size:
            return layout
        # Shrink so that the image alone leaves room for the strips, then re-measure the text.
        room = max(1, max_size - banner_height - caption_height)
        scale = scale * min(room / h, max_size / w) * 0.99
    assert layout is not None
    logger.warning("overlay text strips do not fit max_size=%d; picture is %s", max_size, layout.output_shape)
    return layout


def _draw_lines(canvas: np.ndarray, lines: Sequence[str], top: int, layout: OverlayLayout) -> None:
    """Draw white text with a black outline, one line per ``layout.line_height``."""
    (_, text_h), _ = cv2.getTextSize("Ag", _FONT, layout.font_scale, layout.thickness)
    y = top + layout.padding + text_h + layout.thickness
    # The outline is the same stroke drawn at small offsets: a thicker stroke would change the
    # Hershey glyph advance and the black and white strings would drift apart along the line.
    reach = max(1, (layout.thickness + 1) // 2)
    offsets = [(dx, dy) for dx in (-reach, 0, reach) for dy in (-reach, 0, reach) if dx or dy]
    for line in lines:
        x = layout.padding
        for dx, dy in offsets:
            cv2.putText(
                canvas,
                line,
                (x + dx, y + dy),
                _FONT,
                layout.font_scale,
                _OUTLINE_RGB,
                layout.thickness,
                cv2.LINE_AA,
            )
        cv2.putText(canvas, line, (x, y), _FONT, layout.font_scale, _TEXT_RGB, layout.thickness, cv2.LINE_AA)
        y += layout.line_height


def _sanitised(arr: np.ndarray, *, high: float, posinf: float) -> np.ndarray:
    """``arr`` as float32 clipped to [0, ``high``], NaN and -inf as 0 and +inf as ``posinf``.

    The array itself (no copy) when it already is: the usual case, a windowed source in [0, 1] or
    a CAM map >= 0, where the full-size copies the general path makes cost about 50 ms per
    mammogram. Two reductions decide it (a NaN makes both NaN and fails the test), and nothing
    downstream writes into the array, so the picture is the same either way, bit for bit.
    """
    values = np.asarray(arr, dtype=np.float32)
    low, top = float(values.min()), float(values.max())
    if low >= 0.0 and top <= high and top < np.inf:
        return values
    clean = np.nan_to_num(values, nan=0.0, posinf=posinf, neginf=0.0)
    return np.clip(clean, 0.0, high) if high < np.inf else np.maximum(clean, 0.0)


def render_cam_overlay(
    image01: np.ndarray,
    cam_map: np.ndarray,
    *,
    notice: str | None,
    caption_lines: Sequence[str],
    max_size: int = 2048,
    strength: float = 1.0,
) -> np.ndarray:
    """Blend a thresholded CAM over the greyscale source and burn in notice and captions.

    ``image01`` is the windowed source in [0, 1] at original size (values outside are clipped);
    ``cam_map`` has the same shape, is >= 0, and is zero wherever the model did not activate
    (:func:`inference.cam.cam_to_original` output). Returns an ``(H', W', 3)`` uint8 RGB picture:
    a notice banner (if ``notice``), the image scaled so that the whole picture's longest side is
    at most ``max_size``, and a caption strip (if ``caption_lines``). Pixels where the map is zero
    keep exactly the grey value of the source. ``strength`` in [0, 1] scales the colour's
    opacity: the pipeline passes the image's probability, so the map of an image the model finds
    benign stays faint instead of looking as alarming as a malignant one.
    """
    image = np.asarray(image01)
    cam = np.asarray(cam_map)
    if image.ndim != 2:
        raise ValueError(f"image01 must be 2-D greyscale, got shape {image.shape}")
    if cam.shape != image.shape:
        raise ValueError(f"cam_map shape {cam.shape} != image shape {image.shape}")
    layout = overlay_layout(
        image.shape[0], image.shape[1], notice=notice, caption_lines=caption_lines, max_size=max_size
    )
    h, w = layout.image_shape

    img = _sanitised(image, high=1.0, posinf=1.0)
    heat = _sanitised(cam, high=np.inf, posinf=0.0)
    if (h, w) != image.shape:
        # Area averaging is the right filter for downscaling both: it neither aliases fine
        # calcification-scale structure nor invents activation outside the map's support.
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_AREA)

    grey8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    rgb = np.repeat(grey8[:, :, None], 3, axis=2)
    peak = float(heat.max()) if heat.size else 0.0
    if peak > 0.0:
        norm = heat / peak
        active = norm > 0.0
        colour_bgr = cv2.applyColorMap(np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8), COLORMAP)
        colour = cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
        alpha = (MAX_ALPHA * float(np.clip(strength, 0.0, 1.0)) * norm)[:, :, None]
        blended = rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
        blended_u8 = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        rgb = np.where(active[:, :, None], blended_u8, rgb)
    else:
        logger.debug("CAM map is empty; overlay shows the greyscale image only")

    out = np.zeros(layout.output_shape, dtype=np.uint8)
    out[layout.image_top : layout.image_top + h] = rgb
    if layout.banner_height:
        out[: layout.banner_height] = BANNER_RGB
        _draw_lines(out, layout.banner_lines, 0, layout)
    if layout.caption_height:
        top = layout.image_top + h
        out[top:] = CAPTION_RGB
        _draw_lines(out, layout.caption_lines, top, layout)
    return out


def save_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an RGB uint8 picture as PNG (lossless), e.g. for the CLI or a report; returns the path.

    OpenCV writes BGR, so the channels are swapped here once instead of at every caller.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {arr.dtype} {arr.shape}")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files only, got {target.name!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(target), cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not write PNG to {target}")
    logger.debug("wrote overlay PNG %s (%dx%d)", target, arr.shape[1], arr.shape[0])
    return target
