"""pandas DataFrames from the store, and per-model summaries.

Aggregation runs in SQL; pandas only reshapes the per-model rows that come back.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Float, case, cast, func, select

from hermitkit.store import Batch, Judgement, Run, Store

PASSED_MIRROR = ("passed", "failed_then_passed")


def _latest_batch_id(store: Store) -> int:
    batch_id = store.read(lambda session: session.scalar(select(func.max(Batch.id))))
    if batch_id is None:
        raise LookupError(f"No batch is stored in {store}. Run `hermitkit run params/demo.yaml` first.")
    return int(batch_id)


def resolve_batch_id(store: Store, batch_id: int | str | None) -> int:
    """Accept a batch id, ``"latest"`` or ``None`` (the newest batch)."""
    if batch_id is None or batch_id == "latest":
        return _latest_batch_id(store)
    try:
        return int(batch_id)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid batch id {batch_id!r}: give a number or 'latest'.") from None


def summary(store: Store, batch_id: int | str | None = None) -> pd.DataFrame:
    """One row per model: protocol compliance, judge means and cost.

    Judge verdicts that failed to parse are excluded from every mean and counted in
    ``judge_parse_failures``. The mirror-test pass rate counts ``passed`` and
    ``failed_then_passed`` as passes, out of the parsed verdicts.
    """
    batch_id = resolve_batch_id(store, batch_id)

    run_rows = (
        select(
            Run.model,
            func.count(Run.id).label("runs"),
            func.sum(case((Run.status == "completed", 1), else_=0)).label("completed"),
            func.sum(Run.turn_count).label("turns"),
            func.sum(Run.ok_count).label("ok"),
            func.avg(case((Run.turn_count > 0, cast(Run.ok_count, Float) / Run.turn_count))).label("compliance"),
            func.avg(Run.missing_count + Run.empty_count).label("failures_per_run"),
            func.avg(Run.multiple_count + Run.unbalanced_count).label("malformed_per_run"),
            func.sum(Run.prompt_tokens + Run.completion_tokens).label("tokens"),
            func.sum(Run.cost_usd).label("cost_usd"),
        )
        .where(Run.batch_id == batch_id)
        .group_by(Run.model)
    )
    ok = Judgement.status == "ok"
    judge_rows = (
        select(
            Run.model,
            func.sum(case((ok, 1), else_=0)).label("verdicts"),
            func.sum(case((ok, 0), else_=1)).label("judge_parse_failures"),
            func.avg(case((ok & Judgement.mirror_test.in_(PASSED_MIRROR), 1.0), (ok, 0.0))).label("mirror_pass_rate"),
            func.avg(case((ok, Judgement.autonomy))).label("autonomy_mean"),
            func.avg(case((ok, Judgement.sophistication))).label("sophistication_mean"),
            func.sum(func.coalesce(Judgement.cost_usd, 0.0)).label("judge_cost_usd"),
        )
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id)
        .group_by(Run.model)
    )

    def read(session):  # type: ignore[no-untyped-def]
        runs = pd.DataFrame(session.execute(run_rows).mappings().all())
        judged = pd.DataFrame(session.execute(judge_rows).mappings().all())
        return runs, judged

    runs, judged = store.read(read)
    if runs.empty:
        return pd.DataFrame()
    frame = runs.merge(judged, on="model", how="left") if not judged.empty else runs
    for column in ("verdicts", "judge_parse_failures"):
        if column not in frame:
            frame[column] = 0
        frame[column] = frame[column].fillna(0).astype(int)
    frame["compliance_pct"] = frame["compliance"].astype(float) * 100
    frame = frame.drop(columns=["compliance"]).set_index("model").sort_index()
    frame.attrs["batch_id"] = batch_id
    return frame
