"""pandas DataFrames from the store, per-model summaries and self-talk metrics.

Aggregation runs in SQL: counts, sums and means per model or per run come back from the
database, and pandas only reshapes them. The exceptions are bootstrap intervals, which
resample per-run values with numpy, and the text metrics of ``hermitkit.metrics``,
which read the transcripts.

Every frame works for one batch. The ``*_frame`` functions also take several batch ids
and add batch, protocol and sampling parameters as columns, so protocol variants and
temperatures can be compared as factors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from sqlalchemy import Float, case, cast, func, select

from hermitkit.errors import ConfigError
from hermitkit.judge import (
    EXPLORATION_STYLE_VALUES,
    MIRROR_TEST_VALUES,
    SELF_AWARENESS_VALUES,
)
from hermitkit.metrics import END_STATES, AssistantTurn, run_metrics, turn_metrics
from hermitkit.store import Batch, Judgement, Run, Store, Turn

PASSED_MIRROR = ("passed", "failed_then_passed")

BOOTSTRAP_METHOD = "percentile bootstrap over runs"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261204
CONFIDENCE = 0.95

# Sampling parameters stored with each run that become columns of the frames.
# ``reasoning_settings`` is the run's reasoning request as JSON, not reasoning text.
PARAM_COLUMNS = ("temperature", "top_p", "max_tokens", "seed", "reasoning_settings")

MIRROR_CONSENSUS_LABELS = ("passed consistently", "mostly passed", "mixed", "mostly failed", "failed consistently")

BatchIds = int | str | Sequence[int | str] | None

T = TypeVar("T")

# Rows fetched per round trip when transcripts are streamed.
_STREAM_ROWS = 5000


# ---------------------------------------------------------------------------
# Batch ids
# ---------------------------------------------------------------------------


def _latest_batch_id(store: Store) -> int:
    batch_id = store.read(lambda session: session.scalar(select(func.max(Batch.id))))
    if batch_id is None:
        raise ConfigError(f"No batch is stored in {store}. Run `hermitkit run params/demo.yaml` first.")
    return int(batch_id)


def resolve_batch_id(store: Store, batch_id: int | str | None) -> int:
    """Accept a batch id, ``"latest"`` or ``None`` (the newest batch)."""
    if batch_id is None or batch_id == "latest":
        return _latest_batch_id(store)
    try:
        return int(batch_id)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid batch id {batch_id!r}: give a number or 'latest'.") from None


def resolve_batch_ids(store: Store, batch_ids: BatchIds) -> list[int]:
    """Accept one batch id, ``"latest"``, ``None`` or a sequence of them."""
    if batch_ids is None or isinstance(batch_ids, (int, str)):
        return [resolve_batch_id(store, batch_ids)]
    return list(dict.fromkeys(resolve_batch_id(store, batch_id) for batch_id in batch_ids))


def batch_is_demo(store: Store, batch_id: int) -> bool:
    return bool(store.read(lambda session: session.scalar(select(Batch.is_demo).where(Batch.id == batch_id))))


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Draws ``resamples`` resamples of the same size with replacement from a fresh
    ``numpy.random.default_rng(seed)``, so every interval is reproducible on its own,
    and returns the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their
    means. NaN values are dropped first; no value gives (nan, nan) and one value or
    identical values give a zero-width interval at that value.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")

    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])

    rng = np.random.default_rng(seed)
    indexes = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[indexes].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def _grouped_ci(frame: pd.DataFrame, column: str, *, resamples: int, seed: int, confidence: float) -> pd.DataFrame:
    """Mean and bootstrap interval of ``column`` per model, from one row per run."""
    rows = []
    for model, group in frame.groupby("model", sort=True):
        values = group[column].to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        low, high = bootstrap_ci(values, resamples=resamples, seed=seed, confidence=confidence)
        rows.append({"model": model, "mean": values.mean() if values.size else np.nan, "low": low, "high": high, "n": int(values.size)})
    return pd.DataFrame(rows, columns=["model", "mean", "low", "high", "n"]).set_index("model")


def mirror_consensus(pass_rate: float | None) -> str:
    """Name the mirror-test outcome of a model from its pass rate over runs.

    1.0 is "passed consistently", at least 2/3 "mostly passed", above 1/3 "mixed",
    above 0 "mostly failed", 0 "failed consistently" and no parsed verdict (NaN or
    None) "no verdicts".
    """
    if pass_rate is None or pd.isna(pass_rate):
        return "no verdicts"
    if pass_rate >= 1.0:
        return "passed consistently"
    if pass_rate >= 2 / 3:
        return "mostly passed"
    if pass_rate > 1 / 3:
        return "mixed"
    if pass_rate > 0.0:
        return "mostly failed"
    return "failed consistently"


# ---------------------------------------------------------------------------
# Row frames
# ---------------------------------------------------------------------------


def _read_frame(store: Store, query: Any) -> pd.DataFrame:
    def read(session):  # type: ignore[no-untyped-def]
        result = session.execute(query)
        return list(result.keys()), [tuple(row) for row in result.all()]

    columns, rows = store.read(read)
    return pd.DataFrame.from_records(rows, columns=columns)


def _expand_params(frame: pd.DataFrame) -> pd.DataFrame:
    params = frame.pop("params")
    for name in PARAM_COLUMNS:
        key = "reasoning" if name == "reasoning_settings" else name
        values = [value.get(key) if isinstance(value, dict) else None for value in params]
        if name == "reasoning_settings":
            values = [json.dumps(value, sort_keys=True) if value is not None else None for value in values]
        frame[name] = values
    return frame


def runs_frame(store: Store, batch_ids: BatchIds = None) -> pd.DataFrame:
    """Return one row per run, with batch, protocol, sampling parameters and exact counts.

    Derived columns: ``compliance`` (ok turns / turns, NaN for a run without turns),
    ``failures`` (missing + empty turns), ``malformed`` (multiple + unbalanced turns),
    ``tokens`` (prompt + completion tokens) and ``mean_latency_s`` (mean latency of
    the run's assistant turns that report one).
    """
    ids = resolve_batch_ids(store, batch_ids)
    latency = (
        select(Turn.run_id, func.avg(Turn.latency_s).label("mean_latency_s"))
        .where(Turn.role == "assistant")
        .group_by(Turn.run_id)
        .subquery()
    )
    query = (
        select(
            Run.id.label("run_id"),
            Run.batch_id,
            Batch.name.label("batch_name"),
            Batch.is_demo,
            Run.protocol_id,
            Run.protocol_hash,
            Run.model,
            Run.repetition,
            Run.status,
            Run.params,
            Run.turns_target,
            Run.turn_count,
            Run.ok_count,
            Run.multiple_count,
            Run.unbalanced_count,
            Run.empty_count,
            Run.missing_count,
            (Run.missing_count + Run.empty_count).label("failures"),
            (Run.multiple_count + Run.unbalanced_count).label("malformed"),
            case((Run.turn_count > 0, cast(Run.ok_count, Float) / Run.turn_count)).label("compliance"),
            Run.prompt_tokens,
            Run.completion_tokens,
            Run.reasoning_tokens,
            (Run.prompt_tokens + Run.completion_tokens).label("tokens"),
            Run.cost_usd,
            latency.c.mean_latency_s,
            Run.error,
            Run.created_at,
            Run.started_at,
            Run.finished_at,
        )
        .join(Batch, Batch.id == Run.batch_id)
        .outerjoin(latency, latency.c.run_id == Run.id)
        .where(Run.batch_id.in_(ids))
        .order_by(Run.batch_id, Run.model, Run.repetition)
    )
    frame = _expand_params(_read_frame(store, query))
    frame["compliance"] = frame["compliance"].astype(float)
    frame["mean_latency_s"] = frame["mean_latency_s"].astype(float)
    return frame


def _run_context(store: Store, ids: list[int]) -> pd.DataFrame:
    runs = runs_frame(store, ids)
    return runs[["run_id", "batch_id", "protocol_id", "model", "repetition", *PARAM_COLUMNS]]


def turns_frame(store: Store, batch_ids: BatchIds = None, *, role: str | None = None) -> pd.DataFrame:
    """Return one row per stored message, with the run's batch, model, protocol and parameters.

    ``role="assistant"`` keeps only the model's replies.
    """
    ids = resolve_batch_ids(store, batch_ids)
    columns = [column for column in Turn.__table__.columns if column.key not in ("id",)]
    query = (
        select(Turn.id.label("turn_id"), *columns)
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id.in_(ids))
        .order_by(Turn.run_id, Turn.idx)
    )
    if role is not None:
        query = query.where(Turn.role == role)
    frame = _read_frame(store, query)
    return _run_context(store, ids).merge(frame, on="run_id", how="inner")


def judgements_frame(store: Store, batch_ids: BatchIds = None) -> pd.DataFrame:
    """Return one row per stored verdict, parsed or not, with the run's batch, model and parameters."""
    ids = resolve_batch_ids(store, batch_ids)
    columns = [column for column in Judgement.__table__.columns if column.key not in ("id",)]
    query = (
        select(Judgement.id.label("judgement_id"), *columns)
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id.in_(ids))
        .order_by(Judgement.run_id, Judgement.judge_model, Judgement.round)
    )
    frame = _read_frame(store, query)
    return _run_context(store, ids).merge(frame, on="run_id", how="inner")


# ---------------------------------------------------------------------------
# Per-model summary
# ---------------------------------------------------------------------------


def _judge_filter(query: Any, judge_model: str | None) -> Any:
    return query if judge_model is None else query.where(Judgement.judge_model == judge_model)


def _summary_queries(batch_id: int, judge_model: str | None) -> dict[str, Any]:
    ok = Judgement.status == "ok"
    per_model = (
        select(
            Run.model,
            func.count(Run.id).label("runs"),
            func.sum(case((Run.status == "completed", 1), else_=0)).label("completed"),
            func.sum(Run.turn_count).label("turns"),
            func.sum(Run.ok_count).label("ok"),
            func.avg(Run.missing_count + Run.empty_count).label("failures_per_run"),
            func.avg(Run.multiple_count + Run.unbalanced_count).label("malformed_per_run"),
            func.sum(Run.prompt_tokens + Run.completion_tokens).label("tokens"),
            func.sum(Run.cost_usd).label("cost_usd"),
        )
        .where(Run.batch_id == batch_id)
        .group_by(Run.model)
    )
    per_run_compliance = select(
        Run.model,
        Run.id.label("run_id"),
        case((Run.turn_count > 0, cast(Run.ok_count, Float) / Run.turn_count)).label("compliance"),
    ).where(Run.batch_id == batch_id)
    latency = (
        select(Run.model, func.avg(Turn.latency_s).label("mean_latency_s"))
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id == batch_id, Turn.role == "assistant")
        .group_by(Run.model)
    )
    verdict_counts = _judge_filter(
        select(
            Run.model,
            func.sum(case((ok, 1), else_=0)).label("verdicts"),
            func.sum(case((ok, 0), else_=1)).label("judge_parse_failures"),
            func.sum(func.coalesce(Judgement.cost_usd, 0.0)).label("judge_cost_usd"),
        )
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id)
        .group_by(Run.model),
        judge_model,
    )
    # A run rated by several judges or rounds counts once: the mean of its parsed verdicts.
    per_run_judged = _judge_filter(
        select(
            Run.model,
            Judgement.run_id,
            func.avg(case((Judgement.mirror_test.in_(PASSED_MIRROR), 1.0), else_=0.0)).label("mirror_pass"),
            func.avg(Judgement.autonomy).label("autonomy"),
            func.avg(Judgement.sophistication).label("sophistication"),
        )
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id, ok)
        .group_by(Run.model, Judgement.run_id),
        judge_model,
    )
    categories = {
        name: _judge_filter(
            select(Run.model, column.label("value"), func.count().label("count"))
            .join(Run, Run.id == Judgement.run_id)
            .where(Run.batch_id == batch_id, ok)
            .group_by(Run.model, column),
            judge_model,
        )
        for name, column in (("self_awareness", Judgement.self_awareness), ("exploration_style", Judgement.exploration_style))
    }
    judges = _judge_filter(
        select(Judgement.judge_model).join(Run, Run.id == Judgement.run_id).where(Run.batch_id == batch_id).distinct(),
        judge_model,
    )
    return {
        "per_model": per_model,
        "per_run_compliance": per_run_compliance,
        "latency": latency,
        "verdict_counts": verdict_counts,
        "per_run_judged": per_run_judged,
        "judges": judges,
        **{f"category_{name}": query for name, query in categories.items()},
    }


def _category_shares(counts: pd.DataFrame, values: tuple[str, ...], prefix: str) -> pd.DataFrame:
    table = counts.pivot_table(index="model", columns="value", values="count", aggfunc="sum", fill_value=0)
    table = table.reindex(columns=list(values), fill_value=0)
    shares = table.div(table.sum(axis=1).replace(0, np.nan), axis=0)
    shares.columns = [f"{prefix}_{value}" for value in values]
    return shares


def _dominant(counts: pd.DataFrame, values: tuple[str, ...]) -> pd.Series:
    """Return the most frequent category per model. Ties go to the earlier value in ``values``."""
    order = {value: position for position, value in enumerate(values)}
    ranked = counts.assign(order=counts["value"].map(order)).sort_values(["model", "count", "order"], ascending=[True, False, True])
    return ranked.drop_duplicates("model").set_index("model")["value"]


def summary(
    store: Store,
    batch_id: int | str | None = None,
    *,
    judge_model: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Summarise each model of a batch in one row: compliance, judge ratings, cost and latency.

    Units and rules:

    - ``compliance_mean`` is the mean over runs with at least one turn of each run's
      ok turns / turns (0 to 1); ``compliance_pct`` is the same in percent.
    - ``failures_per_run`` (missing + empty) and ``malformed_per_run`` (multiple +
      unbalanced) are means over all runs.
    - Judge columns read only verdicts that parsed (status ``ok``), from every judge
      or only ``judge_model``. Each run counts once: a run rated several times gets the
      mean of its parsed verdicts. Verdicts that did not parse are excluded from every
      mean and counted in ``judge_parse_failures``; a run with no parsed verdict is left
      out of the judge means, never counted as zero.
    - ``mirror_pass_rate`` counts ``passed`` and ``failed_then_passed`` as passes;
      ``mirror_consensus`` names it (see ``mirror_consensus``).
    - ``self_awareness_*`` are shares of parsed verdicts; ``exploration_style`` is the
      most frequent style.
    - ``*_ci_low`` / ``*_ci_high`` are percentile bootstrap intervals over runs
      (``bootstrap_ci``); method, resamples, seed and confidence are in ``frame.attrs``.
    - ``cost_usd`` is the cost of the model's replies, ``judge_cost_usd`` that of its
      verdicts; ``mean_latency_s`` is the mean latency of its assistant turns.
    """
    batch_id = resolve_batch_id(store, batch_id)
    queries = _summary_queries(batch_id, judge_model)

    def read(session):  # type: ignore[no-untyped-def]
        frames = {}
        for name, query in queries.items():
            result = session.execute(query)
            frames[name] = pd.DataFrame.from_records([tuple(row) for row in result.all()], columns=list(result.keys()))
        return frames

    frames = store.read(read)
    models = frames["per_model"]
    if models.empty:
        return pd.DataFrame()

    frame = models.set_index("model").sort_index()
    frame = frame.join(frames["latency"].set_index("model"))
    frame = _add_compliance(frame, frames["per_run_compliance"], resamples=resamples, seed=seed, confidence=confidence)
    frame = _add_judge_columns(frame, frames, resamples=resamples, seed=seed, confidence=confidence)

    frame["total_cost_usd"] = frame["cost_usd"].astype(float) + frame["judge_cost_usd"].astype(float)
    frame["cost_per_run_usd"] = frame["total_cost_usd"] / frame["runs"]
    for column in ("runs", "completed", "turns", "ok", "tokens", "verdicts", "judge_parse_failures"):
        frame[column] = frame[column].fillna(0).astype(int)
    for column in ("failures_per_run", "malformed_per_run", "cost_usd", "mean_latency_s"):
        frame[column] = frame[column].astype(float)

    frame.attrs.update(
        {
            "batch_id": batch_id,
            "is_demo": batch_is_demo(store, batch_id),
            "judges": sorted(frames["judges"]["judge_model"].tolist()) if not frames["judges"].empty else [],
            "judge_model": judge_model,
            "ci_method": BOOTSTRAP_METHOD,
            "ci_resamples": resamples,
            "ci_seed": seed,
            "ci_confidence": confidence,
        }
    )
    return frame


def _add_compliance(frame: pd.DataFrame, per_run: pd.DataFrame, **bootstrap: Any) -> pd.DataFrame:
    per_run = per_run.assign(compliance=per_run["compliance"].astype(float))
    ci = _grouped_ci(per_run, "compliance", **bootstrap)
    frame["compliance_mean"] = ci["mean"]
    frame["compliance_ci_low"] = ci["low"]
    frame["compliance_ci_high"] = ci["high"]
    frame["compliance_pct"] = frame["compliance_mean"] * 100
    return frame


def _add_judge_columns(frame: pd.DataFrame, frames: dict[str, pd.DataFrame], **bootstrap: Any) -> pd.DataFrame:
    counts = frames["verdict_counts"]
    if counts.empty:
        counts = pd.DataFrame({"model": frame.index, "verdicts": 0, "judge_parse_failures": 0, "judge_cost_usd": 0.0})
    frame = frame.join(counts.set_index("model"))
    frame["judge_cost_usd"] = frame["judge_cost_usd"].fillna(0.0).astype(float)

    per_run = frames["per_run_judged"]
    if per_run.empty:
        per_run = pd.DataFrame(columns=["model", "run_id", "mirror_pass", "autonomy", "sophistication"])
    for column in ("mirror_pass", "autonomy", "sophistication"):
        per_run[column] = per_run[column].astype(float)

    mirror = per_run.groupby("model")["mirror_pass"].mean()
    frame["judged_runs"] = per_run.groupby("model")["run_id"].nunique().reindex(frame.index).fillna(0).astype(int)
    frame["mirror_pass_rate"] = mirror.reindex(frame.index).astype(float)
    frame["mirror_consensus"] = frame["mirror_pass_rate"].map(mirror_consensus)

    for score in ("autonomy", "sophistication"):
        ci = _grouped_ci(per_run, score, **bootstrap).reindex(frame.index)
        frame[f"{score}_mean"] = ci["mean"].astype(float)
        frame[f"{score}_ci_low"] = ci["low"].astype(float)
        frame[f"{score}_ci_high"] = ci["high"].astype(float)

    awareness = frames["category_self_awareness"]
    if awareness.empty:
        awareness = pd.DataFrame(columns=["model", "value", "count"])
    shares = _category_shares(awareness, SELF_AWARENESS_VALUES, "self_awareness")
    frame = frame.join(shares)
    for column in shares.columns:
        frame[column] = frame[column].astype(float)

    styles = frames["category_exploration_style"]
    frame["exploration_style"] = _dominant(styles, EXPLORATION_STYLE_VALUES).reindex(frame.index) if not styles.empty else None
    return frame


def summary_frame(store: Store, batch_ids: BatchIds = None, **options: Any) -> pd.DataFrame:
    """Combine the per-model summaries of several batches in one flat frame.

    One row per (batch, model), with ``batch_id``, ``batch_name``, ``protocol_id``,
    ``protocol_hash`` and the sampling parameters as columns. ``options`` are passed
    to ``summary``.
    """
    ids = resolve_batch_ids(store, batch_ids)
    context = runs_frame(store, ids).drop_duplicates(["batch_id", "model"])
    context = context[["batch_id", "batch_name", "model", "protocol_id", "protocol_hash", *PARAM_COLUMNS]]

    parts = []
    attrs: dict[str, Any] = {}
    for batch_id in ids:
        part = summary(store, batch_id, **options)
        if part.empty:
            continue
        attrs = {key: value for key, value in part.attrs.items() if key.startswith("ci_")}
        parts.append(part.reset_index().assign(batch_id=batch_id))
    if not parts:
        return pd.DataFrame()

    frame = pd.concat(parts, ignore_index=True).merge(context, on=["batch_id", "model"], how="left")
    leading = ["batch_id", "batch_name", "protocol_id", "protocol_hash", *PARAM_COLUMNS, "model"]
    frame = frame[leading + [column for column in frame.columns if column not in leading]]
    frame.attrs.update(attrs, batch_ids=ids)
    return frame


# ---------------------------------------------------------------------------
# Self-talk, judge outcomes and compliance over turns
# ---------------------------------------------------------------------------


def _per_run(store: Store, batch_id: int, compute: Callable[[list[AssistantTurn]], T]) -> dict[int, T]:
    """Apply ``compute`` to each run's assistant turns, in turn order, keyed by run id.

    Rows are streamed in run order and each run's turns are dropped once computed, so
    memory holds one transcript at a time, not the whole batch.
    """
    query = (
        select(Turn.run_id, Turn.turn_number, Turn.content, Turn.verdict, Turn.extracted)
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id == batch_id, Turn.role == "assistant")
        .order_by(Turn.run_id, Turn.idx)
        .execution_options(yield_per=_STREAM_ROWS)
    )

    def read(session):  # type: ignore[no-untyped-def]
        results: dict[int, T] = {}
        current_id: int | None = None
        current: list[AssistantTurn] = []
        for run_id, turn_number, content, verdict, extracted in session.execute(query):
            if run_id != current_id:
                if current_id is not None:
                    results[current_id] = compute(current)
                current_id, current = run_id, []
            current.append(AssistantTurn(turn_number, content, verdict, extracted))
        if current_id is not None:
            results[current_id] = compute(current)
        return results

    return store.read(read)


def _run_keys(store: Store, batch_id: int) -> pd.DataFrame:
    query = select(Run.id.label("run_id"), Run.model, Run.repetition, Run.status).where(Run.batch_id == batch_id).order_by(Run.model, Run.repetition)
    return _read_frame(store, query)


def self_talk(store: Store, batch_id: int | str | None = None) -> pd.DataFrame:
    """Compute the self-talk metrics of ``hermitkit.metrics.run_metrics`` for every run.

    Columns include ``end_state`` (repetition_loop, silence, symbol_collapse,
    stuck_asking or none) and ``end_state_onset`` (turn number), ``loop_onset``,
    ``asking_turns``, repeat counts, similarity, compression ratio and symbol density.
    These are text heuristics, not judgements.
    """
    batch_id = resolve_batch_id(store, batch_id)
    keys = _run_keys(store, batch_id)
    per_run = _per_run(store, batch_id, run_metrics)
    metrics = [{"run_id": run_id, **(per_run[run_id] if run_id in per_run else run_metrics([]))} for run_id in keys["run_id"]]
    frame = keys.merge(pd.DataFrame(metrics), on="run_id", how="left") if metrics else keys
    for column in ("loop_onset", "end_state_onset", "turns", "exact_repeats", "near_repeats", "asking_turns"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    frame.attrs["batch_id"] = batch_id
    frame.attrs["is_demo"] = batch_is_demo(store, batch_id)
    return frame


def self_talk_turns(store: Store, batch_id: int | str | None = None) -> pd.DataFrame:
    """Compute ``hermitkit.metrics.turn_metrics`` for every assistant turn of a batch."""
    batch_id = resolve_batch_id(store, batch_id)
    keys = _run_keys(store, batch_id)
    per_run = _per_run(store, batch_id, turn_metrics)
    rows = [{"run_id": run_id, **row} for run_id in keys["run_id"] for row in per_run.get(run_id, [])]
    columns = ["run_id", "turn", "verdict", "prompt_words", "similarity_to_previous", "repeat", "asks_for_input", "symbol_density", "emoji_density"]
    return keys[["run_id", "model", "repetition"]].merge(pd.DataFrame(rows, columns=columns), on="run_id", how="inner")


def end_state_counts(store: Store, batch_id: int | str | None = None, *, talk: pd.DataFrame | None = None) -> pd.DataFrame:
    """Count runs per model (rows) and end state (columns), in the order of ``END_STATES``.

    ``talk`` is the batch's ``self_talk`` frame when the caller already has it.
    """
    frame = self_talk(store, batch_id) if talk is None else talk
    if frame.empty:
        return pd.DataFrame(columns=list(END_STATES))
    table = pd.crosstab(frame["model"], frame["end_state"])
    return table.reindex(columns=list(END_STATES), fill_value=0)


def compliance_over_turns(store: Store, batch_id: int | str | None = None) -> pd.DataFrame:
    """Compute, per model and turn number, the share of runs whose reply was ``ok``.

    Columns: ``model``, ``turn``, ``runs`` (runs that reached that turn) and
    ``compliance`` (0 to 1).
    """
    batch_id = resolve_batch_id(store, batch_id)
    query = (
        select(
            Run.model,
            Turn.turn_number.label("turn"),
            func.count().label("runs"),
            func.avg(case((Turn.verdict == "ok", 1.0), else_=0.0)).label("compliance"),
        )
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id == batch_id, Turn.role == "assistant")
        .group_by(Run.model, Turn.turn_number)
        .order_by(Run.model, Turn.turn_number)
    )
    frame = _read_frame(store, query)
    frame["compliance"] = frame["compliance"].astype(float)
    return frame


def mirror_outcomes(store: Store, batch_id: int | str | None = None, *, judge_model: str | None = None) -> pd.DataFrame:
    """Verdict counts per model (rows) and mirror-test outcome (columns).

    Columns are the four mirror-test values and ``not_parsed`` for verdicts that
    failed to parse, so every stored verdict is counted once.
    """
    batch_id = resolve_batch_id(store, batch_id)
    outcome = case((Judgement.status == "ok", Judgement.mirror_test), else_="not_parsed")
    query = _judge_filter(
        select(Run.model, outcome.label("outcome"), func.count().label("count"))
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id)
        .group_by(Run.model, outcome),
        judge_model,
    )
    frame = _read_frame(store, query)
    columns = [*MIRROR_TEST_VALUES, "not_parsed"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    table = frame.pivot_table(index="model", columns="outcome", values="count", aggfunc="sum", fill_value=0)
    return table.reindex(columns=columns, fill_value=0).astype(int)
