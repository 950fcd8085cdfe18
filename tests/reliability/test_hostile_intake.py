"""The hostile corpus (tests/data/hostile/README.md) sent over real sockets to a running node SCP.

For every case: the exact named status, an ``instance.rejected`` audit entry naming it when the
instance is refused, nothing spooled or recorded for refused instances; afterwards the node still
answers C-ECHO and stores a good image, and no log record (DEBUG and up) holds a patient probe.
Runs on SQLite and PostgreSQL (``sessions``). Also: the association limit (``max_associations``)
rejects one association too many and the node keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import hostile
import pytest
from peers import LOOPBACK, free_port
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.config import NodeConfig
from node.db.models import AuditEvent, Instance
from node.dicom.scp import start_scp, stop_scp
from node.dicom.sender import echo
from node.dicom.status import DimseStatus

NODE_AE, PEER_AE = "MAMMONODE", "HOSTILEPEER"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[hostile.HostileCase]:
    return hostile.build_cases(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def chunked_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom streams a file's dataset bytes as they are, instead of re-encoding them."""
    import pynetdicom._config as pynetdicom_config

    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


class Node:
    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session]) -> None:
        self.config, self.sessions = config, sessions
        self.server: ThreadedAssociationServer = start_scp(config, sessions)

    def spooled(self) -> set[str]:
        """SOP Instance UIDs with a file in the spool (files are named after them)."""
        root = self.config.spool_dir
        return {p.name.removesuffix(".dcm") for p in root.rglob("*.dcm")}


def _start(tmp_path: Path, sessions: sessionmaker[Session], **overrides: object) -> Iterator[Node]:
    values: dict[str, object] = {
        "ae_title": NODE_AE,
        "port": free_port(),
        "bind_address": LOOPBACK,
        "data_dir": tmp_path / "node",
    }
    values.update(overrides)
    node = Node(NodeConfig(**values), sessions)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        stop_scp(node.server)


def _wait_until_idle(server: ThreadedAssociationServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.active_associations:
        assert time.monotonic() < deadline, "associations still open after release"
        time.sleep(0.05)


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from _start(tmp_path, sessions)


def send(port: int, case: hostile.HostileCase) -> int | None:
    """One association, one C-STORE of the case file's bytes; the status (None: no response)."""
    ae = AE(PEER_AE)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(case.sop_class, [case.transfer_syntax])
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AE)
    assert assoc.is_established, f"{case.name}: the node refused the association"
    try:
        rsp = assoc.send_c_store(case.path)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def _sop_uid(case: hostile.HostileCase) -> str:
    return str(hostile.read_back(case.path).file_meta.MediaStorageSOPInstanceUID)


@pytest.mark.usefixtures("chunked_sending")
def test_every_hostile_case_gets_its_named_status(
    node: Node, corpus: list[hostile.HostileCase], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    got = {case.name: send(node.config.port, case) for case in corpus}
    assert got == {case.name: int(case.status) for case in corpus}

    refused = [case for case in corpus if case.status != DimseStatus.SUCCESS]
    with node.sessions() as session:
        rejected = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.event == audit.INSTANCE_REJECTED).order_by(AuditEvent.id)
            )
        )
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    details = [e.details or {} for e in rejected]
    assert [d.get("status") for d in details] == [case.status.name for case in refused]
    assert all(d.get("reason") and len(d["reason"]) <= 500 for d in details)
    for event in rejected:
        assert not any(probe in str(event.details) for probe in hostile.PROBES)

    stored = {_sop_uid(case) for case in corpus if case.stored}
    assert node.spooled() == stored, "refused instances must leave nothing in the spool"
    assert set(rows) == stored
    assert not rows[_sop_uid(next(c for c in corpus if c.name == "non_mg_modality"))].scorable
    assert rows[_sop_uid(next(c for c in corpus if c.name == "patient_name_fd"))].scorable

    # the node keeps serving: C-ECHO, then a good image
    assert echo(LOOPBACK, node.config.port, NODE_AE, PEER_AE).ok
    fresh = hostile.base_dataset("rle", number=len(corpus) + 1)
    path = node.config.data_dir.parent / "after.dcm"
    fresh.save_as(path, enforce_file_format=True)
    after = hostile.HostileCase(
        "after",
        "",
        DimseStatus.SUCCESS,
        True,
        path,
        hostile.SECONDARY_CAPTURE,
        str(fresh.file_meta.TransferSyntaxUID),
    )
    assert send(node.config.port, after) == DimseStatus.SUCCESS
    assert str(fresh.SOPInstanceUID) in node.spooled()

    leaks = [r.getMessage() for r in caplog.records if any(p in r.getMessage() for p in hostile.PROBES)]
    assert leaks == []
    assert not any(probe in caplog.text for probe in hostile.PROBES)
    assert any(r.name == "node.dicom.scp" and "MALFORMED_ELEMENT" in r.getMessage() for r in caplog.records)


def test_one_association_over_the_limit_is_rejected_and_the_node_keeps_serving(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    for node in _start(tmp_path, sessions, max_associations=1):
        first = AE(PEER_AE)
        first.add_requested_context("1.2.840.10008.1.1")
        held = first.associate(LOOPBACK, node.config.port, ae_title=NODE_AE)
        assert held.is_established
        try:
            second = AE("SECONDPEER")
            second.add_requested_context("1.2.840.10008.1.1")
            extra = second.associate(LOOPBACK, node.config.port, ae_title=NODE_AE)
            assert extra.is_rejected and not extra.is_established
            assert held.send_c_echo().Status == DimseStatus.SUCCESS  # the held one still works
        finally:
            held.release()
        _wait_until_idle(node.server)  # the server ends a released association's thread a moment later
        assert echo(LOOPBACK, node.config.port, NODE_AE, PEER_AE).ok  # a slot is free again
        with node.sessions() as session:
            refusals = list(
                session.scalars(select(AuditEvent).where(AuditEvent.event == audit.ASSOCIATION_REJECTED))
            )
        assert [e.calling_ae for e in refusals] == ["SECONDPEER"]
