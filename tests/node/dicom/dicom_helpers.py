"""Helpers of the DICOM networking tests: small synthetic files, a pynetdicom SCU that sends exactly
what a test builds (even malformed), and readers for the rows and audit events the node wrote."""

from __future__ import annotations

import datetime as dt
import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peers import LOOPBACK, write_mammogram
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node.config import NodeConfig
from node.db.models import AuditEvent, Instance, Job, OutputObject, Study, Transmission

SIZE = (256, 192)
MODALITY_AE = "MODALITY"
NODE_AE = "MAMMONODE"
PATIENT = "DICOM-TEST-1"
STUDY = derive_uid("tests", "dicom-networking")
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class RunningNode:
    """An SCP started by the ``node_scp`` fixture."""

    config: NodeConfig
    server: ThreadedAssociationServer
    sessions: sessionmaker[Session]

    @property
    def port(self) -> int:
        return self.config.port

    def spool_files(self) -> list[Path]:
        root = self.config.spool_dir
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


NodeFactory = Callable[..., RunningNode]
"""The ``node_scp`` fixture: ``node_scp(**config overrides) -> RunningNode``."""


def mammogram(
    folder: Path,
    name: str,
    *,
    transfer_syntax: str = "explicit",
    laterality: str = "L",
    view: str = "CC",
    study_uid: str = STUDY,
    number: int = 1,
) -> Path:
    """A synthetic 256x192 MG For Presentation file written by training.synth (via peers)."""
    path = folder / f"{name}.dcm"
    write_mammogram(
        path,
        patient_id=PATIENT,
        study_uid=study_uid,
        laterality=laterality,
        view=view,
        transfer_syntax=transfer_syntax,
        size=SIZE,
        instance_number=number,
    )
    return path


def load(path: Path) -> Dataset:
    return dcmread(path)


def scu_store(
    port: int,
    payloads: Sequence[Dataset | Path],
    *,
    calling_ae: str = MODALITY_AE,
    called_ae: str = NODE_AE,
) -> list[int | None]:
    """C-STORE each payload in one association, proposing exactly (SOP class, syntax) per payload
    from its file meta; returns each response status (None: no response). The dataset is sent
    as built: nothing is validated on this side."""
    datasets = [dcmread(p) if isinstance(p, Path) else p for p in payloads]
    ae = AE(calling_ae)
    ae.maximum_pdu_size = 0
    for key in dict.fromkeys(
        (str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets
    ):
        ae.add_requested_context(key[0], [key[1]])
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
    assert assoc.is_established, "the node refused the association"
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(_as_file(ds))
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        assoc.release()
    return statuses


def _as_file(ds: Dataset) -> Dataset:
    """Round-trip through bytes so the dataset carries its encoding like a file read from disk."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def instances(sessions: sessionmaker[Session]) -> list[Instance]:
    with sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def events(sessions: sessionmaker[Session], event: str | None = None) -> list[AuditEvent]:
    with sessions() as session:
        stmt = select(AuditEvent).order_by(AuditEvent.id)
        if event is not None:
            stmt = stmt.where(AuditEvent.event == event)
        return list(session.scalars(stmt))


# -- the outbox, as the worker fills it ----------------------------------------------------------


def add_output(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    source: Path,
    destination: str,
    *,
    now: dt.datetime,
    created_at: dt.datetime | None = None,
) -> int:
    """Put ``source`` in the outbox with one pending transmission, as the worker does; its id."""
    ds = load(source)
    rel = f"{STUDY}/{ds.SOPInstanceUID}.dcm"
    (config.outbox_dir / STUDY).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, config.outbox_dir / rel)
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == STUDY)).one_or_none()
        if study is None:
            study = Study(study_uid=STUDY, patient_id=PATIENT, state="scored", scored_version=1)
            session.add(study)
            session.flush()
        job = Job(study_id=study.id, version=len(study.jobs) + 1, lateralities="LR", state="done")
        output = OutputObject(
            kind="SC", sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, outbox_path=rel
        )
        session.add(job)
        session.flush()
        output.job_id = job.id
        session.add(output)
        session.flush()
        tx = Transmission(
            output_id=output.id,
            destination=destination,
            state="pending",
            next_attempt_at=now,
            created_at=created_at or now,
        )
        session.add(tx)
        session.commit()
        return tx.id


def transmission(sessions: sessionmaker[Session], tx_id: int) -> Transmission:
    with sessions() as session:
        row = session.get(Transmission, tx_id)
        assert row is not None
        return row
