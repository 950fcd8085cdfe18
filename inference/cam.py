"""From the class-activation matrix (feature grid) to a map on the original image.

Seed 003: keep the activations above mean + 1 std, upscale the matrix smoothly to the image and
overlay it. The model emits the matrix on its feature grid (input / 32 for EfficientNet); here it
is thresholded, interpolated to the model grid, then drawn back through the recorded
:class:`~inference.types.GeometricTransform` (crop, flip, scale, pad) by
:func:`inference.geometry.grid_to_original`, so the map lands on the pixels the radiologist sees.

numpy/OpenCV only (torch-free).
"""

from __future__ import annotations

import cv2
import numpy as np

from inference.geometry import grid_to_display
from inference.types import GeometricTransform


def _as_2d(cam: np.ndarray) -> np.ndarray:
    arr = np.asarray(cam, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("map contains NaN or infinite values")
    return arr


def threshold_cam(cam: np.ndarray) -> np.ndarray:
    """Keep the cells above ``mean + 1 std`` (seed 003); all others become 0.

    Kept cells are returned as their excess over the threshold (``cam - t``), not their raw value:
    the selected region is the seed's, but 0 then always means "below threshold". With raw values
    a mostly negative matrix (the normal case for a negative image, whose logit is mean(M) + b)
    would keep negative hot spots below the zeroed background and the display would be inverted.
    A constant matrix has no cell above its mean and gives all zeros.
    """
    arr = _as_2d(cam)
    t = float(arr.mean() + arr.std())
    return np.where(arr > t, arr - t, 0.0).astype(np.float32)


def cam_to_grid(cam: np.ndarray, input_shape: tuple[int, int]) -> np.ndarray:
    """Upsample the feature-grid matrix to the model grid ``input_shape`` (height, width).

    Bicubic for a smooth map (seed 003), clipped to the matrix's own range so cubic overshoot
    cannot create activation (or negative halos) that the model never produced. OpenCV's
    half-pixel alignment puts each feature cell over the block of input pixels it summarises.
    """
    arr = _as_2d(cam)
    height, width = int(input_shape[0]), int(input_shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"invalid model grid {input_shape}")
    up = cv2.resize(arr, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(up, arr.min(), arr.max()).astype(np.float32)


def cam_to_original(
    cam: np.ndarray, transform: GeometricTransform, *, thresholded: bool = True, factor: int = 1
) -> np.ndarray:
    """The CAM on the original image's pixel grid (``transform.original_shape``), 0 outside the
    crop; with ``factor`` > 1 on that grid shrunk by ``factor`` (a capture's display,
    :func:`inference.geometry.grid_to_display`)."""
    arr = threshold_cam(cam) if thresholded else _as_2d(cam)
    grid = cam_to_grid(arr, transform.input_shape)
    return grid_to_display(grid, transform, factor)


def normalise_cam(cam_map: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1] for display; a constant map (nothing to show) gives zeros."""
    arr = _as_2d(cam_map)
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(arr)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def cam_peak(cam_map: np.ndarray) -> tuple[int, int]:
    """(row, column) of the maximum; the first one in row-major order on ties."""
    arr = _as_2d(cam_map)
    row, col = np.unravel_index(int(np.argmax(arr)), arr.shape)
    return int(row), int(col)
