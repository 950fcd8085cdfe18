"""The audit log: append-only events that say who sent, scored, delivered or changed what.

Every component records through :func:`record` in the caller's transaction, so an event exists
exactly when the change it describes was committed. The table refuses UPDATE and DELETE (database
triggers, see the migrations) and its rows are hash-chained at commit (:mod:`node.audit.chain`).
It is the only place where patient IDs meet study UIDs for people to read; application logs
carry UIDs and row IDs only.
"""

from __future__ import annotations

import getpass
from typing import Any

from sqlalchemy.orm import Session

from node.audit.chain import as_stored_json, queue_event
from node.db.models import AuditEvent, utcnow

# Event names (the ``event`` column); `mammonode audit list --event` filters on them.
ASSOCIATION_ACCEPTED = "association.accepted"
ASSOCIATION_REJECTED = "association.rejected"
INSTANCE_RECEIVED = "instance.received"
INSTANCE_REJECTED = "instance.rejected"
INSTANCE_IGNORED = "instance.ignored"
STUDY_READY = "study.ready"
STUDY_SCORED = "study.scored"
STUDY_FAILED = "study.failed"
STUDY_SKIPPED = "study.skipped"
STUDY_DEFERRED = "study.deferred"
IMAGE_FAILED = "image.failed"
RESULT_SENT = "result.sent"
RESULT_FAILED = "result.failed"
RESULT_DEAD = "result.dead"
QUEUE_RETRY = "queue.retry"
QUEUE_DROP = "queue.drop"
MODEL_REGISTERED = "model.registered"
MODEL_PROMOTED = "model.promoted"
RETRAIN_RUN = "retrain.run"
DATA_EXPORTED = "data.exported"
DB_UPGRADED = "db.upgraded"
NODE_STARTED = "node.started"
NODE_STOPPED = "node.stopped"

EVENTS: tuple[str, ...] = (
    ASSOCIATION_ACCEPTED,
    ASSOCIATION_REJECTED,
    INSTANCE_RECEIVED,
    INSTANCE_REJECTED,
    INSTANCE_IGNORED,
    STUDY_READY,
    STUDY_SCORED,
    STUDY_FAILED,
    STUDY_SKIPPED,
    STUDY_DEFERRED,
    IMAGE_FAILED,
    RESULT_SENT,
    RESULT_FAILED,
    RESULT_DEAD,
    QUEUE_RETRY,
    QUEUE_DROP,
    MODEL_REGISTERED,
    MODEL_PROMOTED,
    RETRAIN_RUN,
    DATA_EXPORTED,
    DB_UPGRADED,
    NODE_STARTED,
    NODE_STOPPED,
)


def cli_actor() -> str:
    """``cli:<login>`` for state changes made from the command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def record(
    session: Session,
    event: str,
    actor: str,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
    calling_ae: str | None = None,
    peer: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Record one event in ``session``'s transaction and return it.

    The event is chained and inserted when the caller commits (so its ``id``, ``seq`` and hashes
    are set only then); a rollback discards it with the change it describes. ``details`` must be
    JSON; it is stored as JSON re-reads it.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    row = AuditEvent(
        at=utcnow(),
        event=event,
        actor=actor,
        patient_id=patient_id,
        study_uid=study_uid,
        sop_instance_uid=sop_instance_uid,
        calling_ae=calling_ae,
        peer=peer,
        details=as_stored_json(details),
    )
    queue_event(session, row)
    return row
