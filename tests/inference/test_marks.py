"""CAD marks land where the CAM peaks, on the source image, through every geometric transform."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference.cam import cam_peak, cam_to_original
from inference.marks import cam_marks, grid_to_source
from inference.types import GeometricTransform, ImageMeta, ImageScore

META = ImageMeta("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3", "1.2.3.5", "P1", "L", "CC")


def _transform(flipped: bool) -> GeometricTransform:
    # A 4463 x 2847 source cropped to rows 100..4300, columns 300..2700, scaled onto a 512 x 256 grid.
    crop = (100, 4300, 300, 2700)
    scale = min(512 / 4200, 256 / 2400)
    rh, rw = round(4200 * scale), round(2400 * scale)
    return GeometricTransform(
        (4463, 2847), crop, flipped, scale, (512 - rh) // 2, (256 - rw) // 2, (512, 256)
    )


def _score(cam: np.ndarray, transform: GeometricTransform) -> ImageScore:
    return ImageScore(META, 1.0, 0.73, cam.astype(np.float32), transform)


def test_a_grid_corner_maps_to_the_crop_corner() -> None:
    t = _transform(False)
    rh, rw = t.resized_shape
    assert grid_to_source(t.pad_left, t.pad_top, t) == pytest.approx((300, 100))
    assert grid_to_source(t.pad_left + rw, t.pad_top + rh, t) == pytest.approx((2700, 4300))
    flipped = _transform(True)
    assert grid_to_source(flipped.pad_left, flipped.pad_top, flipped) == pytest.approx((2700, 100))


@pytest.mark.parametrize("flipped", [False, True])
def test_the_center_is_the_cam_peak_on_the_source(flipped: bool) -> None:
    t = _transform(flipped)
    cam = np.zeros((16, 8), np.float32)
    cam[5, 2], cam[5, 3], cam[6, 2] = 3.0, 2.0, 1.5  # one region, peak at (5, 2)
    (mark,) = cam_marks(_score(cam, t))
    on_source = cam_to_original(cam, t)
    # The map's maximum is a small plateau (clipped bicubic); the centre lies on it.
    assert on_source[int(mark.center[1]), int(mark.center[0])] >= 0.99 * on_source.max()
    row, _ = cam_peak(on_source)
    assert abs(mark.center[1] - (row + 0.5)) <= 2 * 2400 / t.resized_shape[1]
    xs, ys = zip(*mark.outline, strict=True)
    assert mark.outline[0] == mark.outline[-1] and len(mark.outline) >= 4
    assert min(xs) <= mark.center[0] <= max(xs) and min(ys) <= mark.center[1] <= max(ys)
    assert all(300 <= x <= 2700 and 100 <= y <= 4300 for x, y in mark.outline)
    polygon = np.array(mark.outline[:-1], np.float32)
    assert cv2.isContourConvex(polygon)  # never self-crossing
    assert cv2.pointPolygonTest(polygon, mark.center, measureDist=False) >= 0


def test_two_regions_strongest_first_and_weak_ones_dropped() -> None:
    t = _transform(False)
    cam = np.zeros((16, 8), np.float32)
    cam[3, 1], cam[12, 6], cam[8, 4] = 4.0, 3.0, 0.9
    marks = cam_marks(_score(cam, t), max_marks=3)
    assert [m.rank for m in marks] == [1, 2]
    assert marks[0].center[1] < marks[1].center[1]  # the row-3 peak is the strongest
    assert marks[0].relative_activation == 1.0 and 0.5 <= marks[1].relative_activation < 1.0


def test_a_flat_cam_has_no_marks() -> None:
    assert cam_marks(_score(np.ones((16, 8)), _transform(False))) == ()
