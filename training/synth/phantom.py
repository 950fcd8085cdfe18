"""One synthetic mammogram: anatomy + lesions + detector + overlays, in display orientation.

:func:`render_view` is the full-featured entry point (it also returns lesion boxes and the breast
mask); :func:`synth_breast` is the short form other tests use to get an image and its lesion
mask. Pixels come out in the MONOCHROME2 sense (dense tissue bright); the DICOM writer inverts
them for MONOCHROME1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.datasets.rsna import LesionBox
from training.synth.anatomy import (
    BreastAnatomy,
    ViewGeometry,
    lesion_center,
    tissue_attenuation,
    view_geometry,
)
from training.synth.distractors import ImageDistractors, add_distractors
from training.synth.lesions import AMPLITUDE, Lesion, paste_add, paste_max, render_lesion
from training.synth.overlays import Box, border_box, label_mask

logger = logging.getLogger(__name__)

VIEWS: tuple[str, ...] = ("CC", "MLO")
LATERALITIES: tuple[str, ...] = ("L", "R")
BITS_STORED: tuple[int, ...] = (12, 14, 16)
MIN_SIZE = 32


@dataclass
class RenderedView:
    """A rendered image and its ground truth, in display orientation.

    ``pixels`` are uint16 in the MONOCHROME2 sense, below ``2**bits_stored``; ``lesion_mask``
    (uint8 0/255) covers the malignant lesions only; ``lesion_boxes`` are half-open pixel boxes
    of those lesions, one per lesion. ``distractor_labels`` (uint8, or None when the image has
    no distractors) marks each distractor's pixels with ``i + 1`` for ``distractor_kinds[i]``.
    """

    pixels: np.ndarray
    lesion_mask: np.ndarray
    breast_mask: np.ndarray
    bits_stored: int
    lesion_boxes: list[LesionBox] = field(default_factory=list)
    label_box: Box | None = None
    border_box: Box | None = None
    distractor_labels: np.ndarray | None = None
    distractor_kinds: tuple[str, ...] = ()


def _check_args(laterality: str, view: str, size: tuple[int, int], bits_stored: int) -> None:
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if view not in VIEWS:
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ValueError(f"size must be (rows, columns) with both >= {MIN_SIZE}, got {size}")
    if bits_stored not in BITS_STORED:
        raise ValueError(f"bits_stored must be one of {BITS_STORED}, got {bits_stored}")


def render_view(
    rng: np.random.Generator,
    *,
    laterality: str,
    view: str,
    size: tuple[int, int] = (1024, 768),
    density: str = "B",
    lesions: Sequence[Lesion] = (),
    anatomy: BreastAnatomy | None = None,
    bits_stored: int = 12,
    lesion_contrast: float = 1.0,
    label: str | None = None,
    label_corner: int = 0,
    border: str | None = None,
    border_fraction: float = 0.02,
    detector_rng: np.random.Generator | None = None,
    distractors: ImageDistractors | None = None,
) -> RenderedView:
    """Render one view of one breast.

    ``anatomy`` fixes the breast (pass the same one for CC and MLO of a breast); when None a
    random breast of ``density`` is drawn from ``rng``. ``lesions`` are drawn at their
    view-consistent positions with amplitude scaled by ``lesion_contrast``. ``label`` is burned-in
    text (e.g. "R MLO") and ``border`` a bright collimator strip ("top", "bottom" or "far"); both
    are silently skipped when they would overlap the breast (see ``label_box``/``border_box``).
    ``detector_rng`` (default: ``rng``) drives the detector noise and the strip level only, so a
    repeated acquisition of the same breast can reuse the tissue seed and differ in noise.
    ``distractors`` (markers, clips, ...; see :mod:`training.synth.distractors`) are drawn from
    their own generators, so without them the image is exactly what it was before they existed.
    """
    size = (int(size[0]), int(size[1]))
    _check_args(laterality, view, size, bits_stored)
    if lesion_contrast < 0:
        raise ValueError(f"lesion_contrast must be >= 0, got {lesion_contrast}")
    if anatomy is None:
        anatomy = BreastAnatomy.random(rng, density)
    w = size[1]
    geom = view_geometry(anatomy, view, size, rng)
    att = tissue_attenuation(rng, anatomy, geom)

    lesion_mask, canonical_boxes = _add_lesions(att, geom, lesions, view, lesion_contrast)
    labels: np.ndarray | None = None
    kinds: tuple[str, ...] = ()
    if distractors is not None and distractors.xray_items():
        labels, kinds = add_distractors(att, geom, lesion_mask, distractors)

    breast = geom.mask
    if laterality == "L":
        # Left breasts have the chest wall on the right of the image.
        att = att[:, ::-1]
        lesion_mask = lesion_mask[:, ::-1]
        breast = breast[:, ::-1]
        labels = None if labels is None else labels[:, ::-1]
        canonical_boxes = [(k, y0, w - x1, y1, w - x0) for k, y0, x0, y1, x1 in canonical_boxes]
    boxes = [LesionBox(kind=k, y0=y0, x0=x0, y1=y1, x1=x1) for k, y0, x0, y1, x1 in canonical_boxes]

    det_rng = rng if detector_rng is None else detector_rng
    pixels = _detector(det_rng, att, bits_stored)
    placed_border, placed_label, strokes = _burn_in(
        pixels, breast, laterality, det_rng, bits_stored, label, label_corner, border, border_fraction
    )
    if labels is not None:
        labels = np.ascontiguousarray(labels)
        # Burned over: no longer visible.
        if placed_border is not None:
            labels[placed_border[0] : placed_border[2], placed_border[1] : placed_border[3]] = 0
        if strokes is not None:
            labels[strokes] = 0

    return RenderedView(
        pixels=np.ascontiguousarray(pixels),
        lesion_mask=np.ascontiguousarray(lesion_mask.astype(np.uint8) * 255),
        breast_mask=np.ascontiguousarray(breast),
        bits_stored=bits_stored,
        lesion_boxes=boxes,
        label_box=placed_label,
        border_box=placed_border,
        distractor_labels=labels,
        distractor_kinds=kinds,
    )


def _add_lesions(
    att: np.ndarray, geom: ViewGeometry, lesions: Sequence[Lesion], view: str, lesion_contrast: float
) -> tuple[np.ndarray, list[tuple[str, int, int, int, int]]]:
    """Add the lesions to ``att`` (in place); the malignant ones' mask and boxes (chest wall left)."""
    h, w = att.shape
    lesion_mask = np.zeros((h, w), dtype=bool)
    canonical_boxes: list[tuple[str, int, int, int, int]] = []
    for lesion in lesions:
        radius = lesion.size * geom.depth
        margin = 1.15 * radius + 0.03 * geom.depth
        center = lesion_center(geom, lesion.nipple_distance, lesion.offset(view), margin)
        patch = render_lesion(lesion, center, geom.depth, w, view)
        amplitude = np.float32(AMPLITUDE[lesion.kind] * lesion.contrast * lesion_contrast)
        contribution = np.zeros((h, w), dtype=np.float32)
        paste_add(contribution, patch.profile * amplitude, patch.y0, patch.x0)
        att += contribution * geom.mask
        if lesion.malignant:
            own = np.zeros((h, w), dtype=np.float32)
            paste_max(own, patch.mask.astype(np.float32), patch.y0, patch.x0)
            own_mask = (own > 0) & geom.mask
            ys, xs = np.nonzero(own_mask)
            if ys.size == 0:
                logger.warning("lesion %s fell outside the breast in %s view", lesion.kind, view)
                continue
            lesion_mask |= own_mask
            canonical_boxes.append(
                (lesion.kind, int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            )
    return lesion_mask, canonical_boxes


def _burn_in(
    pixels: np.ndarray,
    breast: np.ndarray,
    laterality: str,
    det_rng: np.random.Generator,
    bits_stored: int,
    label: str | None,
    label_corner: int,
    border: str | None,
    border_fraction: float,
) -> tuple[Box | None, Box | None, np.ndarray | None]:
    """Burn the collimator strip and the label text into ``pixels`` (in place) where they fit;
    returns the strip's box, the label's box and the label's strokes (bool mask)."""
    maxval = (1 << bits_stored) - 1
    chest_wall_left = laterality == "R"
    placed_border: Box | None = None
    if border is not None:
        placed_border = border_box(breast, border, border_fraction, chest_wall_left)
        if placed_border is not None:
            y0, x0, y1, x1 = placed_border
            level = maxval * det_rng.uniform(0.85, 0.97)
            strip = level + det_rng.normal(0.0, 0.003 * maxval, (y1 - y0, x1 - x0))
            pixels[y0:y1, x0:x1] = np.clip(strip, 0, maxval).astype(np.uint16)
    placed_label: Box | None = None
    strokes: np.ndarray | None = None
    if label:
        found = label_mask(label, breast, chest_wall_left, label_corner)
        if found is not None:
            strokes, placed_label = found
            pixels[strokes] = maxval
    return placed_border, placed_label, strokes


def _detector(rng: np.random.Generator, att: np.ndarray, bits_stored: int) -> np.ndarray:
    """Attenuation -> stored values: offset, gain, signal-dependent noise, quantisation.

    The background keeps a small offset with noise (never exactly 0), as real detectors do.
    """
    maxval = (1 << bits_stored) - 1
    offset = maxval * rng.uniform(0.006, 0.015)
    gain = (maxval - offset) * rng.uniform(0.62, 0.72)
    sigma = maxval * (0.0012 + 0.0025 * np.sqrt(np.maximum(att, 0.0)))
    noise = rng.standard_normal(att.shape, dtype=np.float32) * sigma
    values = offset + gain * att + noise
    return np.clip(np.rint(values), 0, maxval).astype(np.uint16)


def synth_breast(
    rng: np.random.Generator,
    *,
    laterality: str,
    view: str,
    size: tuple[int, int] = (1024, 768),
    density: str = "B",
    lesions: Sequence[Lesion] = (),
    bits_stored: int = 12,
    anatomy: BreastAnatomy | None = None,
    lesion_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One mammogram and its lesion mask: ``(uint16 pixels, uint8 0/255 mask)``.

    Pixels are in the MONOCHROME2 sense with ``bits_stored`` significant bits; see
    :func:`render_view` for the arguments and for overlays.
    """
    view_ = render_view(
        rng,
        laterality=laterality,
        view=view,
        size=size,
        density=density,
        lesions=lesions,
        anatomy=anatomy,
        bits_stored=bits_stored,
        lesion_contrast=lesion_contrast,
    )
    return view_.pixels, view_.lesion_mask
