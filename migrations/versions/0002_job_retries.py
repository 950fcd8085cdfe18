"""Jobs retry by the kind of fault: when a job may run again, and how many transient faults it met.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

``attempts`` now counts only failures the job itself raised (poison detection); a worker that
died while holding the job no longer charges it. A transient fault (disk full, database gone)
puts the job back with ``next_attempt_at`` in the future and bumps ``retries``, without limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retries")
        batch.drop_column("next_attempt_at")
