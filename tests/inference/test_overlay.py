"""The CAM overlay: the image's own pixel grid, anatomy untouched where the map is zero, heat in
place, and notice, caption and colour scale inside one corner panel on the side without tissue."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.overlay import (
    BANNER_RGB,
    MAX_ALPHA,
    MIN_ANNOTATED_SIDE,
    PANEL_RGB,
    blend_cam,
    colour_scale,
    overlay_layout,
    render_cam_overlay,
    save_png,
)
from inference.rendering import display_image
from inference.types import RESEARCH_NOTICE

CAPTIONS = ["L CC  image P 0.85", "L breast P 0.73 < threshold 0.77: no recall", "efficientnet_b0 0.1.0"]


def _breast(h: int = 256, w: int = 192, chest_wall: str = "left") -> np.ndarray:
    """A half-ellipse of bright tissue against the chest wall, air (0) elsewhere."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = xx if chest_wall == "left" else (w - 1 - xx)
    r = (dist / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2
    return np.clip(1.0 - r, 0.0, 1.0) ** 0.5 * 0.8


def _hot_square(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    cam = np.zeros(shape, dtype=np.float32)
    cam[y0:y1, x0:x1] = 3.0  # raw CAM units; the overlay normalises
    return cam


def _colourfulness(rgb: np.ndarray) -> np.ndarray:
    as_int = rgb.astype(np.int16)
    return as_int.max(axis=2) - as_int.min(axis=2)


def _outside_panel(shape: tuple[int, int], image: np.ndarray, **kwargs: object) -> np.ndarray:
    layout = overlay_layout(image, **kwargs)  # type: ignore[arg-type]
    mask = np.ones(shape, dtype=bool)
    if layout.panel is not None:
        mask[layout.panel.slices] = False
    return mask


@pytest.mark.parametrize("shape", [(1557, 877), (1487, 949), (2013, 1169), (256, 192), (128, 96), (64, 64)])
def test_picture_has_exactly_the_image_shape_with_no_strips(shape: tuple[int, int]) -> None:
    image = _breast(*shape)
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert out.dtype == np.uint8
    assert out.shape == (*shape, 3)
    layout = overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert layout.output_shape == out.shape
    assert layout.panel is not None and layout.bar is not None
    # The panel, and the colour bar inside it, lie within the image.
    panel, bar = layout.panel, layout.bar
    assert panel.top >= 0 and panel.top + panel.height <= shape[0]
    assert panel.left >= 0 and panel.left + panel.width <= shape[1]
    assert panel.top <= bar.top and bar.top + bar.height <= panel.top + panel.height
    assert panel.left <= bar.left and bar.left + bar.width <= panel.left + panel.width


@pytest.mark.parametrize("chest_wall", ["left", "right"])
def test_panel_sits_in_a_corner_away_from_the_breast(chest_wall: str) -> None:
    image = _breast(1557, 877, chest_wall)
    layout = overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert layout.corner is not None and not layout.corner.endswith(chest_wall)
    assert layout.panel is not None
    covered = image[layout.panel.slices]
    assert float(covered.mean()) < 0.1 * float(image.mean())  # it covers (almost) only air
    # Readable at a mammogram's display size, and a small part of the picture.
    assert layout.font is not None and layout.font.text_height >= 15
    assert layout.panel.height * layout.panel.width < 0.15 * image.size


def test_a_chest_wall_hint_breaks_ties_between_equally_dark_corners() -> None:
    blank = np.zeros((600, 400), dtype=np.float32)
    left = overlay_layout(blank, notice=None, caption_lines=CAPTIONS, chest_wall="left")
    right = overlay_layout(blank, notice=None, caption_lines=CAPTIONS, chest_wall="right")
    assert left.corner == "top-right" and right.corner == "top-left"
    # Tissue beats the hint: a hint pointing at the empty side is overruled by the pixels.
    wrong = overlay_layout(_breast(600, 400, "left"), notice=None, caption_lines=CAPTIONS, chest_wall="right")
    assert wrong.corner is not None and wrong.corner.endswith("right")


def test_notice_caption_and_colour_bar_are_burned_into_the_corner() -> None:
    image = _breast(1557, 877)
    cam = _hot_square(image.shape, 700, 800, 100, 200)
    plain = blend_cam(image, cam)
    out = render_cam_overlay(image, cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    layout = overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert layout.panel is not None and layout.bar is not None
    panel = out[layout.panel.slices]
    assert not np.array_equal(panel, plain[layout.panel.slices])
    # Outside the panel the picture is exactly the plain blend: nothing else was drawn on.
    outside = _outside_panel(image.shape, image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert np.array_equal(out[outside], plain[outside])
    # Red notice band, white text, and the colour bar exactly as the colour scale.
    assert np.all(panel[0] == BANNER_RGB)
    assert np.any(np.all(panel == 255, axis=2))
    assert np.any(np.all(panel == PANEL_RGB, axis=2))
    bar = out[layout.bar.slices]
    assert np.array_equal(bar, colour_scale(layout.bar.width, layout.bar.height))
    assert _colourfulness(bar).mean() > 100
    assert layout.notice_lines and " ".join(layout.notice_lines) == RESEARCH_NOTICE
    assert "no recall" in " ".join(layout.caption_lines)
    assert "mean + 1 SD" in " ".join(layout.legend_lines)


def test_without_notice_there_is_no_red_band() -> None:
    image = _breast()
    out = render_cam_overlay(image, np.zeros_like(image), notice=None, caption_lines=CAPTIONS)
    assert not np.any(np.all(out == BANNER_RGB, axis=2))


def test_zero_cam_leaves_breast_pixels_unchanged_grey() -> None:
    image = _breast()
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    outside = _outside_panel(image.shape, image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    expected = np.rint(image * 255).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(out[..., channel][outside], expected[outside])


def test_hot_region_turns_coloured_at_the_right_place() -> None:
    image = _breast(512, 384)
    cam = _hot_square(image.shape, 200, 280, 80, 160)
    out = render_cam_overlay(image, cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    outside = _outside_panel(image.shape, image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    colour = _colourfulness(out)
    assert np.all(colour[200:280, 80:160] > 20)
    cold = outside.copy()
    cold[200:280, 80:160] = False
    assert np.all(colour[cold] == 0)
    # Blended, not painted over: at most MAX_ALPHA of the colour, so the anatomy shows through.
    grey = np.rint(image * 255)[200:280, 80:160]
    diff = np.abs(out[200:280, 80:160].astype(np.float32) - grey[..., None])
    assert diff.max() <= MAX_ALPHA * 255 + 1


def test_hot_region_stays_in_place_on_the_display_copy_of_a_real_sized_image() -> None:
    """A 4463x2847 source is shown 3x smaller (exact blocks): the hot spot is at its place / 3."""
    image = _breast(4463, 2847)
    cam = _hot_square(image.shape, 2400, 2640, 600, 840)  # centre (2520, 720)
    small_image, small_cam = display_image(image), display_image(cam)
    assert small_image.shape == (4463 // 3, 2847 // 3)
    out = render_cam_overlay(small_image, small_cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    outside = _outside_panel(small_image.shape, small_image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    ys, xs = np.nonzero((_colourfulness(out) > 10) & outside)
    assert ys.size > 0
    assert abs(ys.mean() - 2520 / 3) < 2 and abs(xs.mean() - 720 / 3) < 2


def test_strength_scales_the_map_opacity() -> None:
    image = _breast()
    cam = _hot_square(image.shape, 100, 140, 40, 80)
    full = _colourfulness(blend_cam(image, cam))[100:140, 40:80].mean()
    faint = _colourfulness(blend_cam(image, cam, strength=0.1))[100:140, 40:80].mean()
    none = _colourfulness(blend_cam(image, cam, strength=0.0))[100:140, 40:80].mean()
    assert full > 5 * faint > 0 and none == 0


def test_long_text_wraps_within_the_picture() -> None:
    image = _breast(256, 192)
    caption = "weights sha256:" + "ab" * 32
    layout = overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=[caption])
    assert len(layout.notice_lines) > 1
    assert len(layout.caption_lines) > 1
    assert layout.panel is not None and layout.panel.width <= 192 and layout.panel.height <= 256
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=[caption])
    assert out.shape == (256, 192, 3)


def test_on_a_tiny_image_the_legend_text_and_captions_give_way_but_the_bar_stays() -> None:
    image = _breast(128, 96)
    layout = overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert layout.panel is not None and layout.bar is not None and layout.notice_lines
    assert layout.panel.height <= 128 and layout.panel.width <= 96
    assert layout.bar.top + layout.bar.height <= layout.panel.height
    assert len(layout.legend_lines) < len(
        overlay_layout(_breast(), notice=None, caption_lines=[]).legend_lines
    )


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (1, 3000), (MIN_ANNOTATED_SIDE - 1, 500)])
def test_images_too_small_for_text_get_the_map_only(shape: tuple[int, int]) -> None:
    image = np.full(shape, 0.5, dtype=np.float32)
    cam = np.ones(shape, dtype=np.float32)
    out = render_cam_overlay(image, cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    assert out.shape == (*shape, 3)
    assert overlay_layout(image, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS).panel is None
    assert np.array_equal(out, blend_cam(image, cam))


def test_nan_and_negative_cam_values_are_treated_as_no_activation() -> None:
    image = _breast()
    cam = np.full(image.shape, -1.0, dtype=np.float32)
    cam[0:10, 0:10] = np.nan
    assert np.all(_colourfulness(blend_cam(image, cam)) == 0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        render_cam_overlay(np.zeros((10, 10)), np.zeros((10, 11)), notice=None, caption_lines=[])
    with pytest.raises(ValueError, match="2-D"):
        render_cam_overlay(np.zeros((10, 10, 3)), np.zeros((10, 10, 3)), notice=None, caption_lines=[])


def test_save_png_round_trips_rgb(tmp_path: Path) -> None:
    image = _breast()
    out = render_cam_overlay(
        image, _hot_square(image.shape, 10, 50, 10, 50), notice=RESEARCH_NOTICE, caption_lines=CAPTIONS
    )
    path = save_png(out, tmp_path / "sub" / "cam.png")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None
    back = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, out)
    with pytest.raises(ValueError):
        save_png(out.astype(np.float32), tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_png(out, tmp_path / "cam.jpg")
