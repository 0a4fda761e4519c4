"""lease columns on batches, so that one process at a time sends a batch's requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 06:00:00

The four columns are NULL when no process holds the lease, which is the state of every
batch written before this revision. They are added and dropped with plain ALTER TABLE,
not Alembic's batch mode. On SQLite batch mode copies the table and drops the old one,
and with foreign keys on that drop would delete every run, turn and verdict through
ON DELETE CASCADE. Dropping a column needs SQLite 3.35 or newer.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("lease_token", "lease_host", "lease_pid", "lease_expires_at")


def upgrade() -> None:
    op.add_column("batches", sa.Column("lease_token", sa.String(length=64), nullable=True))
    op.add_column("batches", sa.Column("lease_host", sa.String(length=255), nullable=True))
    op.add_column("batches", sa.Column("lease_pid", sa.Integer(), nullable=True))
    op.add_column("batches", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for name in reversed(_COLUMNS):
        op.drop_column("batches", name)
