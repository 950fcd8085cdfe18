"""The outbox sender and the C-STORE/C-ECHO SCU, against real SCPs on loopback: delivery, backoff,
the dead-letter state, and transfer-syntax negotiation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dicom_helpers import (
    MG_FOR_PRESENTATION,
    NODE_AE,
    PATIENT,
    STUDY,
    NodeFactory,
    add_output,
    events,
    load,
    mammogram,
    transmission,
)
from peers import LOOPBACK, free_port, storage_scp
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.config import AllowedPeer, Destination, NodeConfig
from node.db.models import as_utc, utcnow
from node.dicom.sender import backoff_seconds, deliver_due, echo, send_files, store_files
from node.dicom.status import DimseStatus

PACS_AE = "PACS"


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        ae_title=NODE_AE,
        data_dir=tmp_path / "node",
        retry_initial_seconds=30.0,
        retry_max_seconds=100.0,
        retry_max_age_hours=6.0,
    )


@contextmanager
def status_scp(status: int, syntaxes: list[str] | None = None) -> Iterator[int]:
    """A storage SCP for MG For Presentation that answers every C-STORE with ``status``."""
    ae = AE(PACS_AE)
    ae.add_supported_context(MG_FOR_PRESENTATION, syntaxes or [ExplicitVRLittleEndian, JPEG2000Lossless])
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]
    )
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def test_delivers_due_items_and_audits(
    sessions: sessionmaker[Session], config: NodeConfig, tmp_path: Path
) -> None:
    now = utcnow()
    files = [
        mammogram(tmp_path, "j2k", transfer_syntax="jpeg2000"),
        mammogram(tmp_path, "plain", laterality="R", number=2),
    ]
    with storage_scp(PACS_AE) as pacs:
        destination = f"{PACS_AE}@{LOOPBACK}:{pacs.port}"
        ids = [add_output(sessions, config, f, destination, now=now) for f in files]
        assert deliver_due(config, sessions, now) == 2
        received = pacs.wait_for(2)
    assert {r.dataset.SOPInstanceUID for r in received} == {load(f).SOPInstanceUID for f in files}
    assert {r.transfer_syntax for r in received} == {str(load(f).file_meta.TransferSyntaxUID) for f in files}
    assert all(r.calling_ae == NODE_AE for r in received)
    for tx_id in ids:
        row = transmission(sessions, tx_id)
        assert (row.state, row.attempts, row.last_error) == ("sent", 1, None) and row.sent_at is not None
    sent = events(sessions, audit.RESULT_SENT)
    assert {e.sop_instance_uid for e in sent} == {load(f).SOPInstanceUID for f in files}
    assert all((e.study_uid, e.patient_id, e.peer) == (STUDY, PATIENT, destination) for e in sent)
    assert deliver_due(config, sessions, now + dt.timedelta(hours=1)) == 0  # nothing left


def test_transient_failure_backs_off_then_delivers(
    sessions: sessionmaker[Session], config: NodeConfig, tmp_path: Path
) -> None:
    t0 = utcnow()
    port = free_port()  # nothing listens: connection refused
    tx_id = add_output(sessions, config, mammogram(tmp_path, "a"), f"{PACS_AE}@{LOOPBACK}:{port}", now=t0)

    expected_delays = [30.0, 60.0, 100.0]  # 30 * 2**n, capped at retry_max_seconds
    now = t0
    for attempt, delay in enumerate(expected_delays, start=1):
        assert deliver_due(config, sessions, now) == 1
        row = transmission(sessions, tx_id)
        assert (row.state, row.attempts) == ("failed", attempt) and row.last_error
        assert as_utc(row.next_attempt_at) == now + dt.timedelta(seconds=delay)
        assert deliver_due(config, sessions, now + dt.timedelta(seconds=delay - 1)) == 0  # not due yet
        now += dt.timedelta(seconds=delay)
    assert [backoff_seconds(config, n) for n in (1, 2, 3, 4, 200)] == [30.0, 60.0, 100.0, 100.0, 100.0]
    failed = events(sessions, audit.RESULT_FAILED)
    assert len(failed) == 3 and (failed[0].details or {}).get("retry_in_seconds") == 30.0

    with storage_scp(PACS_AE, port=port) as pacs:  # the destination is back
        assert deliver_due(config, sessions, now) == 1
        pacs.wait_for(1)
    assert transmission(sessions, tx_id).state == "sent"


def test_failing_past_the_maximum_age_goes_dead(
    sessions: sessionmaker[Session], config: NodeConfig, tmp_path: Path
) -> None:
    now = utcnow()
    created = now - dt.timedelta(hours=config.retry_max_age_hours, minutes=1)
    destination = f"{PACS_AE}@{LOOPBACK}:{free_port()}"
    tx_id = add_output(sessions, config, mammogram(tmp_path, "a"), destination, now=now, created_at=created)
    assert deliver_due(config, sessions, now) == 1
    assert transmission(sessions, tx_id).state == "dead"
    [dead] = events(sessions, audit.RESULT_DEAD)
    assert (dead.details or {}).get("reason") == "older than retry_max_age_hours"
    assert deliver_due(config, sessions, now + dt.timedelta(days=1)) == 0


def test_association_rejection_is_retried_until_the_destination_accepts(
    sessions: sessionmaker[Session], config: NodeConfig, node_scp: NodeFactory, tmp_path: Path
) -> None:
    """A PACS that refuses the node (not configured for it yet) is fixed on the PACS; the node
    keeps retrying with backoff and delivers once it is let in, with no command of its own."""
    refusing = node_scp(ae_title=PACS_AE, allowed_aes=(AllowedPeer("SOMEONE-ELSE"),))
    destination = f"{PACS_AE}@{LOOPBACK}:{refusing.port}"
    now = utcnow()
    tx_id = add_output(sessions, config, mammogram(tmp_path, "a"), destination, now=now)
    assert deliver_due(config, sessions, now) == 1
    row = transmission(sessions, tx_id)
    assert row.state == "failed" and "rejected (permanent)" in (row.last_error or "")
    assert not events(sessions, audit.RESULT_DEAD)
    refusing.server.server_close()  # the PACS is reconfigured: it now answers on the same port
    accepting = node_scp(ae_title=PACS_AE, port=refusing.port)
    later = now + dt.timedelta(hours=1)
    assert deliver_due(config, sessions, later) == 1
    assert transmission(sessions, tx_id).state == "sent"
    assert len(accepting.spool_files()) == 1


@pytest.mark.parametrize(
    ("status", "state"),
    [(DimseStatus.CANNOT_UNDERSTAND, "dead"), (DimseStatus.OUT_OF_RESOURCES, "failed")],
)
def test_store_failure_status_decides_dead_or_retry(
    sessions: sessionmaker[Session], config: NodeConfig, tmp_path: Path, status: int, state: str
) -> None:
    with status_scp(status) as port:
        tx_id = add_output(
            sessions, config, mammogram(tmp_path, "a"), f"{PACS_AE}@{LOOPBACK}:{port}", now=utcnow()
        )
        assert deliver_due(config, sessions) == 1
    row = transmission(sessions, tx_id)
    assert row.state == state and DimseStatus(status).name in (row.last_error or "")


def test_missing_outbox_file_goes_dead(
    sessions: sessionmaker[Session], config: NodeConfig, tmp_path: Path
) -> None:
    with storage_scp(PACS_AE) as pacs:
        source = mammogram(tmp_path, "a")
        tx_id = add_output(sessions, config, source, f"{PACS_AE}@{LOOPBACK}:{pacs.port}", now=utcnow())
        (config.outbox_dir / STUDY / f"{load(source).SOPInstanceUID}.dcm").unlink()
        assert deliver_due(config, sessions) == 1
        assert pacs.received == []
    assert transmission(sessions, tx_id).state == "dead"


def test_uncompressed_falls_back_but_compressed_is_never_transcoded(tmp_path: Path) -> None:
    plain = mammogram(tmp_path, "plain")
    j2k = mammogram(tmp_path, "j2k", transfer_syntax="jpeg2000", number=2)
    with status_scp(DimseStatus.SUCCESS, [str(ImplicitVRLittleEndian)]) as port:
        outcomes = store_files(
            [plain, j2k, tmp_path / "missing.dcm"], Destination(PACS_AE, LOOPBACK, port), NODE_AE
        )
        names = send_files([plain], Destination(PACS_AE, LOOPBACK, port), NODE_AE)
    assert outcomes[0].ok and outcomes[0].detail == "SUCCESS"
    assert not outcomes[1].ok and outcomes[1].permanent and "presentation context" in outcomes[1].detail
    assert not outcomes[2].ok and outcomes[2].permanent
    assert names == [(plain, "SUCCESS")]


def test_echo_reports_an_unreachable_peer() -> None:
    result = echo(LOOPBACK, free_port(), PACS_AE, NODE_AE)
    assert not result.ok and result.status is None and "connection refused" in result.detail
