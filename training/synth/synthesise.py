"""Demo studies: one cancer and one normal complete 4-view screening exam, deterministic per seed.

`mammonode demo` shows the product on these; they are the same kind of phantoms the bundled model
was trained on, with their ground truth so the user can judge the result.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from inference.types import SCREENING_SIDE_VIEWS, MammoNodeError
from training.datasets.rsna import RsnaRecord, load_rsna
from training.synth.dataset import generate_dataset

log = logging.getLogger(__name__)

DEMO_SIZE = (1024, 768)
"""Rows x columns of the synthetic images: big enough to look like a mammogram, small enough to
synthesise and score in seconds on a laptop CPU."""

DEMO_TRANSFER_SYNTAX = "explicit"
DEMO_LESION_CONTRAST = 1.5
"""The lesion contrast the bundled demo model was trained on (see its MODEL_CARD.md)."""
MAX_ATTEMPTS = 20
"""The generator sometimes adds a repeated view or drops one, as real screening does; the demo
wants two complete 4-view exams, so it tries the next seed (deterministically) until it gets them."""

FOUR_VIEWS = frozenset(SCREENING_SIDE_VIEWS)
"""The (laterality, view) pairs a complete screening exam has."""


@dataclass(frozen=True)
class DemoStudy:
    """One synthesised study and its ground truth."""

    patient_id: str
    cancer_sides: tuple[str, ...]  # lateralities with cancer; empty for the normal study
    files: tuple[Path, ...]


def synthesise_studies(workdir: Path, seed: int, size: tuple[int, int] = DEMO_SIZE) -> list[DemoStudy]:
    """Write one cancer and one normal complete 4-view study under ``workdir`` (RSNA layout).

    Deterministic for a seed: the same seed always yields the same studies, hence (invariant 6)
    the same result UIDs, so running the demo twice into one folder does not pile up objects.
    """
    for attempt in range(MAX_ATTEMPTS):
        root = workdir / f"synth-{seed + attempt}"
        generate_dataset(
            root,
            patients=2,
            seed=seed + attempt,
            cancer_rate=0.5,  # exactly one of the two patients has cancer
            size=size,
            transfer_syntax=DEMO_TRANSFER_SYNTAX,
            lesion_contrast=DEMO_LESION_CONTRAST,
        )
        by_patient: dict[int, list[RsnaRecord]] = {}
        for record in load_rsna(root):
            by_patient.setdefault(record.patient_id, []).append(record)
        studies = [
            DemoStudy(
                patient_id=str(pid),
                cancer_sides=tuple(sorted({r.laterality for r in records if r.cancer})),
                files=tuple(r.path for r in records),
            )
            for pid, records in sorted(by_patient.items())
        ]
        complete = all(
            len(records) == 4 and {(r.laterality, r.view) for r in records} == FOUR_VIEWS
            for records in by_patient.values()
        )
        if complete and sorted(bool(s.cancer_sides) for s in studies) == [False, True]:
            log.debug("demo studies from synth seed %d", seed + attempt)
            return studies
        log.debug("synth seed %d did not give two complete 4-view exams; trying the next", seed + attempt)
        shutil.rmtree(root)
    raise MammoNodeError(f"could not synthesise two complete 4-view studies in {MAX_ATTEMPTS} seeds")
