"""The audit log's hash chain on both databases: what the node records forms one valid chain, even
with many writers; an attacker with write access (triggers dropped or disabled, as the database
owner can) who edits, deletes, inserts, re-orders or cuts rows is caught at the first broken link;
and one who rewrites every hash after an edit is caught by a head anchored elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from admin_helpers import T0, cli
from sqlalchemy import Connection, Table, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.audit.chain import (
    CHAINED_COLUMNS,
    GENESIS_HASH,
    AuditChainError,
    ChainHead,
    pending_events,
    read_head,
    row_hash,
)
from node.audit.verify import Break, parse_anchor, verify_chain
from node.db.models import AuditChainHead, AuditEvent, Study
from node.db.session import make_engine

REVISION = importlib.import_module("migrations.versions.0005_audit_chain")
EVENTS = cast(Table, AuditEvent.__table__)
HEAD = cast(Table, AuditChainHead.__table__)
TRICKY_DETAILS: list[dict[str, Any] | None] = [
    {"probability": 0.1, "values": [1, 2.5, -0.0, 1e-20, 10**20], "ok": True, "none": None},
    None,
    {"name": "Zoë ß 日本 \u2028", "nested": {"b": 1, "a": [{"y": 2, "x": 1}]}, "empty": {}},
    {"tuple": (1, 2), "quote": 'a "b" \\ c'},
]


def record_many(sessions: sessionmaker[Session], n: int, per_commit: int = 1) -> list[int]:
    """``n`` events, ``per_commit`` in each transaction; returns their IDs in recording order."""
    ids = []
    for start in range(0, n, per_commit):
        with sessions() as session:
            rows = [
                audit.record(
                    session,
                    audit.INSTANCE_RECEIVED,
                    "scp",
                    patient_id=f"PAT-{k}",
                    study_uid=f"1.2.826.0.1.{k}",
                    details={"k": k},
                )
                for k in range(start, min(n, start + per_commit))
            ]
            session.commit()
            ids += [r.id for r in rows]
    return ids


def verdict(sessions: sessionmaker[Session], anchors: Sequence[tuple[int, str]] = ()) -> Any:
    with sessions() as session:
        return verify_chain(session, anchors, batch=3)  # small batches: the walk crosses them


def head_of(sessions: sessionmaker[Session]) -> ChainHead:
    with sessions() as session:
        return read_head(session)


def chain(sessions: sessionmaker[Session]) -> list[Any]:
    with sessions() as session:
        return list(session.execute(select(EVENTS).order_by(EVENTS.c.seq, EVENTS.c.id)))


@contextmanager
def attacker(db_url: str, db_kind: str) -> Iterator[Connection]:
    """A connection with the append-only and forward-only triggers out of the way, put back after
    (SQLite: dropped and recreated; PostgreSQL: disabled and enabled, as the superuser)."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            if db_kind == "sqlite":
                for name in (
                    *REVISION.SQLITE_EVENT_TRIGGER_NAMES,
                    "audit_chain_head_forward",
                    "audit_chain_head_no_delete",
                ):
                    conn.execute(text(f"DROP TRIGGER {name}"))
            else:
                conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
                conn.execute(text("ALTER TABLE audit_chain_head DISABLE TRIGGER USER"))
            yield conn
            if db_kind == "sqlite":
                for statement in (*REVISION.SQLITE_EVENT_TRIGGERS, *REVISION.SQLITE_HEAD_TRIGGERS):
                    conn.execute(text(statement))
            else:
                conn.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
                conn.execute(text("ALTER TABLE audit_chain_head ENABLE TRIGGER USER"))
    finally:
        engine.dispose()


def renumber(conn: Connection, from_seq: int, by: int) -> None:
    """Shift every seq >= ``from_seq`` by ``by``, through negative values so that no two rows
    share a seq on the way (the unique constraint checks each row)."""
    conn.execute(update(EVENTS).where(EVENTS.c.seq >= from_seq).values(seq=-(EVENTS.c.seq + by)))
    conn.execute(update(EVENTS).where(EVENTS.c.seq < 0).values(seq=-EVENTS.c.seq))


def rehash_from(conn: Connection, seq: int) -> str:
    """Recompute prev_hash and row_hash from ``seq`` to the end (the algorithm is public) and move
    the head there; returns the new last hash."""
    rows = list(conn.execute(select(EVENTS).where(EVENTS.c.seq >= seq).order_by(EVENTS.c.seq)))
    prev = conn.scalar(select(EVENTS.c.row_hash).where(EVENTS.c.seq == seq - 1)) or GENESIS_HASH
    for row in rows:
        new = row_hash(prev, row)
        conn.execute(update(EVENTS).where(EVENTS.c.id == row.id).values(prev_hash=prev, row_hash=new))
        prev = new
    conn.execute(update(HEAD).values(seq=rows[-1].seq, row_hash=prev))
    return prev


def forged_row(seq: int, prev_hash: str) -> dict[str, Any]:
    """A ``result.sent`` the node never recorded, hashed correctly for position ``seq``."""
    row = SimpleNamespace(
        seq=seq,
        at=T0,
        event=audit.RESULT_SENT,
        actor="sender",
        patient_id="PAT-3",
        study_uid="1.2.826.0.1.3",
        sop_instance_uid="1.2.826.0.1.3.99",
        calling_ae=None,
        peer="PACS@10.0.0.1:104",
        details={"status": "Success"},
    )
    return {**vars(row), "prev_hash": prev_hash, "row_hash": row_hash(prev_hash, row)}


# -- recording ----------------------------------------------------------------------------------


def test_recorded_events_form_one_chain_that_rereads_to_the_same_hashes(
    sessions: sessionmaker[Session],
) -> None:
    """Each row links to the one before; hashes taken before the insert are those of the values
    re-read from the database (times, JSON numbers, unicode), so both databases agree."""
    expected_prev = GENESIS_HASH
    for n, details in enumerate(TRICKY_DETAILS):
        with sessions() as session:
            row = audit.record(session, audit.STUDY_SCORED, "worker", patient_id=f"PÄT-{n}", details=details)
            row.at = T0 + dt.timedelta(microseconds=n)  # as the admin tests do: any time, hashed at commit
            plain = SimpleNamespace(**{c: getattr(row, c) for c in CHAINED_COLUMNS if c != "seq"}, seq=n + 1)
            session.commit()
        assert (row.seq, row.prev_hash) == (n + 1, expected_prev)
        assert row.row_hash == row_hash(expected_prev, plain)  # the in-memory values' hash
        expected_prev = row.row_hash
    stored = chain(sessions)
    assert [r.seq for r in stored] == [1, 2, 3, 4]
    assert stored[3].details == {"tuple": [1, 2], "quote": 'a "b" \\ c'}
    prev = GENESIS_HASH
    for r in stored:
        assert (r.prev_hash, r.row_hash) == (prev, row_hash(prev, r))
        prev = r.row_hash
    result = verdict(sessions)
    assert result.ok and result.checked == 4
    assert head_of(sessions) == ChainHead(4, prev, T0 + dt.timedelta(microseconds=3))


def test_an_event_exists_exactly_when_its_change_committed(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        audit.record(session, audit.QUEUE_DROP, "cli:x")
        assert len(pending_events(session)) == 1
        session.rollback()
        assert pending_events(session) == []
        session.commit()  # nothing left to write
    with sessions() as session:
        audit.record(session, audit.QUEUE_DROP, "cli:x")  # closed without commit
    with sessions() as session:  # the caller's own change fails at commit: its event goes too
        session.add(Study(study_uid="1.2.3", patient_id="P"))
        session.commit()
        session.add(Study(study_uid="1.2.3", patient_id="P"))
        audit.record(session, audit.STUDY_READY, "assembly", study_uid="1.2.3")
        with pytest.raises(IntegrityError):
            session.commit()
    with sessions() as session:  # a savepoint rolled back takes its events along
        audit.record(session, audit.NODE_STARTED, "node", details={"kept": 1})
        savepoint = session.begin_nested()
        audit.record(session, audit.NODE_STOPPED, "node", details={"kept": 0})
        savepoint.rollback()
        with session.begin_nested():
            audit.record(session, audit.NODE_STOPPED, "node", details={"kept": 2})
        session.commit()
    assert [(r.seq, r.details) for r in chain(sessions)] == [(1, {"kept": 1}), (2, {"kept": 2})]
    assert verdict(sessions).ok and head_of(sessions).seq == 2


def test_concurrent_writers_make_one_linear_chain(sessions: sessionmaker[Session], db_url: str) -> None:
    """Threads and a second process commit at once; positions are handed out in commit order,
    and the events of one transaction sit next to each other."""
    code = (
        "import sys\n"
        "from node import audit\n"
        "from node.db.session import make_engine, session_factory\n"
        "sessions = session_factory(make_engine(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "for c in range(40):\n"
        "    with sessions() as s:\n"
        "        for p in range(2):\n"
        "            details = {'writer': 'proc', 'commit': c, 'part': p}\n"
        "            audit.record(s, audit.INSTANCE_RECEIVED, 'scp', details=details)\n"
        "        s.commit()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            for c in range(40):
                with sessions() as session:
                    for p in range(2):
                        details = {"writer": writer, "commit": c, "part": p}
                        audit.record(session, audit.INSTANCE_RECEIVED, "scp", details=details)
                    session.commit()
        except BaseException as exc:  # noqa: BLE001 - the main thread asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.wait(timeout=120) == 0 and not errors, errors

    rows = chain(sessions)
    assert [r.seq for r in rows] == list(range(1, 401))
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        assert first.details["part"] == 0 and second.details == {**first.details, "part": 1}
    result = verdict(sessions)
    assert result.ok and result.checked == 400 and result.head.seq == 400


def test_the_head_only_moves_forward(sessions: sessionmaker[Session]) -> None:
    record_many(sessions, 2)
    before = head_of(sessions)
    refused = [
        update(AuditChainHead).values(seq=1),
        update(AuditChainHead).values(row_hash="f" * 64),
        delete(AuditChainHead),
    ]
    for statement in refused:
        with sessions() as session, pytest.raises(DBAPIError, match="moves only forward"):
            session.execute(statement)
            session.commit()
    assert head_of(sessions) == before


def test_a_missing_head_stops_recording_and_fails_verification(
    sessions: sessionmaker[Session], db_url: str, db_kind: str
) -> None:
    record_many(sessions, 2)
    with attacker(db_url, db_kind) as conn:
        conn.execute(delete(HEAD))
    with sessions() as session:
        audit.record(session, audit.NODE_STARTED, "node")
        with pytest.raises(AuditChainError, match=r"audit chain head .* is missing"):
            session.commit()
    result = verdict(sessions)
    assert result.broken == Break(
        "head", None, None, "the audit chain head (table audit_chain_head) is missing"
    )
    assert [r.seq for r in chain(sessions)] == [1, 2]


# -- tampering ------------------------------------------------------------------------------------


def _edit(conn: Connection, ids: list[int]) -> None:
    conn.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(patient_id="SOMEONE-ELSE"))


def _edit_and_rehash_that_row(conn: Connection, ids: list[int]) -> None:
    conn.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(actor="cli:mallory"))
    row = conn.execute(select(EVENTS).where(EVENTS.c.seq == 4)).one()
    conn.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(row_hash=row_hash(row.prev_hash, row)))


def _delete(conn: Connection, ids: list[int]) -> None:
    conn.execute(delete(EVENTS).where(EVENTS.c.seq == 4))


def _delete_and_renumber(conn: Connection, ids: list[int]) -> None:
    conn.execute(delete(EVENTS).where(EVENTS.c.seq == 4))
    renumber(conn, 5, -1)
    conn.execute(update(HEAD).values(seq=7))


def _insert_forged(conn: Connection, ids: list[int]) -> None:
    renumber(conn, 4, +1)
    h3 = str(conn.scalar(select(EVENTS.c.row_hash).where(EVENTS.c.seq == 3)))
    conn.execute(insert(EVENTS).values(id=1000, **forged_row(4, h3)))
    conn.execute(update(HEAD).values(seq=9))


def _insert_forged_bad_hash(conn: Connection, ids: list[int]) -> None:
    renumber(conn, 4, +1)
    conn.execute(insert(EVENTS).values(id=1000, **{**forged_row(4, "e" * 64), "row_hash": "f" * 64}))
    conn.execute(update(HEAD).values(seq=9))


def _insert_duplicate_seq(conn: Connection, ids: list[int]) -> None:
    """Drop the unique constraint on seq (SQLite: copy the table without it) and add a second seq 4."""
    if conn.dialect.name == "sqlite":
        conn.execute(text("CREATE TABLE audit_copy AS SELECT * FROM audit_events"))
        conn.execute(text("DROP TABLE audit_events"))
        conn.execute(text("ALTER TABLE audit_copy RENAME TO audit_events"))
    else:
        conn.execute(text("ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_seq"))
    h3 = str(conn.scalar(select(EVENTS.c.row_hash).where(EVENTS.c.seq == 3)))
    conn.execute(insert(EVENTS).values(id=1000, **forged_row(4, h3)))


def _append_beyond_head(conn: Connection, ids: list[int]) -> None:
    h8 = str(conn.scalar(select(EVENTS.c.row_hash).where(EVENTS.c.seq == 8)))
    conn.execute(insert(EVENTS).values(id=1000, **forged_row(9, h8)))


def _swap(a: int, b: int) -> Callable[[Connection, list[int]], None]:
    def swap(conn: Connection, ids: list[int]) -> None:
        conn.execute(update(EVENTS).where(EVENTS.c.seq == a).values(seq=-1))
        conn.execute(update(EVENTS).where(EVENTS.c.seq == b).values(seq=a))
        conn.execute(update(EVENTS).where(EVENTS.c.seq == -1).values(seq=b))

    return swap


def _truncate(conn: Connection, ids: list[int]) -> None:
    conn.execute(delete(EVENTS).where(EVENTS.c.seq >= 7))


def _edit_head(conn: Connection, ids: list[int]) -> None:
    conn.execute(update(HEAD).values(row_hash="f" * 64))


TAMPERING = {
    # name: (what the attacker does, kind, seq and index of the row id named, words in the detail)
    "edited": (_edit, "edited", 4, 3, "content no longer matches"),
    "edited, that row rehashed": (_edit_and_rehash_that_row, "edited", 4, 3, "hash was recomputed"),
    "deleted": (_delete, "deleted", 5, 4, "seq 4 missing"),
    "deleted, rest renumbered": (_delete_and_renumber, "deleted", 4, 4, "deleted and the rest renumbered"),
    "inserted, rest renumbered": (_insert_forged, "inserted", 4, None, "seq 5 links past it to seq 3"),
    "inserted with a made-up hash": (_insert_forged_bad_hash, "inserted", 4, None, "seq 5 links past it"),
    "inserted with a duplicate seq": (_insert_duplicate_seq, "inserted", 4, None, "held by two rows"),
    "appended beyond the head": (_append_beyond_head, "inserted", 9, None, "beyond the head (seq 8)"),
    "two rows swapped": (_swap(3, 6), "reordered", 3, 5, "links to the row now at seq 5"),
    "neighbours swapped": (_swap(4, 5), "reordered", 4, 4, "links to the row now at seq 5"),
    "tail cut": (_truncate, "truncated", 8, None, "the log ends at seq 6; seqs 7..8 missing"),
    "head edited": (_edit_head, "head", 8, 7, "the tail was rewritten or the head edited"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_names_the_first_broken_link(
    case: str, sessions: sessionmaker[Session], db_url: str, db_kind: str
) -> None:
    tamper, kind, seq, id_index, words = TAMPERING[case]
    ids = record_many(sessions, 8, per_commit=3)
    assert verdict(sessions).ok
    with attacker(db_url, db_kind) as conn:
        tamper(conn, ids)

    broken = verdict(sessions).broken
    assert broken is not None
    expected_id = (
        1000 if case.startswith(("inserted", "appended")) else (None if id_index is None else ids[id_index])
    )
    assert (broken.kind, broken.seq, broken.id) == (kind, seq, expected_id), broken
    assert words in broken.detail, broken.detail


def test_a_rewritten_chain_is_caught_by_an_anchored_head(
    sessions: sessionmaker[Session], db_url: str, db_kind: str
) -> None:
    """Rewriting every hash after an edit, head included, leaves a consistent chain: only a head
    copied elsewhere before the edit shows it. An anchor before the edit still holds."""
    record_many(sessions, 8)
    at_8 = head_of(sessions)
    h3 = chain(sessions)[2].row_hash
    record_many(sessions, 2)
    at_10 = head_of(sessions)
    with attacker(db_url, db_kind) as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(patient_id="SOMEONE-ELSE"))
        rehash_from(conn, 4)

    assert verdict(sessions).ok  # the limit of a chain anyone can recompute
    assert verdict(sessions, [(3, h3), (0, GENESIS_HASH)]).ok  # anchors before the edit still hold
    broken = verdict(sessions, [(at_8.seq, at_8.row_hash), (at_10.seq, at_10.row_hash)]).broken
    assert broken is not None and (broken.kind, broken.seq) == ("anchor", 8)
    assert f"not the anchored {at_8.row_hash}: rewritten at or before it" in broken.detail

    with attacker(db_url, db_kind) as conn:  # cut the tail and lower the head to match
        conn.execute(delete(EVENTS).where(EVENTS.c.seq > 8))
        last = select(EVENTS.c.row_hash).where(EVENTS.c.seq == 8).scalar_subquery()
        conn.execute(update(HEAD).values(seq=8, row_hash=last))
    assert verdict(sessions).ok
    broken = verdict(sessions, [(at_10.seq, at_10.row_hash)]).broken
    assert broken == Break("anchor", 10, None, "the anchored row is past the end of the log (seq 8)")


# -- the commands -------------------------------------------------------------------------------


def test_verify_and_head_commands(
    sessions: sessionmaker[Session], db_url: str, db_kind: str, tmp_path: Path
) -> None:
    ids = record_many(sessions, 5)
    head = head_of(sessions)
    assert head.at is not None
    shown = cli(["audit", "head"], db_url, tmp_path)
    assert shown.exit_code == 0, shown.output
    at = head.at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert shown.stdout.splitlines() == [f"{head.anchor} {at}"]
    as_json = json.loads(cli(["audit", "head", "--json"], db_url, tmp_path).stdout)
    assert as_json == {"seq": 5, "row_hash": head.row_hash, "at": at, "anchor": head.anchor}
    assert parse_anchor(shown.stdout.split()[0]) == (5, head.row_hash)

    ok = cli(["audit", "verify", "--anchor", head.anchor], db_url, tmp_path)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines() == [f"audit chain OK: 5 event(s), head {head.anchor}, 1 anchor(s) held"]

    bad_anchor = cli(["audit", "verify", "--anchor", "5:abc"], db_url, tmp_path)
    assert bad_anchor.exit_code == 2 and "is not SEQ:HASH" in bad_anchor.output

    with attacker(db_url, db_kind) as conn:
        _edit_and_rehash_that_row(conn, [])
    broken = cli(["audit", "verify"], db_url, tmp_path)
    assert broken.exit_code == 3 and broken.stdout == ""
    assert broken.stderr.splitlines() == [
        f"error: audit chain broken: edited at seq 4 (id {ids[3]}): its hash was recomputed after an edit; "
        "seq 5 still links to its old hash"
    ]
    as_json = json.loads(cli(["audit", "verify", "--json"], db_url, tmp_path).stdout)
    assert as_json["ok"] is False and as_json["checked"] == 3
    assert as_json["break"] == {
        "kind": "edited",
        "seq": 4,
        "id": ids[3],
        "detail": "its hash was recomputed after an edit; seq 5 still links to its old hash",
    }


def test_an_unfiltered_export_verifies_without_mammonode(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    """The README's promise to auditors: sort the JSONL export by seq, drop ``id`` and ``row_hash``,
    dump the rest with sorted keys and no spaces, SHA-256 it: that is ``row_hash``, and the last
    one is the head."""
    for details in TRICKY_DETAILS:
        with sessions() as session:
            audit.record(session, audit.RESULT_SENT, "sender", patient_id="Zoë", details=details)
            session.commit()
    head = head_of(sessions)
    out = tmp_path / "audit.jsonl"
    assert cli(["audit", "export", "--format", "jsonl", "--out", str(out)], db_url, tmp_path).exit_code == 0

    rows = sorted(
        (json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()), key=lambda r: r["seq"]
    )
    prev = "0" * 64
    for row in rows:
        document = {k: v for k, v in row.items() if k not in ("id", "row_hash")}
        assert document["prev_hash"] == prev
        prev = hashlib.sha256(
            json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        assert prev == row["row_hash"]
    assert f"{rows[-1]['seq']}:{prev}" == head.anchor
    assert len(rows) == len(TRICKY_DETAILS)


def test_verify_from_the_console_script_is_one_line_and_exit_3(
    sessions: sessionmaker[Session], db_url: str, db_kind: str, tmp_path: Path
) -> None:
    record_many(sessions, 3)
    with attacker(db_url, db_kind) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.seq == 3))
    env = {"MAMMONODE_DATABASE_URL": db_url, "MAMMONODE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    exe = Path(sys.executable).with_name("mammonode")
    done = subprocess.run([str(exe), "audit", "verify"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1:] == [
        "error: audit chain broken: truncated at seq 3: the log ends at seq 2; seq 3 missing"
    ]
    assert all(line.split()[1:2] == ["INFO"] for line in done.stderr.splitlines()[:-1])  # log lines only
