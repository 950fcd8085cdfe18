"""Issue 3's "Done means": the node end to end with peers it did not write itself.

dcmtk's ``storescu``/``echoscu`` play the modality and a real Orthanc plays the PACS (see
``tests/node/peers.py``); the node runs in-process (``Node``) or, where a real process matters
(its config file, ``kill -9``), as ``mammonode serve --config FILE``. Every test runs on SQLite
and on PostgreSQL (``db_url``). Images and model are tiny so the file fits in CI time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers import (
    LOOPBACK,
    ORTHANC_AET,
    STORAGE_CLASSES,
    Orthanc,
    OrthancError,
    OrthancFactory,
    echoscu,
    free_port,
    storescu,
    write_mammogram,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import MammographyCADSRStorage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import AllowedPeer, Destination, NodeConfig
from node.db.models import AuditEvent, Instance, Job, OutputObject, Score, Study, Transmission
from node.service import Node

pytestmark = [pytest.mark.peers, pytest.mark.dcmtk, pytest.mark.slow]

MAMMONODE = Path(sys.executable).with_name("mammonode")
NODE_AE = "MAMMONODE"
MODALITY_AE = "MODALITY"
SECONDARY_CAPTURE = STORAGE_CLASSES["secondary_capture"]
RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""
RESULT_TIMEOUT = 120.0
"""Grace period plus scoring plus sending, with room for a loaded 2-core CI box."""
SETTLE_SECONDS = 3.0
"""A pause after the results arrived in which a duplicate or stray resend would show up (several
sender polls and the shortest retry delay)."""

# Fast settings for every node here: the study is complete once the 4 views are in, so the grace
# period decides; a long quiet period makes sure nothing is scored early by accident.
FAST: dict[str, Any] = {
    "grace_seconds": 0.5,
    "study_quiet_seconds": 30.0,
    "poll_seconds": 0.2,
    "retry_initial_seconds": 1.0,
    "retry_max_seconds": 2.0,
}


# -- helpers -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = RESULT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (after {timeout:.0f} s)")
        time.sleep(0.2)


def sop_uids(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def study_uid_of(files: list[Path]) -> str:
    (uid,) = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files}
    return uid


def node_modality(port: int) -> dict[str, tuple[str, str, int]]:
    """The node as Orthanc's DicomModalities: Orthanc accepts its results and can send to it."""
    return {"mammonode": (NODE_AE, LOOPBACK, port)}


def modality_and_node(port: int) -> dict[str, tuple[str, str, int]]:
    return {**node_modality(port), "modality": (MODALITY_AE, LOOPBACK, free_port())}


def source_uid(capture: Dataset) -> str:
    (item,) = capture.SourceImageSequence
    return str(item.ReferencedSOPInstanceUID)


def evidence_uids(report: Dataset) -> set[str]:
    """The SOP Instance UIDs an SR lists as the evidence it was made from: its evidence sequence
    less the CAM captures it references as "Visual explanation" (DCM 130401) of its images."""
    listed = {
        str(sop.ReferencedSOPInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    captures = set()
    todo = list(report.ContentSequence)
    while todo:
        item = todo.pop()
        names = item.get("ConceptNameCodeSequence", [])
        if item.get("ValueType") == "IMAGE" and names and names[0].CodeValue == "130401":
            captures.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        todo.extend(item.get("ContentSequence", []))
    return listed - captures


@dataclass
class Results:
    """What the node left in Orthanc, read back from the stored files."""

    captures: list[Dataset]
    reports: list[Dataset]
    cad_reports: list[Dataset]
    others: list[Dataset]


def results_in(pacs: Orthanc) -> Results:
    datasets = [pacs.dataset(i) for i in pacs.instances()]
    return Results(
        captures=[ds for ds in datasets if ds.SOPClassUID == SECONDARY_CAPTURE],
        reports=[ds for ds in datasets if ds.Modality == "SR" and ds.SOPClassUID != MammographyCADSRStorage],
        cad_reports=[ds for ds in datasets if ds.SOPClassUID == MammographyCADSRStorage],
        others=[ds for ds in datasets if ds.SOPClassUID != SECONDARY_CAPTURE and ds.Modality != "SR"],
    )


def wait_for_exactly(pacs: Orthanc, n: int) -> list[str]:
    """Wait until Orthanc holds ``n`` instances, then check that no more arrive."""
    pacs.wait_for_instances(n, timeout=RESULT_TIMEOUT)
    time.sleep(SETTLE_SECONDS)
    ids = pacs.instances()
    assert len(ids) == n, f"Orthanc holds {len(ids)} instances, expected exactly {n}"
    return ids


def assert_one_result_set(results: Results, study_uid: str, patient_id: str, sent: list[str]) -> None:
    """4 CAM captures, one per sent image, one score report and one Mammography CAD SR, each
    citing them all, in the sent study."""
    assert len(results.captures) == 4 and len(results.reports) == 1 and len(results.cad_reports) == 1
    report, cad = results.reports[0], results.cad_reports[0]
    for ds in [*results.captures, report, cad]:
        assert (str(ds.StudyInstanceUID), str(ds.PatientID)) == (study_uid, patient_id)
    assert sorted(source_uid(c) for c in results.captures) == sorted(sent)
    assert evidence_uids(report) == set(sent) and evidence_uids(cad) == set(sent)
    assert str(report.SOPClassUID) in STORAGE_CLASSES.values()


def wait_sent(sessions: sessionmaker[Session], n: int) -> None:
    wait_until(lambda: count(sessions, Transmission, Transmission.state == "sent") == n, "not all sent")


def count(sessions: sessionmaker[Session], model: type[Any], *where: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def audit_events(sessions: sessionmaker[Session], *names: str) -> list[AuditEvent]:
    with sessions() as session:
        stmt = select(AuditEvent).order_by(AuditEvent.id)
        if names:
            stmt = stmt.where(AuditEvent.event.in_(names))
        return list(session.scalars(stmt))


def transmission_states(sessions: sessionmaker[Session]) -> list[tuple[str, int]]:
    with sessions() as session:
        return [
            (t.state, t.attempts) for t in session.scalars(select(Transmission).order_by(Transmission.id))
        ]


def all_sent_once(sessions: sessionmaker[Session]) -> None:
    """Every transmission is sent and the audit log says each went out exactly once."""
    assert [state for state, _ in transmission_states(sessions)] == ["sent"] * RESULTS_PER_STUDY
    sent = audit_events(sessions, "result.sent")
    assert len(sent) == RESULTS_PER_STUDY
    assert len({e.details["transmission_id"] for e in sent if e.details}) == RESULTS_PER_STUDY


def assert_storescu_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"storescu exited {proc.returncode}:\n{proc.stderr}"


# -- the node, in-process or as `mammonode serve` --------------------------------------------------


def node_settings(
    tmp_path: Path, db_url: str, model: Path, port: int, destination: str, **overrides: Any
) -> dict[str, Any]:
    """Settings under their TOML / NodeConfig names (plain values, so both forms can use them)."""
    values: dict[str, Any] = {
        "ae_title": NODE_AE,
        "port": port,
        "bind_address": LOOPBACK,
        "data_dir": str(tmp_path / "node-data"),
        "database_url": db_url,
        "model_dir": str(model),
        "allowed_aes": [MODALITY_AE],
        "destinations": [destination],
        **FAST,
    }
    values.update(overrides)
    return values


def node_config(settings: dict[str, Any]) -> NodeConfig:
    values = dict(settings)
    values["data_dir"] = Path(values["data_dir"])
    values["model_dir"] = Path(values["model_dir"])
    values["allowed_aes"] = tuple(AllowedPeer.parse(a) for a in values["allowed_aes"])
    values["destinations"] = tuple(Destination.parse(d) for d in values["destinations"])
    return NodeConfig(**values)


def write_toml(path: Path, settings: dict[str, Any]) -> Path:
    """A `mammonode serve` config file; destinations as ``[[destinations]]`` tables."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if k != "destinations"]
    for text in settings.get("destinations", []):
        d = Destination.parse(text)
        lines += ["[[destinations]]", f'ae_title = "{d.ae_title}"', f'host = "{d.host}"', f"port = {d.port}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def start_node() -> Iterator[Callable[[dict[str, Any]], Node]]:
    """``start_node(settings) -> Node`` started in this process; stopped at teardown."""
    nodes: list[Node] = []

    def start(settings: dict[str, Any]) -> Node:
        node = Node(node_config(settings))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one torch thread: the CI box has 2 cores
    return env


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def serve(config: Path, port: int, log_path: Path) -> Iterator[ServeProcess]:
    """``mammonode serve --config FILE`` until its DICOM port answers C-ECHO; killed on exit.

    Its output goes to a file (a pipe nobody reads would block it once full).
    """
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(MAMMONODE), "serve", "--config", str(config)],
            env=_subprocess_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    served = ServeProcess(process, log_path)
    try:
        deadline = time.monotonic() + RESULT_TIMEOUT
        while echoscu(port, NODE_AE, MODALITY_AE).returncode != 0:
            assert process.poll() is None, f"mammonode serve exited:\n{served.log_tail()}"
            assert time.monotonic() < deadline, f"mammonode serve did not answer:\n{served.log_tail()}"
            time.sleep(0.3)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


# -- the tests -----------------------------------------------------------------------------------


def test_modality_to_node_to_pacs_with_the_audit_timeline(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    j2k_study: list[Path],
) -> None:
    """storescu sends a 4-view J2K study to `mammonode serve`; Orthanc gets 4 CAMs + 1 SR."""
    port = free_port()
    pacs = orthanc(node_modality(port))
    settings = node_settings(tmp_path, db_url, test_model, port, pacs.destination)
    config = write_toml(tmp_path / "node.toml", settings)
    study_uid, sent = study_uid_of(j2k_study), sop_uids(j2k_study)
    patient_id = str(dcmread(j2k_study[0], stop_before_pixels=True).PatientID)

    with serve(config, port, tmp_path / "serve.log") as node:
        started = time.monotonic()
        assert_storescu_ok(storescu(j2k_study, port, aec=NODE_AE, aet=MODALITY_AE, syntax="-xv"))
        pacs.wait_for_instances(RESULTS_PER_STUDY, timeout=RESULT_TIMEOUT)
        elapsed = time.monotonic() - started
        wait_for_exactly(pacs, RESULTS_PER_STUDY)
        assert node.process.poll() is None, node.log_tail()
        wait_until(
            lambda: count(sessions, Transmission, Transmission.state == "sent") == RESULTS_PER_STUDY,
            "not all sent",
        )

    assert elapsed >= FAST["grace_seconds"]  # not before the grace period was over
    results = results_in(pacs)
    assert results.others == []  # Orthanc got results only, never the images themselves
    assert_one_result_set(results, study_uid, patient_id, sent)
    with sessions() as session:  # the images went in as JPEG 2000, as the modality sent them
        syntaxes = set(session.scalars(select(Instance.transfer_syntax_uid)))
    assert syntaxes == {str(dcmread(j2k_study[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)}

    show = subprocess.run(
        [str(MAMMONODE), "audit", "show", study_uid, "--json", "--config", str(config)],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert show.returncode == 0, show.stderr
    timeline = [json.loads(line) for line in show.stdout.splitlines()]
    assert [e["event"] for e in timeline] == [
        "association.accepted",
        *["instance.received"] * 4,
        "study.ready",
        "study.scored",
        *["result.sent"] * RESULTS_PER_STUDY,
    ]
    accepted = timeline[0]
    assert accepted["calling_ae"] == MODALITY_AE and accepted["peer"].startswith(f"{LOOPBACK}:")
    assert sorted(e["sop_instance_uid"] for e in timeline[1:5]) == sorted(sent)
    scored = timeline[6]["details"]
    assert scored["model_name"] == "mammonode-test" and len(scored["weights_sha256"]) == 64
    output_uids = {
        str(ds.SOPInstanceUID) for ds in [*results.captures, *results.reports, *results.cad_reports]
    }
    assert {e["sop_instance_uid"] for e in timeline[7:]} == output_uids
    assert {e["peer"] for e in timeline[7:]} == {pacs.destination}


def test_pacs_sends_a_study_to_the_node_and_gets_the_results_back(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    start_node: Callable[[dict[str, Any]], Node],
    j2k_study: list[Path],
) -> None:
    """Orthanc C-STOREs a study (REST ``/modalities/mammonode/store``); results land beside it."""
    port = free_port()
    pacs = orthanc(node_modality(port))
    start_node(node_settings(tmp_path, db_url, test_model, port, pacs.destination, allowed_aes=[ORTHANC_AET]))
    study_uid, sent = study_uid_of(j2k_study), sop_uids(j2k_study)
    uploaded = [pacs.upload(p) for p in j2k_study]
    (orthanc_study,) = {pacs.get_json(f"/instances/{i}/study")["ID"] for i in uploaded}

    job = pacs.send_to_modality("mammonode", [orthanc_study])
    assert job.get("FailedInstancesCount", 0) == 0 and job.get("InstancesCount") == 4, job

    wait_for_exactly(pacs, 4 + RESULTS_PER_STUDY)
    results = results_in(pacs)
    assert sorted(str(ds.SOPInstanceUID) for ds in results.others) == sorted(sent)
    patient_id = str(results.others[0].PatientID)
    assert_one_result_set(results, study_uid, patient_id, sent)
    wait_until(
        lambda: count(sessions, Transmission, Transmission.state == "sent") == RESULTS_PER_STUDY,
        "not all sent",
    )
    all_sent_once(sessions)
    (accepted,) = audit_events(sessions, "association.accepted")
    assert accepted.calling_ae == ORTHANC_AET
    assert count(sessions, Instance) == 4


def test_a_node_killed_before_sending_delivers_exactly_one_set_after_restart(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    j2k_study: list[Path],
) -> None:
    """`mammonode serve` scores the study while the PACS is not up yet, is killed (-9) with every
    result still unsent, and restarted once the PACS is up: one set of results, each sent once."""
    port, http_port, dicom_port = free_port(), free_port(), free_port()
    destination = f"{ORTHANC_AET}@{LOOPBACK}:{dicom_port}"
    config = write_toml(
        tmp_path / "node.toml", node_settings(tmp_path, db_url, test_model, port, destination)
    )
    study_uid, sent = study_uid_of(j2k_study), sop_uids(j2k_study)
    patient_id = str(dcmread(j2k_study[0], stop_before_pixels=True).PatientID)

    with serve(config, port, tmp_path / "serve-1.log") as node:
        assert_storescu_ok(storescu(j2k_study, port, aec=NODE_AE, aet=MODALITY_AE))

        def tried_and_failed() -> bool:
            states = transmission_states(sessions)
            return len(states) == RESULTS_PER_STUDY and all(s == "failed" and n >= 1 for s, n in states)

        wait_until(tried_and_failed, "results were not tried against the absent PACS")
        node.process.send_signal(signal.SIGKILL)
        assert node.process.wait(30) == -signal.SIGKILL
    assert count(sessions, OutputObject) == RESULTS_PER_STUDY
    assert audit_events(sessions, "result.sent") == []

    pacs = orthanc(node_modality(port), http_port=http_port, dicom_port=dicom_port)
    assert pacs.instances() == []
    with serve(config, port, tmp_path / "serve-2.log") as node:
        wait_for_exactly(pacs, RESULTS_PER_STUDY)
        wait_until(
            lambda: count(sessions, Transmission, Transmission.state == "sent") == RESULTS_PER_STUDY,
            "not all sent",
        )
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(60) == 0, node.log_tail()

    assert_one_result_set(results_in(pacs), study_uid, patient_id, sent)
    all_sent_once(sessions)
    assert count(sessions, Job) == 1 and count(sessions, OutputObject) == RESULTS_PER_STUDY
    assert len(audit_events(sessions, "study.scored")) == 1  # the restart did not score it again
    assert len(audit_events(sessions, "node.started")) == 2


def test_results_wait_for_a_pacs_that_is_down_and_arrive_once_it_is_back(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    start_node: Callable[[dict[str, Any]], Node],
    j2k_study: list[Path],
) -> None:
    port = free_port()
    pacs = orthanc(node_modality(port))
    start_node(node_settings(tmp_path, db_url, test_model, port, pacs.destination))
    pacs.kill()  # the PACS crashes before the results are ready
    assert_storescu_ok(storescu(j2k_study, port, aec=NODE_AE, aet=MODALITY_AE))

    wait_until(
        lambda: (
            len({e.sop_instance_uid for e in audit_events(sessions, "result.failed")}) == RESULTS_PER_STUDY
        ),
        "the node did not try the dead PACS",
    )
    assert [state for state, _ in transmission_states(sessions)] == ["failed"] * RESULTS_PER_STUDY
    failed = audit_events(sessions, "result.failed")[0]
    assert failed.peer == pacs.destination and failed.details and failed.details["retry_in_seconds"] > 0

    pacs.start()  # same ports, same (empty) storage
    wait_for_exactly(pacs, RESULTS_PER_STUDY)
    assert_one_result_set(
        results_in(pacs),
        study_uid_of(j2k_study),
        str(dcmread(j2k_study[0], stop_before_pixels=True).PatientID),
        sop_uids(j2k_study),
    )
    wait_until(
        lambda: count(sessions, Transmission, Transmission.state == "sent") == RESULTS_PER_STUDY,
        "not all sent",
    )
    all_sent_once(sessions)
    assert all(attempts >= 2 for _, attempts in transmission_states(sessions))
    assert audit_events(sessions, "result.dead") == []


def test_an_unknown_calling_ae_is_rejected_and_audited(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    start_node: Callable[[dict[str, Any]], Node],
    j2k_study: list[Path],
) -> None:
    """Only MODALITY may call: dcmtk as STRANGER, and Orthanc (not on the list), are refused."""
    port = free_port()
    pacs = orthanc(node_modality(port))
    start_node(node_settings(tmp_path, db_url, test_model, port, pacs.destination))

    stranger = storescu(j2k_study, port, aec=NODE_AE, aet="STRANGER")
    assert stranger.returncode != 0
    assert "reject" in stranger.stderr.lower(), stranger.stderr
    pacs.upload(j2k_study[0])
    with pytest.raises(OrthancError):  # Orthanc's C-STORE job fails: its association is refused
        pacs.send_to_modality("mammonode", pacs.instances())
    assert echoscu(port, NODE_AE, MODALITY_AE).returncode == 0  # the node still serves its modality

    rejected = audit_events(sessions, "association.rejected")
    assert [e.calling_ae for e in rejected] == ["STRANGER", ORTHANC_AET]
    for event in rejected:
        host, _, peer_port = (event.peer or "").rpartition(":")
        assert host == LOOPBACK and int(peer_port) > 0
        assert event.details and "allow-list" in event.details["reason"]
    assert [e.calling_ae for e in audit_events(sessions, "association.accepted")] == [MODALITY_AE]
    assert count(sessions, Instance) == 0 and count(sessions, Study) == 0
    assert audit_events(sessions, "instance.received") == []


def test_a_late_view_produces_a_second_version_and_both_are_kept(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    start_node: Callable[[dict[str, Any]], Node],
    j2k_study: list[Path],
) -> None:
    """After the first results, an extra L-CC re-scores the left breast: a new SR and new left
    CAMs in new series reach Orthanc, and the database keeps versions 1 and 2."""
    port = free_port()
    pacs = orthanc(node_modality(port))
    start_node(node_settings(tmp_path, db_url, test_model, port, pacs.destination))
    study_uid, sent = study_uid_of(j2k_study), sop_uids(j2k_study)
    first = dcmread(j2k_study[0], stop_before_pixels=True)
    assert_storescu_ok(storescu(j2k_study, port, aec=NODE_AE, aet=MODALITY_AE))
    wait_for_exactly(pacs, RESULTS_PER_STUDY)
    v1 = results_in(pacs)

    late = tmp_path / "late-L_CC.dcm"
    late_uid = str(
        write_mammogram(
            late,
            patient_id=str(first.PatientID),
            study_uid=study_uid,
            laterality="L",
            view="CC",
            instance_number=5,
        ).SOPInstanceUID
    )
    assert late_uid not in sent
    assert_storescu_ok(storescu([late], port, aec=NODE_AE, aet=MODALITY_AE))
    wait_for_exactly(pacs, RESULTS_PER_STUDY + 5)  # 3 left CAMs (L-CC, L-MLO, late L-CC), 2 new SRs

    v1_uids = {str(ds.SOPInstanceUID) for ds in [*v1.captures, *v1.reports, *v1.cad_reports]}
    both = results_in(pacs)
    new_captures = [ds for ds in both.captures if str(ds.SOPInstanceUID) not in v1_uids]
    (old_report,) = v1.reports
    (new_report,) = [ds for ds in both.reports if str(ds.SOPInstanceUID) not in v1_uids]
    assert len(both.reports) == len(both.cad_reports) == 2 and len(both.captures) == 4 + 3
    left = [uid for uid, path in zip(sent, j2k_study, strict=True) if path.name.startswith("L_")]
    assert sorted(source_uid(c) for c in new_captures) == sorted([*left, late_uid])
    assert {str(c.ImageLaterality) for c in new_captures} == {"L"}
    assert new_report.SeriesInstanceUID != old_report.SeriesInstanceUID
    old_series = {str(ds.SeriesInstanceUID) for ds in v1.captures}
    assert {str(c.SeriesInstanceUID) for c in new_captures}.isdisjoint(old_series)
    assert evidence_uids(new_report) == {*sent, late_uid}  # the exam score needs every image
    assert evidence_uids(old_report) == set(sent)
    for ds in [*new_captures, new_report]:
        assert str(ds.StudyInstanceUID) == study_uid

    wait_until(
        lambda: count(sessions, Transmission, Transmission.state == "sent") == RESULTS_PER_STUDY + 5,
        "not all sent",
    )
    with sessions() as session:
        jobs = list(session.scalars(select(Job).order_by(Job.version)))
        assert [(j.version, j.lateralities, j.state) for j in jobs] == [(1, "LR", "done"), (2, "L", "done")]
        for job in jobs:
            levels = {s.level for s in session.scalars(select(Score).where(Score.job_id == job.id))}
            assert levels == {"image", "breast", "exam"}
        image_scores = {
            job.version: count(sessions, Score, Score.job_id == job.id, Score.level == "image")
            for job in jobs
        }
        assert image_scores == {1: 4, 2: 5}
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        assert (study.state, study.scored_version) == ("scored", 2)
    assert len(audit_events(sessions, "study.scored")) == 2
