"""Read-only views of stored batches and runs for the CLI and notebooks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from hermitkit.errors import ConfigError
from hermitkit.lease import database_now, lease_state
from hermitkit.store import Batch, Judgement, Run, Store, Turn, batch_spent_usd


def list_batches(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    def read(session):  # type: ignore[no-untyped-def]
        batches = session.scalars(select(Batch).order_by(Batch.id.desc()).limit(limit)).all()
        rows = []
        for batch in batches:
            runs = session.scalar(select(func.count()).select_from(Run).where(Run.batch_id == batch.id))
            rows.append({"id": batch.id, "name": batch.name, "status": batch.status, "created_at": batch.created_at, "runs": runs, "models": batch.config.get("models", []), "is_demo": batch.is_demo})
        return rows

    return store.read(read)


def batch_status(store: Store, batch_id: int) -> dict[str, Any]:
    def read(session):  # type: ignore[no-untyped-def]
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise ConfigError(f"Batch {batch_id} not found in {store}. Run `hermitkit status` to list batches.")
        statuses = dict(session.execute(select(Run.status, func.count()).where(Run.batch_id == batch_id).group_by(Run.status)).all())
        turns, target = session.execute(select(func.coalesce(func.sum(Run.turn_count), 0), func.coalesce(func.sum(Run.turns_target), 0)).where(Run.batch_id == batch_id)).one()
        verdicts = session.execute(
            select(func.count(), func.coalesce(func.sum((Judgement.status != "ok").cast(type_=Run.turn_count.type)), 0))
            .join(Run, Run.id == Judgement.run_id)
            .where(Run.batch_id == batch_id)
        ).one()
        return {
            "id": batch.id,
            "name": batch.name,
            "status": batch.status,
            "is_demo": batch.is_demo,
            "protocol_id": batch.protocol_id,
            "protocol_hash": batch.protocol_hash,
            "endpoint": batch.endpoint,
            "created_at": batch.created_at,
            "updated_at": batch.updated_at,
            "error": batch.error,
            "budget_usd": batch.budget_usd,
            "run_statuses": statuses,
            "turns": int(turns),
            "turns_target": int(target),
            "verdicts": int(verdicts[0]),
            "parse_failures": int(verdicts[1]),
            "spent_usd": batch_spent_usd(session, batch_id),
            "lease": None
            if batch.lease_token is None
            else {"host": batch.lease_host, "pid": batch.lease_pid, "expires_at": batch.lease_expires_at, "state": lease_state(batch, database_now(session))},
        }

    return store.read(read)


def batch_runs(store: Store, batch_id: int) -> list[dict[str, Any]]:
    """Return one row per run of ``batch_id``, in run id order: id, model, repetition, status, turns, verdicts and error."""

    def read(session):  # type: ignore[no-untyped-def]
        verdicts = select(Judgement.run_id, func.count().label("verdicts")).group_by(Judgement.run_id).subquery()
        query = (
            select(Run.id, Run.model, Run.repetition, Run.status, Run.turn_count, Run.turns_target, func.coalesce(verdicts.c.verdicts, 0), Run.error)
            .outerjoin(verdicts, verdicts.c.run_id == Run.id)
            .where(Run.batch_id == batch_id)
            .order_by(Run.id)
        )
        names = ("id", "model", "repetition", "status", "turns", "turns_target", "verdicts", "error")
        return [dict(zip(names, row, strict=True)) for row in session.execute(query)]

    return store.read(read)


def run_transcript(store: Store, run_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def read(session):  # type: ignore[no-untyped-def]
        run = session.get(Run, run_id)
        if run is None:
            raise ConfigError(f"Run {run_id} not found in {store}. The runs file of `hermitkit export BATCH_ID` lists a batch's run ids.")
        info = {
            "id": run.id,
            "batch_id": run.batch_id,
            "model": run.model,
            "repetition": run.repetition,
            "status": run.status,
            "turn_count": run.turn_count,
            "turns_target": run.turns_target,
            "ok_count": run.ok_count,
            "failures": run.missing_count + run.empty_count,
            "malformed": run.multiple_count + run.unbalanced_count,
        }
        turns = session.scalars(select(Turn).where(Turn.run_id == run_id).order_by(Turn.idx)).all()
        rows = [{"idx": t.idx, "role": t.role, "content": t.content, "reasoning": t.reasoning, "turn_number": t.turn_number, "verdict": t.verdict, "extracted": t.extracted} for t in turns]
        return info, rows

    return store.read(read)
