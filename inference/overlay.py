"""Render a class-activation map over the source mammogram as an RGB picture for humans.

The picture is what the radiologist sees in PACS next to the original views (the CAM secondary
capture). It has exactly the pixel grid of the image it is drawn over -- same rows and columns,
nothing added around it -- so a viewer can hang it by view, link its pan and zoom to the source
and measure on it (:mod:`inference.writers.sc` records the pixel spacing):

* the greyscale anatomy stays visible: colour is blended in only where the thresholded map is
  positive, with an opacity proportional to the activation and never above ``MAX_ALPHA``
  (times ``strength``);
* the notice (research use, synthetic training data...), the caption (scores and the breast's
  decision) and a colour scale saying what the colours mean sit in one solid panel *inside* the
  image, in the corner with the least tissue: of the four corners, the one whose panel footprint
  is darkest (dense tissue is bright), ties going to the side away from the chest wall when the
  caller knows it. Film labels and breast tissue are bright, air is dark, so the panel lands on
  air;
* text is drawn white with a black outline and sized from the image's longest side (shrunk only
  as far as needed for the panel to fit), wrapped to the panel width, so it stays legible from
  128-pixel test images to 2048-pixel mammograms. On an image too small for all of it the legend
  text goes first, then the model line and the other captions; images too small for any legible
  text (shorter side under ``MIN_ANNOTATED_SIDE``) get the map only. The SC header carries the
  notice and the scores either way.

Only numpy and OpenCV are used; the DICOM wrapping lives in :mod:`inference.writers.sc`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

logger = logging.getLogger(__name__)

MAX_ALPHA = 0.5
"""Opacity of the colour at the strongest activation; weaker activations are more transparent."""

COLORMAP = cv2.COLORMAP_TURBO
"""Perceptually smoother than JET and still the familiar blue-to-red heat scale."""

BANNER_RGB = (150, 0, 0)
"""Dark red behind the notice: a warning colour that cannot be mistaken for the greyscale image."""

PANEL_RGB = (0, 0, 0)
"""Behind the caption and the colour scale."""

DEFAULT_LEGEND = (
    "Colour: CAM activation above mean + 1 SD, relative to this image's strongest; not a probability"
)
"""What the colour bar means (the map is thresholded by :func:`inference.cam.threshold_cam`)."""

LEGEND_LOW, LEGEND_HIGH = "low", "high"

MIN_ANNOTATED_SIDE = 64
"""Below this many pixels on the shorter side no text is legible: the image gets no panel."""

ChestWall = Literal["left", "right"]
Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
CORNERS: tuple[Corner, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_RGB = (255, 255, 255)
_OUTLINE_RGB = (0, 0, 0)
# Cap height of the text as a fraction of the image's longest side (about 17 pixels on a 1557-row
# display copy of a mammogram), clamped to stay legible on small images.
_TEXT_HEIGHT_FRACTION = 0.011
_MIN_TEXT_HEIGHT = 9
_MAX_TEXT_HEIGHT = 40
_FONT_STEP = 0.85
# The panel is tried at these fractions of the image width, narrowest first, at each font size
# from the target down, and accepted when it takes at most this fraction of the image height.
_WIDTH_FRACTIONS = (0.45, 0.6, 0.8, 1.0)
_MAX_HEIGHT_FRACTION = 0.4
# A corner on the chest-wall side must be this much darker (in [0, 1] display units) to be chosen.
_CHEST_WALL_PENALTY = 0.03


@dataclass(frozen=True)
class Box:
    """A rectangle of pixels: rows ``top : top + height``, columns ``left : left + width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class Font:
    """Hershey font scale and the metrics of one text line drawn with it."""

    scale: float
    thickness: int
    text_height: int
    line_height: int
    padding: int


@dataclass(frozen=True)
class OverlayLayout:
    """Where the annotation panel sits in the picture and what it holds.

    The picture has ``image_shape``; ``panel`` is ``None`` when the image is too small for text.
    ``bar`` (the colour scale) is in picture coordinates and lies inside ``panel``; so does every
    drawn glyph (the panel is drawn on its own copy and pasted back).
    """

    image_shape: tuple[int, int]
    panel: Box | None
    corner: Corner | None
    notice_lines: tuple[str, ...]
    caption_lines: tuple[str, ...]
    legend_lines: tuple[str, ...]
    bar: Box | None
    font: Font | None

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.image_shape[0], self.image_shape[1], 3)


@dataclass(frozen=True)
class _Content:
    """The wrapped text of a panel at one font and width, and the panel size it needs."""

    font: Font
    notice: tuple[str, ...]
    captions: tuple[str, ...]
    legend: tuple[str, ...]
    height: int
    width: int


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only; anything else would silently become '?' boxes."""
    return text.encode("ascii", errors="replace").decode("ascii")


def _font(cap_height: int) -> Font:
    (_, base_h), _ = cv2.getTextSize("Ag", _FONT, 1.0, 1)
    scale = cap_height / max(base_h, 1)
    thickness = max(1, round(scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    padding = max(3, cap_height // 2)
    line_height = text_h + baseline + thickness + 2 + padding // 2
    return Font(scale, thickness, text_h, line_height, padding)


def _text_width(text: str, font: Font) -> int:
    (w, _), _ = cv2.getTextSize(text, _FONT, font.scale, font.thickness)
    # The outline reaches about one stroke beyond the glyphs on each side.
    return int(w) + 2 * font.thickness


def _wrap(text: str, max_width: int, font: Font) -> list[str]:
    """Greedy word wrap; a single word wider than the panel is cut rather than shrunk."""
    lines: list[str] = []
    current = ""
    for word in _ascii(text).split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font) <= max_width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
        while _text_width(current, font) > max_width and len(current) > 1:
            # Hard-cut an over-long token (e.g. a hash) so nothing is drawn off the panel.
            cut = len(current) - 1
            while cut > 1 and _text_width(current[:cut], font) > max_width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    return lines


def _bar_height(font: Font) -> int:
    return max(4, font.text_height)


def _panel_height(font: Font, notice: int, captions: int, legend: int) -> int:
    """Rows of a panel with these numbers of wrapped lines (the bar and its labels included)."""
    lines = notice + captions + legend + 1  # + the bar's labels
    height = lines * font.line_height + _bar_height(font) + 2 * font.padding
    return height + (font.padding if notice else 0)  # the notice band has its own bottom margin


def _measure(
    notice: str | None, captions: Sequence[str], legend: str, font: Font, max_width: int
) -> _Content:
    """Wrap everything to ``max_width`` and size the panel: notice band, captions, scale."""
    inner = max(1, max_width - 2 * font.padding)
    notice_lines = _wrap(notice, inner, font) if notice else []
    caption_lines = [line for caption in captions for line in _wrap(caption, inner, font)]
    legend_lines = _wrap(legend, inner, font)
    text = [*notice_lines, *caption_lines, *legend_lines, f"{LEGEND_LOW} {LEGEND_HIGH}"]
    widest = max(_text_width(line, font) for line in text)
    width = min(max_width, widest + 2 * font.padding)
    height = _panel_height(font, len(notice_lines), len(caption_lines), len(legend_lines))
    return _Content(font, tuple(notice_lines), tuple(caption_lines), tuple(legend_lines), height, width)


def _trimmed(content: _Content, max_height: int) -> _Content | None:
    """``content`` cut to ``max_height`` rows: the legend text goes first, then the captions from
    the last (the model line) up, then the notice's last lines; the bar stays. ``None`` when not
    even the bar and its labels fit."""
    notice, captions, legend = list(content.notice), list(content.captions), list(content.legend)
    height = content.height
    while height > max_height and (legend or captions or notice):
        (legend or captions or notice).pop()
        height = _panel_height(content.font, len(notice), len(captions), len(legend))
    if height > max_height:
        return None
    return _Content(content.font, tuple(notice), tuple(captions), tuple(legend), height, content.width)


def _fit(
    height: int, width: int, notice: str | None, captions: Sequence[str], legend: str
) -> _Content | None:
    """The largest font (then the narrowest panel) whose panel takes at most
    ``_MAX_HEIGHT_FRACTION`` of the image height; failing that, the smallest font at full width
    with what fits of the text (:func:`_trimmed`)."""
    target = int(
        np.clip(round(max(height, width) * _TEXT_HEIGHT_FRACTION), _MIN_TEXT_HEIGHT, _MAX_TEXT_HEIGHT)
    )
    sizes = [target]
    while sizes[-1] > _MIN_TEXT_HEIGHT:
        sizes.append(max(_MIN_TEXT_HEIGHT, int(sizes[-1] * _FONT_STEP)))
    content: _Content | None = None
    for size in sizes:
        font = _font(size)
        for fraction in _WIDTH_FRACTIONS:
            content = _measure(notice, captions, legend, font, max(1, int(width * fraction)))
            if content.height <= _MAX_HEIGHT_FRACTION * height:
                return content
    assert content is not None  # the last one tried: smallest font, full width
    logger.debug("overlay text does not fit a %dx%d image; drawing what fits", height, width)
    return _trimmed(content, height)


def _corner_box(corner: Corner, panel_h: int, panel_w: int, height: int, width: int) -> Box:
    top = 0 if corner.startswith("top") else height - panel_h
    left = 0 if corner.endswith("left") else width - panel_w
    return Box(top, left, panel_h, panel_w)


def _choose_corner(image: np.ndarray, panel_h: int, panel_w: int, chest_wall: ChestWall | None) -> Corner:
    """The corner whose panel footprint is darkest; a corner on the chest-wall side must be
    clearly darker to win. Ties go top before bottom, then in :data:`CORNERS` order."""
    height, width = image.shape

    def cost(corner: Corner) -> float:
        rows, cols = _corner_box(corner, panel_h, panel_w, height, width).slices
        penalty = _CHEST_WALL_PENALTY if chest_wall is not None and corner.endswith(chest_wall) else 0.0
        return float(image[rows, cols].mean()) + penalty

    return min(CORNERS, key=cost)


def overlay_layout(
    image01: np.ndarray,
    *,
    notice: str | None,
    caption_lines: Sequence[str],
    legend: str = DEFAULT_LEGEND,
    chest_wall: ChestWall | None = None,
) -> OverlayLayout:
    """Size the annotation panel for this image and put it in the corner with the least tissue.

    ``image01`` is the greyscale image the picture is drawn over (dense tissue bright), in [0, 1]
    or as 8-bit grey levels (:func:`grey_levels`). ``chest_wall`` is the image side the breast lies
    against, when the caller knows it (from the source's Patient Orientation); the darkest-corner
    rule alone also works without it.
    """
    image = np.asarray(image01)
    image = image / np.float32(255.0) if image.dtype == np.uint8 else image.astype(np.float32, copy=False)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be non-empty 2-D greyscale, got shape {image.shape}")
    height, width = image.shape
    if min(height, width) < MIN_ANNOTATED_SIDE:
        logger.debug("image %dx%d is too small for a legible annotation panel", height, width)
        return OverlayLayout((height, width), None, None, (), (), (), None, None)
    content = _fit(height, width, notice, caption_lines, legend)
    if content is None:
        return OverlayLayout((height, width), None, None, (), (), (), None, None)
    panel_h, panel_w = min(content.height, height), min(content.width, width)
    corner = _choose_corner(np.nan_to_num(image, nan=1.0), panel_h, panel_w, chest_wall)
    panel = _corner_box(corner, panel_h, panel_w, height, width)
    font = content.font
    lines_above_bar = len(content.notice) + len(content.captions) + len(content.legend)
    bar_top = font.padding + lines_above_bar * font.line_height + (font.padding if content.notice else 0)
    bar = Box(
        panel.top + bar_top,
        panel.left + font.padding,
        _bar_height(font),
        max(1, panel_w - 2 * font.padding),
    )
    return OverlayLayout(
        (height, width), panel, corner, content.notice, content.captions, content.legend, bar, font
    )


def _draw_text(canvas: np.ndarray, text: str, x: int, baseline_y: int, font: Font) -> None:
    """White text with a black outline. The outline is the same stroke drawn at small offsets: a
    thicker stroke would change the Hershey glyph advance and the two strings would drift apart."""
    reach = max(1, (font.thickness + 1) // 2)
    for dx in (-reach, 0, reach):
        for dy in (-reach, 0, reach):
            if dx or dy:
                org = (x + dx, baseline_y + dy)
                cv2.putText(canvas, text, org, _FONT, font.scale, _OUTLINE_RGB, font.thickness, cv2.LINE_AA)
    cv2.putText(canvas, text, (x, baseline_y), _FONT, font.scale, _TEXT_RGB, font.thickness, cv2.LINE_AA)


def _draw_lines(canvas: np.ndarray, lines: Sequence[str], top: int, font: Font) -> int:
    """Draw ``lines`` from row ``top`` of ``canvas``; returns the row below the last one."""
    for line in lines:
        _draw_text(canvas, line, font.padding, top + font.text_height + font.thickness, font)
        top += font.line_height
    return top


def colour_scale(width: int, height: int) -> np.ndarray:
    """The colour bar: :data:`COLORMAP` from no activation (left) to the strongest (right), RGB."""
    ramp = np.rint(np.linspace(0.0, 255.0, max(1, width))).astype(np.uint8)[None, :]
    rgb = cv2.cvtColor(cv2.applyColorMap(ramp, COLORMAP), cv2.COLOR_BGR2RGB)
    return np.repeat(rgb, max(1, height), axis=0)


def _draw_panel(picture: np.ndarray, layout: OverlayLayout) -> None:
    """Paint the panel (notice band, captions, legend, colour bar and its labels) in place.

    Drawn on a copy of the panel's pixels and pasted back, so nothing outside the panel changes.
    """
    if layout.panel is None or layout.font is None or layout.bar is None:
        return
    font, panel, bar = layout.font, layout.panel, layout.bar
    canvas = np.empty((panel.height, panel.width, 3), dtype=np.uint8)
    canvas[:] = PANEL_RGB
    y = font.padding
    if layout.notice_lines:
        band = font.padding + len(layout.notice_lines) * font.line_height + font.padding // 2
        canvas[:band] = BANNER_RGB
        y = _draw_lines(canvas, layout.notice_lines, y, font) + font.padding
    y = _draw_lines(canvas, layout.caption_lines, y, font)
    _draw_lines(canvas, layout.legend_lines, y, font)
    bar_rows = slice(bar.top - panel.top, bar.top - panel.top + bar.height)
    bar_cols = slice(bar.left - panel.left, bar.left - panel.left + bar.width)
    canvas[bar_rows, bar_cols] = colour_scale(bar.width, bar.height)[: canvas[bar_rows, bar_cols].shape[0]]
    label_y = bar.top - panel.top + bar.height + font.text_height + font.thickness + font.padding // 2
    _draw_text(canvas, LEGEND_LOW, font.padding, label_y, font)
    high_x = max(font.padding, panel.width - font.padding - _text_width(LEGEND_HIGH, font))
    _draw_text(canvas, LEGEND_HIGH, high_x, label_y, font)
    picture[panel.slices] = canvas


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


def grey_levels(image01: np.ndarray) -> np.ndarray:
    """The 8-bit grey levels a picture shows of an image in [0, 1] (values outside clipped, NaN
    black); uint8 input is grey levels already and is returned as it is.

    The display copy of a source is kept as these (:func:`inference.rendering.display_image`):
    they are all the blend uses, and a quarter of float32 to carry between processes.
    """
    arr = np.asarray(image01)
    if arr.dtype == np.uint8:
        return arr
    img = _sanitised(arr, high=1.0, posinf=1.0)
    return np.rint(img * np.float32(255.0)).astype(np.uint8)  # img is in [0, 1]: no clipping


def blend_cam(image01: np.ndarray, cam_map: np.ndarray, *, strength: float = 1.0) -> np.ndarray:
    """The greyscale image (in [0, 1] or :func:`grey_levels`) as RGB with the map's colour blended
    in where the map is positive.

    Pixels where the map is zero keep exactly the grey value of the image. The colour's opacity is
    ``MAX_ALPHA * strength * activation / peak``.
    """
    grey8 = grey_levels(image01)
    heat = _sanitised(cam_map, high=np.inf, posinf=0.0)
    rgb = np.repeat(grey8[:, :, None], 3, axis=2)
    peak = float(heat.max()) if heat.size else 0.0
    opacity = MAX_ALPHA * float(np.clip(np.nan_to_num(strength), 0.0, 1.0))
    if peak <= 0.0 or opacity <= 0.0:
        logger.debug("CAM map is empty or fully transparent; overlay shows the greyscale image only")
        return rgb
    # Only the map's bounding box is blended: the thresholded map is zero over most of the image.
    rows = np.flatnonzero(heat.max(axis=1) > 0.0)
    cols = np.flatnonzero(heat.max(axis=0) > 0.0)
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    norm = heat[box] / np.float32(peak)
    active = norm > 0.0
    colour_bgr = cv2.applyColorMap(np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8), COLORMAP)
    colour = cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = (opacity * norm)[:, :, None]
    grey = rgb[box]
    blended = grey.astype(np.float32) * (1.0 - alpha) + colour * alpha
    blended_u8 = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    rgb[box] = np.where(active[:, :, None], blended_u8, grey)
    return rgb


def render_cam_overlay(
    image01: np.ndarray,
    cam_map: np.ndarray,
    *,
    notice: str | None,
    caption_lines: Sequence[str],
    legend: str = DEFAULT_LEGEND,
    strength: float = 1.0,
    chest_wall: ChestWall | None = None,
) -> np.ndarray:
    """Blend a thresholded CAM over the greyscale image and burn in notice, captions and scale.

    ``image01`` is the windowed image in [0, 1] (values outside are clipped) or its
    :func:`grey_levels`, already at the size
    the picture should have (:func:`inference.rendering.display_image`); ``cam_map`` has the same
    shape, is >= 0, and is zero wherever the model did not activate. Returns an ``(H, W, 3)``
    uint8 RGB picture of exactly the image's shape: the blend (:func:`blend_cam`) with the
    annotation panel of :func:`overlay_layout` painted into one corner. ``strength`` in [0, 1]
    scales the colour's opacity (1: the map is always shown; the pipeline passes the image's
    probability only when told to fade the maps of images the model finds benign).
    """
    image = np.asarray(image01)
    cam = np.asarray(cam_map)
    if image.ndim != 2:
        raise ValueError(f"image01 must be 2-D greyscale, got shape {image.shape}")
    if cam.shape != image.shape:
        raise ValueError(f"cam_map shape {cam.shape} != image shape {image.shape}")
    grey = grey_levels(image)
    rgb = blend_cam(grey, cam, strength=strength)
    layout = overlay_layout(
        grey,
        notice=notice,
        caption_lines=caption_lines,
        legend=legend,
        chest_wall=chest_wall,
    )
    _draw_panel(rgb, layout)
    return rgb


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
