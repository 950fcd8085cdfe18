"""The worker decodes the next round while it scores the current one (issue 12: no idle core).

Overlap is shown by order, not by timing: a recording pool (``recording_pool``) notes when each
decode starts and which thread asked for it, and the tests mark the moment each job's results are
committed in the same list. Every test also checks that each job completed exactly once.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import write_study
from queue_helpers import T0, events, make_config, spool_file, study_row
from recording_pool import RecordingPool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.manifest import load_manifest, save_manifest
from inference.uids import derive_uid
from node.config import Destination, NodeConfig
from node.db.models import Job, ModelVersion, OutputObject, Score, Study
from node.queue.assembly import promote_ready
from node.queue.worker import Worker
from node.service import Node

STUDIES = {name: derive_uid("tests", "prefetch", name) for name in ("a", "b", "c")}
A, B, C = STUDIES["a"], STUDIES["b"], STUDIES["c"]
READY = T0.replace(minute=5)
PREFETCH = "mammonode-prefetch"
OUTPUTS_PER_STUDY = 6  # 4 CAM captures, the score report and the Mammography CAD SR


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three 4-view studies, explicit VR for speed."""
    root = tmp_path_factory.mktemp("prefetch-studies")
    return {
        uid: write_study(
            root / name, patient_id=f"P-{name}", study_uid=uid, transfer_syntax="explicit", seed=n
        )
        for n, (name, uid) in enumerate(STUDIES.items())
    }


def _study_of(item: Any) -> str | None:
    """The study of a worker's decode task: ``(spool_dir/STUDY/SERIES/SOP.dcm, sop_uid)``."""
    if isinstance(item, tuple) and item and isinstance(item[0], Path):
        return item[0].parent.parent.name
    return None


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    with RecordingPool(_study_of) as recording:
        yield recording


def _config(tmp_path: Path, model: Path | None, **overrides: Any) -> NodeConfig:
    # batch_size 4: one 4-view study a round, so the next study is the next round
    values: dict[str, Any] = {"destinations": (Destination("PACS", "127.0.0.1", 1),), "batch_size": 4}
    values.update(overrides)
    return make_config(tmp_path, model_dir=model, **values)


def _queue(
    sessions: sessionmaker[Session], config: NodeConfig, files: dict[str, list[Path]]
) -> dict[str, int]:
    """Spool and queue the studies (in the order given); their job IDs by study UID."""
    for paths in files.values():
        for path in paths:
            spool_file(sessions, config, path)
    promote_ready(config, sessions, now=READY)
    with sessions() as session:
        rows = session.execute(select(Study.study_uid, Job.id).join(Job, Job.study_id == Study.id)).all()
    return {uid: job_id for uid, job_id in rows}


class MarkingWorker(Worker):
    """Marks in the pool's list the moment a job's results are about to be committed."""

    def __init__(self, *args: Any, pool: RecordingPool, **kwargs: Any) -> None:
        super().__init__(*args, decode_pool=pool, **kwargs)
        self.recording = pool

    def _complete_job(self, session: Session, work: Any) -> bool:
        self.recording.mark("commit", work.study_uid)
        return super()._complete_job(session, work)


def _run_until_idle(worker: Worker) -> int:
    handled = 0
    while n := worker.run_once():
        handled += n
    return handled


def _jobs(sessions: sessionmaker[Session]) -> dict[int, Job]:
    with sessions() as session:
        return {job.id: job for job in session.scalars(select(Job))}


def _scored_once(sessions: sessionmaker[Session], outputs: dict[int, int]) -> None:
    """Each job of ``outputs`` (job ID: how many result objects) done, with one ``study.scored``
    event and one set of results."""
    jobs = _jobs(sessions)
    assert {j: jobs[j].state for j in outputs} == dict.fromkeys(outputs, "done")
    scored = [int((e.details or {})["job_id"]) for e in events(sessions, "study.scored")]
    assert sorted(scored) == sorted(outputs)
    with sessions() as session:
        made = Counter(session.scalars(select(OutputObject.job_id)))
    assert made == Counter(outputs)


def _no_prefetch_thread() -> bool:
    return not any(t.name == PREFETCH and t.is_alive() for t in threading.enumerate())


def test_the_next_study_decodes_while_the_current_one_is_scored_and_each_completes_once(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    study_files: dict[str, list[Path]],
    pool: RecordingPool,
) -> None:
    config = _config(tmp_path, test_model)
    jobs = _queue(sessions, config, study_files)
    worker = MarkingWorker(config, sessions, pool=pool)

    assert _run_until_idle(worker) == 3

    _scored_once(sessions, dict.fromkeys(jobs.values(), OUTPUTS_PER_STUDY))
    (commit_a,), (commit_b,), (commit_c,) = (pool.index("commit", s) for s in (A, B, C))
    assert commit_a < commit_b < commit_c
    # B's decoding started (in the prefetch thread) before A's results were committed, C's before B's.
    assert pool.index("decode-start", B)[0] < commit_a
    assert pool.index("decode-start", C)[0] < commit_b
    assert {m.thread for m in pool.of("decode-start", A)} == {threading.current_thread().name}
    assert {m.thread for m in pool.of("decode-start", B) + pool.of("decode-start", C)} == {PREFETCH}
    # Each image decoded once: the prefetched inputs were scored, not decoded again.
    assert [len(pool.of("decode-start", s)) for s in (A, B, C)] == [4, 4, 4]
    assert _no_prefetch_thread()


def test_a_prefetched_image_that_fails_fails_alone_and_a_prefetched_job_that_fails_is_retried(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    study_files: dict[str, list[Path]],
    pool: RecordingPool,
) -> None:
    config = _config(tmp_path, test_model)
    jobs = _queue(sessions, config, study_files)
    (b_mlo,) = [p for p in study_files[B] if p.name == "R_MLO.dcm"]
    spooled = _spooled(config, b_mlo)
    spooled.write_bytes(spooled.read_bytes()[:2000])  # cut inside the header: that image fails alone
    pool.failures[C] = RuntimeError("decoder ran out of patience")  # not the file's fault: the job's
    worker = MarkingWorker(config, sessions, pool=pool)

    assert _run_until_idle(worker) == 3

    # B (prefetched) scored from its 3 readable images, the 4th audited and named as not analysed.
    assert {m.thread for m in pool.of("decode-start", B)} == {PREFETCH}
    _scored_once(sessions, {jobs[A]: OUTPUTS_PER_STUDY, jobs[B]: OUTPUTS_PER_STUDY - 1})
    (failed,) = events(sessions, "image.failed")
    assert failed.study_uid == B and failed.details and failed.details["stage"] == "decode"
    assert len(_image_scores(sessions, jobs[B])) == 3
    (scored_b,) = [e for e in events(sessions, "study.scored") if e.study_uid == B]
    assert (
        scored_b.details and not scored_b.details["complete"] and len(scored_b.details["not_analysed"]) == 1
    )
    # C (prefetched) failed as a job: charged one attempt, back to pending after a backoff.
    assert {m.thread for m in pool.of("decode-start", C)} == {PREFETCH}
    c = _jobs(sessions)[jobs[C]]
    assert (c.state, c.attempts, c.claimed_by) == ("pending", 1, None)
    assert "decoder ran out of patience" in (c.error or "")
    assert study_row(sessions, C).state == "queued"
    assert [e.study_uid for e in events(sessions, "study.deferred")] == [C]
    assert _no_prefetch_thread()


def _spooled(config: NodeConfig, path: Path) -> Path:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return (
        config.spool_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    )


def _image_scores(sessions: sessionmaker[Session], job_id: int) -> list[Score]:
    with sessions() as session:
        return list(session.scalars(select(Score).where(Score.job_id == job_id, Score.level == "image")))


def _promote(sessions: sessionmaker[Session], model_dir: Path) -> str:
    """Make ``model_dir`` the served model (what `mammonode model promote` leaves in the registry);
    returns its weights hash."""
    manifest = load_manifest(model_dir)
    with sessions() as session:
        for row in session.scalars(select(ModelVersion)):
            row.active = False
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.weights_sha256 == manifest.weights_sha256)
        )
        if row is None:
            row = ModelVersion(
                name=manifest.name,
                version=manifest.version,
                weights_sha256=manifest.weights_sha256,
                path=str(model_dir),
                promoted_at=T0,
            )
            session.add(row)
        row.active = True
        session.commit()
    return manifest.weights_sha256


@pytest.mark.parametrize("preprocessing", ["same", "other"])
def test_a_model_promoted_between_rounds_scores_the_study_decoded_ahead_for_its_own_preprocessing(
    preprocessing: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    other_weights_model: Path,
    study_files: dict[str, list[Path]],
    pool: RecordingPool,
) -> None:
    """B is decoded ahead for the first model; the second, promoted before B's round, scores it.
    With the same preprocessing the decoded inputs are used as they are; with another one
    (the chest wall on the other side) B is decoded again, for the second model."""
    second = other_weights_model
    if preprocessing == "other":
        second = tmp_path / "model-other-preprocessing"
        shutil.copytree(other_weights_model, second)
        manifest = load_manifest(second)
        flipped = dataclasses.replace(manifest.preprocess, chest_wall_side="right")
        save_manifest(dataclasses.replace(manifest, preprocess=flipped), second)
    first_sha = _promote(sessions, test_model)
    config = _config(tmp_path, None)  # not pinned: the registry's promoted model is served
    jobs = _queue(sessions, config, {uid: study_files[uid] for uid in (A, B)})
    worker = MarkingWorker(config, sessions, pool=pool)

    assert worker.run_once() == 1  # A scored; B claimed and decoded ahead, for the first model
    first = load_manifest(test_model).preprocess
    assert {(m.thread, m.config) for m in pool.of("decode-start", B)} == {(PREFETCH, first)}
    second_sha = _promote(sessions, second)
    assert _run_until_idle(worker) == 1

    _scored_once(sessions, dict.fromkeys(jobs.values(), OUTPUTS_PER_STUDY))
    assert {s.weights_sha256 for s in _image_scores(sessions, jobs[A])} == {first_sha}
    assert {s.weights_sha256 for s in _image_scores(sessions, jobs[B])} == {second_sha}
    decoded = [(m.thread, m.config) for m in pool.of("decode-start", B)]
    if preprocessing == "same":
        assert decoded == [(PREFETCH, first)] * 4
    else:
        again = load_manifest(second).preprocess
        assert again != first
        assert decoded == [(PREFETCH, first)] * 4 + [(threading.current_thread().name, again)] * 4
    assert _no_prefetch_thread()


def test_a_worker_closed_between_rounds_gives_back_the_job_it_decoded_ahead(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    study_files: dict[str, list[Path]],
    pool: RecordingPool,
) -> None:
    config = _config(tmp_path, test_model)
    jobs = _queue(sessions, config, study_files)
    worker = MarkingWorker(config, sessions, pool=pool)

    assert worker.run_once() == 1
    held = _jobs(sessions)
    assert (held[jobs[A]].state, held[jobs[B]].claimed_by, held[jobs[C]].state) == (
        "done",
        worker.name,
        "pending",
    )
    assert study_row(sessions, B).state == "scoring"
    assert worker.heartbeat() == 1  # the claim held ahead is a lease like any other
    assert _no_prefetch_thread()

    worker.close()

    b = _jobs(sessions)[jobs[B]]
    assert (b.state, b.claimed_by, b.lease_expires_at, b.attempts, b.retries) == ("pending", None, None, 0, 0)
    assert study_row(sessions, B).state == "queued"
    assert worker.stopping and worker.run_once() == 0
    assert {j.state for j in _jobs(sessions).values()} == {"done", "pending"}
    # Another worker scores the rest, each job once.
    assert _run_until_idle(Worker(config, sessions, decode_pool=pool)) == 2
    _scored_once(sessions, dict.fromkeys(jobs.values(), OUTPUTS_PER_STUDY))


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_node_stopped_while_it_decodes_ahead_gives_the_job_back_and_leaves_no_thread(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    study_files: dict[str, list[Path]],
    pool: RecordingPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve` stopping (SIGTERM) while B's images are being decoded ahead of its round: A's round
    finishes, B's decoding stops between two images and B goes back to the queue uncharged; no
    thread of the worker is left and no job stays claimed."""
    config = _config(tmp_path, test_model, database_url=db_url, role="worker", poll_seconds=0.1)
    jobs = _queue(sessions, config, study_files)
    gate = pool.gates[B] = threading.Event()
    monkeypatch.setattr("node.queue.worker.shared_pool", lambda: pool)
    node = Node(config)
    node.start()
    stopper = threading.Thread(target=node.stop, name="test-stop")
    try:
        _wait(lambda: pool.of("decode-start", B), "B was never decoded ahead")
        worker = node.worker
        assert worker is not None and _jobs(sessions)[jobs[B]].claimed_by == worker.name
        stopper.start()
        _wait(lambda: worker.stopping, "the worker was not told to stop")
    finally:
        gate.set()
        if stopper.ident is None:  # failed before the stop was asked for
            node.stop()
        else:
            stopper.join(120)
    assert not stopper.is_alive()

    assert _no_prefetch_thread()
    assert not any(t.name == "mammonode-scoring" and t.is_alive() for t in threading.enumerate())
    states = {job_id: (j.state, j.claimed_by, j.attempts) for job_id, j in _jobs(sessions).items()}
    assert states == {
        jobs[A]: ("done", worker.name, 0),
        jobs[B]: ("pending", None, 0),  # given back, uncharged
        jobs[C]: ("pending", None, 0),  # never claimed
    }
    assert len(pool.of("decode-start", C)) == 0
    _scored_once(sessions, {jobs[A]: OUTPUTS_PER_STUDY})
