"""`mammonode serve` as a process (signals, kill -9 and restart) and `mammonode studies`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from peers import free_port, storage_scp, write_study
from pynetdicom.status import Status
from queue_helpers import T0, add_instance, c_store, events
from serve_helpers import port_open, serve_env, toml_config, wait_until
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from inference.uids import derive_uid
from node.commands import app as cli
from node.db.models import Job, OutputObject, Score, Study, Transmission

RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""

MAMMONODE = Path(sys.executable).with_name("mammonode")
STUDY = derive_uid("tests", "serve-command")


def test_serve_names_the_database_kind_never_its_url(tmp_path: Path) -> None:
    secret = "s3cret-pw"
    url = f"postgresql+psycopg://mammo:{secret}@127.0.0.1:{free_port()}/node"
    env = serve_env(
        MAMMONODE_DATA_DIR=str(tmp_path / "data"),
        MAMMONODE_DATABASE_URL=url,
        MAMMONODE_PORT=str(free_port()),
        MAMMONODE_AE_TITLE="NODE_UNDER_TEST",
    )
    proc = subprocess.run([MAMMONODE, "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # nothing listens on that database port
    (line,) = proc.stdout.splitlines()
    assert "NODE_UNDER_TEST" in line and "database postgresql" in line and str(tmp_path / "data") in line
    assert secret not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot open the database")


@contextmanager
def _serve(config: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [MAMMONODE, "serve", "--config", str(config)],
        env=serve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 120, "node did not start")
        assert proc.poll() is None, proc.communicate()[1]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_a_node_killed_after_receiving_delivers_one_set_of_results_after_restart(
    db_url: str, sessions: sessionmaker[Session], tmp_path: Path, test_model: Path
) -> None:
    files = write_study(tmp_path / "study", patient_id="P-KILL", study_uid=STUDY, transfer_syntax="explicit")
    port, pacs_port = free_port(), free_port()
    common = {
        "port": port,
        "bind_address": "127.0.0.1",
        "data_dir": str(tmp_path / "data"),
        "database_url": db_url,
        "model_dir": str(test_model),
        "poll_seconds": 0.1,
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
    }
    # First life: it stores the study, then dies (kill -9) long before the study is due.
    slow = toml_config(tmp_path / "slow.toml", grace_seconds=3600.0, study_quiet_seconds=3600.0, **common)
    with _serve(slow, port) as proc:
        assert c_store(files, port) == [int(Status.SUCCESS)] * 4
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    # Second life: the study is due at once, is scored and delivered; SIGTERM stops it cleanly.
    quick = toml_config(tmp_path / "quick.toml", grace_seconds=0.2, study_quiet_seconds=30.0, **common)
    with storage_scp("PACS", port=pacs_port) as pacs, _serve(quick, port) as proc:
        pacs.wait_for(RESULTS_PER_STUDY, timeout=120)

        def all_sent() -> bool:
            with sessions() as session:
                states = session.scalars(select(Transmission.state)).all()
            return len(states) == RESULTS_PER_STUDY and set(states) == {"sent"}

        wait_until(all_sent, 60, "transmissions not marked sent")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert (
            len(pacs.received) == RESULTS_PER_STUDY
            and len(set(pacs.sop_instance_uids())) == RESULTS_PER_STUDY
        )
    assert [e.event for e in events(sessions, "node.started")] == ["node.started"] * 2
    assert len(events(sessions, "node.stopped")) == 1  # the killed node never said goodbye
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutputObject)) == RESULTS_PER_STUDY


def _run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_studies_lists_state_latest_scores_model_and_delivery(
    db_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    for laterality, view in (("L", "CC"), ("R", "CC")):
        add_instance(
            sessions, study_uid="1.2.3.4", patient_id="SECRET-PATIENT", laterality=laterality, view=view
        )
    add_instance(sessions, study_uid="1.2.3.5", laterality="L", view="CC", at=T0.replace(hour=10))
    with sessions() as session:
        study_id = session.scalars(select(Study.id).where(Study.study_uid == "1.2.3.4")).one()
        session.execute(update(Study).where(Study.id == study_id).values(state="scored", scored_version=2))
        for version, exam in ((1, 0.2), (2, 0.7)):
            job = Job(study_id=study_id, version=version, lateralities="LR", state="done")
            session.add(job)
            session.flush()
            model = {
                "threshold": 0.5,
                "model_name": "m",
                "model_version": f"v{version}",
                "weights_sha256": "a" * 64,
            }
            session.add_all(
                [
                    Score(job_id=job.id, level="breast", laterality="L", probability=exam / 2, **model),
                    Score(job_id=job.id, level="breast", laterality="R", probability=exam, **model),
                    Score(job_id=job.id, level="exam", probability=exam, recall=exam >= 0.5, **model),
                ]
            )
            output = OutputObject(
                job_id=job.id,
                kind="SR",
                sop_instance_uid=f"1.2.3.4.9.{version}",
                sop_class_uid="1.2",
                outbox_path="x",
            )
            session.add(output)
            session.flush()
            session.add(
                Transmission(
                    output_id=output.id, destination="PACS@h:1", state="sent" if version == 1 else "failed"
                )
            )
        session.commit()

    env = serve_env(MAMMONODE_DATABASE_URL=db_url, MAMMONODE_DATA_DIR=str(tmp_path))
    code, out, err = _run("studies", "--json", env=env)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["study_uid"] for r in rows] == ["1.2.3.5", "1.2.3.4"]  # newest first
    scored = rows[1]
    assert scored["state"] == "scored" and scored["version"] == 2 and scored["model"] == "m v2"
    assert scored["breasts"] == {"L": pytest.approx(0.35), "R": pytest.approx(0.7)}
    assert scored["exam_probability"] == pytest.approx(0.7) and scored["recall"] is True
    assert scored["delivery"] == {"sent": 1, "pending": 0, "failed": 1, "dead": 0}
    assert rows[0]["version"] is None and rows[0]["state"] == "receiving"

    code, out, err = _run("studies", "--limit", "1", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("1.2.3.5")
    code, out, _ = _run("studies", env=env)
    assert "0.700" in out and "sent=1" in out and "failed=1" in out
    assert "SECRET-PATIENT" not in out


def test_studies_without_a_node_database_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [MAMMONODE, "studies"],
        env=serve_env(MAMMONODE_DATA_DIR=str(tmp_path / "nothing")),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"error: no node database in {tmp_path / 'nothing'} yet (mammonode serve creates it)"
    )
    assert not (tmp_path / "nothing").exists()
