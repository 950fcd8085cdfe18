"""The CAM overlay: notice always visible, anatomy untouched where the map is zero, heat in place."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.overlay import BANNER_RGB, MAX_ALPHA, overlay_layout, render_cam_overlay, save_png
from inference.types import RESEARCH_NOTICE

CAPTIONS = ["MammoNode 0.1.0 efficientnet_b0", "P(malignancy) image 0.83  breast 0.91"]


def _breast(h: int = 256, w: int = 192) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = (xx / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2
    return np.clip(1.0 - r, 0.0, 1.0) ** 0.5 * 0.8


def _hot_square(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    cam = np.zeros(shape, dtype=np.float32)
    cam[y0:y1, x0:x1] = 3.0  # raw CAM units; the overlay normalises
    return cam


def _colourfulness(rgb: np.ndarray) -> np.ndarray:
    as_int = rgb.astype(np.int16)
    return as_int.max(axis=2) - as_int.min(axis=2)


def test_output_is_rgb_uint8_and_fits_max_size_keeping_aspect() -> None:
    image = np.random.default_rng(0).random((1500, 900)).astype(np.float32)
    out = render_cam_overlay(
        image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=CAPTIONS, max_size=512
    )
    assert out.dtype == np.uint8
    assert out.ndim == 3 and out.shape[2] == 3
    assert max(out.shape[:2]) <= 512
    layout = overlay_layout(1500, 900, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS, max_size=512)
    assert out.shape == layout.output_shape
    h, w = layout.image_shape
    assert abs(h / w - 1500 / 900) < 0.01


def test_notice_banner_differs_from_source_and_is_solid() -> None:
    image = _breast()
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=[])
    layout = overlay_layout(*image.shape, notice=RESEARCH_NOTICE, caption_lines=[])
    assert layout.banner_height > 0 and layout.image_top == layout.banner_height
    banner = out[: layout.banner_height]
    source_top = np.repeat(np.rint(image[: layout.banner_height] * 255).astype(np.uint8)[..., None], 3, 2)
    assert np.mean(np.any(banner != source_top, axis=2)) > 0.9
    # Mostly the solid banner colour, with white text drawn on it.
    assert np.mean(np.all(banner == BANNER_RGB, axis=2)) > 0.5
    assert np.any(np.all(banner == 255, axis=2))


def test_without_notice_there_is_no_banner() -> None:
    image = _breast()
    out = render_cam_overlay(image, np.zeros_like(image), notice=None, caption_lines=[])
    assert out.shape == (*image.shape, 3)
    expected = np.rint(image * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)


def test_zero_cam_leaves_breast_pixels_unchanged_grey() -> None:
    image = _breast()
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    layout = overlay_layout(*image.shape, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    region = out[layout.image_top : layout.image_top + layout.image_shape[0]]
    expected = np.rint(image * 255).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(region[..., channel], expected)
    # The caption strip sits below the image, not on the breast.
    assert layout.caption_height > 0
    assert out.shape[0] == layout.image_top + image.shape[0] + layout.caption_height


def test_hot_region_turns_coloured_at_the_right_place() -> None:
    image = _breast()
    cam = _hot_square(image.shape, 100, 140, 40, 80)
    out = render_cam_overlay(image, cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    layout = overlay_layout(*image.shape, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS)
    region = out[layout.image_top : layout.image_top + image.shape[0]]
    colour = _colourfulness(region)
    assert np.all(colour[100:140, 40:80] > 20)
    outside = np.ones(image.shape, dtype=bool)
    outside[100:140, 40:80] = False
    assert np.all(colour[outside] == 0)
    # Blended, not painted over: at most MAX_ALPHA of the colour, so the anatomy shows through.
    grey = np.rint(image * 255)[100:140, 40:80]
    diff = np.abs(region[100:140, 40:80].astype(np.float32) - grey[..., None])
    assert diff.max() <= MAX_ALPHA * 255 + 1


def test_hot_region_is_placed_correctly_after_downscaling() -> None:
    image = _breast(1200, 900)
    cam = _hot_square(image.shape, 600, 720, 300, 420)  # centre (660, 360)
    out = render_cam_overlay(image, cam, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS, max_size=400)
    layout = overlay_layout(1200, 900, notice=RESEARCH_NOTICE, caption_lines=CAPTIONS, max_size=400)
    region = out[layout.image_top : layout.image_top + layout.image_shape[0]]
    ys, xs = np.nonzero(_colourfulness(region) > 10)
    assert ys.size > 0
    assert abs(ys.mean() - 660 * layout.scale) < 3
    assert abs(xs.mean() - 360 * layout.scale) < 3


def test_long_text_wraps_within_the_picture() -> None:
    image = _breast(128, 96)
    caption = "weights sha256:" + "ab" * 32
    layout = overlay_layout(128, 96, notice=RESEARCH_NOTICE, caption_lines=[caption])
    assert len(layout.banner_lines) > 1
    assert len(layout.caption_lines) > 1
    out = render_cam_overlay(image, np.zeros_like(image), notice=RESEARCH_NOTICE, caption_lines=[caption])
    assert out.shape[1] == 96


def test_nan_and_negative_cam_values_are_treated_as_no_activation() -> None:
    image = _breast()
    cam = np.full(image.shape, -1.0, dtype=np.float32)
    cam[0:10, 0:10] = np.nan
    out = render_cam_overlay(image, cam, notice=None, caption_lines=[])
    assert np.all(_colourfulness(out) == 0)


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
