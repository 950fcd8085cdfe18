"""Mapping between the model grid and the original image pixels.

Preprocessing records a :class:`~inference.types.GeometricTransform`; everything that draws a map
back on the source image (CAM overlays, lesion masks for evaluation) goes through these two
functions, so the geometry is written once.
"""

from __future__ import annotations

import math

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


def grid_to_display(grid_map: np.ndarray, transform: GeometricTransform, factor: int) -> np.ndarray:
    """:func:`grid_to_original` on the original image shrunk by ``factor`` (a capture's display grid:
    ``original_shape // factor``, as :func:`inference.rendering.shrink` makes it), drawn there
    directly.

    Each display pixel takes the bilinear value at the centre of the ``factor`` x ``factor`` source
    block it shows, where drawing at full size and averaging the blocks costs ~40 ms and 35 MB per
    mammogram (~200 ms at factor 3). The two agree but at the crop's border, where a block the
    crop covers in part gets the map's value or zero (by its centre) rather than a fraction.
    """
    if factor <= 1:
        return grid_to_original(grid_map, transform)
    if grid_map.shape != tuple(transform.input_shape):
        raise ValueError(f"map shape {grid_map.shape} != model grid {transform.input_shape}")
    rh, rw = transform.resized_shape
    content = np.ascontiguousarray(
        grid_map[transform.pad_top : transform.pad_top + rh, transform.pad_left : transform.pad_left + rw],
        dtype=np.float32,
    )
    y0, y1, x0, x1 = transform.crop_box
    sy, sx = rh / (y1 - y0), rw / (x1 - x0)
    # Display pixel u is centred on source coordinate (u + 1/2) f - 1/2; cv2.resize puts crop pixel
    # c at content coordinate (c + 1/2) s - 1/2 (mirrored in x when flipped).
    ay, by = factor * sy, (factor / 2 - y0) * sy - 0.5
    if transform.flipped:
        ax, bx = -factor * sx, (x1 - factor / 2) * sx - 0.5
    else:
        ax, bx = factor * sx, (factor / 2 - x0) * sx - 0.5
    height, width = transform.original_shape[0] // factor, transform.original_shape[1] // factor
    out = cv2.warpAffine(
        content,
        np.array([[ax, 0.0, bx], [0.0, ay, by]]),
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,  # as cv2.resize treats the content's edges
    )
    inside = np.zeros((height, width), dtype=bool)
    inside[_centres_in(y0, y1, factor), _centres_in(x0, x1, factor)] = True
    out[~inside] = 0.0
    return out


def _centres_in(start: int, stop: int, factor: int) -> slice:
    """The display pixels whose block centre lies in source pixels ``[start, stop)``."""
    first, end = (max(0, math.ceil((edge + 0.5) / factor - 0.5)) for edge in (start, stop))
    return slice(first, end)


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
