"""The node in one process: C-STORE in over a real socket, scored, results C-STOREd to a destination."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import free_port, storage_scp, write_study
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, MammographyCADSRStorage
from pynetdicom.status import Status
from queue_helpers import c_store, events, referenced_uids
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node.config import Destination, NodeConfig
from node.db.models import Job, OutputObject, Transmission
from node.service import Node

RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""

STUDY = derive_uid("tests", "node-service")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("node-service-study")
    return write_study(folder, patient_id="P-NODE", study_uid=STUDY, transfer_syntax="explicit")


def _config(
    tmp_path: Path, db_url: str, model: Path, destination_port: int, **overrides: object
) -> NodeConfig:
    values: dict[str, object] = {
        "port": free_port(),
        "bind_address": "127.0.0.1",
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "grace_seconds": 0.3,
        "study_quiet_seconds": 30.0,
        "model_dir": model,
        "destinations": (Destination("PACS", "127.0.0.1", destination_port),),
        "poll_seconds": 0.1,
        "retry_initial_seconds": 0.5,
        "retry_max_seconds": 1.0,
    }
    values.update(overrides)
    return NodeConfig(**values)  # type: ignore[arg-type]


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def _sent(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).where(Transmission.state == "sent")) or 0


def test_a_study_sent_to_the_node_comes_back_as_captures_and_a_report(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    study_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    header = dcmread(study_files[0], stop_before_pixels=True)
    phi = [str(header.PatientID), str(header.PatientName)]
    assert all(phi)
    sent_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study_files}
    with storage_scp("PACS") as pacs:
        node = Node(_config(tmp_path, db_url, test_model, pacs.port))
        node.start()
        try:
            assert c_store(study_files, node.config.port) == [int(Status.SUCCESS)] * 4
            received = pacs.wait_for(RESULTS_PER_STUDY, timeout=120)
            _wait(lambda: _sent(sessions) == RESULTS_PER_STUDY)
        finally:
            node.stop()
        time.sleep(0.3)
        assert len(pacs.received) == RESULTS_PER_STUDY  # nothing sent twice

    assert {r.calling_ae for r in received} == {"MAMMONODE"}
    datasets = [r.dataset for r in received]
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {STUDY}
    captures = [ds for ds in datasets if "SourceImageSequence" in ds]
    reports = [ds for ds in datasets if "SourceImageSequence" not in ds]
    assert sorted(str(ds.SOPClassUID) for ds in reports) == sorted(
        [Comprehensive3DSRStorage, MammographyCADSRStorage]
    )
    assert {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in captures} == sent_uids
    assert all(referenced_uids(report) >= sent_uids for report in reports)

    timeline = [e.event for e in events(sessions, "node.started") + events(sessions, "node.stopped")]
    assert timeline == ["node.started", "node.stopped"]
    assert len(events(sessions, "instance.received")) == 4
    assert len(events(sessions, "study.ready")) == 1
    assert len(events(sessions, "study.scored")) == 1
    assert len(events(sessions, "result.sent")) == RESULTS_PER_STUDY

    # Application logs (every logger, DEBUG up) name UIDs, never the patient; the audit log does.
    assert caplog.records, "the node logged nothing at all: the check below would prove nothing"
    for text in phi:
        assert text not in caplog.text
    assert {e.patient_id for e in events(sessions, "instance.received")} == {phi[0]}


def test_results_wait_through_a_restart_for_a_destination_that_was_down(
    db_url: str, sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, study_files: list[Path]
) -> None:
    port = free_port()  # nothing listens here yet: the destination is down
    node = Node(_config(tmp_path, db_url, test_model, port))
    node.start()
    try:
        assert c_store(study_files, node.config.port) == [int(Status.SUCCESS)] * 4

        def failed_once() -> bool:
            with sessions() as session:
                states = session.scalars(select(Transmission.state)).all()
            return len(states) == RESULTS_PER_STUDY and set(states) == {"failed"}

        _wait(failed_once, timeout=120)
    finally:
        node.stop()

    # The destination comes up; a new node process on the same data delivers exactly once.
    with storage_scp("PACS", port=port) as pacs:
        node = Node(_config(tmp_path, db_url, test_model, port))
        node.start()
        try:
            pacs.wait_for(5, timeout=60)
            _wait(lambda: _sent(sessions) == RESULTS_PER_STUDY)
        finally:
            node.stop()
        time.sleep(0.3)
        assert (
            len(pacs.received) == RESULTS_PER_STUDY
            and len(set(pacs.sop_instance_uids())) == RESULTS_PER_STUDY
        )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
        assert session.scalar(select(func.count()).select_from(OutputObject)) == RESULTS_PER_STUDY
