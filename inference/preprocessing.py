"""The one preprocessing shared by training and serving (design invariant 4).

decode -> VOI/window (:mod:`inference.voi`, which also flips MONOCHROME1) -> min-max to [0, 1]
-> crop the background -> flip so the chest wall is on ``config.chest_wall_side`` -> resize
preserving the aspect ratio -> zero-pad to the model grid. The geometry is returned as a
:class:`~inference.types.GeometricTransform`, and the grid itself is produced by
:func:`inference.geometry.original_to_grid`, so mapping a CAM back with
:func:`inference.geometry.grid_to_original` inverts exactly what was done here.

The crop replaces seed 003's "drop rows/columns whose sum is 0", which keeps the whole image as
soon as there is detector noise, a burned-in label or a bright collimator strip. It works on a
~512-pixel copy (so a 3328x2560 image costs milliseconds): threshold, remove bright bands along
the image edges (:func:`inference.segmentation.remove_edge_bands`, the same test the fallback window
uses), morphological opening, keep the largest bright component (the breast; labels
and specks are smaller), grow it into the faint tissue connected to it (hysteresis down to the
background's noise floor, so a window that darkens the skin line does not cut it off), take its
bounding box plus a margin.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np
from pydicom.dataset import Dataset

from inference.dicom_header import read_meta
from inference.geometry import original_to_grid
from inference.pyramid import MAX_LEVEL
from inference.reduced_decode import SourceLevels
from inference.segmentation import noise_floor, remove_edge_bands
from inference.types import GeometricTransform, ImageMeta, InputError, PreprocessConfig, PreprocessedImage
from inference.voi import apply_voi

logger = logging.getLogger(__name__)

Side = Literal["left", "right"]

WORK_SIZE = 512
"""Long side of the downsampled copy used to find the breast."""
MIN_TISSUE_FRACTION = 0.01
"""The breast component must cover at least this share of the image, else there is no breast."""
MARGIN_FRACTION = 0.01
"""Margin added around the breast bounding box, as a share of the image's long side."""
SIDE_BAND = 0.1
"""Share of the crop width compared on each side to find the chest wall."""
SIDE_MIN_DIFFERENCE = 0.05
"""Smallest difference in tissue fill between the two sides that decides the chest-wall side."""

_CHEST_WALL_BY_LATERALITY: dict[str, Side] = {"R": "left", "L": "right"}


@dataclass(frozen=True)
class BreastRegion:
    """Where the breast is in the original image, and which side its chest wall seems to be on."""

    crop_box: tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open), original pixels
    chest_wall: Side | None  # from the image content; None when the two sides look alike


def preprocess(ds: Dataset, config: PreprocessConfig, *, meta: ImageMeta | None = None) -> PreprocessedImage:
    """Turn a DICOM image into model input on the ``config`` grid, with the geometry used.

    Raises InputError for anything that cannot be scored (no pixels, undecodable, no breast).
    """
    if meta is None:
        meta = read_meta(ds)
    return preprocess_levels(SourceLevels(ds), ds, meta, config)


def find_level(rows: int, columns: int) -> int:
    """The pyramid level the breast is looked for at: the coarsest whose long side is still at
    least :data:`WORK_SIZE` (the finder works on a copy of about that size anyway)."""
    r = 0
    while r < MAX_LEVEL and max(rows, columns) >> (r + 1) >= WORK_SIZE:
        r += 1
    return r


def model_level(crop_rows: int, crop_columns: int, config: PreprocessConfig) -> int:
    """The coarsest pyramid level that still has at least the model grid's resolution after the
    crop (``crop_rows`` x ``crop_columns`` source pixels): the model input is then only ever shrunk
    from it, never enlarged."""
    shrink = max(crop_rows / config.input_height, crop_columns / config.input_width)
    r = 0
    while r < MAX_LEVEL and shrink >= 1 << (r + 1):
        r += 1
    return r


@dataclass(frozen=True)
class LevelPlan:
    """Where and how a source's model input is made (:func:`plan_levels`)."""

    level: int  # pyramid level the model input is resampled from
    image: np.ndarray  # that level, windowed and min-max normalised (:func:`normalised_grey`)
    level_transform: GeometricTransform  # the geometry on ``image``
    transform: GeometricTransform  # the same geometry in source pixels


def preprocess_levels(
    source: SourceLevels, ds: Dataset, meta: ImageMeta, config: PreprocessConfig
) -> PreprocessedImage:
    """:func:`preprocess` on a source's resolution pyramid (:mod:`inference.pyramid`): the grid
    is resampled from the level :func:`plan_levels` chooses; the transform returned is in source
    pixels, as if the source had been cropped and scaled directly, so CAMs map back onto it."""
    plan = plan_levels(source, ds, meta, config)
    t = plan.level_transform
    interpolation = cv2.INTER_AREA if t.scale < 1.0 else cv2.INTER_LINEAR
    grid = original_to_grid(plan.image, t, interpolation=interpolation)
    np.clip(grid, 0.0, 1.0, out=grid)
    logger.debug(
        "preprocessed %s at level %d: crop=%s flipped=%s scale=%.4f",
        meta.sop_instance_uid,
        plan.level,
        plan.transform.crop_box,
        plan.transform.flipped,
        plan.transform.scale,
    )
    return PreprocessedImage(pixels=grid, transform=plan.transform, meta=meta)


def plan_levels(source: SourceLevels, ds: Dataset, meta: ImageMeta, config: PreprocessConfig) -> LevelPlan:
    """Find the breast on level :func:`find_level` and choose the level the model input is made
    from, :func:`model_level` of that crop (the coarsest that is only shrunk onto the grid),
    windowed and normalised at that level. Shared with the DALI path, which resamples the grid on
    the device from the same plan."""
    k = find_level(source.rows, source.columns)
    found = normalised_grey(apply_voi(source.modality(k), ds, fallback=config.fallback_window))
    region = find_breast(found, config)
    y0, y1, x0, x1 = region.crop_box
    r = model_level((y1 - y0) << k, (x1 - x0) << k, config)
    image = found
    if r != k:
        image = normalised_grey(apply_voi(source.modality(r), ds, fallback=config.fallback_window))
        region = replace(region, crop_box=_rescale_box(region.crop_box, k, r, image.shape))
    level_transform = plan_transform(image, meta, config, region=region)
    return LevelPlan(
        level=r,
        image=image,
        level_transform=level_transform,
        transform=_in_source_pixels(level_transform, r, source.rows, source.columns),
    )


def _rescale_box(
    box: tuple[int, int, int, int], src: int, dst: int, shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """A crop box found at level ``src`` on the level-``dst`` image of ``shape`` (outward rounding)."""
    y0, y1, x0, x1 = box
    if dst <= src:
        f = 1 << (src - dst)
        y0, y1, x0, x1 = y0 * f, y1 * f, x0 * f, x1 * f
    else:
        f = 1 << (dst - src)
        y0, y1, x0, x1 = y0 // f, -(-y1 // f), x0 // f, -(-x1 // f)
    return (y0, max(y0 + 1, min(y1, shape[0])), x0, max(x0 + 1, min(x1, shape[1])))


def _in_source_pixels(level: GeometricTransform, r: int, rows: int, columns: int) -> GeometricTransform:
    """A level-``r`` transform expressed in source pixels: the crop box times ``2^r`` and the scale
    divided by it, so the grid content (``resized_shape``) and every mapping stay the same."""
    if r == 0:
        return level
    f = 1 << r
    y0, y1, x0, x1 = level.crop_box
    source = replace(
        level,
        original_shape=(rows, columns),
        crop_box=(y0 * f, y1 * f, x0 * f, x1 * f),
        scale=level.scale / f,
    )
    if source.resized_shape != level.resized_shape:  # rounding of (size * f) * (scale / f)
        h = (y1 - y0) * f
        source = replace(source, scale=level.resized_shape[0] / h if h else source.scale)
    return source


def preprocess_array(pixels01: np.ndarray, meta: ImageMeta, config: PreprocessConfig) -> PreprocessedImage:
    """Preprocess an already-windowed image (as from :func:`inference.voi.apply_voi`).

    ``pixels01`` must already show dense tissue bright (MONOCHROME1 inverted); it is min-max
    normalised here, so its exact range does not matter. RGB input is converted to grey.
    """
    image = normalised_grey(pixels01)
    transform = plan_transform(image, meta, config)
    interpolation = cv2.INTER_AREA if transform.scale < 1.0 else cv2.INTER_LINEAR
    grid = original_to_grid(image, transform, interpolation=interpolation)
    np.clip(grid, 0.0, 1.0, out=grid)
    logger.debug(
        "preprocessed %s: crop=%s flipped=%s scale=%.4f",
        meta.sop_instance_uid,
        transform.crop_box,
        transform.flipped,
        transform.scale,
    )
    return PreprocessedImage(pixels=grid, transform=transform, meta=meta)


def normalised_grey(pixels01: np.ndarray) -> np.ndarray:
    """The windowed image as float32 grey, min-max normalised to [0, 1] (seed 003).

    Raises InputError for a uniform, non-finite or non-2-D image.
    """
    return _normalise(_as_grey(pixels01))


def plan_transform(
    image: np.ndarray, meta: ImageMeta, config: PreprocessConfig, *, region: BreastRegion | None = None
) -> GeometricTransform:
    """Decide the geometry for a :func:`normalised_grey` image: breast crop, orientation flip,
    aspect-preserving scale onto the model grid, and the padding that keeps the chest wall on
    the grid edge. Shared by this module and the DALI path (:mod:`inference.preprocessing_dali`),
    which applies the same transform on the GPU. ``region`` is the breast when it was already
    found (on another level of the same image); else it is looked for on ``image``.
    """
    if config.input_height < 1 or config.input_width < 1:
        raise ValueError(f"invalid model grid {config.input_height}x{config.input_width}")
    if region is None:
        region = find_breast(image, config)
    y0, y1, x0, x1 = region.crop_box
    grid_h, grid_w = config.input_height, config.input_width
    transform = GeometricTransform(
        original_shape=(image.shape[0], image.shape[1]),
        crop_box=region.crop_box,
        flipped=_needs_flip(region, meta.laterality, config),
        scale=min(grid_h / (y1 - y0), grid_w / (x1 - x0)),
        pad_top=0,
        pad_left=0,
        input_shape=(grid_h, grid_w),
    )
    if config.chest_wall_side == "right":  # keep the chest wall on the grid edge
        transform = replace(transform, pad_left=grid_w - transform.resized_shape[1])
    return transform


def find_breast(image: np.ndarray, config: PreprocessConfig) -> BreastRegion:
    """Locate the breast in a [0, 1] image (dense tissue bright).

    The threshold is ``config.crop_threshold``, lowered to Otsu's when that is lower (a faint
    breast next to a bright label); the breast found at it is then grown into connected faint
    tissue (:func:`_grow_into_faint_tissue`). A uniform or nearly empty image raises
    InputError("no breast tissue found"); an image with no separable background (tissue
    everywhere, or noise only) is used whole, since cutting tissue is worse than keeping air.
    """
    height, width = image.shape
    small = _downsample(image)
    sh, sw = small.shape
    grey = cv2.medianBlur(np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8), 5)
    otsu, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    level = min(float(otsu), config.crop_threshold * 255.0)
    mask = remove_edge_bands(grey > level)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if count <= 1 or areas.max() < MIN_TISSUE_FRACTION * sh * sw:
        covered = 0.0 if count <= 1 else float(areas.max()) / (sh * sw)
        raise InputError(f"no breast tissue found (largest bright region covers {covered:.1%} of the image)")
    breast = _grow_into_faint_tissue(grey, labels == 1 + int(np.argmax(areas)), level, kernel)

    y0, y1 = _extent(breast.mean(axis=1), config.crop_min_fraction)
    x0, x1 = _extent(breast.mean(axis=0), config.crop_min_fraction)
    chest_wall = _chest_wall_side(breast[y0:y1, x0:x1])

    fy, fx = height / sh, width / sw
    margin = math.ceil(MARGIN_FRACTION * max(height, width))
    box = (
        max(0, math.floor(y0 * fy) - margin),
        min(height, math.ceil(y1 * fy) + margin),
        max(0, math.floor(x0 * fx) - margin),
        min(width, math.ceil(x1 * fx) + margin),
    )
    return BreastRegion(crop_box=box, chest_wall=chest_wall)


def _grow_into_faint_tissue(
    grey: np.ndarray, core: np.ndarray, level: float, kernel: np.ndarray
) -> np.ndarray:
    """Hysteresis: add to the breast ``core`` the faint tissue connected to it.

    Windows that compress the low end (a SIGMOID function, a sigmoid-shaped VOI LUT) leave the
    subcutaneous fat and skin line below ``level``, and the crop cut them off (1-3 % of the
    image at each tip). Everything above the background's noise floor
    (:func:`inference.segmentation.noise_floor` of the pixels below ``level``) that is connected to the
    core is breast too. Border strips are removed from the weak mask as from the strong one,
    so a strip touching the breast does not join it.
    """
    dark = grey[grey <= level]
    if dark.size == 0:
        return core
    weak = remove_edge_bands(grey > noise_floor(dark))
    opened = cv2.morphologyEx(weak.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool) | core
    _, labels = cv2.connectedComponents(opened.astype(np.uint8), connectivity=8)
    return np.asarray(labels == labels[core][0])


def _as_grey(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3], dtype=np.float32), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _normalise(image: np.ndarray) -> np.ndarray:
    """Seed-003 min-max normalisation to [0, 1]; a new array, the caller's is never modified."""
    low, high = float(image.min()), float(image.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError("image has non-finite pixel values")
    if high - low < 1e-6:
        raise InputError("no breast tissue found: the image is uniform")
    if low == 0.0 and high == 1.0:
        return image
    return np.asarray((image - np.float32(low)) * np.float32(1.0 / (high - low)), dtype=np.float32)


def _downsample(image: np.ndarray) -> np.ndarray:
    height, width = image.shape
    factor = max(height, width) / WORK_SIZE
    if factor <= 1.0:
        return image
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def _extent(fill: np.ndarray, min_fraction: float) -> tuple[int, int]:
    """First and one-past-last index where ``fill`` exceeds ``min_fraction`` (any tissue if none)."""
    idx = np.flatnonzero(fill > min_fraction)
    if idx.size == 0:
        idx = np.flatnonzero(fill > 0)
    return int(idx[0]), int(idx[-1]) + 1


def _chest_wall_side(breast: np.ndarray) -> Side | None:
    """The side where the breast mask fills more of the edge columns: the breast hugs the chest
    wall and tapers towards the nipple."""
    band = max(1, round(SIDE_BAND * breast.shape[1]))
    left = float(breast[:, :band].mean())
    right = float(breast[:, -band:].mean())
    if abs(left - right) < SIDE_MIN_DIFFERENCE:
        return None
    return "left" if left > right else "right"


def _needs_flip(region: BreastRegion, laterality: str, config: PreprocessConfig) -> bool:
    """Flip when the chest wall is on the other side; content decides, laterality breaks ties
    (R is stored chest wall left, L chest wall right in the usual orientation)."""
    side = region.chest_wall or _CHEST_WALL_BY_LATERALITY.get(laterality)
    if side is None:
        logger.debug("chest-wall side undecided (laterality %s): not flipping", laterality)
        return False
    return side != config.chest_wall_side
