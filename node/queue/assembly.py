"""Study assembly: decide when a receiving study is complete enough to score, and queue it.

The prediction unit is patient + study + laterality, but the exam score and the report need every
image of the study, so the unit of work is a study *version*: a :class:`~node.db.models.Job` that
re-scores the breasts that received new images (``dirty``) since the last version. A study is ready
as soon as its expected views are all in and a short grace period has passed (exam-aware
completion), or else after the quiet period since its last instance (Orthanc's StableAge).

Assembly runs beside the C-STORE handler, which may commit a new instance at any moment, so the
study's state moves from ``receiving`` to ``queued`` through a conditional UPDATE that also checks
``last_received_at``: if an instance arrived after the decision was made, nothing is queued and the
study is looked at again on the next poll.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from inference import view_key
from node import audit
from node.config import NodeConfig
from node.db.models import Breast, Instance, Job, Study, as_utc, utcnow
from node.db.repository import has_active_job, next_job_version
from node.db.states import JobState, StudyState, move

log = logging.getLogger(__name__)

ACTOR = "assembly"


def missing_views(config: NodeConfig, instances: Iterable[Instance]) -> set[str]:
    """Expected views not yet present among the scorable ``instances``."""
    present = {view_key(i.laterality, i.view) for i in instances if i.scorable}
    return set(config.expected_views) - present


def ready_reason(config: NodeConfig, study: Study, instances: list[Instance], now: dt.datetime) -> str | None:
    """Why ``study`` is ready now (``views complete`` or ``quiet period``), or None if not yet."""
    quiet_for = (now - as_utc(study.last_received_at)).total_seconds()
    if not missing_views(config, instances) and quiet_for >= config.grace_seconds:
        return "views complete"
    if quiet_for >= config.study_quiet_seconds:
        return "quiet period"
    return None


def _leave_receiving(session: Session, study: Study, state: StudyState) -> bool:
    """Conditionally move ``study`` out of ``receiving``; False if an instance arrived meanwhile."""
    leave = move(StudyState.RECEIVING, state)
    result = session.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.state == leave.old,
            Study.last_received_at == study.last_received_at,
        )
        .values(state=leave.new)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def _promote_one(session: Session, config: NodeConfig, study: Study, now: dt.datetime) -> int | None:
    """Queue or skip one receiving study if it is ready; returns the new job's ID, if any.

    The caller commits (or rolls back when this returns None without a change).
    """
    if has_active_job(session, study.id):
        return None
    instances = list(session.scalars(select(Instance).where(Instance.study_id == study.id)))
    scorable = [i for i in instances if i.scorable]
    reason = ready_reason(config, study, scorable, now)
    if reason is None:
        return None
    if not scorable:
        # Nothing to score (non-mammography, For Processing...): only the quiet period ends it.
        if reason != "quiet period" or not _leave_receiving(session, study, StudyState.SKIPPED):
            return None
        audit.record(
            session,
            audit.STUDY_SKIPPED,
            ACTOR,
            patient_id=study.patient_id,
            study_uid=study.study_uid,
            details={"reason": "no scorable image", "instances": len(instances)},
        )
        log.info("study %s skipped: no scorable image among %d", study.study_uid, len(instances))
        return None
    breasts = list(session.scalars(select(Breast).where(Breast.study_id == study.id)))
    sides = sorted({b.laterality for b in breasts if b.dirty})
    if not sides and study.scored_version == 0:
        sides = sorted({i.laterality for i in scorable})  # never scored: every breast is new
    if not sides:
        # A resent copy of images already scored: nothing new to score.
        _leave_receiving(session, study, StudyState.SCORED)
        return None
    if not _leave_receiving(session, study, StudyState.QUEUED):
        return None
    version = next_job_version(session, study)
    job = Job(study_id=study.id, version=version, lateralities="".join(sides), state=JobState.PENDING)
    session.add(job)
    session.execute(
        update(Study)
        .where(Study.id == study.id)
        .values(ready_at=now)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    audit.record(
        session,
        audit.STUDY_READY,
        ACTOR,
        patient_id=study.patient_id,
        study_uid=study.study_uid,
        details={
            "job_id": job.id,
            "version": version,
            "lateralities": job.lateralities,
            "reason": reason,
            "images": len(scorable),
            "missing_views": sorted(missing_views(config, scorable)),
        },
    )
    log.info("study %s ready (%s): job %d version %d for %s", study.study_uid, reason, job.id, version, sides)
    return job.id


def promote_ready(
    config: NodeConfig, sessions: sessionmaker[Session], now: dt.datetime | None = None
) -> list[int]:
    """Queue every receiving study that is ready; returns the IDs of the jobs created.

    One transaction per study, so one study's conflict (a concurrent instance, another node
    queueing it first) does not hold back the others.
    """
    now = as_utc(now) if now is not None else utcnow()
    with sessions() as session:
        study_ids = list(session.scalars(select(Study.id).where(Study.state == StudyState.RECEIVING)))
    created: list[int] = []
    for study_id in study_ids:
        with sessions() as session:
            study = session.get(Study, study_id)
            if study is None or study.state != StudyState.RECEIVING:
                continue
            try:
                job_id = _promote_one(session, config, study, now)
                session.commit()
            except IntegrityError:
                # Another node created this version first; it owns the job.
                session.rollback()
                log.info("study %s was queued concurrently; leaving it", study.study_uid)
                continue
            if job_id is not None:
                created.append(job_id)
    return created
