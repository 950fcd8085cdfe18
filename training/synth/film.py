"""Digitised screen-film mammograms (CBIS-DDSM-like): the ``film`` style of the generator.

Public screening data that people first try the node on is digitised film: Secondary Capture
class with Modality MG, 16-bit MONOCHROME2, no VOI, no ViewPosition (the view only in free text),
about 4400-4700 x 2600-2900 pixels with odd sizes, one image per patient and study. The node must
score such files without falling over (odd sizes broke GDCM's RLE encoder), so the generator
writes them at those shapes.

Rendering the phantom at that size costs about 4 s per image on one core, most of it in the
tissue texture. Film is optically blurred and scanned, so the phantom is rendered at
:data:`FILM_RENDER_SCALE` of the size, resampled up to the full size (the scan), and given a
fine scanner grain at full resolution. That costs about a quarter as much and keeps the files
as big and as hard to compress as real scans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from training.datasets.rsna import LesionBox
from training.synth.anatomy import BreastAnatomy
from training.synth.distractors import ImageDistractors, add_film_defects
from training.synth.lesions import Lesion
from training.synth.overlays import Box
from training.synth.phantom import MIN_SIZE, RenderedView, render_view

FILM_BITS_STORED = 16
FILM_RENDER_SCALE = 0.5
"""Linear scale at which the phantom is rendered before it is "scanned" to the full size."""
GRAIN_SIGMA = 0.0015
"""Scanner grain, as a fraction of the full 16-bit range."""

VIEW_TEXT_FORMS: tuple[str, ...] = ("{side}_{view}", "{lat} {view}", "{lat}-{view}", "{side} {view}")
"""How the view is spelt in SeriesDescription of digitised films (``LEFT_CC``, ``L CC``, ``L-CC``,
``LEFT CC``): real archives use all of these, and no ViewPosition."""


def view_text(laterality: str, view: str, form: int) -> str:
    """The free-text view of one image, in form ``form`` (cycled) of :data:`VIEW_TEXT_FORMS`."""
    side = {"L": "LEFT", "R": "RIGHT"}[laterality]
    return VIEW_TEXT_FORMS[form % len(VIEW_TEXT_FORMS)].format(side=side, lat=laterality, view=view)


def render_film_view(
    rng: np.random.Generator,
    *,
    laterality: str,
    view: str,
    size: tuple[int, int],
    density: str = "B",
    lesions: Sequence[Lesion] = (),
    anatomy: BreastAnatomy | None = None,
    bits_stored: int = FILM_BITS_STORED,
    lesion_contrast: float = 1.0,
    label: str | None = None,
    label_corner: int = 0,
    border: str | None = None,
    detector_rng: np.random.Generator | None = None,
    distractors: ImageDistractors | None = None,
) -> RenderedView:
    """Render one digitised film of ``size`` (rows, columns) with its ground truth.

    Same arguments and ground truth as :func:`training.synth.phantom.render_view` (which draws the
    phantom at the reduced scale); ``lesion_mask``, ``breast_mask`` and ``lesion_boxes`` are at
    the full size. Deterministic for the given generators. ``distractors``: the X-ray ones are
    drawn with the phantom, the film defects (borders, scratches) on the scanned pixels.
    """
    rows, cols = int(size[0]), int(size[1])
    if min(rows, cols) < MIN_SIZE:
        raise ValueError(f"size must be (rows, columns) with both >= {MIN_SIZE}, got {size}")
    scale = FILM_RENDER_SCALE if min(rows, cols) * FILM_RENDER_SCALE >= MIN_SIZE else 1.0
    small = (math.ceil(rows * scale), math.ceil(cols * scale))
    det_rng = rng if detector_rng is None else detector_rng
    low = render_view(
        rng,
        laterality=laterality,
        view=view,
        size=small,
        density=density,
        lesions=lesions,
        anatomy=anatomy,
        bits_stored=bits_stored,
        lesion_contrast=lesion_contrast,
        label=label,
        label_corner=label_corner,
        border=border,
        detector_rng=det_rng,
        distractors=distractors,
    )
    if small == (rows, cols):
        return _with_film_defects(low, distractors)
    maxval = (1 << bits_stored) - 1
    scanned = cv2.resize(low.pixels, (cols, rows), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    scanned += det_rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(GRAIN_SIGMA * maxval)
    pixels = np.clip(np.rint(scanned, out=scanned), 0, maxval).astype(np.uint16)
    del scanned
    lesion_mask = _upscale_mask(low.lesion_mask, rows, cols)
    breast_mask = _upscale_mask(low.breast_mask.astype(np.uint8), rows, cols).astype(bool)
    labels = None if low.distractor_labels is None else _upscale_mask(low.distractor_labels, rows, cols)
    scanned_view = RenderedView(
        pixels=np.ascontiguousarray(pixels),
        lesion_mask=np.ascontiguousarray(lesion_mask),
        breast_mask=np.ascontiguousarray(breast_mask),
        bits_stored=bits_stored,
        lesion_boxes=[_upscale_box(box, lesion_mask, small, (rows, cols)) for box in low.lesion_boxes],
        label_box=_upscale_overlay(low.label_box, small, (rows, cols)),
        border_box=_upscale_overlay(low.border_box, small, (rows, cols)),
        distractor_labels=labels,
        distractor_kinds=low.distractor_kinds,
    )
    return _with_film_defects(scanned_view, distractors)


def _with_film_defects(view: RenderedView, distractors: ImageDistractors | None) -> RenderedView:
    """``view`` with the film defects of ``distractors`` drawn on its pixels (in place)."""
    if distractors is None or not distractors.film_items():
        return view
    labels = view.distractor_labels
    if labels is None:
        labels = np.zeros(view.pixels.shape, dtype=np.uint8)
    view.distractor_labels, view.distractor_kinds = add_film_defects(
        view.pixels, labels, view.distractor_kinds, view.lesion_mask, distractors, view.bits_stored
    )
    return view


def _upscale_mask(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.asarray(cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST))


def _scaled_span(lo: int, hi: int, small: int, full: int) -> tuple[int, int]:
    """Half-open [lo, hi) on a ``small`` axis -> the covering span on the ``full`` axis."""
    return math.floor(lo * full / small), min(full, math.ceil(hi * full / small))


def _upscale_box(
    box: LesionBox, full_mask: np.ndarray, small: tuple[int, int], full: tuple[int, int]
) -> LesionBox:
    """The lesion's box at full size: the bounding box of the upscaled mask near the scaled box.

    Taken from the mask (not only scaled) so that box and mask agree pixel for pixel, as the
    boxes of the digital style do; a two-pixel margin absorbs the resampler's rounding.
    """
    y0, y1 = _scaled_span(box.y0, box.y1, small[0], full[0])
    x0, x1 = _scaled_span(box.x0, box.x1, small[1], full[1])
    y0, x0 = max(0, y0 - 2), max(0, x0 - 2)
    y1, x1 = min(full[0], y1 + 2), min(full[1], x1 + 2)
    ys, xs = np.nonzero(full_mask[y0:y1, x0:x1])
    if ys.size:
        y0, y1 = y0 + int(ys.min()), y0 + int(ys.max()) + 1
        x0, x1 = x0 + int(xs.min()), x0 + int(xs.max()) + 1
    return LesionBox(kind=box.kind, y0=y0, x0=x0, y1=y1, x1=x1)


def _upscale_overlay(box: Box | None, small: tuple[int, int], full: tuple[int, int]) -> Box | None:
    if box is None:
        return None
    y0, x0, y1, x1 = box
    ys = _scaled_span(y0, y1, small[0], full[0])
    xs = _scaled_span(x0, x1, small[1], full[1])
    return (ys[0], xs[0], ys[1], xs[1])
