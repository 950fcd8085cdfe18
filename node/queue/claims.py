"""Claims on scoring jobs: who scores which study version, and taking back claims of the dead.

A claim is a conditional UPDATE (``pending`` -> ``claimed``) whose row count says who won, under
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers (threads, processes or nodes)
never score the same job. A claim is not an attempt (:mod:`node.queue.retry`): a job whose
claimer died goes back to ``pending`` with nothing charged.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, Study, utcnow
from node.db.repository import claimed_jobs
from node.db.states import JobState, StudyState, check_transition, move

log = logging.getLogger(__name__)

CLAIM = move(JobState.PENDING, JobState.CLAIMED)
START_SCORING = move(StudyState.QUEUED, StudyState.SCORING)
"""A claim moves the job's study too, if it is still queued (a late image may have reopened it)."""


def claim_job(
    sessions: sessionmaker[Session], worker_name: str, now: dt.datetime | None = None
) -> int | None:
    """Claim the oldest pending job for ``worker_name``; its ID, or None when nothing is pending."""
    now = now or utcnow()
    with sessions() as session:
        for _ in range(8):  # another worker may win the candidate; try the next one
            job_id = session.scalar(
                select(Job.id)
                .where(Job.state == JobState.PENDING, is_due(now))
                .order_by(Job.created_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job_id is None:
                session.rollback()
                return None
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == CLAIM.old)
                .values(state=CLAIM.new, claimed_by=worker_name, claimed_at=now)
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
                return job_id
            session.rollback()
    return None


def is_due(now: dt.datetime) -> ColumnElement[bool]:
    """Jobs whose backoff (if any) has run out."""
    return or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)


def requeue_stale_claims(sessions: sessionmaker[Session], *, worker: str | None = None) -> int:
    """Put jobs left ``claimed`` by a worker that died (or, with ``worker``, by that worker) back to
    ``pending``; returns how many.

    Called when the node starts, before its worker runs, so every claim found is stale; a worker
    also calls it for its own name before each round, for a job it could not release (the database
    was gone). A claim is not an attempt (:mod:`node.queue.retry`): a node killed in the middle of
    a job charges the job nothing. Results are written under deterministic UIDs and committed
    with the job, so re-running a job that died half way never duplicates anything.
    """
    requeued = 0
    with sessions() as session:
        for job in claimed_jobs(session, worker):
            study = session.get(Study, job.study_id)
            job.state = check_transition(job.state, JobState.PENDING)
            job.claimed_by = None
            job.claimed_at = None
            if study is not None and study.state == StudyState.SCORING:
                study.state = check_transition(study.state, StudyState.QUEUED)
            requeued += 1
            log.info("job %d (version %d) requeued after an interrupted run", job.id, job.version)
        session.commit()
    return requeued
