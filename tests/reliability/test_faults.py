"""Transient faults retry by themselves: a full disk, and a destination that is down, frozen or
refusing the node -- then everything acknowledged is delivered, with no operator command.

The finding: a 30 MB disk that filled and was then freed left 4 acknowledged studies failed for
good (the outbox write hit ENOSPC and nothing retried it). Design invariant 9: transient faults
(disk full, database or destination down) retry by themselves; invariant 6: a resend never
duplicates an object in the PACS.

Both tests run `mammonode serve` as a subprocess on SQLite and PostgreSQL with short retry
settings, dcmtk ``storescu`` as the modality and a real Orthanc as the destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    NODE_AE,
    Modality,
    ServeFactory,
    delivered,
    evidence_uids,
    node_settings,
    orthanc_sop_uids,
    source_uids,
    store,
    wait_until,
)
from peers import LOOPBACK, Orthanc, OrthancFactory, free_port, write_study
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import AuditEvent, Job, Transmission

RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""

pytestmark = [pytest.mark.peers, pytest.mark.dcmtk, pytest.mark.slow]

MODALITY_AE = "MODALITY"
IMAGE_SIZE = (512, 384)
"""Uncompressed 16-bit: about 390 KB a file, so a few fill a small disk's last megabytes."""
TMPFS_SIZE = "40m"
RESULT_TIMEOUT = 180.0
SETTLE_SECONDS = 3.0
FROZEN_TIMEOUT = 120.0
"""The sender's ACSE timeout (30 s) against a frozen peer, plus room for a loaded box."""


def _uids(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def _events(sessions: sessionmaker[Session], *names: str, after: int = 0) -> list[AuditEvent]:
    with sessions() as session:
        stmt = select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id)
        if names:
            stmt = stmt.where(AuditEvent.event.in_(names))
        return list(session.scalars(stmt))


def _last_event_id(sessions: sessionmaker[Session]) -> int:
    events = _events(sessions)
    return events[-1].id if events else 0


def _assert_one_result_set(pacs: Orthanc, studies: dict[str, list[str]]) -> None:
    """Each study: one CAM SC per image (and no other), one SR and one CAD SR citing them all;
    nothing else."""
    got = delivered(pacs)
    assert got.others == []
    for study_uid, images in studies.items():
        captures = got.captures_of(study_uid)
        assert sorted(uid for c in captures for uid in source_uids(c)) == sorted(images), study_uid
        (report,) = got.reports_of(study_uid)
        (cad,) = got.cad_reports_of(study_uid)
        assert evidence_uids(report) == evidence_uids(cad) == set(images)
    expected = sum(len(images) + 2 for images in studies.values())
    assert len(got.captures) + len(got.reports) + len(got.cad_reports) == expected


def _wait_all_sent(sessions: sessionmaker[Session], n: int) -> None:
    wait_until(lambda: _all_sent(sessions, n), "every transmission recorded as sent", RESULT_TIMEOUT)


def _all_sent(sessions: sessionmaker[Session], n: int) -> bool:
    with sessions() as session:
        states = list(session.scalars(select(Transmission.state)))
    return len(states) == n and set(states) == {"sent"}


def _assert_no_operator_needed(sessions: sessionmaker[Session]) -> None:
    """No job or result given up on, none charged an attempt, no `mammonode queue` command."""
    names = [e.event for e in _events(sessions)]
    for name in ("study.failed", "result.dead", "queue.retry", "queue.drop"):
        assert name not in names, f"{name} in the audit log"
    with sessions() as session:
        jobs = list(session.scalars(select(Job)))
        assert [(j.state, j.attempts) for j in jobs] == [("done", 0)] * len(jobs)
        assert {t.state for t in session.scalars(select(Transmission))} == {"sent"}


# -- (a) a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs mounted for this test (we are root in CI), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(folder: Path) -> Path:
    """Write a ballast file into ``folder`` until its file system has not one byte left."""
    ballast = folder / "ballast"
    chunk = b"\0" * (1 << 20)
    with ballast.open("wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            piece = chunk[:size]
            with contextlib.suppress(OSError):
                while True:
                    out.write(piece)
    stat = os.statvfs(folder)
    assert stat.f_bavail == 0, f"{stat.f_bavail * stat.f_frsize} bytes still free"
    with pytest.raises(OSError) as full:  # really full: not even a small file fits
        (folder / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    return ballast


def test_a_full_disk_refuses_new_images_and_delivers_everything_once_freed(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    serve_node: ServeFactory,
    small_disk: Path,
) -> None:
    """Study A is acknowledged; the disk fills before A is scored (its outbox write hits ENOSPC);
    study B is refused 0xA700; the disk is freed; the modality resends B; A and B are delivered."""
    port = free_port()
    pacs = orthanc({"mammonode": (NODE_AE, LOOPBACK, port)})
    settings = node_settings(
        data_dir=small_disk / "data",
        db_url=db_url,
        model_dir=test_model,
        port=port,
        destinations=[pacs.destination],
        allowed_aes=[MODALITY_AE],
        grace_seconds=5.0,  # room to fill the disk between A's receipt and its scoring
    )
    node = serve_node(settings, echo_ae=MODALITY_AE)
    study_a, study_b = "1.2.826.0.1.3680043.10.1471.31", "1.2.826.0.1.3680043.10.1471.32"
    files_a = write_study(
        tmp_path / "a", patient_id="DISK-A", study_uid=study_a, transfer_syntax="explicit", size=IMAGE_SIZE
    )
    files_b = write_study(
        tmp_path / "b",
        patient_id="DISK-B",
        study_uid=study_b,
        transfer_syntax="explicit",
        size=IMAGE_SIZE,
        seed=1,
    )
    node.start()
    try:
        sent_a = store(files_a, port, aet=MODALITY_AE)
        assert sorted(sent_a.acknowledged) == sorted(files_a), sent_a.log
        ballast = fill(small_disk)

        # New images are refused with OUT_OF_RESOURCES (0xA700), audited under that name.
        refused = store(files_b, port, aet=MODALITY_AE)
        assert refused.acknowledged == [], refused.log
        assert set(refused.responses.values()) == {"Refused: OutOfResources"}, refused.log
        rejected = _events(sessions, "instance.rejected")
        assert sorted(e.sop_instance_uid or "" for e in rejected) == sorted(_uids(files_b))
        assert {(e.details or {}).get("status") for e in rejected} == {"OUT_OF_RESOURCES"}

        # A's outbox write met the full disk: the job is deferred as a transient fault.
        def deferred() -> bool:
            return any(
                e.study_uid == study_a and (e.details or {}).get("transient") is True
                for e in _events(sessions, "study.deferred")
            )

        wait_until(deferred, "study A's scoring deferred by the full disk (ENOSPC)", RESULT_TIMEOUT)
        assert pacs.instances() == []

        ballast.unlink()  # the operator frees space; nobody touches the node
        modality = Modality("modality", MODALITY_AE, files_b, port, "-xe", time.monotonic() + RESULT_TIMEOUT)
        modality.run()
        assert modality.error is None, "\n".join(modality.history)

        pacs.wait_for_instances(2 * RESULTS_PER_STUDY, timeout=RESULT_TIMEOUT)
        wait_until(
            lambda: _all_sent(sessions, 2 * RESULTS_PER_STUDY),
            "every transmission recorded as sent",
            RESULT_TIMEOUT,
        )
        time.sleep(SETTLE_SECONDS)
        assert node.running, node.log_tail()
    finally:
        node.cleanup()  # before the tmpfs is unmounted
    _assert_one_result_set(pacs, {study_a: _uids(files_a), study_b: _uids(files_b)})
    _assert_no_operator_needed(sessions)


# -- (b) a destination that is down, frozen, refusing, then healthy ---------------------------------


def test_results_reach_a_destination_that_was_down_frozen_and_refusing_exactly_once(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    serve_node: ServeFactory,
) -> None:
    """Study 1 while the PACS is stopped, study 2 while it is frozen (SIGSTOP: TCP connects, no
    DICOM answer), study 3 while it refuses the node's AE; then it is healthy again and every
    result arrives, once per SOP Instance UID."""
    port = free_port()
    known: dict[str, Any] = {"mammonode": (NODE_AE, LOOPBACK, port)}
    pacs = orthanc(known)
    settings = node_settings(
        data_dir=tmp_path / "data",
        db_url=db_url,
        model_dir=test_model,
        port=port,
        destinations=[pacs.destination],
        allowed_aes=[MODALITY_AE],
    )
    node = serve_node(settings, echo_ae=MODALITY_AE)
    studies: dict[str, list[Path]] = {}
    for n in (1, 2, 3):
        uid = f"1.2.826.0.1.3680043.10.1471.4{n}"
        studies[uid] = write_study(tmp_path / f"s{n}", patient_id=f"DEST-{n}", study_uid=uid, seed=n)
    (uid_1, files_1), (_, files_2), (uid_3, files_3) = studies.items()
    node.start()

    def failed_sends(study_uid: str, after: int, containing: str = "") -> list[AuditEvent]:
        return [
            e
            for e in _events(sessions, "result.failed", after=after)
            if e.study_uid == study_uid and containing in str((e.details or {}).get("status", ""))
        ]

    # 1. Stopped: connection refused; results wait with backoff.
    pacs.kill()
    mark = _last_event_id(sessions)
    assert sorted(store(files_1, port, aet=MODALITY_AE, syntax="-xv").acknowledged) == sorted(files_1)
    wait_until(
        lambda: len({e.sop_instance_uid for e in failed_sends(uid_1, mark)}) == RESULTS_PER_STUDY,
        "study 1 tried",
        RESULT_TIMEOUT,
    )

    # 2. Frozen: the port accepts connections, nothing answers; the sender must give up on the
    # attempt (its timeout), not hang, and the node keeps receiving meanwhile.
    pacs.start()
    assert pacs._process is not None
    os.kill(pacs._process.pid, signal.SIGSTOP)
    try:
        mark = _last_event_id(sessions)
        assert sorted(store(files_2, port, aet=MODALITY_AE, syntax="-xv").acknowledged) == sorted(files_2)
        assert node.echo()
        wait_until(
            lambda: bool(_events(sessions, "result.failed", after=mark)),
            "an attempt against the frozen PACS ended",
            FROZEN_TIMEOUT,
        )
    finally:
        pacs.kill()  # SIGKILL ends a stopped process too; it never thaws

    # 3. Refusing: Orthanc no longer knows the node's AE and rejects its associations.
    pacs.modalities = {}
    pacs.start()
    mark = _last_event_id(sessions)
    assert sorted(store(files_3, port, aet=MODALITY_AE, syntax="-xv").acknowledged) == sorted(files_3)
    wait_until(
        lambda: len(failed_sends(uid_3, mark, "rejected")) > 0, "study 3 refused by the PACS", RESULT_TIMEOUT
    )
    assert delivered(pacs).reports_of(uid_3) == []
    assert _events(sessions, "result.dead") == [], "a refused association is not a reason to give up"

    # 4. Healthy again: everything arrives, once.
    pacs.kill()
    pacs.modalities = dict(known)
    pacs.start()
    pacs.wait_for_instances(3 * RESULTS_PER_STUDY, timeout=RESULT_TIMEOUT)
    time.sleep(SETTLE_SECONDS)
    uids = orthanc_sop_uids(pacs)
    assert len(uids) == len(set(uids)) == 3 * RESULTS_PER_STUDY
    stats = pacs.get_json("/statistics")
    assert int(stats["CountInstances"]) == 3 * RESULTS_PER_STUDY
    assert node.running and node.runs == 1, node.log_tail()
    _assert_one_result_set(pacs, {uid: _uids(files) for uid, files in studies.items()})
    wait_until(
        lambda: _all_sent(sessions, 3 * RESULTS_PER_STUDY),
        "every transmission recorded as sent",
        RESULT_TIMEOUT,
    )
    _assert_no_operator_needed(sessions)
