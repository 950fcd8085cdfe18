"""Named queries that more than one role asks: the questions the node puts to its database.

Roles own their transactions (callers commit, as in Prefect's server); this module only reads.
Writes that move a state stay with the role that decides the move (:mod:`node.db.states`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Job, Study
from node.db.states import JobState

ACTIVE_JOB_STATES = (JobState.PENDING, JobState.CLAIMED)
"""A job in one of these will still score its study version."""


def has_active_job(session: Session, study_id: int) -> bool:
    """Whether a version of the study is queued or being scored."""
    query = select(Job.id).where(Job.study_id == study_id, Job.state.in_(ACTIVE_JOB_STATES)).limit(1)
    return session.scalar(query) is not None


def next_job_version(session: Session, study: Study) -> int:
    """``scored_version + 1``, or past any version a failed job already used (unique per study)."""
    used = session.scalar(select(func.max(Job.version)).where(Job.study_id == study.id)) or 0
    return max(study.scored_version, used) + 1


def latest_done_job(session: Session, study_id: int) -> Job | None:
    """The job of the newest scored version of a study."""
    query = (
        select(Job)
        .where(Job.study_id == study_id, Job.state == JobState.DONE)
        .order_by(Job.version.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def job_ids_in_state(session: Session, state: JobState) -> list[int]:
    """IDs of the jobs in ``state``, oldest first."""
    return list(session.scalars(select(Job.id).where(Job.state == state).order_by(Job.id)))


def claimed_jobs(session: Session, worker: str | None = None) -> Sequence[Job]:
    """Jobs held by a claim (by ``worker`` only, when given)."""
    query = select(Job).where(Job.state == JobState.CLAIMED)
    if worker is not None:
        query = query.where(Job.claimed_by == worker)
    return session.scalars(query).all()
