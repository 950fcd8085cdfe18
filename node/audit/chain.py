"""The audit log's hash chain: canonical row content, row hashes, and appending at commit.

Each audit row stores its position ``seq`` (1, 2, ... without gaps), ``prev_hash`` (the
``row_hash`` of the row at ``seq - 1``, :data:`GENESIS_HASH` for the first) and ``row_hash``, the
SHA-256 of :func:`canonical_document`: one JSON object holding ``prev_hash`` and every column but
the surrogate ``id`` and the hashes. Editing, deleting, inserting or moving a row therefore breaks
a link that :mod:`node.audit.verify` finds. Anyone can recompute the hashes (no secret is
involved), so the chain proves integrity only up to a head that was copied elsewhere
(``audit head``, anchoring): rewriting history before an anchor changes the anchored hash.

Why the chain is built at commit and not when :func:`node.audit.record` is called: the chain
must be one line even with many writers (threads, processes, machines on one PostgreSQL), and
row IDs from a sequence are not in commit order. So ``record`` only queues the event on the
session, and a ``before_commit`` hook registered here for every :class:`~sqlalchemy.orm.Session`
(the node's, the CLI's and the tests' alike) locks the one-row ``audit_chain_head``, numbers and
hashes the queued events after the head, inserts them and moves the head, all in the transaction
that commits the change they describe. The lock is taken last, after the caller's own changes
are flushed, so it is held only for a few statements and never waits behind a lock taken later
(no deadlock). A rollback drops the queued events: an event exists exactly when its change was
committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, event, select, update
from sqlalchemy.orm import Session, SessionTransaction

from inference import MammoNodeError
from node.db.models import AuditChainHead, AuditEvent, as_utc

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first row, and the head's hash while the log is empty."""
HEAD_ID = 1
CHAINED_COLUMNS: tuple[str, ...] = (
    "seq",
    "at",
    "event",
    "actor",
    "patient_id",
    "study_uid",
    "sop_instance_uid",
    "calling_ae",
    "peer",
    "details",
)
"""The columns a row's hash covers, besides ``prev_hash`` (everything but ``id`` and the hashes)."""
_PENDING = "mammonode.audit.pending"
_HEAD = cast(Table, AuditChainHead.__table__)
_EVENTS = cast(Table, AuditEvent.__table__)


_LOCK_HEAD = (
    select(_HEAD.c.seq, _HEAD.c.row_hash).where(_HEAD.c.id == HEAD_ID).with_for_update(),
    update(_HEAD)
    .where(_HEAD.c.id == HEAD_ID)
    .values(seq=_HEAD.c.seq)
    .returning(_HEAD.c.seq, _HEAD.c.row_hash),
)
"""Lock and read the head: a row lock on PostgreSQL; on SQLite (where FOR UPDATE does not exist)
a no-op UPDATE, which takes the database's write lock before the head is read."""


class AuditChainError(MammoNodeError):
    """The chain cannot be extended or read (its head row is missing)."""


def canonical_time(value: dt.datetime) -> str:
    """UTC ISO 8601 with microseconds: SQLite hands back naive times, PostgreSQL aware ones."""
    return as_utc(value).isoformat(timespec="microseconds")


def canonical_document(prev_hash: str, row: Any) -> bytes:
    """The bytes a row's hash is taken over: ``prev_hash`` and :data:`CHAINED_COLUMNS` of ``row``
    (an ORM object or a result row) as one JSON object, keys sorted at every level, no spaces,
    ASCII only (``\\uXXXX`` escapes), None as ``null``. JSON re-read from either database gives
    the same values (numbers keep their repr), so the bytes are the same on SQLite and PostgreSQL.
    """
    doc: dict[str, Any] = {name: getattr(row, name) for name in CHAINED_COLUMNS}
    doc["at"] = canonical_time(doc["at"])
    doc["prev_hash"] = prev_hash
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def row_hash(prev_hash: str, row: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_document`."""
    return hashlib.sha256(canonical_document(prev_hash, row)).hexdigest()


def as_stored_json(details: dict[str, Any] | None) -> dict[str, Any] | None:
    """``details`` as the database will hand it back (tuples become lists, keys strings), so the
    hash taken before the insert is the hash of what is re-read. Refuses what JSON cannot hold."""
    if details is None:
        return None
    value = json.loads(json.dumps(details))
    if not isinstance(value, dict):  # pragma: no cover - json of a dict is a dict
        raise TypeError("audit details must be a JSON object")
    return value


# -- appending at commit ----------------------------------------------------------------------


def queue_event(session: Session, row: AuditEvent) -> None:
    """Hold ``row`` until ``session`` commits; it is chained and inserted then."""
    if session.get_transaction() is None:
        session.begin()  # as session.add would: the event belongs to this transaction
    pending: list[tuple[AuditEvent, SessionTransaction | None]] = session.info.setdefault(_PENDING, [])
    pending.append((row, session.get_nested_transaction()))


def pending_events(session: Session) -> list[AuditEvent]:
    """The events recorded on ``session`` and not yet committed, in recording order."""
    return [row for row, _ in session.info.get(_PENDING, ())]


@event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    if session.in_nested_transaction():  # releasing a savepoint: the outer commit chains them
        return
    pending = session.info.pop(_PENDING, None)
    if pending:
        append(session, [row for row, _ in pending])


@event.listens_for(Session, "after_soft_rollback")
def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    """A savepoint rolled back takes the events recorded inside it along."""
    pending = session.info.get(_PENDING)
    if pending and previous_transaction.nested:
        session.info[_PENDING] = [(row, tx) for row, tx in pending if not _inside(tx, previous_transaction)]


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended: committed or not, done
        session.info.pop(_PENDING, None)


def _inside(tx: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while tx is not None:
        if tx is outer:
            return True
        tx = tx.parent
    return False


def append(session: Session, rows: list[AuditEvent]) -> None:
    """Number and hash ``rows`` after the chain's head, add them and move the head (under the
    head's row lock, which the caller's commit releases)."""
    session.flush()  # the caller's own changes (and their row locks) first; the chain lock last
    conn = session.connection()  # plain Core statements: no ORM execution or autoflush around them
    locked = conn.execute(_LOCK_HEAD[conn.dialect.name == "sqlite"]).one_or_none()
    if locked is None:
        raise AuditChainError(
            "the audit chain head (table audit_chain_head) is missing: the log cannot be extended; "
            "run `mammonode audit verify`"
        )
    seq, prev = int(locked.seq), str(locked.row_hash)
    for row in rows:
        seq += 1
        row.seq, row.at, row.prev_hash = seq, as_utc(row.at), prev
        row.row_hash = prev = row_hash(prev, row)
    conn.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=seq, row_hash=prev))
    session.add_all(rows)  # inserted by the commit's flush


# -- the head -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainHead:
    """Where the chain ends; ``at`` is the time of the event at ``seq`` (None when the log is
    empty or that row is gone)."""

    seq: int
    row_hash: str
    at: dt.datetime | None

    @property
    def anchor(self) -> str:
        """``SEQ:HASH``, the form ``audit verify --anchor`` takes."""
        return f"{self.seq}:{self.row_hash}"


def read_head(session: Session) -> ChainHead:
    """The head as the database holds it (raises :class:`AuditChainError` when it is missing)."""
    row = session.execute(
        select(_HEAD.c.seq, _HEAD.c.row_hash, _EVENTS.c.at)
        .outerjoin(_EVENTS, _EVENTS.c.seq == _HEAD.c.seq)
        .where(_HEAD.c.id == HEAD_ID)
        .limit(1)
    ).one_or_none()
    if row is None:
        raise AuditChainError("the audit chain head (table audit_chain_head) is missing")
    return ChainHead(int(row.seq), str(row.row_hash), as_utc(row.at) if row.at is not None else None)
