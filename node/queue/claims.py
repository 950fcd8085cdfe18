"""Claims on scoring jobs: who scores which study version, under a lease, and taking back claims
of the dead.

A claim is a conditional UPDATE (``pending`` -> ``claimed``) whose row count says who won, under
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers (threads, processes or
machines) never score the same job at once. A claim is a lease: it lapses ``lease_seconds`` after
it was taken or last renewed, and the claimer's heartbeat (:func:`renew_leases`) renews it while
the job runs. A worker that dies, hangs or loses its database stops renewing; once the lease has
lapsed, any worker may take the job over. Finishing is conditional on still holding the claim
(:meth:`node.queue.worker.Worker._complete_job`), so a job taken over from a worker that was only
slow never completes twice. A claim is not an attempt (:mod:`node.queue.retry`): a job whose
claimer died goes back to work with nothing charged.

Worker names are ``HOST:PID:RANDOM``: a node starting on a host takes back at once the claims of
that host's workers whose process is gone, without waiting for their leases to lapse.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Collection

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, Study, as_utc, utcnow
from node.db.repository import claimed_jobs
from node.db.states import JobState, StudyState, check_transition, move

log = logging.getLogger(__name__)

CLAIM = move(JobState.PENDING, JobState.CLAIMED)
START_SCORING = move(StudyState.QUEUED, StudyState.SCORING)
"""A claim moves the job's study too, if it is still queued (a late image may have reopened it)."""


def claim_job(
    sessions: sessionmaker[Session],
    worker_name: str,
    lease_seconds: float,
    now: dt.datetime | None = None,
) -> int | None:
    """Claim the oldest pending job, or one whose claimer's lease lapsed, for ``worker_name``
    under a lease of ``lease_seconds``; its ID, or None when there is nothing to claim."""
    now = now or utcnow()
    claimable = is_claimable(now)
    with sessions() as session:
        for _ in range(8):  # another worker may win the candidate; try the next one
            candidate = session.execute(
                select(Job.id, Job.claimed_by)
                .where(claimable)
                .order_by(Job.created_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                session.rollback()
                return None
            job_id, previous = candidate
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, claimable)
                .values(
                    state=CLAIM.new,
                    claimed_by=worker_name,
                    claimed_at=now,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) == 1:
                study_id = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
                session.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == START_SCORING.old)
                    .values(state=START_SCORING.new)
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                if previous:
                    log.warning("job %d taken over from %s, whose lease lapsed", job_id, previous)
                return job_id
            session.rollback()
    return None


def renew_leases(
    sessions: sessionmaker[Session], worker_name: str, lease_seconds: float, now: dt.datetime | None = None
) -> int:
    """Extend the leases of every job ``worker_name`` holds (its heartbeat); returns how many."""
    now = now or utcnow()
    with sessions() as session:
        renewed = session.execute(
            update(Job)
            .where(Job.state == JobState.CLAIMED, Job.claimed_by == worker_name)
            .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return int(getattr(renewed, "rowcount", 0) or 0)


def is_claimable(now: dt.datetime) -> ColumnElement[bool]:
    """Jobs a worker may claim now: pending and due, or claimed under a lease that lapsed."""
    return or_(
        and_(Job.state == CLAIM.old, is_due(now)),
        and_(Job.state == CLAIM.new, lease_lapsed(now)),
    )


def lease_lapsed(now: dt.datetime) -> ColumnElement[bool]:
    """Claims whose lease ran out (claims made before leases existed have none: lapsed too)."""
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)


def worker_name() -> str:
    """A name no other worker has, now or later: ``HOST:PID:RANDOM``."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


def claimer_is_gone(name: str | None) -> bool:
    """Whether the worker ``name`` ran on this host in a process that no longer exists (or that is
    this very process under another name: a restarted container gets the same PID)."""
    host, _, rest = (name or "").partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def is_due(now: dt.datetime) -> ColumnElement[bool]:
    """Jobs whose backoff (if any) has run out."""
    return or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)


def requeue_stale_claims(
    sessions: sessionmaker[Session], *, worker: str | None = None, keep: Collection[int] = ()
) -> int:
    """Put jobs left ``claimed`` by a worker that is gone back to ``pending``; returns how many.

    Without ``worker`` (a node starting): the claims whose lease lapsed, and those of this host's
    workers whose process is gone; claims of live workers elsewhere are left alone. With
    ``worker``: that worker's own claims, which it calls for before each round for a job it could
    not release (the database was gone), except the jobs in ``keep`` (the round it claimed ahead,
    :mod:`node.queue.prefetch`). A claim is not an attempt (:mod:`node.queue.retry`): a node
    killed in the middle of a job charges the job nothing. Results are written under
    deterministic UIDs and committed with the job, so re-running a job that died half way never
    duplicates anything.
    """
    now = utcnow()
    requeued = 0
    with sessions() as session:
        for job in claimed_jobs(session, worker):
            lapsed = job.lease_expires_at is None or as_utc(job.lease_expires_at) < now
            if worker is None and not lapsed and not claimer_is_gone(job.claimed_by):
                continue
            if job.id in keep:
                continue
            _unclaim(session, job)
            requeued += 1
            log.info("job %d (version %d) requeued after an interrupted run", job.id, job.version)
        session.commit()
    return requeued


def release_claims(sessions: sessionmaker[Session], worker: str, job_ids: Collection[int]) -> int:
    """Give back jobs ``worker`` claimed but will not score (claimed ahead of a round, then the
    worker stopped): pending again at once, uncharged, like a claim whose claimer died. Jobs it
    no longer holds are left alone; returns how many were given back."""
    if not job_ids:
        return 0
    with sessions() as session:
        jobs = [job for job in claimed_jobs(session, worker) if job.id in job_ids]
        for job in jobs:
            _unclaim(session, job)
        session.commit()
    if jobs:
        log.info("gave back %d claimed job(s) unscored: %s", len(jobs), ", ".join(str(j.id) for j in jobs))
    return len(jobs)


def _unclaim(session: Session, job: Job) -> None:
    """The claimed ``job`` back to ``pending`` (its study back to ``queued`` if it was scoring)."""
    study = session.get(Study, job.study_id)
    job.state = check_transition(job.state, JobState.PENDING)
    job.claimed_by = None
    job.claimed_at = None
    job.lease_expires_at = None
    if study is not None and study.state == StudyState.SCORING:
        study.state = check_transition(study.state, StudyState.QUEUED)
