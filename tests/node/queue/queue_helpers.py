"""Helpers of the queue tests: put studies in the database (and files in the spool) the way the
C-STORE handler does, so assembly and the worker can be tested without a network."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import NodeConfig
from node.db.models import AuditEvent, Breast, Instance, Study

T0 = dt.datetime(2026, 1, 5, 9, 0, 0, tzinfo=dt.UTC)
STUDY = "1.2.826.0.1.3680043.10.1234.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def make_config(tmp_path: Path, **overrides: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "grace_seconds": 5.0,
        "study_quiet_seconds": 60.0,
    }
    values.update(overrides)
    return NodeConfig(**values)


def add_instance(
    sessions: sessionmaker[Session],
    *,
    study_uid: str = STUDY,
    patient_id: str = "P-1",
    laterality: str = "L",
    view: str = "CC",
    sop_uid: str | None = None,
    series_uid: str | None = None,
    sop_class_uid: str = MG_FOR_PRESENTATION,
    skip_reason: str | None = None,
    at: dt.datetime = T0,
    spool_path: str | None = None,
) -> int:
    """Record one received instance as the SCP contract says; returns the Instance ID."""
    scorable = skip_reason is None
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            study = Study(
                study_uid=study_uid, patient_id=patient_id, first_received_at=at, last_received_at=at
            )
            session.add(study)
            session.flush()
        n = len(study.instances) + 1
        sop_uid = sop_uid or f"{study_uid}.{n}"
        series_uid = series_uid or f"{study_uid}.0"
        instance = Instance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            study_id=study.id,
            series_uid=series_uid,
            transfer_syntax_uid=EXPLICIT_VR_LE,
            laterality=laterality,
            view=view,
            scorable=scorable,
            skip_reason=skip_reason,
            spool_path=spool_path or f"{study_uid}/{series_uid}/{sop_uid}.dcm",
            size_bytes=1,
            received_at=at,
        )
        session.add(instance)
        if scorable:
            breast = session.scalars(
                select(Breast).where(Breast.study_id == study.id, Breast.laterality == laterality)
            ).first()
            if breast is None:
                session.add(Breast(study_id=study.id, laterality=laterality, dirty=True))
            else:
                breast.dirty = True
            if study.state != "receiving":
                study.state = "receiving"
        study.last_received_at = at
        session.commit()
        return instance.id


def spool_file(sessions: sessionmaker[Session], config: NodeConfig, path: Path, at: dt.datetime = T0) -> int:
    """Copy a DICOM file into the spool (UID path) and record it; returns the Instance ID."""
    ds = dcmread(path, stop_before_pixels=True)
    study_uid, series_uid, sop_uid = (
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )
    rel = f"{study_uid}/{series_uid}/{sop_uid}.dcm"
    target = config.spool_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return add_instance(
        sessions,
        study_uid=study_uid,
        patient_id=str(ds.PatientID),
        laterality=str(ds.ImageLaterality),
        view=str(ds.ViewPosition),
        sop_uid=sop_uid,
        series_uid=series_uid,
        at=at,
        spool_path=rel,
    )


def events(sessions: sessionmaker[Session], event: str) -> list[AuditEvent]:
    with sessions() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id))
        )


def study_row(sessions: sessionmaker[Session], study_uid: str = STUDY) -> Study:
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        return study


def referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds`` (SC source images, SR evidence)."""
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def c_store(files: list[Path], port: int) -> list[int]:
    """Send ``files`` as a modality would (one association); the C-STORE statuses."""
    ae = AE("MODALITY")
    ae.add_requested_context(MG_FOR_PRESENTATION, EXPLICIT_VR_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dcmread(path)).Status) for path in files]
    finally:
        assoc.release()
