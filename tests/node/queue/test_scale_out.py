"""Scale-out on PostgreSQL: one receiver, three workers and one sender, each its own
`mammonode serve --role` process, sharing the data folder (the spool) and the database.

A worker is killed (SIGKILL) while it holds a job; its lease lapses, another worker takes the job
over, and in the end every job ran to completion exactly once and every result reached the PACS
(a real Orthanc) exactly once.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from peers import Orthanc, free_port, storescu, write_study
from serve_helpers import port_open, serve_env, toml_config, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node.db.models import AuditEvent, Job, OutputObject, Transmission
from node.db.session import make_engine, session_factory

MAMMONODE = Path(sys.executable).with_name("mammonode")
STUDIES = 6
RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""
LEASE_SECONDS = 3.0


def _start(role: str, config: Path, logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / f"{role}-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [MAMMONODE, "serve", "--config", str(config), "--role", role],
        env=serve_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _claimed_by(sessions: sessionmaker[Session], prefix: str) -> list[int]:
    with sessions() as session:
        query = select(Job.id).where(Job.state == "claimed", Job.claimed_by.startswith(prefix))
        return list(session.scalars(query))


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.mark.slow
@pytest.mark.peers
def test_receiver_three_workers_and_sender_survive_a_worker_killed_mid_job(
    pg_url: str,
    pg_sessions: sessionmaker[Session],
    tmp_path: Path,
    onnx_test_model: Path,
    orthanc: Callable[..., Orthanc],
) -> None:
    port = free_port()
    pacs = orthanc({"mammonode": ("MAMMONODE", "127.0.0.1", port)})
    config = toml_config(
        tmp_path / "node.toml",
        port=port,
        bind_address="127.0.0.1",
        data_dir=str(tmp_path / "shared-data"),  # one folder: the shared filesystem of the roles
        database_url=pg_url,
        model_dir=str(onnx_test_model),
        poll_seconds=0.1,
        grace_seconds=0.2,
        study_quiet_seconds=30.0,
        lease_seconds=LEASE_SECONDS,
        batch_size=4,  # one study a claim: the three workers share the studies
        destinations=[{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
    )
    studies = [
        write_study(
            tmp_path / f"study-{n}",
            patient_id=f"SCALE-{n}",
            study_uid=derive_uid("tests", "scale-out", str(n)),
            size=(1536, 1152),  # big enough that a job takes a moment to score
            seed=n,
        )
        for n in range(STUDIES)
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    host = socket.gethostname()
    with ExitStack() as stack:
        receiver = _start("receiver", config, logs)
        workers = [_start("worker", config, logs) for _ in range(3)]
        sender = _start("sender", config, logs)
        procs = [receiver, *workers, sender]
        stack.callback(_stop_all, procs)
        wait_until(lambda: port_open(port) or receiver.poll() is not None, 120, "receiver did not start")
        assert receiver.poll() is None, (logs / "receiver").as_posix()
        for files in studies:
            sent = storescu(files, port)
            assert sent.returncode == 0, sent.stderr

        # Kill whichever worker is first seen holding a job, while it holds it.
        victim, victim_jobs = None, []
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            for proc in workers:
                held = _claimed_by(pg_sessions, f"{host}:{proc.pid}:")
                if held:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    victim, victim_jobs = proc, held
                    break
            time.sleep(0.02)
        assert victim is not None, "no worker was ever seen holding a job"

        def all_delivered() -> bool:
            with pg_sessions() as session:
                jobs = session.scalars(select(Job.state)).all()
                sent = session.scalars(select(Transmission.state)).all()
            return (
                len(jobs) == STUDIES
                and set(jobs) == {"done"}
                and len(sent) == STUDIES * RESULTS_PER_STUDY
                and set(sent) == {"sent"}
            )

        wait_until(all_delivered, 240, "not every job was scored and delivered")
        assert all(p.poll() is None for p in procs if p is not victim), "a surviving role died"

    with pg_sessions() as session:
        jobs = session.scalars(select(Job)).all()
        scored = session.scalars(select(AuditEvent).where(AuditEvent.event == "study.scored")).all()
        outputs = session.scalars(select(OutputObject.sop_instance_uid)).all()
    # Each job ran to completion exactly once, the victim's by another worker, uncharged.
    assert Counter(int((e.details or {})["job_id"]) for e in scored) == Counter(j.id for j in jobs)
    assert all(count == 1 for count in Counter(int((e.details or {})["job_id"]) for e in scored).values())
    for job in jobs:
        if job.id in victim_jobs:
            assert job.claimed_by is not None and not job.claimed_by.startswith(f"{host}:{victim.pid}:")
            assert job.attempts == 0
    # Every result reached the PACS once: no result was lost or duplicated.
    assert len(outputs) == len(set(outputs)) == STUDIES * RESULTS_PER_STUDY
    arrived = {pacs.simplified_tags(i)["SOPInstanceUID"] for i in pacs.wait_for_instances(len(outputs))}
    assert arrived == set(outputs)
    assert len(pacs.instances()) == len(outputs)
