"""Ground truth of the bright things on a mammogram that are not cancer (phantoms only).

The phantoms of :mod:`training.synth` carry skin markers, clips, calcified vessels, devices,
lead letters, paddle edges and film defects; ``ROOT/distractors.csv`` lists each one with its box
and ``ROOT/distractor_masks/<patient_id>/<image_id>.png`` holds its exact pixels, so the
evaluation can ask whether a false positive or a CAM peak sits on one. A real RSNA root has
neither file, and the readers then return nothing.

``distractors.csv`` columns: ``patient_id,image_id,laterality,view,kind,y0,x0,y1,x1,mask_value``:
one row per distractor per image, box half-open in original pixel coordinates (like
``lesions.csv``); ``mask_value`` is the value of its pixels in the image's mask PNG (uint8,
0 = none). Boxes alone are too coarse for a tram-track vessel or a paddle edge across the image,
hence the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference.types import InputError
from training.datasets.csv_rows import read_rows

DISTRACTORS_CSV = "distractors.csv"
DISTRACTOR_MASKS_DIR = "distractor_masks"
DISTRACTOR_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "image_id",
    "laterality",
    "view",
    "kind",
    "y0",
    "x0",
    "y1",
    "x1",
    "mask_value",
)

MARKER_KINDS: tuple[str, ...] = ("bb_marker", "nipple_marker", "scar_marker")
"""Skin markers, reported together as ``marker`` too (the issue's "breasts with a marker")."""
DISTRACTOR_KINDS: tuple[str, ...] = (
    *MARKER_KINDS,
    "clip",
    "vessel_calcification",
    "chest_device",
    "metal_label",
    "paddle_edge",
    "digitiser_border",
    "scratch",
)
"""Every kind, in the order the generator draws them (the order is part of its random streams)."""


@dataclass(frozen=True)
class DistractorRow:
    """One distractor on one image."""

    kind: str
    y0: int
    x0: int
    y1: int
    x1: int
    mask_value: int


def load_distractors(root: Path) -> dict[int, list[DistractorRow]] | None:
    """Distractor rows per image_id from ``root/distractors.csv``; None when the file is absent
    (a real dataset), an empty dict when the phantoms have none."""
    path = Path(root) / DISTRACTORS_CSV
    if not path.exists():
        return None
    rows: dict[int, list[DistractorRow]] = {}
    for row in read_rows(path, DISTRACTOR_COLUMNS):
        item = DistractorRow(
            kind=str(row.choice("kind", DISTRACTOR_KINDS)),
            y0=row.integer("y0"),
            x0=row.integer("x0"),
            y1=row.integer("y1"),
            x1=row.integer("x1"),
            mask_value=row.integer("mask_value"),
        )
        if not (0 <= item.y0 < item.y1 and 0 <= item.x0 < item.x1):
            raise InputError(f"{path.name} line {row.line}: empty or negative box")
        if not 1 <= item.mask_value <= 255:
            raise InputError(f"{path.name} line {row.line}: mask_value must be 1-255")
        rows.setdefault(row.integer("image_id"), []).append(item)
    return rows


def distractor_mask_path(root: Path, patient_id: int, image_id: int) -> Path:
    return Path(root) / DISTRACTOR_MASKS_DIR / str(patient_id) / f"{image_id}.png"


def read_distractor_mask(root: Path, patient_id: int, image_id: int) -> np.ndarray:
    """The uint8 mask of one image's distractors (values = ``mask_value``); InputError if absent."""
    path = distractor_mask_path(root, patient_id, image_id)
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
    if mask is None or mask.ndim != 2:
        raise InputError(f"distractor mask {path} is missing or not a single-channel PNG")
    return np.asarray(mask, dtype=np.uint8)
