"""pandas DataFrames from the store, per-model summaries and self-talk metrics.

Aggregation runs in SQL: counts, sums and means per model or per run come back from the
database, and pandas only reshapes them or adds up counts. The exceptions are bootstrap
intervals, which resample per-run values with numpy (``hermitkit.bootstrap``), and the
text metrics of ``hermitkit.metrics``, which read the transcripts.

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
from sqlalchemy import Float, and_, case, cast, func, select

# Callers import the bootstrap settings and ``bootstrap_ci`` from this module too.
from hermitkit.bootstrap import (
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    bootstrap_ci,
    bootstrap_intervals,
)
from hermitkit.errors import ConfigError
from hermitkit.judge import (
    EXPLORATION_STYLE_VALUES,
    MIRROR_TEST_VALUES,
    SELF_AWARENESS_VALUES,
)
from hermitkit.metrics import END_STATES, AssistantTurn, run_metrics, turn_metrics
from hermitkit.store import Batch, Judgement, Run, Store, Turn

PASSED_MIRROR = ("passed", "failed_then_passed")

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
# Mirror test
# ---------------------------------------------------------------------------


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
    """Build every query that ``summary`` sends, by name.

    ``latency`` is the only one that reads ``turns``. ``per_run`` returns one row per run
    in run id order, which fixes the order of the values that the bootstrap resamples.
    """
    ok = Judgement.status == "ok"
    batch = select(Batch.is_demo).where(Batch.id == batch_id)
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
    latency = (
        select(Run.model, func.avg(Turn.latency_s).label("mean_latency_s"))
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id == batch_id, Turn.role == "assistant")
        .group_by(Run.model)
    )

    # A run rated by several judges or rounds counts once: the mean of its parsed verdicts.
    # A run without a parsed verdict gets NULL judge columns, never zero.
    parsed = ok if judge_model is None else and_(ok, Judgement.judge_model == judge_model)
    mirror_pass = case((Judgement.mirror_test.in_(PASSED_MIRROR), 1.0), (Judgement.id.is_not(None), 0.0))
    per_run = (
        select(
            Run.model,
            case((Run.turn_count > 0, cast(Run.ok_count, Float) / Run.turn_count)).label("compliance"),
            # PostgreSQL averages integers as numeric, so the cast makes both backends return float8.
            cast(func.avg(mirror_pass), Float).label("mirror_pass"),
            cast(func.avg(Judgement.autonomy), Float).label("autonomy"),
            cast(func.avg(Judgement.sophistication), Float).label("sophistication"),
        )
        .outerjoin(Judgement, and_(Judgement.run_id == Run.id, parsed))
        .where(Run.batch_id == batch_id)
        .group_by(Run.id)
        .order_by(Run.id)
    )

    # One pass over the verdicts gives the counts, the judges and both category shares.
    verdict_groups = _judge_filter(
        select(
            Run.model,
            Judgement.judge_model,
            Judgement.status,
            Judgement.self_awareness,
            Judgement.exploration_style,
            func.count().label("count"),
        )
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id)
        .group_by(Run.model, Judgement.judge_model, Judgement.status, Judgement.self_awareness, Judgement.exploration_style),
        judge_model,
    )
    # Summed per model in SQL: adding up the sums of the groups above would round differently.
    judge_cost = _judge_filter(
        select(Run.model, func.sum(func.coalesce(Judgement.cost_usd, 0.0)).label("judge_cost_usd"))
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id)
        .group_by(Run.model),
        judge_model,
    )
    return {
        "batch": batch,
        "per_model": per_model,
        "latency": latency,
        "per_run": per_run,
        "verdict_groups": verdict_groups,
        "judge_cost": judge_cost,
    }


def _fetch_frames(session: Any, queries: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Run each query in the session's transaction and return its rows as a frame, by name."""
    # Core execution, because the rows are plain columns and the ORM's per-row loading would be wasted work.
    connection = session.connection()
    frames = {}
    for name, query in queries.items():
        result = connection.execute(query)
        names = list(result.keys())
        rows = result.all()
        columns = zip(*rows) if rows else ([] for _ in names)
        frames[name] = pd.DataFrame(dict(zip(names, columns, strict=True)), columns=names)
    return frames


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
      (``bootstrap_ci``), which resample each model's per-run values in run id order;
      method, resamples, seed and confidence are in ``frame.attrs``.
    - ``cost_usd`` is the cost of the model's replies, ``judge_cost_usd`` that of its
      verdicts; ``mean_latency_s`` is the mean latency of its assistant turns.
    """
    batch_id = resolve_batch_id(store, batch_id)
    queries = _summary_queries(batch_id, judge_model)
    frames = store.read(lambda session: _fetch_frames(session, queries))
    models = frames["per_model"]
    if models.empty:
        return pd.DataFrame()

    frame = models.set_index("model").sort_index()
    frame["mean_latency_s"] = frames["latency"].set_index("model")["mean_latency_s"].reindex(frame.index)
    frame = _add_run_means(frame, frames["per_run"], resamples=resamples, seed=seed, confidence=confidence)
    frame = _add_verdict_columns(frame, frames["verdict_groups"], frames["judge_cost"])

    frame["total_cost_usd"] = frame["cost_usd"].astype(float) + frame["judge_cost_usd"].astype(float)
    frame["cost_per_run_usd"] = frame["total_cost_usd"] / frame["runs"]
    for column in ("runs", "completed", "turns", "ok", "tokens", "verdicts", "judge_parse_failures"):
        frame[column] = frame[column].fillna(0).astype(int)
    for column in ("failures_per_run", "malformed_per_run", "cost_usd", "mean_latency_s"):
        frame[column] = frame[column].astype(float)
    frame = frame[list(_summary_columns())]

    batch = frames["batch"]
    frame.attrs.update(
        {
            "batch_id": batch_id,
            "is_demo": bool(batch["is_demo"].iloc[0]) if not batch.empty else False,
            "judges": sorted(frames["verdict_groups"]["judge_model"].unique().tolist()),
            "judge_model": judge_model,
            "ci_method": BOOTSTRAP_METHOD,
            "ci_resamples": resamples,
            "ci_seed": seed,
            "ci_confidence": confidence,
        }
    )
    return frame


def _summary_columns() -> tuple[str, ...]:
    """Columns of ``summary`` in their order."""
    counts = ("runs", "completed", "turns", "ok", "failures_per_run", "malformed_per_run", "tokens", "cost_usd", "mean_latency_s")
    compliance = ("compliance_mean", "compliance_ci_low", "compliance_ci_high", "compliance_pct")
    verdicts = ("verdicts", "judge_parse_failures", "judge_cost_usd", "judged_runs", "mirror_pass_rate", "mirror_consensus")
    scores = tuple(f"{score}_{part}" for score in ("autonomy", "sophistication") for part in ("mean", "ci_low", "ci_high"))
    awareness = tuple(f"self_awareness_{value}" for value in SELF_AWARENESS_VALUES)
    return (*counts, *compliance, *verdicts, *scores, *awareness, "exploration_style", "total_cost_usd", "cost_per_run_usd")


_RUN_MEANS = ("compliance", "autonomy", "sophistication")


def _add_run_means(frame: pd.DataFrame, per_run: pd.DataFrame, **bootstrap: Any) -> pd.DataFrame:
    """Add the means over runs with their bootstrap intervals, the mirror pass rate and ``judged_runs``.

    A run whose value is NULL (no turns, or no parsed verdict) is left out of that mean only.
    """
    values = {name: per_run[name].to_numpy(dtype=float) for name in _RUN_MEANS}
    positions = per_run.groupby("model", sort=False).indices
    no_runs = np.array([], dtype=np.intp)

    # One call for every model and metric, so that each sample size is drawn once.
    samples = {}
    for name in _RUN_MEANS:
        for model in frame.index:
            sample = values[name][positions.get(model, no_runs)]
            samples[name, model] = sample[~np.isnan(sample)]
    intervals = dict(zip(samples, bootstrap_intervals(list(samples.values()), **bootstrap), strict=True))

    for name in _RUN_MEANS:
        frame[f"{name}_mean"] = [samples[name, model].mean() if samples[name, model].size else np.nan for model in frame.index]
        frame[f"{name}_ci_low"] = [intervals[name, model][0] for model in frame.index]
        frame[f"{name}_ci_high"] = [intervals[name, model][1] for model in frame.index]
    frame["compliance_pct"] = frame["compliance_mean"] * 100

    mirror = per_run.groupby("model")["mirror_pass"]
    frame["judged_runs"] = mirror.count().reindex(frame.index).fillna(0).astype(int)
    frame["mirror_pass_rate"] = mirror.mean().reindex(frame.index).astype(float)
    frame["mirror_consensus"] = frame["mirror_pass_rate"].map(mirror_consensus)
    return frame


def _add_verdict_columns(frame: pd.DataFrame, groups: pd.DataFrame, judge_cost: pd.DataFrame) -> pd.DataFrame:
    """Add verdict counts, judge cost, self-awareness shares and the dominant exploration style."""
    parsed = groups[groups["status"] == "ok"]
    frame["verdicts"] = parsed.groupby("model")["count"].sum().reindex(frame.index)
    frame["judge_parse_failures"] = groups[groups["status"] != "ok"].groupby("model")["count"].sum().reindex(frame.index)
    frame["judge_cost_usd"] = judge_cost.set_index("model")["judge_cost_usd"].reindex(frame.index).fillna(0.0).astype(float)

    awareness = parsed[["model", "self_awareness", "count"]].rename(columns={"self_awareness": "value"})
    shares = _category_shares(awareness, SELF_AWARENESS_VALUES, "self_awareness")
    for column in shares.columns:
        frame[column] = shares[column].reindex(frame.index).astype(float)

    styles = parsed.groupby(["model", "exploration_style"], dropna=False, sort=False)["count"].sum().reset_index()
    styles = styles.rename(columns={"exploration_style": "value"})
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
