"""Claims become leases: a worker holds a job until ``lease_expires_at``, renewed by its heartbeat.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Workers on several machines share one PostgreSQL database. A claim used to last until the node
that made it started again; a worker that died on another machine held its job for ever. Now a
claim expires unless renewed, and any worker may take an expired claim over. Claims made before
this revision have no expiry and count as expired.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_expires_at")
