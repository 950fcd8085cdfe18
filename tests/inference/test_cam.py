"""CAM post-processing: seed-003 threshold, smooth upsampling, and drawing back on the original."""

from __future__ import annotations

import numpy as np
import pytest

from inference.cam import cam_peak, cam_to_grid, cam_to_original, normalise_cam, threshold_cam
from inference.types import GeometricTransform

# Original 400x300; crop rows 40..360, cols 20..220 (320x200); flip; scale 0.2 -> 64x40; pasted
# at column 24 of a 64x64 model grid.
TRANSFORM = GeometricTransform(
    original_shape=(400, 300),
    crop_box=(40, 360, 20, 220),
    flipped=True,
    scale=0.2,
    pad_top=0,
    pad_left=24,
    input_shape=(64, 64),
)


def _hot_cell_cam(row: int, col: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    cam = np.full(shape, -2.0, dtype=np.float32)  # a negative background, as for most images
    cam[row, col] = 3.0
    return cam


def test_threshold_keeps_cells_above_mean_plus_std() -> None:
    cam = np.array([[0.0, 0.0], [0.0, 4.0]], dtype=np.float32)
    # mean 1, std sqrt(3): only the 4 survives, as its excess over the threshold
    out = threshold_cam(cam)
    np.testing.assert_allclose(out, [[0, 0], [0, 4 - (1 + np.sqrt(3))]], rtol=1e-6)
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=(8, 4)).astype(np.float32)
    assert np.array_equal(threshold_cam(noisy) > 0, noisy > noisy.mean() + noisy.std())
    assert not threshold_cam(np.full((4, 2), 5.0, np.float32)).any()


def test_threshold_never_inverts_a_negative_cam() -> None:
    out = threshold_cam(_hot_cell_cam(3, 5))
    assert out.min() == 0.0
    assert cam_peak(out) == (3, 5)
    assert np.count_nonzero(out) == 1


def test_cam_to_grid_is_smooth_and_does_not_overshoot() -> None:
    cam = threshold_cam(_hot_cell_cam(4, 10))
    grid = cam_to_grid(cam, (64, 64))
    assert grid.shape == (64, 64) and grid.dtype == np.float32
    assert grid.min() >= 0.0 and grid.max() <= cam.max() + 1e-6
    r, c = cam_peak(grid)
    assert 16 <= r < 20 and 40 <= c < 44  # the 4x4 block the cell covers
    assert np.count_nonzero(grid) > 16  # interpolated, not nearest-neighbour blocks


def test_hot_cell_lands_on_the_right_region_of_the_original() -> None:
    # Cell (4, 10) of a 16x16 grid covers model rows 16..20, cols 40..44 -> content cols 16..20
    # -> crop rows 80..100, flipped crop cols 80..100 -> unflipped 100..120 of the 200-wide crop
    # -> original rows 120..140, cols 120..140.
    for thresholded in (True, False):
        out = cam_to_original(_hot_cell_cam(4, 10), TRANSFORM, thresholded=thresholded)
        assert out.shape == (400, 300)
        r, c = cam_peak(out)
        assert 120 <= r < 140 and 120 <= c < 140, (thresholded, r, c)
    out = cam_to_original(_hot_cell_cam(4, 10), TRANSFORM)
    assert not out[:40].any() and not out[360:].any() and not out[:, :20].any() and not out[:, 220:].any()
    heat = normalise_cam(out)
    mass = heat.sum()
    assert heat[100:160, 100:160].sum() > 0.95 * mass  # nearly all activation near the cell
    # Without the flip the same cell would have landed on the mirror side (cols 100..120 -> 80..100
    # of the crop): make sure we are not there.
    assert heat[120:140, 100:120].sum() < heat[120:140, 120:140].sum()


def test_normalise_and_peak() -> None:
    m = np.array([[1.0, 3.0], [2.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(normalise_cam(m), [[0, 0.5], [0.25, 1]])
    assert cam_peak(m) == (1, 1)
    assert not normalise_cam(np.ones((3, 3), np.float32)).any()


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2)), np.zeros((0, 3)), np.array([[np.nan, 0.0]])])
def test_invalid_maps_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        threshold_cam(bad)


@pytest.mark.parametrize("flipped", [True, False])
@pytest.mark.parametrize("factor", [2, 3])
def test_the_map_drawn_on_a_display_grid_is_the_shrunk_full_size_map(flipped: bool, factor: int) -> None:
    """A capture's CAM, drawn directly at its display size, is the full-size map's block average
    (as the capture's display copy is the source's): the same everywhere but at the crop's border."""
    from inference.rendering import shrink

    transform = GeometricTransform(
        original_shape=(3329, 2561),  # odd, so the display drops a last row and column
        crop_box=(101, 3302, 0, 1733),
        flipped=flipped,
        scale=512 / 3201,
        pad_top=0,
        pad_left=0,
        input_shape=(512, 256),
    )
    rng = np.random.default_rng(factor)
    cam = rng.normal(size=(16, 8)).astype(np.float32)
    cam[5, 3] = 6.0
    full = shrink(cam_to_original(cam, transform), factor)
    direct = cam_to_original(cam, transform, factor=factor)
    assert direct.shape == full.shape == (3329 // factor, 2561 // factor) and direct.dtype == np.float32
    y0, y1, x0, x1 = (round(v / factor) for v in transform.crop_box)
    border = np.zeros(full.shape, dtype=bool)
    border[max(0, y0 - 1) : y0 + 1] = border[y1 - 1 : y1 + 1] = True
    border[:, max(0, x0 - 1) : x0 + 1] = border[:, x1 - 1 : x1 + 1] = True
    np.testing.assert_allclose(direct[~border], full[~border], rtol=0, atol=1e-3 * full.max())
    assert not direct[: y0 - 1].any() and not direct[y1 + 1 :].any() and not direct[:, x1 + 1 :].any()
    peak = cam_peak(cam_to_original(cam, transform))  # on a plateau: the first of its pixels
    assert all(abs(d - p // factor) <= 1 for d, p in zip(cam_peak(direct), peak, strict=True))
