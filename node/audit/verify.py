"""`audit verify`: walk the audit chain in ``seq`` order and name the first broken link.

The walk reads the log in batches (memory stays bounded for millions of rows) and checks, row by
row, that the positions follow without gap or repeat, that each row links to the one before it,
and that each row's content still gives its hash. At the first break it looks around once to say
what most likely happened, as a :class:`Break` of one :data:`BREAK_KINDS`:

- ``edited``: a row's content no longer gives its ``row_hash`` (or a row's hash was recomputed
  after an edit and the next row still links to the old one);
- ``deleted``: positions are missing, or a row links to a hash no row has any more and its own
  position changed (rows deleted and the rest renumbered);
- ``inserted``: a position held twice, a row the chain skips (its neighbours link past it), or
  rows beyond the head;
- ``reordered``: a row links to a row that sits elsewhere in the chain;
- ``truncated``: the log ends before the head (rows cut from the end);
- ``head``: the head's hash is not the last row's (the tail rewritten, or the head edited);
- ``anchor``: a hash copied elsewhere earlier (``audit head``) is not in the chain any more.

The head is read after the rows: a writer commits its rows and the head together, and positions
are handed out in commit order, so rows committed while the walk runs are picked up and checked,
and a head behind the last row seen can only be tampering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, select, tuple_
from sqlalchemy.orm import Session

from node.audit.chain import CHAINED_COLUMNS, GENESIS_HASH, AuditChainError, ChainHead, read_head, row_hash
from node.db.models import AuditEvent

BREAK_KINDS: tuple[str, ...] = ("edited", "deleted", "inserted", "reordered", "truncated", "head", "anchor")
BATCH_ROWS = 5000
_T = AuditEvent.__table__
_COLUMNS = [_T.c[name] for name in ("id", "prev_hash", "row_hash", *CHAINED_COLUMNS)]
_ANCHOR_RE = re.compile(r"([0-9]+):([0-9a-fA-F]{64})")


@dataclass(frozen=True)
class Break:
    """The first broken link: what kind, at which row (``seq`` and row ``id``; None when the
    break is not at a row, e.g. a missing head), and what was found."""

    kind: str
    seq: int | None
    id: int | None
    detail: str

    def describe(self) -> str:
        where = f"seq {self.seq}" + (f" (id {self.id})" if self.id is not None else "")
        return (
            f"{self.kind} at {where}: {self.detail}"
            if self.seq is not None
            else f"{self.kind}: {self.detail}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "id": self.id, "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    """What a verification found: how many rows checked out before the first break (all of them
    when intact), the head, and the first break (None: intact)."""

    checked: int
    head: ChainHead | None
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        head = self.head
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head": None
            if head is None
            else {"seq": head.seq, "row_hash": head.row_hash, "anchor": head.anchor},
            "break": None if self.broken is None else self.broken.as_dict(),
        }


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as ``audit head`` prints it) into (seq, lower-case hex hash)."""
    match = _ANCHOR_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"anchor {text!r} is not SEQ:HASH (a number, a colon, 64 hex digits)")
    return int(match[1]), match[2].lower()


@dataclass
class _Walk:
    """The chain as far as it checked out: the last row and the hash before it."""

    session: Session
    anchors: Mapping[int, str]
    checked: int = 0
    last_seq: int = 0
    last_id: int | None = None
    last_hash: str = GENESIS_HASH
    before_last_hash: str | None = None
    broken: Break | None = field(default=None)

    def run(self, rows: Iterable[Row[Any]]) -> Break | None:
        for row, after in _with_next(rows):
            self.broken = self._step(row, after)
            if self.broken is not None:
                return self.broken
        return None

    def _step(self, r: Row[Any], after: Row[Any] | None) -> Break | None:
        if self.last_id is not None and r.seq == self.last_seq:
            return Break(
                "inserted", r.seq, r.id, f"seq {r.seq} is held by two rows (ids {self.last_id} and {r.id})"
            )
        expected = self.last_seq + 1
        if r.seq != expected:
            gap = f"seq {expected}" if r.seq == expected + 1 else f"seqs {expected}..{r.seq - 1}"
            return Break("deleted", r.seq, r.id, f"{gap} missing before it")
        if r.prev_hash != self.last_hash:
            return self._unlinked(r, after)
        if row_hash(r.prev_hash, r) != r.row_hash:
            if after is not None and after.prev_hash == self.last_hash:
                return Break("inserted", r.seq, r.id, f"its hash is wrong and seq {r.seq + 1} links past it")
            return Break("edited", r.seq, r.id, "its content no longer matches its row_hash")
        anchored = self.anchors.get(r.seq)
        if anchored is not None and anchored != r.row_hash:
            return Break(
                "anchor",
                r.seq,
                r.id,
                f"its hash {r.row_hash} is not the anchored {anchored}: rewritten at or before it",
            )
        self.checked += 1
        self.before_last_hash, self.last_hash = self.last_hash, r.row_hash
        self.last_seq, self.last_id = r.seq, r.id
        return None

    def _unlinked(self, r: Row[Any], after: Row[Any] | None) -> Break:
        """``r`` does not link to the row before it: say why, as far as the neighbours tell."""
        if self.last_id is not None and r.prev_hash == self.before_last_hash:
            self.checked -= 1  # the break is the row before, which looked intact on its own
            return Break(
                "inserted",
                self.last_seq,
                self.last_id,
                f"seq {r.seq} links past it to seq {self.last_seq - 1}",
            )
        elsewhere = self.session.execute(
            select(_T.c.seq, _T.c.id).where(_T.c.row_hash == r.prev_hash).limit(1)
        ).one_or_none()
        if elsewhere is not None:
            return Break(
                "reordered",
                r.seq,
                r.id,
                f"it links to the row now at seq {elsewhere.seq} (id {elsewhere.id}), not to seq {r.seq - 1}",
            )
        if after is not None and after.prev_hash == self.last_hash:
            return Break(
                "inserted",
                r.seq,
                r.id,
                f"it does not link to seq {r.seq - 1} and seq {r.seq + 1} links past it",
            )
        if self.last_id is not None and row_hash(r.prev_hash, r) == r.row_hash:
            self.checked -= 1
            return Break(
                "edited",
                self.last_seq,
                self.last_id,
                f"its hash was recomputed after an edit; seq {r.seq} still links to its old hash",
            )
        return Break(
            "deleted",
            r.seq,
            r.id,
            "it links to a hash no row has and its own hash no longer matches: rows before it were "
            "deleted and the rest renumbered",
        )


def _with_next(rows: Iterable[Row[Any]]) -> Iterator[tuple[Row[Any], Row[Any] | None]]:
    it = iter(rows)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following
        current = following


def _rows(
    session: Session, after: tuple[int, int] | None, upto: int | None, batch: int
) -> Iterator[Row[Any]]:
    """Rows in (seq, id) order after ``after`` and up to seq ``upto``, ``batch`` at a time."""
    while True:
        stmt = select(*_COLUMNS).order_by(_T.c.seq, _T.c.id).limit(batch)
        if after is not None:
            stmt = stmt.where(_T.c.seq >= after[0], tuple_(_T.c.seq, _T.c.id) > tuple_(*after))
        if upto is not None:
            stmt = stmt.where(_T.c.seq <= upto)
        rows = session.execute(stmt).all()
        yield from rows
        if len(rows) < batch:
            return
        after = (rows[-1].seq, rows[-1].id)


def verify_chain(
    session: Session, anchors: Iterable[tuple[int, str]] = (), batch: int = BATCH_ROWS
) -> Verdict:
    """Walk the whole chain, then hold its end against the head and the ``anchors``."""
    anchored = dict(anchors)
    walk = _Walk(session, anchored)
    if walk.run(_rows(session, None, None, batch)) is not None:
        return Verdict(walk.checked, None, walk.broken)
    try:
        head = read_head(session)
    except AuditChainError as exc:
        return Verdict(walk.checked, None, Break("head", None, None, str(exc)))
    broken = _check_end(session, walk, head, batch)
    if broken is None:
        beyond = sorted(seq for seq in anchored if seq > walk.last_seq)
        if beyond:
            broken = Break(
                "anchor",
                beyond[0],
                None,
                f"the anchored row is past the end of the log (seq {walk.last_seq})",
            )
        elif 0 in anchored and anchored[0] != GENESIS_HASH:
            broken = Break("anchor", 0, None, f"seq 0 is the genesis {GENESIS_HASH}, not {anchored[0]}")
    return Verdict(walk.checked, head, broken)


def _check_end(session: Session, walk: _Walk, head: ChainHead, batch: int) -> Break | None:
    if walk.last_seq > head.seq:
        first = session.execute(
            select(_T.c.seq, _T.c.id).where(_T.c.seq > head.seq).order_by(_T.c.seq, _T.c.id).limit(1)
        ).one()
        return Break("inserted", first.seq, first.id, f"it lies beyond the head (seq {head.seq})")
    if walk.last_seq < head.seq:  # committed while the walk ran, or cut from the end
        after = (walk.last_seq, walk.last_id) if walk.last_id is not None else None
        if walk.run(_rows(session, after, head.seq, batch)) is not None:
            return walk.broken
    if walk.last_seq < head.seq:
        gap = f"seq {head.seq}" if head.seq == walk.last_seq + 1 else f"seqs {walk.last_seq + 1}..{head.seq}"
        return Break("truncated", head.seq, None, f"the log ends at seq {walk.last_seq}; {gap} missing")
    if walk.last_hash != head.row_hash:
        return Break(
            "head",
            head.seq,
            walk.last_id,
            f"the head's hash {head.row_hash} is not the last row's {walk.last_hash}: the tail was "
            "rewritten or the head edited",
        )
    return None
