"""Reading the audit log: filtered listings, a study's timeline and CSV/JSONL exports.

Read-only by design: the audit table refuses UPDATE and DELETE, and nothing here tries. The one
write is the ``data.exported`` event that :func:`export_events` callers record through
:func:`node.audit.record`, because handing the log (which links patients to studies) to a file is
itself an action to account for.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from inference import MammoNodeError
from node.audit import ASSOCIATION_ACCEPTED, ASSOCIATION_REJECTED, EVENTS
from node.audit.chain import CHAINED_COLUMNS, canonical_time
from node.db.models import Association, AuditEvent, Instance, Study, as_utc

EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_COLUMNS: tuple[str, ...] = (
    "id",
    *(name for name in CHAINED_COLUMNS if name != "seq"),
    "seq",
    "prev_hash",
    "row_hash",
)
"""An unfiltered export carries the hash chain: it can be verified without MammoNode (the ``at``
text is the one the hash covers)."""
_S = TypeVar("_S", bound=Select[Any])
ASSOCIATION_EVENTS = (ASSOCIATION_ACCEPTED, ASSOCIATION_REJECTED)
_ASSOCIATION_SLACK = dt.timedelta(seconds=5)
"""How far outside an association's recorded span its audit event may lie (clocks, commit order)."""


class AuditQueryError(MammoNodeError):
    """A filter the user gave cannot be applied (bad time, unknown event name, ...)."""


def parse_time(text: str, what: str = "time") -> dt.datetime:
    """ISO 8601 date or date-time; without an offset it is taken as UTC (the log's clock)."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise AuditQueryError(
            f"{what} {text!r} is not an ISO date or date-time (e.g. 2026-11-23T15:00)"
        ) from None
    return as_utc(value)


@dataclass(frozen=True)
class AuditFilter:
    """The filters `audit list` and `audit export` share; None means "any"."""

    patient_id: str | None = None
    study_uid: str | None = None
    events: tuple[str, ...] = ()
    """Exact names, or a prefix ending in ``*`` (``result.*``)."""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        for name in self.events:
            if name.endswith("*"):
                prefix = name[:-1]
                if not any(e.startswith(prefix) for e in EVENTS):
                    raise AuditQueryError(
                        f"no audit event starts with {prefix!r}; known: {', '.join(EVENTS)}"
                    )
            elif name not in EVENTS:
                raise AuditQueryError(f"unknown audit event {name!r}; known: {', '.join(EVENTS)}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise AuditQueryError("--since is after --until")

    def apply(self, stmt: _S) -> _S:
        if self.patient_id is not None:
            stmt = stmt.where(AuditEvent.patient_id == self.patient_id)
        if self.study_uid is not None:
            stmt = stmt.where(AuditEvent.study_uid == self.study_uid)
        if self.events:
            names = sorted(
                {e for pattern in self.events for e in EVENTS if _matches(e, pattern)}
                | {p for p in self.events if not p.endswith("*")}
            )
            stmt = stmt.where(AuditEvent.event.in_(names))
        if self.since is not None:
            stmt = stmt.where(AuditEvent.at >= self.since)
        if self.until is not None:
            stmt = stmt.where(AuditEvent.at <= self.until)
        return stmt

    def describe(self) -> dict[str, Any]:
        """The filters as plain values, for the ``data.exported`` event's details."""
        return {
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "events": list(self.events),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


def _matches(event: str, pattern: str) -> bool:
    return event.startswith(pattern[:-1]) if pattern.endswith("*") else event == pattern


def list_events(
    session: Session, filters: AuditFilter, limit: int | None = 100
) -> tuple[list[AuditEvent], int]:
    """The newest ``limit`` matching events in time order, and how many matched in all."""
    total = session.scalar(filters.apply(select(func.count()).select_from(AuditEvent)))
    stmt = filters.apply(select(AuditEvent)).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = list(session.scalars(stmt))
    rows.reverse()
    return rows, int(total or 0)


def iter_events(session: Session, filters: AuditFilter) -> Iterator[AuditEvent]:
    """Every matching event, oldest first, streamed in chunks (the log can be large)."""
    stmt = filters.apply(select(AuditEvent)).order_by(AuditEvent.at, AuditEvent.id)
    yield from session.scalars(stmt.execution_options(yield_per=1000))


def study_timeline(session: Session, study_uid: str) -> list[AuditEvent]:
    """Every event of ``study_uid`` plus the association events of the associations that
    delivered its instances, oldest first: the study's path from receipt to delivery.

    An association event belongs to one of those associations when its details name the
    association's row id (``association_id``), or, for events that do not, when it has the same
    calling AE and peer host and lies within the association's span.
    """
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    events = list(session.scalars(select(AuditEvent).where(AuditEvent.study_uid == study_uid)))
    if study is None and not events:
        raise AuditQueryError(f"no study {study_uid} in the node's database or audit log")
    associations: list[Association] = []
    if study is not None:
        associations = list(
            session.scalars(
                select(Association).where(
                    Association.id.in_(
                        select(Instance.association_id)
                        .where(Instance.study_id == study.id, Instance.association_id.is_not(None))
                        .distinct()
                    )
                )
            )
        )
    if associations:
        start = min(as_utc(a.started_at) for a in associations) - _ASSOCIATION_SLACK
        end = max(as_utc(a.ended_at or a.started_at) for a in associations) + _ASSOCIATION_SLACK
        candidates = session.scalars(
            select(AuditEvent).where(
                AuditEvent.event.in_(ASSOCIATION_EVENTS),
                AuditEvent.at >= start,
                AuditEvent.at <= end,
            )
        )
        seen = {e.id for e in events}
        events.extend(e for e in candidates if e.id not in seen and any(_belongs(e, a) for a in associations))
    events.sort(key=lambda e: (as_utc(e.at), e.id))
    return events


def _belongs(event: AuditEvent, association: Association) -> bool:
    details = event.details or {}
    if "association_id" in details:
        return bool(details["association_id"] == association.id)
    start = as_utc(association.started_at) - _ASSOCIATION_SLACK
    end = as_utc(association.ended_at or association.started_at) + _ASSOCIATION_SLACK
    peer_host = (event.peer or "").rsplit(":", 1)[0] if event.peer and ":" in event.peer else event.peer
    return (
        event.calling_ae == association.calling_ae
        and peer_host == association.peer_host
        and start <= as_utc(event.at) <= end
    )


def event_dict(event: AuditEvent) -> dict[str, Any]:
    """One event as plain JSON-able values (time in ISO 8601 UTC with microseconds), chain included."""
    return {
        "id": event.id,
        "at": canonical_time(event.at),
        "event": event.event,
        "actor": event.actor,
        "patient_id": event.patient_id,
        "study_uid": event.study_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "calling_ae": event.calling_ae,
        "peer": event.peer,
        "details": event.details,
        "seq": event.seq,
        "prev_hash": event.prev_hash,
        "row_hash": event.row_hash,
    }


def format_time(value: dt.datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def summarise_details(details: dict[str, Any] | None, width: int = 100) -> str:
    """``key=value`` pairs of an event's details on one line, cut at ``width`` characters."""
    if not details:
        return ""
    parts = []
    for key, value in details.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        parts.append(f"{key}={text}")
    line = " ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


def format_events(events: Sequence[AuditEvent], *, with_study: bool = True) -> list[str]:
    """Readable lines: time, event, actor, who/what, details."""
    lines = []
    for e in events:
        who = []
        if e.calling_ae:
            who.append(f"{e.calling_ae}@{e.peer or '?'}")
        elif e.peer:  # the sender's events name the destination (AE@HOST:PORT) as the peer
            who.append(f"to {e.peer}")
        if with_study and e.study_uid:
            who.append(f"study {e.study_uid}")
        if e.patient_id and with_study:
            who.append(f"patient {e.patient_id}")
        if e.sop_instance_uid:
            who.append(f"sop {e.sop_instance_uid}")
        text = f"{format_time(e.at)}  {e.event:<20} {e.actor:<12} {' '.join(who)}".rstrip()
        extra = summarise_details(e.details)
        lines.append(f"{text}  {extra}" if extra else text)
    return lines


def write_export(events: Iterable[AuditEvent], fmt: str, out: Path) -> int:
    """Write events as CSV (details as a JSON cell) or JSONL; atomic, returns the row count."""
    if fmt not in EXPORT_FORMATS:
        raise AuditQueryError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS) if fmt == "csv" else None
            if writer is not None:
                writer.writeheader()
            for event in events:
                row = event_dict(event)
                if writer is not None:
                    cell = json.dumps(row["details"], sort_keys=True) if row["details"] is not None else ""
                    writer.writerow({**row, "details": cell})
                else:
                    fh.write(json.dumps(row, sort_keys=True) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
