"""CAD marks: where the CAM points, as coordinates on the source image.

Every localising output (the Mammography CAD SR's single-image findings, the TID 1500 report's
image regions, the optional presentation state) takes its coordinates from here, so they agree.
A mark is one connected region of the thresholded CAM (seed 003: above mean + 1 std): its peak
(the CAM maximum inside it) and its outline, worked out on the model grid and mapped back through
the recorded :class:`~inference.types.GeometricTransform` to the source's pixel space.

Coordinates follow DICOM SCOORD (PS3.3 C.18.6.1.2): (column, row) pairs, where (0, 0) is the top
left corner of the top left pixel, so the centre of pixel (r, c) is (c + 0.5, r + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inference.cam import cam_to_grid, threshold_cam
from inference.types import GeometricTransform, ImageScore

MAX_MARKS = 2
"""At most this many regions per image (the strongest first)."""
SECONDARY_FRACTION = 0.5
"""A weaker region is marked only if its peak reaches this fraction of the strongest one."""
MAX_OUTLINE_POINTS = 64

Point = tuple[float, float]
"""(column, row) in source pixels, SCOORD convention."""


@dataclass(frozen=True)
class CamMark:
    """One region the model attends to on one image."""

    rank: int
    """1 for the strongest region of the image."""
    center: Point
    """The CAM peak inside the region."""
    outline: tuple[Point, ...]
    """A closed polygon around the region (first point repeated last)."""
    relative_activation: float
    """Peak activation over the image's strongest peak (1.0 for rank 1)."""


def grid_to_source(x: float, y: float, transform: GeometricTransform) -> Point:
    """A point on the model grid (continuous coordinates, (0, 0) at the grid's top left corner) as
    (column, row) on the source image; the inverse of crop, flip, scale and pad."""
    y0, y1, x0, x1 = transform.crop_box
    rh, rw = transform.resized_shape
    sx, sy = rw / (x1 - x0), rh / (y1 - y0)
    cx = (x - transform.pad_left) / sx
    cy = (y - transform.pad_top) / sy
    if transform.flipped:
        cx = (x1 - x0) - cx
    column = min(max(cx + x0, float(x0)), float(x1))
    row = min(max(cy + y0, float(y0)), float(y1))
    return (column, row)


def _content(grid: np.ndarray, transform: GeometricTransform) -> np.ndarray:
    """The grid with the padding zeroed (padding is not image)."""
    rh, rw = transform.resized_shape
    out = np.zeros_like(grid)
    top, left = transform.pad_top, transform.pad_left
    out[top : top + rh, left : left + rw] = grid[top : top + rh, left : left + rw]
    return out


def _outline(region: np.ndarray, transform: GeometricTransform) -> tuple[Point, ...]:
    """The convex hull of the region's cells (their corners, so a one-cell region is a square):
    never self-crossing, and it encloses every cell of the region."""
    ys, xs = np.nonzero(region)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]).astype(
        np.float32
    )
    hull = cv2.convexHull(corners)[:, 0, :]
    epsilon = 0.5
    while len(hull) > MAX_OUTLINE_POINTS:
        hull = cv2.approxPolyDP(hull, epsilon, closed=True)[:, 0, :]
        epsilon *= 2
    points = [grid_to_source(float(x), float(y), transform) for x, y in hull]
    return (*points, points[0])


def cam_marks(score: ImageScore, max_marks: int = MAX_MARKS) -> tuple[CamMark, ...]:
    """The image's marks, strongest first; none when the thresholded CAM keeps nothing."""
    transform = score.transform
    grid = _content(cam_to_grid(threshold_cam(score.cam), transform.input_shape), transform)
    mask = (grid > 0).astype(np.uint8)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    regions = []
    for label in range(1, count):
        region = labels == label
        values = np.where(region, grid, 0.0)
        peak_row, peak_col = (int(i) for i in np.unravel_index(int(np.argmax(values)), values.shape))
        regions.append((float(values[peak_row, peak_col]), peak_row, peak_col, region))
    regions.sort(key=lambda r: (-r[0], r[1], r[2]))
    if not regions or regions[0][0] <= 0:
        return ()
    strongest = regions[0][0]
    marks = []
    for rank, (peak, row, col, region) in enumerate(regions[:max_marks], start=1):
        if peak < SECONDARY_FRACTION * strongest:
            break
        center = grid_to_source(col + 0.5, row + 0.5, transform)
        marks.append(CamMark(rank, center, _outline(region, transform), peak / strongest))
    return tuple(marks)
