"""Results of one job: files in the outbox, and the score, output and transmission rows.

Files are written (and fsync'd) before the rows that point at them are committed, so a committed
output always has its file. Both are idempotent: the writers derive every SOP Instance UID from
the inputs, model and result version (invariant 6), a re-run after a crash rewrites the same
files, and rows that already exist under those UIDs are reused rather than duplicated.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import EncodedObject, Pipeline, StudyOutputs, StudyScore, atomic_write_bytes, is_valid_uid
from node.config import Destination
from node.db.models import OutputObject, Score, Transmission, utcnow
from node.db.states import TransmissionState
from node.dicom.intake import side_code
from node.dicom.spool import fsync_dir
from node.private_files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE

KIND_SC = "SC"
KIND_SR = "SR"
KIND_CAD_SR = "CAD"
KIND_PR = "PR"


def write_outbox_file(outbox_dir: Path, study_uid: str, obj: EncodedObject) -> str:
    """Write an encoded result to ``outbox/<study_uid>/<sop_uid>.dcm`` atomically and durably.

    Returns the path relative to ``outbox_dir``. The file is synced before it is renamed into
    place and the folder is synced after, so a committed row never points at a missing file.
    A full disk raises OSError (ENOSPC), which the worker treats as transient.
    """
    sop_uid = obj.sop_instance_uid
    for uid in (study_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"refusing to build an outbox path from an invalid UID {uid!r}")
    folder = outbox_dir / study_uid
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    path = folder / f"{sop_uid}.dcm"
    atomic_write_bytes(path, obj.data, mode=PRIVATE_FILE_MODE)  # patient data
    fsync_dir(folder)
    return f"{study_uid}/{sop_uid}.dcm"


def score_rows(job_id: int, study: StudyScore, pipeline: Pipeline) -> list[Score]:
    """Image, breast and exam scores of ``study``, each naming the model that made it."""
    m = pipeline.manifest
    common: dict[str, Any] = {
        "job_id": job_id,
        "threshold": float(study.threshold),
        "model_name": m.name,
        "model_version": m.version,
        "weights_sha256": m.weights_sha256,
    }
    rows = [
        Score(
            level="image",
            laterality=side_code(i.meta.laterality),
            sop_instance_uid=i.meta.sop_instance_uid,
            probability=float(i.probability),
            recall=None,
            aggregation=None,
            input_uids={"sop_instance_uids": [i.meta.sop_instance_uid]},
            **common,
        )
        for i in study.images
    ]
    rows += [
        Score(
            level="breast",
            laterality=side_code(b.laterality),
            sop_instance_uid=None,
            probability=float(b.probability),
            recall=b.probability >= study.threshold,
            aggregation=b.method,
            input_uids={"sop_instance_uids": sorted(b.image_probabilities)},
            **common,
        )
        for b in study.breasts
    ]
    rows.append(
        Score(
            level="exam",
            laterality=None,
            sop_instance_uid=None,
            probability=float(study.exam_probability),
            recall=bool(study.recall_recommended),
            aggregation=pipeline.aggregation,
            input_uids={"sop_instance_uids": sorted(i.meta.sop_instance_uid for i in study.images)},
            **common,
        )
    )
    return rows


def add_output(
    session: Session,
    *,
    job_id: int,
    kind: str,
    obj: EncodedObject,
    outbox_path: str,
    source_uids: Sequence[str],
    destinations: Iterable[Destination],
) -> OutputObject:
    """The output row of ``obj`` plus one pending transmission per destination, reusing what exists."""
    sop_uid = obj.sop_instance_uid
    output = session.scalars(select(OutputObject).where(OutputObject.sop_instance_uid == sop_uid)).first()
    if output is None:
        output = OutputObject(
            job_id=job_id,
            kind=kind,
            sop_instance_uid=sop_uid,
            sop_class_uid=obj.sop_class_uid,
            outbox_path=outbox_path,
            source_uids={"sop_instance_uids": list(source_uids)},
        )
        session.add(output)
        session.flush()
    existing = set(
        session.scalars(select(Transmission.destination).where(Transmission.output_id == output.id))
    )
    now = utcnow()
    for destination in destinations:
        if str(destination) not in existing:
            session.add(
                Transmission(
                    output_id=output.id,
                    destination=str(destination),
                    state=TransmissionState.PENDING,
                    next_attempt_at=now,
                )
            )
    return output


Output = tuple[str, EncodedObject, str, list[str]]
"""(kind, encoded object, outbox path, source SOP Instance UIDs) of one written result."""


def write_outputs(
    outbox_dir: Path, study_uid: str, lateralities: Collection[str], result: StudyOutputs
) -> list[Output]:
    """Write a scored study version's objects to the outbox: the captures and presentation states
    of the breasts it re-scores (``lateralities``), the report and the CAD SR."""
    files: list[Output] = []
    states = result.presentation_states or [None] * len(result.score.images)
    for image, sc, state in zip(result.score.images, result.secondary_captures, states, strict=True):
        if side_code(image.meta.laterality) not in lateralities:
            continue
        for kind, obj in ((KIND_SC, sc), (KIND_PR, state)):
            if obj is not None:
                files.append(
                    (kind, obj, write_outbox_file(outbox_dir, study_uid, obj), [image.meta.sop_instance_uid])
                )
    all_sources = [i.meta.sop_instance_uid for i in result.score.images]
    for kind, report in ((KIND_SR, result.report), (KIND_CAD_SR, result.cad_report)):
        if report is not None:
            files.append((kind, report, write_outbox_file(outbox_dir, study_uid, report), all_sources))
    return files
