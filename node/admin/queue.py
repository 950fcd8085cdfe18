"""What an operator sees and does with the queues: outbox transmissions and scoring jobs.

`mammonode queue` lists both; retrying puts an item back in front of the sender or worker,
dropping takes a transmission (or job) out for good. Every change is audited in the same
transaction (``queue.retry`` / ``queue.drop``). Jobs are addressed as ``job:ID`` so that they
cannot be mistaken for transmissions, which are plain numbers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from inference import MammoNodeError, scrub
from node import audit
from node.db.models import Job, OutputObject, Study, Transmission, utcnow
from node.db.states import TRANSMISSION_DUE, JobState, StudyState, TransmissionState, check_transition

ALL = "all"
STATE_CHOICES = (
    TransmissionState.PENDING,
    TransmissionState.FAILED,
    TransmissionState.DEAD,
    TransmissionState.DROPPED,
    TransmissionState.SENT,
    ALL,
)
DEFAULT_TRANSMISSION_STATES = (TransmissionState.PENDING, TransmissionState.FAILED, TransmissionState.DEAD)
DEFAULT_JOB_STATES = (JobState.PENDING, JobState.CLAIMED, JobState.FAILED)
JOB_STATES_LISTED: dict[str, tuple[JobState, ...]] = {
    TransmissionState.PENDING: (JobState.PENDING, JobState.CLAIMED),
    TransmissionState.FAILED: (JobState.FAILED,),
    TransmissionState.DROPPED: (JobState.DROPPED,),
}
"""Jobs listed for ``--state`` (the choices are transmission words; a claimed job is pending work)."""
JOB_PREFIX = "job:"
# What an operator may retry or drop; the moves themselves are in node.db.states' tables.
RETRYABLE_TRANSMISSION = (
    TransmissionState.PENDING,
    TransmissionState.FAILED,
    TransmissionState.DEAD,
    TransmissionState.DROPPED,
)
DROPPABLE_TRANSMISSION = (TransmissionState.PENDING, TransmissionState.FAILED, TransmissionState.DEAD)
RETRYABLE_JOB = (JobState.FAILED, JobState.DROPPED)
DROPPABLE_JOB = (JobState.FAILED,)
"""A pending job is left to the worker: dropping it would strand its study in ``queued``."""


class QueueError(MammoNodeError):
    """A queue item does not exist or cannot make the requested move."""


@dataclass(frozen=True)
class QueueItem:
    """One row of `mammonode queue`: a transmission, or a scoring job (``kind == "job"``)."""

    ref: str
    kind: str
    """``SC`` / ``SR`` for transmissions, ``job`` for scoring jobs."""
    study_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.ref,
            "kind": self.kind,
            "study_uid": self.study_uid,
            "destination": self.destination,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "last_error": self.last_error,
        }


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value).isoformat()


def _states(state: str | None) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Transmission states and job states to list for ``--state`` (None = no filter)."""
    if state is None:
        return DEFAULT_TRANSMISSION_STATES, DEFAULT_JOB_STATES
    if state not in STATE_CHOICES:
        raise QueueError(f"--state must be one of {', '.join(STATE_CHOICES)}, not {state!r}")
    if state == ALL:
        return None, None
    return (state,), JOB_STATES_LISTED.get(state, ())


def list_items(session: Session, state: str | None = None) -> list[QueueItem]:
    """Transmissions (oldest first) then scoring jobs, in the states ``state`` selects."""
    tx_states, job_states = _states(state)
    tx_stmt = (
        select(Transmission, OutputObject.kind, Study.study_uid)
        .join(OutputObject, Transmission.output_id == OutputObject.id)
        .join(Job, OutputObject.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .order_by(Transmission.id)
    )
    if tx_states is not None:
        tx_stmt = tx_stmt.where(Transmission.state.in_(tx_states))
    items = [
        QueueItem(
            ref=str(t.id),
            kind=kind,
            study_uid=study_uid,
            destination=t.destination,
            state=t.state,
            attempts=t.attempts,
            next_attempt_at=t.next_attempt_at if t.state in TRANSMISSION_DUE else None,
            last_error=scrub(t.last_error) if t.last_error else None,
        )
        for t, kind, study_uid in session.execute(tx_stmt)
    ]
    if job_states == ():
        return items
    job_stmt = select(Job).options(joinedload(Job.study)).order_by(Job.id)
    if job_states is not None:
        job_stmt = job_stmt.where(Job.state.in_(job_states))
    items.extend(
        QueueItem(
            ref=f"{JOB_PREFIX}{j.id}",
            kind="job",
            study_uid=j.study.study_uid,
            destination=f"score v{j.version} {j.lateralities}",
            state=j.state,
            attempts=j.attempts,
            next_attempt_at=None,
            last_error=scrub(j.error) if j.error else None,
        )
        for j in session.scalars(job_stmt)
    )
    return items


def parse_refs(refs: Sequence[str]) -> tuple[list[int], list[int]]:
    """Split ``["12", "job:3"]`` into transmission IDs and job IDs; QueueError on anything else."""
    tx_ids: list[int] = []
    job_ids: list[int] = []
    for ref in refs:
        text = ref.strip().lower()
        target, number = (job_ids, text[len(JOB_PREFIX) :]) if text.startswith(JOB_PREFIX) else (tx_ids, text)
        if not number.isdigit():
            raise QueueError(f"{ref!r} is not a queue ID (a transmission number, or job:NUMBER for a job)")
        target.append(int(number))
    return tx_ids, job_ids


def _fetch(session: Session, model: type[Any], ids: Sequence[int], what: str) -> list[Any]:
    rows = {r.id: r for r in session.scalars(select(model).where(model.id.in_(ids)).with_for_update())}
    missing = [str(i) for i in ids if i not in rows]
    if missing:
        raise QueueError(f"no {what} with ID {', '.join(missing)}")
    return [rows[i] for i in dict.fromkeys(ids)]


def _output_studies(session: Session, transmissions: Sequence[Transmission]) -> dict[int, str]:
    """Study Instance UID of each transmission's output object, by output ID."""
    ids = {t.output_id for t in transmissions}
    if not ids:
        return {}
    stmt = (
        select(OutputObject.id, Study.study_uid)
        .join(Job, OutputObject.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(OutputObject.id.in_(ids))
    )
    return {output_id: study_uid for output_id, study_uid in session.execute(stmt)}


def transmissions_in_state(session: Session, state: str) -> list[int]:
    return list(
        session.scalars(select(Transmission.id).where(Transmission.state == state).order_by(Transmission.id))
    )


def _checked(
    session: Session,
    tx_ids: Sequence[int],
    job_ids: Sequence[int],
    tx_states: tuple[str, ...],
    job_states: tuple[str, ...],
    verb: str,
) -> tuple[list[Transmission], list[Job]]:
    """The rows behind the IDs, after checking every one may be ``verb`` (retried, dropped)."""
    transmissions = _fetch(session, Transmission, tx_ids, "transmission")
    jobs = _fetch(session, Job, job_ids, "scoring job")
    for t in transmissions:
        if t.state not in tx_states:
            raise QueueError(f"transmission {t.id} is {t.state}; only {'/'.join(tx_states)} can be {verb}")
    for j in jobs:
        if j.state not in job_states:
            raise QueueError(f"job:{j.id} is {j.state}; only {'/'.join(job_states)} jobs can be {verb}")
    return transmissions, jobs


def retry(session: Session, tx_ids: Sequence[int], job_ids: Sequence[int], actor: str) -> list[str]:
    """Make the items pending again, due now, and audit each; the caller commits.

    A transmission keeps its attempt count (history); a retried job goes back to the worker
    and its study to ``queued``. Checks every item before changing any, so a bad ID changes
    nothing. Returns one line per item changed.
    """
    transmissions, jobs = _checked(session, tx_ids, job_ids, RETRYABLE_TRANSMISSION, RETRYABLE_JOB, "retried")
    now = utcnow()
    studies = _output_studies(session, transmissions)
    done = []
    for t in transmissions:
        before = t.state
        t.state, t.next_attempt_at = check_transition(before, TransmissionState.PENDING), now
        audit.record(
            session,
            audit.QUEUE_RETRY,
            actor,
            study_uid=studies[t.output_id],
            sop_instance_uid=t.output.sop_instance_uid,
            details={"transmission_id": t.id, "destination": t.destination, "from_state": before},
        )
        done.append(f"transmission {t.id} ({t.output.kind} to {t.destination}): {before} -> pending")
    for j in jobs:
        before = j.state
        j.state = check_transition(before, JobState.PENDING)
        j.claimed_by, j.claimed_at, j.finished_at = None, None, None
        study: Study = j.study
        study.state = check_transition(study.state, StudyState.QUEUED)
        audit.record(
            session,
            audit.QUEUE_RETRY,
            actor,
            study_uid=study.study_uid,
            details={"job_id": j.id, "version": j.version, "from_state": before},
        )
        done.append(f"job:{j.id} (study {study.study_uid} v{j.version}): {before} -> pending")
    return done


def drop(session: Session, tx_ids: Sequence[int], job_ids: Sequence[int], actor: str) -> list[str]:
    """Take the items out of the queue for good (state ``dropped``) and audit each."""
    transmissions, jobs = _checked(session, tx_ids, job_ids, DROPPABLE_TRANSMISSION, DROPPABLE_JOB, "dropped")
    studies = _output_studies(session, transmissions)
    done = []
    for t in transmissions:
        before, t.state = t.state, check_transition(t.state, TransmissionState.DROPPED)
        audit.record(
            session,
            audit.QUEUE_DROP,
            actor,
            study_uid=studies[t.output_id],
            sop_instance_uid=t.output.sop_instance_uid,
            details={"transmission_id": t.id, "destination": t.destination, "from_state": before},
        )
        done.append(f"transmission {t.id} ({t.output.kind} to {t.destination}): {before} -> dropped")
    for j in jobs:
        before, j.state = j.state, check_transition(j.state, JobState.DROPPED)
        audit.record(
            session,
            audit.QUEUE_DROP,
            actor,
            study_uid=j.study.study_uid,
            details={"job_id": j.id, "version": j.version, "from_state": before},
        )
        done.append(f"job:{j.id} (study {j.study.study_uid} v{j.version}): {before} -> dropped")
    return done
