"""Mapping between the model grid and the original image pixels.

Preprocessing records a :class:`~inference.types.GeometricTransform`; everything that draws a map
back on the source image (CAM overlays, lesion masks for evaluation) goes through these two
functions, so the geometry is written once.
"""

from __future__ import annotations

import cv2
import numpy as np

from inference.types import GeometricTransform


def grid_to_original(grid_map: np.ndarray, transform: GeometricTransform) -> np.ndarray:
    """Draw a map given on the model grid back onto the original image (zeros outside the crop).

    ``grid_map`` has ``transform.input_shape``; the result has ``transform.original_shape``.
    Interpolation is bilinear, so a smooth map stays smooth.
    """
    if grid_map.shape != tuple(transform.input_shape):
        raise ValueError(f"map shape {grid_map.shape} != model grid {transform.input_shape}")
    rh, rw = transform.resized_shape
    content = grid_map[
        transform.pad_top : transform.pad_top + rh, transform.pad_left : transform.pad_left + rw
    ].astype(np.float32)
    y0, y1, x0, x1 = transform.crop_box
    crop = cv2.resize(content, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    if transform.flipped:
        crop = crop[:, ::-1]
    out = np.zeros(transform.original_shape, dtype=np.float32)
    out[y0:y1, x0:x1] = crop
    return out


def original_to_grid(
    image: np.ndarray, transform: GeometricTransform, interpolation: int = cv2.INTER_AREA
) -> np.ndarray:
    """Apply the forward transform (crop, flip, scale, pad) to an original-sized array.

    Used for the pixels themselves and for lesion masks (pass ``cv2.INTER_NEAREST`` or keep the
    default area interpolation to get fractional coverage).
    """
    if image.shape[:2] != tuple(transform.original_shape):
        raise ValueError(f"image shape {image.shape[:2]} != original {transform.original_shape}")
    y0, y1, x0, x1 = transform.crop_box
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    if transform.flipped:
        crop = np.ascontiguousarray(crop[:, ::-1])
    rh, rw = transform.resized_shape
    resized = cv2.resize(crop.astype(np.float32), (rw, rh), interpolation=interpolation)
    out = np.zeros(transform.input_shape, dtype=np.float32)
    out[transform.pad_top : transform.pad_top + rh, transform.pad_left : transform.pad_left + rw] = resized
    return out
