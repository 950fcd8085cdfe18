"""Study assembly: when a receiving study becomes a scoring job, and what that job covers."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

from queue_helpers import MG_FOR_PROCESSING, STUDY, T0, add_instance, events, make_config, study_row
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Breast, Job, Study, utcnow
from node.queue.assembly import promote_ready
from node.queue.claims import claim_job, renew_leases, requeue_stale_claims

LEASE = 60.0
FOUR = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


def _seconds(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def _add_views(
    sessions: sessionmaker[Session], views: tuple[tuple[str, str], ...], at: dt.datetime = T0
) -> None:
    for laterality, view in views:
        add_instance(sessions, laterality=laterality, view=view, at=at)


def _jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.version)))


def test_complete_views_make_the_study_ready_after_the_grace_period_only(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = make_config(tmp_path, grace_seconds=5, study_quiet_seconds=60)
    _add_views(sessions, FOUR)

    assert promote_ready(config, sessions, now=_seconds(4.9)) == []
    assert study_row(sessions).state == "receiving"

    (job_id,) = promote_ready(config, sessions, now=_seconds(5))
    (job,) = _jobs(sessions)
    assert (job.id, job.version, job.lateralities, job.state) == (job_id, 1, "LR", "pending")
    study = study_row(sessions)
    assert study.state == "queued"
    (ready,) = events(sessions, "study.ready")
    assert ready.study_uid == STUDY and ready.details is not None
    assert ready.details["reason"] == "views complete" and ready.details["job_id"] == job_id

    # Already queued: nothing more to do, however long we wait.
    assert promote_ready(config, sessions, now=_seconds(600)) == []
    assert len(_jobs(sessions)) == 1


def test_incomplete_study_waits_for_the_quiet_period_since_its_last_instance(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = make_config(tmp_path, grace_seconds=5, study_quiet_seconds=60)
    _add_views(sessions, FOUR[:2])  # left breast only
    _add_views(sessions, FOUR[2:3], at=_seconds(30))  # R-CC later; R-MLO never comes

    assert promote_ready(config, sessions, now=_seconds(60)) == []  # 30 s after the last one
    assert promote_ready(config, sessions, now=_seconds(89.9)) == []
    assert len(promote_ready(config, sessions, now=_seconds(90))) == 1
    (job,) = _jobs(sessions)
    assert job.lateralities == "LR"
    (ready,) = events(sessions, "study.ready")
    assert ready.details is not None
    assert ready.details["reason"] == "quiet period" and ready.details["missing_views"] == ["R-MLO"]


def test_expected_views_come_from_the_config(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    config = make_config(tmp_path, expected_views=("L-CC", "R-CC"))
    _add_views(sessions, (("L", "CC"), ("R", "CC")))
    assert promote_ready(config, sessions, now=_seconds(5)) != []


def test_for_processing_and_non_mammography_images_are_skipped_not_counted(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    _add_views(sessions, FOUR[:3])
    # The fourth view arrives only as For Processing: recorded, never a view that completes the exam.
    add_instance(
        sessions, laterality="R", view="MLO", sop_class_uid=MG_FOR_PROCESSING, skip_reason="For Processing"
    )
    assert promote_ready(config, sessions, now=_seconds(30)) == []
    assert promote_ready(config, sessions, now=_seconds(60)) != []

    other = "1.2.826.0.1.3680043.10.1234.2"
    add_instance(sessions, study_uid=other, laterality="U", view="unknown", skip_reason="modality CT")
    assert promote_ready(config, sessions, now=_seconds(59)) == []
    assert study_row(sessions, other).state == "receiving"
    assert promote_ready(config, sessions, now=_seconds(60)) == []
    assert study_row(sessions, other).state == "skipped"
    with sessions() as session:
        other_id = session.scalars(select(Study.id).where(Study.study_uid == other)).one()
        assert session.scalars(select(Job).where(Job.study_id == other_id)).all() == []
    (skipped,) = events(sessions, "study.skipped")
    assert skipped.study_uid == other


def test_late_arrival_queues_a_new_version_for_that_breast_only_once_the_job_is_done(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    _add_views(sessions, FOUR)
    (first,) = promote_ready(config, sessions, now=_seconds(5))

    # A late left image while version 1 is still pending: no second job yet.
    add_instance(sessions, laterality="L", view="CC", at=_seconds(10))
    assert study_row(sessions).state == "receiving"
    assert promote_ready(config, sessions, now=_seconds(100)) == []

    # Version 1 finishes (what the worker does), the left breast stays dirty from the late image.
    with sessions() as session:
        session.execute(update(Job).where(Job.id == first).values(state="done"))
        session.execute(update(Study).values(scored_version=1))
        session.execute(update(Breast).where(Breast.laterality == "R").values(dirty=False, scored_version=1))
        session.commit()
    (second,) = promote_ready(config, sessions, now=_seconds(100))
    jobs = _jobs(sessions)
    assert [(j.version, j.lateralities) for j in jobs] == [(1, "LR"), (2, "L")]
    assert jobs[1].id == second


def test_a_resent_copy_of_scored_images_queues_nothing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    _add_views(sessions, FOUR)
    (first,) = promote_ready(config, sessions, now=_seconds(5))
    with sessions() as session:
        session.execute(update(Job).where(Job.id == first).values(state="done"))
        session.execute(update(Study).values(scored_version=1, state="receiving"))
        session.execute(update(Breast).values(dirty=False, scored_version=1))
        session.commit()
    assert promote_ready(config, sessions, now=_seconds(100)) == []
    assert study_row(sessions).state == "scored"
    assert len(_jobs(sessions)) == 1


def test_a_failed_version_is_not_reused(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    config = make_config(tmp_path)
    _add_views(sessions, FOUR)
    (first,) = promote_ready(config, sessions, now=_seconds(5))
    with sessions() as session:
        session.execute(update(Job).where(Job.id == first).values(state="failed"))
        session.commit()
    add_instance(sessions, laterality="R", view="CC", at=_seconds(10))
    promote_ready(config, sessions, now=_seconds(100))
    assert [(j.version, j.state, j.lateralities) for j in _jobs(sessions)] == [
        (1, "failed", "LR"),
        (2, "pending", "LR"),  # never scored: every breast is new
    ]


def _gone_worker() -> str:
    """The name a worker of this host had in a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:0dead0"


def test_claims_left_by_dead_workers_are_requeued_without_charging_the_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A node killed in the middle of a job (kill -9, OOM) charges the job nothing: however often
    it dies, the job goes back to the queue and is never failed for it (only exceptions that the
    job itself raises count, see test_queue_worker)."""
    config = make_config(tmp_path)
    _add_views(sessions, FOUR)
    (job_id,) = promote_ready(config, sessions, now=_seconds(5))
    assert claim_job(sessions, _gone_worker(), LEASE) == job_id
    assert study_row(sessions).state == "scoring"
    assert claim_job(sessions, "other", LEASE) is None  # claimed means claimed

    for restart in range(6):
        assert requeue_stale_claims(sessions) == 1, restart
        (job,) = _jobs(sessions)
        assert (job.state, job.claimed_by, job.attempts) == ("pending", None, 0)
        assert study_row(sessions).state == "queued"
        assert claim_job(sessions, _gone_worker(), LEASE) == job_id
    assert not events(sessions, "study.failed")

    # A live worker puts back only its own stale claims (one it could not release).
    assert requeue_stale_claims(sessions, worker="someone-else") == 0
    (job,) = _jobs(sessions)
    assert requeue_stale_claims(sessions, worker=job.claimed_by) == 1


def test_a_starting_node_leaves_live_workers_claims_alone_until_their_lease_lapses(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Workers on other machines: their process cannot be looked up, only their lease tells."""
    config = make_config(tmp_path)
    _add_views(sessions, FOUR)
    (job_id,) = promote_ready(config, sessions, now=_seconds(5))
    now = utcnow()
    assert claim_job(sessions, "other-host:4242:abcd", LEASE, now=now) == job_id
    assert requeue_stale_claims(sessions) == 0
    assert claim_job(sessions, "me", LEASE, now=now + dt.timedelta(seconds=LEASE - 1)) is None
    # Its heartbeat keeps the job; once the heartbeats stop, the lease lapses and the job is taken.
    assert renew_leases(sessions, "other-host:4242:abcd", LEASE, now=now + dt.timedelta(seconds=50)) == 1
    assert claim_job(sessions, "me", LEASE, now=now + dt.timedelta(seconds=LEASE + 1)) is None
    later = now + dt.timedelta(seconds=50 + LEASE + 1)
    assert claim_job(sessions, "me", LEASE, now=later) == job_id
    (job,) = _jobs(sessions)
    assert (job.state, job.claimed_by, job.attempts) == ("claimed", "me", 0)
    assert renew_leases(sessions, "other-host:4242:abcd", LEASE) == 0  # the old claimer holds nothing
