"""The audit log becomes a hash chain: ``seq``, ``prev_hash`` and ``row_hash`` on every event, and a
one-row ``audit_chain_head`` saying where the chain ends.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Existing events are chained in ``id`` order (the order they were inserted in). Writing their hashes
is an UPDATE, which the append-only triggers of 0001 refuse, so this revision lifts them for the
duration (dropped and recreated on SQLite, where batch mode rebuilds the table anyway; disabled
and re-enabled on PostgreSQL) inside the migration's one transaction.

The hashing is written out here rather than imported from :mod:`node.audit.chain`: a revision must
build the same schema and data forever, while the node's code may change (a later canonical form
would come with its own revision and a version marker). The migration tests check that rows chained
here get exactly the hashes the node gives the same rows, and that ``audit verify`` accepts them.

The head row may only move forward (triggers refuse lowering it, changing its hash in place, and
DELETE/TRUNCATE), like the events themselves refuse UPDATE and DELETE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64
BATCH_ROWS = 5000
CHAINED_COLUMNS = (
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

APPEND_ONLY_MESSAGE = "audit_events is append-only"
SQLITE_EVENT_TRIGGERS: tuple[str, ...] = (
    f"""CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}: UPDATE refused'); END""",
    f"""CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}: DELETE refused'); END""",
)
SQLITE_EVENT_TRIGGER_NAMES = ("audit_events_no_update", "audit_events_no_delete")
PG_EVENT_TRIGGER = "audit_events_no_update_delete"

HEAD_MESSAGE = "audit_chain_head moves only forward"
SQLITE_HEAD_TRIGGERS: tuple[str, ...] = (
    f"""CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE ON audit_chain_head
    WHEN NEW.seq < OLD.seq OR (NEW.seq = OLD.seq AND NEW.row_hash <> OLD.row_hash)
    BEGIN SELECT RAISE(ABORT, '{HEAD_MESSAGE}: UPDATE refused'); END""",
    f"""CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
    BEGIN SELECT RAISE(ABORT, '{HEAD_MESSAGE}: DELETE refused'); END""",
)
POSTGRESQL_HEAD_TRIGGERS: tuple[str, ...] = (
    f"""CREATE FUNCTION audit_chain_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            IF NEW.seq > OLD.seq OR (NEW.seq = OLD.seq AND NEW.row_hash = OLD.row_hash) THEN
                RETURN NEW;
            END IF;
        END IF;
        RAISE EXCEPTION '{HEAD_MESSAGE}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$""",
    """CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE OR DELETE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION audit_chain_head_forward()""",
    """CREATE TRIGGER audit_chain_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_head_forward()""",
)

_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("event", sa.String()),
    sa.column("actor", sa.String()),
    sa.column("patient_id", sa.String()),
    sa.column("study_uid", sa.String()),
    sa.column("sop_instance_uid", sa.String()),
    sa.column("calling_ae", sa.String()),
    sa.column("peer", sa.String()),
    sa.column("details", sa.JSON()),
    sa.column("seq", sa.Integer()),
    sa.column("prev_hash", sa.String()),
    sa.column("row_hash", sa.String()),
)


def _dialect() -> str:
    name = op.get_bind().dialect.name
    if name not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"audit chain: SQLite and PostgreSQL only, not {name}")
    return name


def _row_hash(prev_hash: str, seq: int, row: Any) -> str:
    """SHA-256 of the row's canonical document (node.audit.chain.canonical_document, version 1)."""
    doc: dict[str, Any] = {name: getattr(row, name) for name in CHAINED_COLUMNS if name != "seq"}
    at: dt.datetime = doc["at"]
    at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
    doc.update(seq=seq, at=at.isoformat(timespec="microseconds"), prev_hash=prev_hash)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _chain_existing_rows() -> tuple[int, str]:
    """Give every event its seq and hashes in id order; returns the head (last seq, its hash)."""
    conn = op.get_bind()
    seq, prev, last_id = 0, GENESIS_HASH, None
    columns = [_events.c[name] for name in ("id", *CHAINED_COLUMNS) if name != "seq"]
    set_chain = (
        _events.update()
        .where(_events.c.id == sa.bindparam("_id"))
        .values(seq=sa.bindparam("_seq"), prev_hash=sa.bindparam("_prev"), row_hash=sa.bindparam("_hash"))
    )
    while True:
        stmt = sa.select(*columns).order_by(_events.c.id).limit(BATCH_ROWS)
        if last_id is not None:
            stmt = stmt.where(_events.c.id > last_id)
        rows = conn.execute(stmt).all()
        if not rows:
            return seq, prev
        params = []
        for row in rows:
            seq += 1
            digest = _row_hash(prev, seq, row)
            params.append({"_id": row.id, "_seq": seq, "_prev": prev, "_hash": digest})
            prev = digest
        conn.execute(set_chain, params)
        last_id = rows[-1].id


def _lift_event_triggers(dialect: str) -> None:
    if dialect == "sqlite":
        for name in SQLITE_EVENT_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute(f"ALTER TABLE audit_events DISABLE TRIGGER {PG_EVENT_TRIGGER}")


def _restore_event_triggers(dialect: str) -> None:
    if dialect == "sqlite":
        for statement in SQLITE_EVENT_TRIGGERS:
            op.execute(statement)
    else:
        op.execute(f"ALTER TABLE audit_events ENABLE TRIGGER {PG_EVENT_TRIGGER}")


def upgrade() -> None:
    dialect = _dialect()
    _lift_event_triggers(dialect)
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    head_seq, head_hash = _chain_existing_rows()
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(op.f("uq_audit_events_seq"), ["seq"])
    _restore_event_triggers(dialect)

    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_chain_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": head_seq, "row_hash": head_hash}])
    for statement in SQLITE_HEAD_TRIGGERS if dialect == "sqlite" else POSTGRESQL_HEAD_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    dialect = _dialect()
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_chain_head_forward")
        op.execute("DROP TRIGGER IF EXISTS audit_chain_head_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_chain_head_no_truncate ON audit_chain_head")
        op.execute("DROP TRIGGER IF EXISTS audit_chain_head_forward ON audit_chain_head")
        op.execute("DROP FUNCTION IF EXISTS audit_chain_head_forward()")
    op.drop_table("audit_chain_head")
    _lift_event_triggers(dialect)
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_constraint(op.f("uq_audit_events_seq"), type_="unique")
        batch.drop_column("row_hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
    _restore_event_triggers(dialect)
