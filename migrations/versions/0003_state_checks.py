"""CHECK constraints on the state columns: a study, job or transmission state is one of its words.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

The words are those of :mod:`node.db.states`, written out here rather than imported: a migration
must build the same schema forever, while the enums may grow. Adding a state therefore takes a
new revision that widens the constraint (a test compares these lists with the enums).

SQLite cannot add a constraint to a table, so batch mode rebuilds each table with it (foreign keys
are off during migrations, see :mod:`node.db.migrate`); a row already holding another word makes
the upgrade fail rather than be carried over unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES: dict[str, tuple[str, ...]] = {
    "studies": ("receiving", "queued", "scoring", "scored", "skipped", "failed"),
    "jobs": ("pending", "claimed", "done", "failed", "dropped"),
    "transmissions": ("pending", "sent", "failed", "dead", "dropped"),
}
"""Table -> the words its ``state`` column may hold (each table's CHECK is ``ck_<table>_state``)."""


def upgrade() -> None:
    for table, words in STATES.items():
        with op.batch_alter_table(table) as batch:
            batch.create_check_constraint(
                op.f(f"ck_{table}_state"), f"state IN ({', '.join(repr(w) for w in words)})"
            )


def downgrade() -> None:
    for table in reversed(STATES):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_state"), type_="check")
