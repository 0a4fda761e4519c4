"""parse status and repair reply columns for syntheses and personas

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 10:00:00

Before this revision a persona kept its parse status, its count of dropped citations
and its failure ("reason: detail") as the keys ``status``, ``dropped_citations`` and
``failure`` of its ``stats`` JSON. Syntheses and personas that needed a repair request
kept both replies in ``raw_reply``, joined by ``REPAIR_SEPARATOR``. The upgrade moves
those values into the new columns, and the downgrade writes them back the old way.
The downgrade leaves out a stats key whose value is the default that 0001-era readers
assumed for a missing key, so ``"status": "ok"`` does not come back. This file uses
only ``sa.*`` types, so it does not depend on the hermitkit code that is installed.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The separator that hermitkit.synthesis wrote between the first reply and the repair
# reply in ``raw_reply`` before this revision.
REPAIR_SEPARATOR = "\n\n----- repair reply -----\n\n"
# The keys of ``personas.stats`` that moved to columns, with the values that readers
# assumed when a key was missing.
LEGACY_STAT_DEFAULTS = {"status": "ok", "dropped_citations": 0}

_personas = sa.table(
    "personas",
    sa.column("id", sa.Integer()),
    sa.column("stats", sa.JSON()),
    sa.column("raw_reply", sa.Text()),
    sa.column("status", sa.String(32)),
    sa.column("repair_reply", sa.Text()),
    sa.column("failure_reason", sa.String(64)),
    sa.column("failure_detail", sa.Text()),
    sa.column("dropped_citations", sa.Integer()),
)
_syntheses = sa.table(
    "syntheses",
    sa.column("id", sa.Integer()),
    sa.column("raw_reply", sa.Text()),
    sa.column("repair_reply", sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table("syntheses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("repair_reply", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("failure_reason", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("failure_detail", sa.Text(), nullable=True))

    with op.batch_alter_table("personas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=32), server_default="ok", nullable=False))
        batch_op.add_column(sa.Column("repair_reply", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("failure_reason", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("failure_detail", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("dropped_citations", sa.Integer(), server_default="0", nullable=False))

    connection = op.get_bind()
    for row in connection.execute(sa.select(_syntheses.c.id, _syntheses.c.raw_reply)).all():
        if row.raw_reply is not None and REPAIR_SEPARATOR in row.raw_reply:
            first, _separator, repair = row.raw_reply.partition(REPAIR_SEPARATOR)
            connection.execute(_syntheses.update().where(_syntheses.c.id == row.id).values(raw_reply=first, repair_reply=repair))

    for persona in connection.execute(sa.select(_personas.c.id, _personas.c.stats, _personas.c.raw_reply)).all():
        values = _persona_columns(dict(persona.stats or {}), persona.raw_reply)
        if values:
            connection.execute(_personas.update().where(_personas.c.id == persona.id).values(**values))


def _persona_columns(stats: dict[str, Any], raw_reply: str | None) -> dict[str, Any]:
    """Return the column values that replace a 0001-era persona's stats keys and joined replies."""
    values: dict[str, Any] = {}
    if raw_reply is not None and REPAIR_SEPARATOR in raw_reply:
        first, _separator, repair = raw_reply.partition(REPAIR_SEPARATOR)
        values.update(raw_reply=first, repair_reply=repair)

    if not any(key in stats for key in (*LEGACY_STAT_DEFAULTS, "failure")):
        return values
    values["status"] = str(stats.pop("status", LEGACY_STAT_DEFAULTS["status"]))
    values["dropped_citations"] = int(stats.pop("dropped_citations", LEGACY_STAT_DEFAULTS["dropped_citations"]) or 0)
    failure = stats.pop("failure", None)
    if failure is not None:
        # The old value is "reason: detail", and reason codes contain no ": ".
        reason, _separator, detail = str(failure).partition(": ")
        values.update(failure_reason=reason[:64], failure_detail=detail or None)
    values["stats"] = stats
    return values


def downgrade() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.select(_syntheses)).all():
        if row.repair_reply is not None:
            joined = (row.raw_reply or "") + REPAIR_SEPARATOR + row.repair_reply
            connection.execute(_syntheses.update().where(_syntheses.c.id == row.id).values(raw_reply=joined))

    for persona in connection.execute(sa.select(_personas)).all():
        values = _legacy_persona_values(persona)
        if values:
            connection.execute(_personas.update().where(_personas.c.id == persona.id).values(**values))

    with op.batch_alter_table("personas", schema=None) as batch_op:
        batch_op.drop_column("dropped_citations")
        batch_op.drop_column("failure_detail")
        batch_op.drop_column("failure_reason")
        batch_op.drop_column("repair_reply")
        batch_op.drop_column("status")

    with op.batch_alter_table("syntheses", schema=None) as batch_op:
        batch_op.drop_column("failure_detail")
        batch_op.drop_column("failure_reason")
        batch_op.drop_column("repair_reply")


def _legacy_persona_values(row: Any) -> dict[str, Any]:
    """Return the 0001-era ``stats`` and ``raw_reply`` of a persona row.

    Keys whose value equals the readers' default for a missing key are left out, so a
    row that went up and down again reads the same as before.
    """
    values: dict[str, Any] = {}
    if row.repair_reply is not None:
        values["raw_reply"] = (row.raw_reply or "") + REPAIR_SEPARATOR + row.repair_reply

    stats = dict(row.stats or {})
    legacy = {"status": row.status, "dropped_citations": row.dropped_citations}
    for key, default in LEGACY_STAT_DEFAULTS.items():
        if legacy[key] != default:
            stats[key] = legacy[key]
    if row.failure_reason is not None:
        stats["failure"] = row.failure_reason if row.failure_detail is None else f"{row.failure_reason}: {row.failure_detail}"
    if stats != dict(row.stats or {}):
        values["stats"] = stats
    return values
