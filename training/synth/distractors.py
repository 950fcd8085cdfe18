"""Bright things on a mammogram that are not cancer, drawn into the phantoms with their masks.

Why: scored on a public film mammogram, the demo model once put its CAM peak on a round skin
marker. Real screening images carry skin markers (BBs, nipple pellets, scar wires), surgical and
biopsy clips, calcified arteries, pacemakers and ports, lead letters, compression-paddle edges
and, on digitised film, scanner borders and scratches; the phantoms carry them too, so a model
can learn to ignore them and the evaluation can measure whether it does.

What is drawn where (see :mod:`training.synth.distractor_plan` for how often):

- X-ray objects (everything but the film defects) are added to the attenuation map in the
  canonical frame, before the detector, so they get its noise and saturation; on the ``film``
  style they are drawn at the reduced render scale and scanned with the rest.
- Film defects (``digitiser_border``, ``scratch``) are drawn on the scanned pixels at full size
  (:mod:`training.synth.distractor_film`).
- Nothing is placed within :data:`LESION_CLEARANCE_MM` of a malignant lesion, and distractors
  do not overlap each other, so every pixel of the mask belongs to one thing.

Distractors have their own random streams (seeded from the plan, never from the tissue or
detector generators): an image without distractors is bit-identical to what the generator made
before they existed, and changing the rate never moves a lesion or changes the anatomy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from training.synth import distractor_devices as devices
from training.synth import distractor_film as film_defects
from training.synth import distractor_shapes as shapes
from training.synth.anatomy import ViewGeometry
from training.synth.distractor_shapes import Drawn, Scene
from training.synth.lesions import paste_add

logger = logging.getLogger(__name__)

LESION_CLEARANCE_MM = 20.0
"""No distractor comes closer than this to a malignant lesion. The pointing game's tolerance is
16 px of the 512-row model grid, about 9 mm of a 290 mm image; twice that keeps every CAM peak
from counting as on the lesion and on a distractor at once."""
DIGITAL_HEIGHT_MM = 290.0
"""Image height of the digital style in mm: the ImagerPixelSpacing the DICOM writer records is
this over the rows (0.28 mm at 1024 rows, 0.14 mm at 2048), so sizes in mm match the header."""
FILM_HEIGHT_MM = 240.0
"""Assumed height of a digitised film: the long side of an 18 x 24 cm film, which at the
default 4500 rows gives 53 um pixels (DDSM's digitisers scanned at 42-50 um)."""
FILM_DEFECTS: tuple[str, ...] = ("digitiser_border", "scratch")
MAX_TRIES = 12
"""Places tried for one distractor before it is left out of this view."""


@dataclass(frozen=True)
class DistractorItem:
    """One kind to draw on one image: ``count`` instances (a clip cluster is one instance of
    ``count`` clips) placed from the random stream ``seed``; ``port`` chooses a port over a
    pacemaker for ``chest_device``."""

    kind: str
    seed: tuple[int, ...]
    count: int = 1
    port: bool = False


@dataclass(frozen=True)
class ImageDistractors:
    """Everything to draw on one image, and the physical height of that image in mm."""

    items: tuple[DistractorItem, ...]
    height_mm: float
    laterality: str

    def xray_items(self) -> tuple[DistractorItem, ...]:
        return tuple(i for i in self.items if i.kind not in FILM_DEFECTS)

    def film_items(self) -> tuple[DistractorItem, ...]:
        return tuple(i for i in self.items if i.kind in FILM_DEFECTS)


def clearance_zone(lesion_mask: np.ndarray, mm: float) -> np.ndarray:
    """Pixels within :data:`LESION_CLEARANCE_MM` of a lesion (bool), by a distance transform."""
    if not lesion_mask.any():
        return np.zeros(lesion_mask.shape, dtype=bool)
    outside = (~lesion_mask.astype(bool)).astype(np.uint8)
    return np.asarray(cv2.distanceTransform(outside, cv2.DIST_L2, 5) <= LESION_CLEARANCE_MM / mm)


def _drawer(item: DistractorItem, laterality: str) -> Callable[[np.random.Generator, Scene], Drawn | None]:
    kind = item.kind
    if kind == "clip":
        return lambda rng, scene: shapes.clip(rng, scene, item.count)
    if kind == "chest_device":
        return lambda rng, scene: devices.chest_device(rng, scene, item.port)
    if kind == "metal_label":
        return lambda rng, scene: devices.metal_label(rng, scene, laterality)
    simple: dict[str, Callable[[np.random.Generator, Scene], Drawn | None]] = {
        "bb_marker": shapes.bb_marker,
        "nipple_marker": shapes.nipple_marker,
        "scar_marker": shapes.scar_marker,
        "vessel_calcification": shapes.vessel_calcification,
        "paddle_edge": devices.paddle_edge,
    }
    if kind not in simple:
        raise ValueError(f"{kind!r} is not an X-ray distractor")
    return simple[kind]


def _visible_mask(drawn: Drawn, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The part of ``drawn``'s mask inside the image: the image slices and the mask there."""
    h, w = drawn.mask.shape
    ty0, tx0 = max(drawn.y0, 0), max(drawn.x0, 0)
    ty1, tx1 = min(drawn.y0 + h, shape[0]), min(drawn.x0 + w, shape[1])
    if ty0 >= ty1 or tx0 >= tx1:
        return None
    part = drawn.mask[ty0 - drawn.y0 : ty1 - drawn.y0, tx0 - drawn.x0 : tx1 - drawn.x0]
    if not part.any():
        return None
    return (slice(ty0, ty1), slice(tx0, tx1)), part


def _place(
    rng: np.random.Generator,
    scene: Scene,
    draw: Callable[[np.random.Generator, Scene], Drawn | None],
    keep_out: np.ndarray,
) -> tuple[Drawn, tuple[slice, slice], np.ndarray] | None:
    """Draw until the result shows in the image and stays clear of ``keep_out``."""
    for _ in range(MAX_TRIES):
        drawn = draw(rng, scene)
        if drawn is None:
            continue
        visible = _visible_mask(drawn, scene.shape)
        if visible is None:
            continue
        where, part = visible
        if not (keep_out[where] & part).any():
            return drawn, where, part
    return None


def add_distractors(
    att: np.ndarray, geom: ViewGeometry, lesion_mask: np.ndarray, spec: ImageDistractors
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Add the X-ray distractors of ``spec`` to ``att`` (in place, canonical frame).

    Returns the label image (uint8, value ``i + 1`` for the ``i``-th kind returned) and the kind
    of each value. Distractors that find no place are left out (and logged at debug level).
    """
    h, w = att.shape
    scene = Scene(geom=geom, mm=spec.height_mm / h)
    keep_out = clearance_zone(lesion_mask, scene.mm)
    labels = np.zeros((h, w), dtype=np.uint8)
    kinds: list[str] = []
    for item in spec.xray_items():
        rng = np.random.default_rng(list(item.seed))
        draw = _drawer(item, spec.laterality)
        for _ in range(1 if item.kind == "clip" else item.count):
            placed = _place(rng, scene, draw, keep_out)
            if placed is None:
                logger.debug("no place for a %s in this %s view", item.kind, geom.view)
                continue
            drawn, where, part = placed
            paste_add(att, drawn.add, drawn.y0, drawn.x0)
            kinds.append(item.kind)
            labels[where][part] = len(kinds)
            keep_out[where] |= part
    return labels, tuple(kinds)


def add_film_defects(
    pixels: np.ndarray,
    labels: np.ndarray,
    kinds: tuple[str, ...],
    lesion_mask: np.ndarray,
    spec: ImageDistractors,
    bits_stored: int,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Draw the film defects of ``spec`` on scanned ``pixels`` (in place, display orientation),
    clear of lesions and of the distractors already in ``labels``; returns the extended labels."""
    items = spec.film_items()
    if not items:
        return labels, kinds
    mm = spec.height_mm / pixels.shape[0]
    keep_out = clearance_zone(lesion_mask > 0, mm) | (labels > 0)
    maxval = (1 << bits_stored) - 1
    out_kinds = list(kinds)
    for item in items:
        rng = np.random.default_rng(list(item.seed))
        for _ in range(item.count):
            for _ in range(MAX_TRIES):
                if item.kind == "digitiser_border":
                    mask = film_defects.digitiser_border(rng, pixels, maxval, keep_out)
                else:
                    mask = film_defects.scratch(rng, pixels, maxval, keep_out, mm)
                if mask is not None:
                    out_kinds.append(item.kind)
                    labels[mask] = len(out_kinds)
                    keep_out |= mask
                    break
    return labels, tuple(out_kinds)


def label_boxes(labels: np.ndarray, kinds: tuple[str, ...]) -> list[tuple[str, int, int, int, int, int]]:
    """``(kind, y0, x0, y1, x1, mask_value)`` of each kind value still present in ``labels``
    (a burned-in strip may have covered one); half-open boxes in pixel coordinates."""
    ys, xs = np.nonzero(labels)
    values = labels[ys, xs]
    out = []
    for value in np.unique(values):
        if value > len(kinds):
            raise ValueError(f"label value {value} has no kind")
        mine = values == value
        vy, vx = ys[mine], xs[mine]
        out.append(
            (kinds[value - 1], int(vy.min()), int(vx.min()), int(vy.max()) + 1, int(vx.max()) + 1, int(value))
        )
    return out


def image_height_mm(film: bool) -> float:
    """Physical height of a phantom image in mm: the pixel size is this over the rows."""
    return FILM_HEIGHT_MM if film else DIGITAL_HEIGHT_MM
