"""Helpers of the admin-command tests: studies in the spool and database as the SCP leaves them,
outbox rows as the worker leaves them, and the CLI run in-process on a test database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peers import write_study
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from inference.uids import derive_uid
from node import audit
from node.db.models import Association, AuditEvent, Breast, Instance, Job, OutputObject, Study, Transmission

T0 = dt.datetime(2026, 3, 2, 8, 0, 0, tzinfo=dt.UTC)
IMAGE_SIZE = (256, 192)
SECRET_NAME = "DOE^JANE^SECRETNAME"
SECRET_INSTITUTION = "St Secret Hospital"
PRIVATE_TEXT = "PRIVATE-PHI-TEXT"


def study_uid(tag: str) -> str:
    return derive_uid("tests", "admin", tag)


def cli(args: Sequence[str], db_url: str, data_dir: Path) -> Result:
    """Run `mammonode ARGS` in-process against the test database and data folder."""
    from node.commands.app import app

    env = {"MAMMONODE_DATABASE_URL": db_url, "MAMMONODE_DATA_DIR": str(data_dir)}
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)


def add_association(
    sessions: sessionmaker[Session], calling_ae: str, host: str, port: int, at: dt.datetime
) -> int:
    with sessions() as session:
        row = Association(
            calling_ae=calling_ae,
            called_ae="MAMMONODE",
            peer_host=host,
            peer_port=port,
            accepted=True,
            started_at=at,
            ended_at=at + dt.timedelta(seconds=2),
        )
        session.add(row)
        session.commit()
        return row.id


def record_event(
    sessions: sessionmaker[Session], event: str, at: dt.datetime, actor: str = "scp", **kwargs: Any
) -> int:
    """One audit event at a chosen time (an INSERT, which the append-only log allows)."""
    with sessions() as session:
        row = audit.record(session, event, actor, **kwargs)
        row.at = at
        session.commit()
        return row.id


def _add_phi(path: Path) -> None:
    """Give a synthetic file the identifying content real ones carry, to prove it is removed."""
    ds = dcmread(path)
    ds.PatientName = SECRET_NAME
    ds.OtherPatientIDs = f"OTHER-{ds.PatientID}"
    ds.InstitutionName = SECRET_INSTITUTION
    ds.ReferringPhysicianName = "WHO^DOCTOR"
    ds.AccessionNumber = "ACC-998877"
    block = ds.private_block(0x0011, "ACME PHI", create=True)
    block.add_new(0x01, "LO", PRIVATE_TEXT)
    ds.save_as(path, enforce_file_format=True)


def spool_study(
    sessions: sessionmaker[Session],
    data_dir: Path,
    *,
    patient_id: str,
    uid: str,
    seed: int = 0,
    at: dt.datetime = T0,
    association_id: int | None = None,
    views: Sequence[tuple[str, str]] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")),
) -> list[str]:
    """Write a synthetic study into ``data_dir/spool/<study>/<series>/<sop>.dcm`` and record it as
    the SCP would (study, scorable instances, dirty breasts); returns the SOP Instance UIDs."""
    staging = data_dir / "staging" / uid
    paths = write_study(
        staging,
        patient_id=patient_id,
        study_uid=uid,
        views=views,
        transfer_syntax="explicit",
        size=IMAGE_SIZE,
        seed=seed,
    )
    sops = []
    with sessions() as session:
        study = Study(
            study_uid=uid, patient_id=patient_id, first_received_at=at, last_received_at=at, state="scored"
        )
        session.add(study)
        session.flush()
        for path in paths:
            _add_phi(path)
            ds = dcmread(path, stop_before_pixels=True)
            rel = f"{uid}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            target = data_dir / "spool" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
            session.add(
                Instance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_id=study.id,
                    series_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    laterality=str(ds.ImageLaterality),
                    view=str(ds.ViewPosition),
                    scorable=True,
                    spool_path=rel,
                    size_bytes=target.stat().st_size,
                    association_id=association_id,
                    received_at=at,
                )
            )
            sops.append(str(ds.SOPInstanceUID))
        for side in sorted({lat for lat, _ in views}):
            session.add(Breast(study_id=study.id, laterality=side, dirty=False, scored_version=1))
        session.commit()
    return sops


def add_outbox(
    sessions: sessionmaker[Session],
    uid: str,
    *,
    patient_id: str = "P-OUTBOX",
    states: Sequence[str] = ("pending",),
    job_state: str = "done",
) -> tuple[int, list[int]]:
    """A study with one job and one SR output sent to one destination per state; returns
    (job ID, transmission IDs)."""
    with sessions() as session:
        study = Study(
            study_uid=uid, patient_id=patient_id, state="scored" if job_state == "done" else "failed"
        )
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, version=1, lateralities="LR", state=job_state, attempts=1)
        if job_state == "failed":
            job.error = "RuntimeError: backend exploded"
        session.add(job)
        session.flush()
        output = OutputObject(
            job_id=job.id,
            kind="SR",
            sop_instance_uid=derive_uid(uid, "sr"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            outbox_path=f"{uid}/{derive_uid(uid, 'sr')}.dcm",
        )
        session.add(output)
        session.flush()
        ids = []
        for n, state in enumerate(states):
            tx = Transmission(
                output_id=output.id,
                destination=f"PACS{n}@127.0.0.1:{10400 + n}",
                state=state,
                attempts=3 if state in ("failed", "dead") else 0,
                next_attempt_at=T0 + dt.timedelta(hours=1),
                last_error="association rejected" if state in ("failed", "dead") else None,
            )
            session.add(tx)
            session.flush()
            ids.append(tx.id)
        session.commit()
        return job.id, ids


def audit_events(sessions: sessionmaker[Session], event: str) -> list[AuditEvent]:
    with sessions() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id))
        )
