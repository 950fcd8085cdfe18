"""Loader for the RSNA Screening Mammography (Kaggle 2023) layout.

``ROOT/train.csv`` with the 14 RSNA columns and ``ROOT/train_images/<patient_id>/<image_id>.dcm``.
A real RSNA download and the synthetic phantoms of :mod:`training.synth` load through the same
code, so training never has a "synthetic only" path. The phantoms add ground truth that RSNA
lacks: ``ROOT/lesions.csv`` (lesion boxes) and ``ROOT/train_masks/<patient_id>/<image_id>.png``;
their readers return nothing on a real RSNA root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from inference.rsna_layout import CSV_NAME, IMAGES_DIR, RSNA_COLUMNS
from inference.types import InputError
from training.datasets.csv_rows import read_rows

logger = logging.getLogger(__name__)

LESION_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "image_id",
    "laterality",
    "view",
    "kind",
    "y0",
    "x0",
    "y1",
    "x1",
)
LESIONS_CSV = "lesions.csv"
MASKS_DIR = "train_masks"


@dataclass(frozen=True)
class RsnaRecord:
    """One row of ``train.csv`` (one image), typed, with the path of its DICOM file.

    Empty cells (site 2 has no BIRADS or density; some ages are missing) become None.
    """

    site_id: int
    patient_id: int
    image_id: int
    laterality: str  # "L" or "R"
    view: str  # "CC", "MLO", or the rare RSNA extras ("AT", "LM", "ML", "LMO")
    age: int | None
    cancer: int
    biopsy: int
    invasive: int
    birads: int | None
    implant: int
    density: str | None  # "A".."D"
    machine_id: int
    difficult_negative_case: bool
    path: Path

    @property
    def prediction_id(self) -> str:
        """The RSNA prediction unit: one breast of one patient."""
        return f"{self.patient_id}_{self.laterality}"


@dataclass(frozen=True)
class LesionBox:
    """A lesion's bounding box in original pixel coordinates, half-open: rows y0..y1-1."""

    kind: str  # "mass" or "calcification"
    y0: int
    x0: int
    y1: int
    x1: int


def load_rsna(
    root: Path,
    csv_name: str = CSV_NAME,
    images_dir: str = IMAGES_DIR,
    *,
    check_files: bool = True,
) -> list[RsnaRecord]:
    """Read ``root/csv_name`` into records whose ``path`` is ``root/images_dir/<pid>/<iid>.dcm``.

    Raises InputError on a missing csv, missing columns, unparsable cells, duplicate image ids
    and (with ``check_files``) missing image files, so a broken download fails before training.
    """
    root = Path(root)
    csv_path = root / csv_name
    records: list[RsnaRecord] = []
    seen: set[int] = set()
    for row in read_rows(csv_path, RSNA_COLUMNS):
        patient_id = row.integer("patient_id")
        image_id = row.integer("image_id")
        if image_id in seen:
            raise InputError(f"{csv_path.name} line {row.line}: duplicate image_id {image_id}")
        seen.add(image_id)
        view = row.text("view")
        if not view:
            raise row._fail("view", "a view is required")
        records.append(
            RsnaRecord(
                site_id=row.integer("site_id"),
                patient_id=patient_id,
                image_id=image_id,
                laterality=str(row.choice("laterality", ("L", "R"))),
                view=view,
                age=row.optional_int("age"),
                cancer=row.flag("cancer"),
                biopsy=row.flag("biopsy"),
                invasive=row.flag("invasive"),
                birads=row.optional_int("BIRADS"),
                implant=row.flag("implant"),
                density=row.choice("density", ("A", "B", "C", "D"), optional=True),
                machine_id=row.integer("machine_id"),
                difficult_negative_case=row.boolean("difficult_negative_case"),
                path=root / images_dir / str(patient_id) / f"{image_id}.dcm",
            )
        )
    if check_files:
        missing = [r.path for r in records if not r.path.is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} image file(s) listed in {csv_name} are missing, e.g. {missing[0]}"
            )
    logger.info("loaded %d RSNA records from %s", len(records), csv_path)
    return records


def load_lesions(root: Path) -> dict[int, list[LesionBox]]:
    """Lesion boxes per image_id from ``root/lesions.csv``; empty for a real RSNA root."""
    path = Path(root) / LESIONS_CSV
    if not path.exists():
        return {}
    boxes: dict[int, list[LesionBox]] = {}
    for row in read_rows(path, LESION_COLUMNS):
        box = LesionBox(
            kind=str(row.choice("kind", ("mass", "calcification"))),
            y0=row.integer("y0"),
            x0=row.integer("x0"),
            y1=row.integer("y1"),
            x1=row.integer("x1"),
        )
        if not (0 <= box.y0 < box.y1 and 0 <= box.x0 < box.x1):
            raise InputError(f"{path.name} line {row.line}: empty or negative box {box}")
        boxes.setdefault(row.integer("image_id"), []).append(box)
    return boxes


def lesion_mask_path(root: Path, record: RsnaRecord) -> Path | None:
    """``root/train_masks/<pid>/<iid>.png`` if it exists (cancer images of phantoms), else None."""
    path = Path(root) / MASKS_DIR / str(record.patient_id) / f"{record.image_id}.png"
    return path if path.is_file() else None
