"""Creating batches and reading their runs and transcripts from the store.

These are the database steps of the runner, kept apart so the runner module holds only
the scheduling logic. Every function takes a SQLAlchemy session and is run through
``Store.write``/``Store.read``, which commits it as one transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Row, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from hermitkit import __version__
from hermitkit.client import ChatReply, ModelInfo, storable_text
from hermitkit.config import BatchConfig
from hermitkit.protocol import Classification, Protocol
from hermitkit.store import FINAL_RUN_STATUSES, Batch, Judgement, ModelRecord, Run, Turn, touch_batch, utcnow
from hermitkit.writer import OneStatement


@dataclass(frozen=True)
class RunTask:
    """The ids and progress of one run that a worker carries on."""

    run_id: int
    model: str
    repetition: int
    status: str
    turn_count: int
    turns_target: int


def upsert_models(session: Session, endpoint: str, infos: list[ModelInfo]) -> None:
    now = utcnow()
    for info in infos:
        record = session.get(ModelRecord, (endpoint, info.id))
        if record is None:
            record = ModelRecord(endpoint=endpoint, model_id=info.id)
            session.add(record)
        record.name = _fit(info.name, ModelRecord.__table__.c.name)
        record.context_length = info.context_length
        record.prompt_price = info.prompt_price
        record.completion_price = info.completion_price
        record.is_demo = info.is_demo
        record.supports_structured_output = info.supports_structured_output
        record.raw = info.raw
        record.updated_at = now


def create_batch(session: Session, config: BatchConfig, protocol: Protocol, *, endpoint: str, is_demo: bool) -> int:
    """Insert a batch and one pending run per (model, repetition); return the batch id."""
    batch = Batch(
        name=config.name,
        status="pending",
        config=config.model_dump(mode="json"),
        protocol_id=protocol.id,
        protocol_hash=protocol.hash,
        protocol=protocol.to_dict(),
        endpoint=endpoint,
        is_demo=is_demo,
        budget_usd=config.budget_usd,
        hermitkit_version=__version__,
    )
    session.add(batch)
    session.flush()

    rows = [
        {
            "batch_id": batch.id,
            "model": model,
            "repetition": repetition,
            "status": "pending",
            "params": config.run_sampling(repetition),
            "protocol_id": protocol.id,
            "protocol_hash": protocol.hash,
            "turns_target": config.turns,
            "created_at": utcnow(),
        }
        for model in config.models
        for repetition in range(1, config.runs + 1)
    ]
    session.execute(insert(Run), rows)
    return batch.id


_TURNS = Turn.__table__
_RUNS = Run.__table__
_VERDICT_COUNTS = ("ok", "multiple", "unbalanced", "empty", "missing")

# Built once with bound parameters, so SQLAlchemy compiles each statement a single time;
# ``insert(Turn).values(...)`` would build, hash and look up a new statement per turn.
_INSERT_TURNS = insert(_TURNS)
_ADD_TO_RUN_COUNTS = (
    update(_RUNS)
    .where(_RUNS.c.id == bindparam("target_run_id"))
    .values(
        turn_count=_RUNS.c.turn_count + 1,
        **{f"{verdict}_count": _RUNS.c[f"{verdict}_count"] + bindparam(f"add_{verdict}") for verdict in _VERDICT_COUNTS},
        prompt_tokens=_RUNS.c.prompt_tokens + bindparam("add_prompt_tokens"),
        completion_tokens=_RUNS.c.completion_tokens + bindparam("add_completion_tokens"),
        reasoning_tokens=_RUNS.c.reasoning_tokens + bindparam("add_reasoning_tokens"),
        cost_usd=_RUNS.c.cost_usd + bindparam("add_cost_usd"),
    )
)
_INSERT_JUDGEMENT = insert(Judgement.__table__)
_MARK_COMPLETED = (
    update(_RUNS)
    .where(_RUNS.c.id == bindparam("target_run_id"))
    .values(status="completed", error=None, finished_at=bindparam("now", type_=_RUNS.c.finished_at.type))
)
_COUNT_INITIAL_PROMPT = select(func.count()).select_from(_TURNS).where(_TURNS.c.run_id == bindparam("target_run_id"), _TURNS.c.idx == 0)
_MARK_RUNNING = (
    update(_RUNS)
    .where(_RUNS.c.id == bindparam("target_run_id"))
    .values(status="running", error=None, started_at=func.coalesce(_RUNS.c.started_at, bindparam("now", type_=_RUNS.c.started_at.type)))
)
_SELECT_HISTORY = (
    select(_TURNS.c.idx, _TURNS.c.role, _TURNS.c.content, _TURNS.c.turn_number, _TURNS.c.verdict)
    .where(_TURNS.c.run_id == bindparam("target_run_id"))
    .order_by(_TURNS.c.idx)
)


_TASK_COLUMNS = (Run.id, Run.model, Run.repetition, Run.status, Run.turn_count, Run.turns_target)


def pending_work(session: Session, batch_id: int, judges: list[str]) -> list[RunTask]:
    """Runs that still need turns, or a batch verdict from one of ``judges``.

    Ordered by repetition so that an interrupted batch has spread its finished runs
    over all models rather than finishing one model first.
    """
    judged_by_all = (
        select(Judgement.run_id)
        .where(Judgement.judge_model.in_(judges), Judgement.round == 0)
        .group_by(Judgement.run_id)
        .having(func.count(func.distinct(Judgement.judge_model)) == len(judges))
    )
    rows = session.execute(
        select(*_TASK_COLUMNS)
        .where(Run.batch_id == batch_id)
        .where(Run.status.not_in(FINAL_RUN_STATUSES) | ((Run.turn_count > 0) & Run.id.not_in(judged_by_all)))
        .order_by(Run.repetition, Run.id)
    )
    return [RunTask(*row) for row in rows]


def judged_by(session: Session, run_id: int) -> set[str]:
    rows = session.scalars(select(Judgement.judge_model).where(Judgement.run_id == run_id, Judgement.round == 0))
    return set(rows)


def judge_inputs(session: Session, run_id: int, judges: list[str]) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """Return the judges in ``judges`` that have not judged the run yet, with its transcript and counts.

    One read for what the runner needs before it sends verdict requests. The
    transcript is only loaded when a judge is missing; otherwise it is empty.
    """
    done = judged_by(session, run_id)
    pending = [judge for judge in judges if judge not in done]
    if not pending:
        return [], [], {}
    transcript, counts = judge_transcript_rows(session, run_id)
    return pending, transcript, counts


def run_task(session: Session, run_id: int) -> RunTask:
    row = session.execute(select(*_TASK_COLUMNS).where(Run.id == run_id)).one()
    return RunTask(*row)


def missing_judgements(session: Session, batch_id: int, judges: list[str]) -> int:
    """Number of (finished run, judge) pairs that have no batch verdict yet."""
    finished = session.scalar(
        select(func.count()).select_from(Run).where(Run.batch_id == batch_id, Run.status.in_(FINAL_RUN_STATUSES), Run.turn_count > 0)
    ) or 0
    stored = session.scalar(
        select(func.count())
        .select_from(Judgement)
        .join(Run, Run.id == Judgement.run_id)
        .where(Run.batch_id == batch_id, Run.status.in_(FINAL_RUN_STATUSES), Judgement.judge_model.in_(judges), Judgement.round == 0)
    ) or 0
    return finished * len(judges) - stored


def load_history(session: Session, run_id: int) -> list[dict[str, Any]]:
    rows = session.execute(_SELECT_HISTORY, {"target_run_id": run_id})
    return [{"idx": idx, "role": role, "content": content or "", "turn": number, "verdict": verdict} for idx, role, content, number, verdict in rows]


def start_run(session: Session, run_id: int, initial_prompt: str) -> None:
    """Mark a run as running and store its initial prompt if it has none yet."""
    now = utcnow()
    if not session.execute(_COUNT_INITIAL_PROMPT, {"target_run_id": run_id}).scalar():
        session.execute(_INSERT_TURNS, {"run_id": run_id, "idx": 0, "role": "user", "content": initial_prompt, "created_at": now})
    session.execute(_MARK_RUNNING, {"target_run_id": run_id, "now": now})


def begin_run(session: Session, run_id: int, initial_prompt: str) -> list[dict[str, Any]]:
    """``start_run`` and ``load_history`` in one transaction: return the run's messages so far."""
    start_run(session, run_id, initial_prompt)
    return load_history(session, run_id)


def begin_runs(session: Session, calls: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Do the work of several ``begin_run`` calls (their keyword arguments) with four statements in all.

    On PostgreSQL each statement is a round trip, and a batch starts up to
    ``concurrency`` runs at once. One by one, those starts held up the writer for tens
    of milliseconds, and every run's exchanges waited behind them.
    """
    run_ids = list(dict.fromkeys(call["run_id"] for call in calls))
    prompts = {call["run_id"]: call["initial_prompt"] for call in calls}
    now = utcnow()

    started = set(session.scalars(select(_TURNS.c.run_id).where(_TURNS.c.run_id.in_(run_ids), _TURNS.c.idx == 0)))
    missing = [{"run_id": run_id, "idx": 0, "role": "user", "content": prompts[run_id], "created_at": now} for run_id in run_ids if run_id not in started]
    if missing:
        session.execute(_INSERT_TURNS, missing)
    session.execute(_MARK_RUNNING, [{"target_run_id": run_id, "now": now} for run_id in run_ids])

    histories: dict[int, list[dict[str, Any]]] = {run_id: [] for run_id in run_ids}
    rows = session.execute(
        select(_TURNS.c.run_id, _TURNS.c.idx, _TURNS.c.role, _TURNS.c.content, _TURNS.c.turn_number, _TURNS.c.verdict)
        .where(_TURNS.c.run_id.in_(run_ids))
        .order_by(_TURNS.c.run_id, _TURNS.c.idx)
    )
    for run_id, idx, role, content, number, verdict in rows:
        histories[run_id].append({"idx": idx, "role": role, "content": content or "", "turn": number, "verdict": verdict})
    return [histories[call["run_id"]] for call in calls]


def add_exchange(
    session: Session,
    *,
    run_id: int,
    idx: int,
    turn_number: int,
    reply: ChatReply,
    cost_usd: float | None,
    classification: Classification,
    echo: str | None,
    completes_run: bool = False,
) -> None:
    """Store one assistant reply, the echo sent after it and the run's new counts.

    All of it is one transaction, and (run_id, idx) is unique, so a retried or
    concurrent write can never store a turn twice or count it twice. ``echo`` is
    ``None`` after the last turn, which is never sent. ``completes_run`` also marks
    the run completed, as ``finish_run`` would, in the same transaction.
    """
    add_exchanges(session, [dict(run_id=run_id, idx=idx, turn_number=turn_number, reply=reply, cost_usd=cost_usd, classification=classification, echo=echo, completes_run=completes_run)])


def add_exchanges(session: Session, exchanges: list[dict[str, Any]]) -> list[None]:
    """Store several exchanges (keyword arguments of ``add_exchange``) with two or three statements.

    One executemany inserts every turn row and one updates every run's counts, so a
    group of exchanges costs two round trips to the database instead of two each. A
    third executemany marks the runs completed whose exchange has ``completes_run``.
    The exchanges must belong to different runs.
    """
    rows, counts, completed = _group_rows(exchanges)
    session.execute(_INSERT_TURNS, rows)
    session.execute(_ADD_TO_RUN_COUNTS, counts)
    if completed:
        now = utcnow()
        session.execute(_MARK_COMPLETED, [{**row, "now": now} for row in completed])
    return [None] * len(exchanges)


def _group_rows(exchanges: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build the turn rows, run-count updates and completed runs of a group of exchanges."""
    rows: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    completed: list[dict[str, Any]] = []
    for exchange in exchanges:
        exchange = dict(exchange)
        if exchange.pop("completes_run", False):
            completed.append({"target_run_id": exchange["run_id"]})
        exchange_rows, run_counts = _exchange_rows(**exchange)
        rows.extend(exchange_rows)
        counts.append(run_counts)
    return rows, counts, completed


def _postgresql_array_type(column: Any) -> str:
    # Strings are passed as text[], because a cast to varchar(n)[] would cut long values
    # silently. The insert's own cast to the column type rejects them as usual.
    compiled = column.type.compile(dialect=postgresql.dialect())
    return "TEXT" if compiled.startswith("VARCHAR") else compiled


_TURN_COLUMNS = [column.name for column in _TURNS.c if column.name != "id"]
_SUMMED = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_usd")
_COUNT_TYPES = {
    "run_id": "INTEGER",
    **{f"add_{verdict}": "INTEGER" for verdict in _VERDICT_COUNTS},
    **{f"add_{name}": _postgresql_array_type(_RUNS.c[name]) for name in _SUMMED},
    "completes": "BOOLEAN",
}

# The work of add_exchanges on PostgreSQL as one statement, which needs one round trip
# and no transaction block. The turn rows and the run counts are each sent as one JSON
# text, and json_to_recordset() turns them back into typed rows. One array parameter per
# column cost more, because psycopg builds each array in Python. That took a fifth of the
# event loop at 1,280 requests per second (benchmarks/README.md).
# The statement text is the same for any number of exchanges, so psycopg prepares it
# once per connection, from its fifth use on (psycopg's default prepare_threshold).
# Each run appears once per group, so the counts update and the completion are one
# UPDATE per run, because PostgreSQL does not support updating a row twice in one
# statement.
_POSTGRESQL_ADD_EXCHANGES = text(
    "WITH new_turns AS (INSERT INTO turns ("
    + ", ".join(_TURN_COLUMNS)
    + ") SELECT "
    + ", ".join(_TURN_COLUMNS)
    + " FROM json_to_recordset(CAST(:turns AS JSON)) AS new("
    + ", ".join(f"{name} {_postgresql_array_type(_TURNS.c[name])}" for name in _TURN_COLUMNS)
    + ")) UPDATE runs SET turn_count = runs.turn_count + 1, "
    + ", ".join(f"{verdict}_count = runs.{verdict}_count + counts.add_{verdict}" for verdict in _VERDICT_COUNTS)
    + ", "
    + ", ".join(f"{name} = runs.{name} + counts.add_{name}" for name in _SUMMED)
    + ", status = CASE WHEN counts.completes THEN 'completed' ELSE runs.status END"
    + ", error = CASE WHEN counts.completes THEN NULL ELSE runs.error END"
    + ", finished_at = CASE WHEN counts.completes THEN CAST(:now AS TIMESTAMP WITH TIME ZONE) ELSE runs.finished_at END"
    + " FROM json_to_recordset(CAST(:counts AS JSON)) AS counts("
    + ", ".join(f"{name} {kind}" for name, kind in _COUNT_TYPES.items())
    + ") WHERE runs.id = counts.run_id"
)

# PostgreSQL reads these spellings of the float values that JSON has no number for.
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_rows(rows: list[dict[str, Any]], floats: tuple[str, ...]) -> str:
    """Encode ``rows`` for json_to_recordset: timestamps in ISO 8601, non-finite floats as strings.

    The non-finite values of the ``floats`` keys are replaced in ``rows`` itself.
    """
    for row in rows:
        for name in floats:
            value = row.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                row[name] = _NON_FINITE[repr(value)]
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"), default=_json_timestamp)


def _json_timestamp(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} values cannot be stored through JSON: {value!r}")


def add_exchanges_statement(exchanges: list[dict[str, Any]]) -> OneStatement:
    """Build the work of ``add_exchanges`` as one PostgreSQL statement and return it with its parameters.

    The statement is atomic on its own, so it may run outside a transaction block. A
    turn that is already stored fails the whole statement with an IntegrityError, as
    in ``add_exchanges``.
    """
    rows, counts, completed = _group_rows(exchanges)
    completing = {row["target_run_id"] for row in completed}
    count_rows = [
        {"run_id": count["target_run_id"], **{name: count[name] for name in _COUNT_TYPES if name.startswith("add_")}, "completes": count["target_run_id"] in completing}
        for count in counts
    ]
    parameters = {
        "turns": _json_rows(rows, ("cost_usd", "latency_s")),
        "counts": _json_rows(count_rows, ("add_cost_usd",)),
        "now": utcnow(),
    }
    return OneStatement(_POSTGRESQL_ADD_EXCHANGES, parameters)


# The work of begin_runs on PostgreSQL as one statement. Its final SELECT reads the
# table as it was before the statement, so an initial prompt inserted by this statement
# comes from the insert's RETURNING instead, through the UNION ALL.
_POSTGRESQL_BEGIN_RUNS = text(
    "WITH calls AS (SELECT * FROM unnest(CAST(:run_id AS INTEGER[]), CAST(:prompt AS TEXT[])) AS calls(run_id, prompt)), "
    "first_prompts AS (INSERT INTO turns (run_id, idx, role, content, created_at) "
    "SELECT run_id, 0, 'user', prompt, CAST(:now AS TIMESTAMP WITH TIME ZONE) FROM calls "
    "ON CONFLICT (run_id, idx) DO NOTHING "
    "RETURNING run_id, idx, role, content, turn_number, verdict), "
    "started AS (UPDATE runs SET status = 'running', error = NULL, "
    "started_at = COALESCE(runs.started_at, CAST(:now AS TIMESTAMP WITH TIME ZONE)) "
    "WHERE runs.id IN (SELECT run_id FROM calls)) "
    "SELECT run_id, idx, role, content, turn_number, verdict FROM turns WHERE run_id IN (SELECT run_id FROM calls) "
    "UNION ALL SELECT run_id, idx, role, content, turn_number, verdict FROM first_prompts "
    "ORDER BY run_id, idx"
)


def begin_runs_statement(calls: list[dict[str, Any]]) -> OneStatement:
    """Build the work of ``begin_runs`` as one PostgreSQL statement, atomic on its own.

    Starting runs needs one round trip instead of five (read, insert, update, read,
    commit), and the writer can write no other group in the meantime.
    """
    prompts = {call["run_id"]: call["initial_prompt"] for call in calls}

    def results(rows: Sequence[Row[Any]]) -> list[list[dict[str, Any]]]:
        histories: dict[int, list[dict[str, Any]]] = {run_id: [] for run_id in prompts}
        for run_id, idx, role, content, number, verdict in rows:
            histories[run_id].append({"idx": idx, "role": role, "content": content or "", "turn": number, "verdict": verdict})

        for run_id, history in histories.items():
            if not history:
                # Another process inserted the prompt after this statement's snapshot and
                # before its insert, which then did nothing. That prompt is the batch's,
                # the same as this one.
                history.append({"idx": 0, "role": "user", "content": prompts[run_id], "turn": None, "verdict": None})
        return [histories[call["run_id"]] for call in calls]

    parameters = {"run_id": list(prompts), "prompt": list(prompts.values()), "now": utcnow()}
    return OneStatement(_POSTGRESQL_BEGIN_RUNS, parameters, results)


def _exchange_rows(
    *,
    run_id: int,
    idx: int,
    turn_number: int,
    reply: ChatReply,
    cost_usd: float | None,
    classification: Classification,
    echo: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build the turn rows of one exchange and the parameters of its run-count update."""
    verdict = classification.verdict
    if verdict not in _VERDICT_COUNTS:
        raise ValueError(f"Unknown verdict {verdict!r}: expected one of {', '.join(_VERDICT_COUNTS)}.")

    now = utcnow()
    assistant = {
        "run_id": run_id,
        "idx": idx,
        "role": "assistant",
        "content": reply.content,
        "reasoning": reply.reasoning,
        "turn_number": turn_number,
        "verdict": verdict,
        "extracted": classification.extracted,
        "finish_reason": _fit(reply.finish_reason, _TURNS.c.finish_reason),
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "reasoning_tokens": reply.reasoning_tokens,
        "cost_usd": cost_usd,
        "latency_s": reply.latency_s,
        "generation_id": _fit(reply.generation_id, _TURNS.c.generation_id),
        "provider": _fit(reply.provider, _TURNS.c.provider),
        "served_model": _fit(reply.served_model, _TURNS.c.served_model),
        "created_at": now,
    }
    rows = [assistant]
    if echo is not None:
        # An executemany needs the same keys in every row.
        rows.append({**dict.fromkeys(assistant), "run_id": run_id, "idx": idx + 1, "role": "user", "content": echo, "created_at": now})

    run_counts = {
        "target_run_id": run_id,
        **{f"add_{name}": int(name == verdict) for name in _VERDICT_COUNTS},
        "add_prompt_tokens": reply.prompt_tokens or 0,
        "add_completion_tokens": reply.completion_tokens or 0,
        "add_reasoning_tokens": reply.reasoning_tokens or 0,
        "add_cost_usd": cost_usd or 0.0,
    }
    return rows, run_counts


def _fit(value: str | None, column: Column[Any]) -> str | None:
    """Cut a provider's name or id to the length of its VARCHAR ``column``.

    PostgreSQL rejects a longer value, and one such value stopped the whole batch.
    """
    length = column.type.length
    return value if value is None or len(value) <= length else value[:length]


def finish_run(session: Session, run_id: int, status: str, error: str | None = None) -> None:
    # A provider's error text may quote the reply, NUL characters and all.
    values: dict[str, Any] = {"status": status, "error": None if error is None else storable_text(error)}
    if status in FINAL_RUN_STATUSES:
        values["finished_at"] = utcnow()
    session.execute(update(_RUNS).where(_RUNS.c.id == bindparam("target_run_id")), {"target_run_id": run_id, **values})


def set_batch_status(session: Session, batch_id: int, status: str, error: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "error": None if error is None else storable_text(error)}
    if status in {"completed", "failed", "budget_exhausted", "cancelled"}:
        values["finished_at"] = utcnow()
    touch_batch(session, batch_id, **values)


def interrupt_batch(session: Session, batch_id: int, error: str) -> None:
    """Mark the batch interrupted and its runs in progress pending again, for a process that stops early.

    Only the process that holds the batch's lease calls this, so every run still marked
    running is one of its own and none is running any more.
    """
    set_batch_status(session, batch_id, "interrupted", error)
    session.execute(update(_RUNS).where(_RUNS.c.batch_id == bindparam("target_batch_id"), _RUNS.c.status == "running").values(status="pending"), {"target_batch_id": batch_id})


def batch_run_statuses(session: Session, batch_id: int) -> dict[str, int]:
    rows = session.execute(select(Run.status, func.count()).where(Run.batch_id == batch_id).group_by(Run.status))
    return {status: count for status, count in rows}


_COUNT_COLUMNS = (Run.turn_count, Run.ok_count, Run.multiple_count, Run.unbalanced_count, Run.empty_count, Run.missing_count)


def judge_transcript_rows(session: Session, run_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load the transcript and exact protocol counts of a run, as the judge receives them."""
    # Core statements only, so the runner's writer can run this on a plain connection.
    run = session.execute(select(*_COUNT_COLUMNS).where(Run.id == run_id)).one_or_none()
    if run is None:
        raise KeyError(run_id)
    return _judge_transcript(load_history(session, run_id)), _judge_counts(*run)


def _judge_transcript(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": m["content"], "turn": m["turn"], "verdict": m["verdict"]} for m in history]


def _judge_counts(turns: int, ok: int, multiple: int, unbalanced: int, empty: int, missing: int) -> dict[str, Any]:
    return {
        "turns": turns,
        "ok": ok,
        "failures": missing + empty,
        "malformed": multiple + unbalanced,
        "empty": empty,
        "missing": missing,
        "compliance_rate": (ok / turns) if turns else None,
    }


def judge_inputs_many(session: Session, calls: list[dict[str, Any]]) -> list[tuple[list[str], list[dict[str, Any]], dict[str, Any]]]:
    """Do the work of several ``judge_inputs`` calls (their keyword arguments) with three reads in all."""
    run_ids = list(dict.fromkeys(call["run_id"] for call in calls))
    done: dict[int, set[str]] = {run_id: set() for run_id in run_ids}
    for run_id, judge in session.execute(select(Judgement.run_id, Judgement.judge_model).where(Judgement.run_id.in_(run_ids), Judgement.round == 0)):
        done[run_id].add(judge)
    pending = [[judge for judge in call["judges"] if judge not in done[call["run_id"]]] for call in calls]
    needed = list(dict.fromkeys(call["run_id"] for call, judges in zip(calls, pending, strict=True) if judges))
    if not needed:
        return [([], [], {}) for _ in calls]

    counts = {row[0]: _judge_counts(*row[1:]) for row in session.execute(select(Run.id, *_COUNT_COLUMNS).where(Run.id.in_(needed)))}
    histories: dict[int, list[dict[str, Any]]] = {run_id: [] for run_id in needed}
    rows = session.execute(
        select(_TURNS.c.run_id, _TURNS.c.role, _TURNS.c.content, _TURNS.c.turn_number, _TURNS.c.verdict)
        .where(_TURNS.c.run_id.in_(needed))
        .order_by(_TURNS.c.run_id, _TURNS.c.idx)
    )
    for run_id, role, content, number, verdict in rows:
        histories[run_id].append({"role": role, "content": content or "", "turn": number, "verdict": verdict})

    results: list[tuple[list[str], list[dict[str, Any]], dict[str, Any]]] = []
    for call, judges in zip(calls, pending, strict=True):
        if not judges:
            results.append(([], [], {}))
            continue
        if call["run_id"] not in counts:
            raise KeyError(call["run_id"])
        results.append((judges, histories[call["run_id"]], counts[call["run_id"]]))
    return results


# The reads of judge_inputs_many on PostgreSQL as one statement: one row per turn of each
# run (one row with no turn for a run without turns), each with the run's counts and the
# judges that have judged it.
_POSTGRESQL_JUDGE_INPUTS = text(
    "WITH calls AS (SELECT DISTINCT unnest(CAST(:run_id AS INTEGER[])) AS run_id), "
    "judged AS (SELECT judgements.run_id, array_agg(judgements.judge_model) AS judges FROM judgements "
    "WHERE judgements.run_id IN (SELECT run_id FROM calls) AND judgements.round = 0 GROUP BY judgements.run_id) "
    "SELECT runs.id, "
    + ", ".join(f"runs.{column.key}" for column in _COUNT_COLUMNS)
    + ", judged.judges, turns.role, turns.content, turns.turn_number, turns.verdict "
    "FROM runs JOIN calls ON calls.run_id = runs.id "
    "LEFT JOIN judged ON judged.run_id = runs.id "
    "LEFT JOIN turns ON turns.run_id = runs.id "
    "ORDER BY runs.id, turns.idx"
)


def judge_inputs_statement(calls: list[dict[str, Any]]) -> OneStatement:
    """Build the reads of ``judge_inputs_many`` as one PostgreSQL statement: one round trip instead of four."""

    def results(rows: Sequence[Row[Any]]) -> list[tuple[list[str], list[dict[str, Any]], dict[str, Any]]]:
        done: dict[int, set[str]] = {}
        counts: dict[int, dict[str, Any]] = {}
        histories: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            run_id = row[0]
            if run_id not in counts:
                counts[run_id] = _judge_counts(*row[1:7])
                done[run_id] = set(row[7] or ())
                histories[run_id] = []
            role, content, number, verdict = row[8:]
            if role is not None:
                histories[run_id].append({"role": role, "content": content or "", "turn": number, "verdict": verdict})

        outcomes: list[tuple[list[str], list[dict[str, Any]], dict[str, Any]]] = []
        for call in calls:
            run_id = call["run_id"]
            pending = [judge for judge in call["judges"] if judge not in done.get(run_id, set())]
            if not pending:
                outcomes.append(([], [], {}))
                continue
            if run_id not in counts:
                raise KeyError(run_id)
            outcomes.append((pending, histories[run_id], counts[run_id]))
        return outcomes

    return OneStatement(_POSTGRESQL_JUDGE_INPUTS, {"run_id": [call["run_id"] for call in calls]}, results)


def next_judge_round(session: Session, run_id: int, judge_model: str) -> int:
    current = session.scalar(select(func.max(Judgement.round)).where(Judgement.run_id == run_id, Judgement.judge_model == judge_model))
    return 0 if current is None else current + 1


def add_judgement(session: Session, *, run_id: int, judge_model: str, round_: int, outcome: Any) -> None:
    """Store one judge outcome (a ``hermitkit.judge.JudgeOutcome``), parsed or not.

    A parse failure is stored with the raw reply and no scores, so it is counted but
    never averaged as a zero.
    """
    session.execute(_INSERT_JUDGEMENT, _judgement_row(run_id=run_id, judge_model=judge_model, round_=round_, outcome=outcome))


def add_judgements(session: Session, calls: list[dict[str, Any]]) -> list[None]:
    """Do the work of several ``add_judgement`` calls (their keyword arguments) with one executemany."""
    session.execute(_INSERT_JUDGEMENT, [_judgement_row(**call) for call in calls])
    return [None] * len(calls)


_JUDGEMENTS = Judgement.__table__
_JUDGEMENT_COLUMNS = [column for column in _JUDGEMENTS.c if column.name != "id"]
_JSON_COLUMNS = {column.name for column in _JUDGEMENT_COLUMNS if isinstance(column.type, JSON)}
_QUOTE = postgresql.dialect().identifier_preparer.quote

# The work of add_judgements on PostgreSQL as one INSERT over unnest(), like the exchanges.
# JSON values travel as text and are cast back, as SQLAlchemy's JSON type sends them.
_POSTGRESQL_ADD_JUDGEMENTS = text(
    "INSERT INTO judgements ("
    + ", ".join(_QUOTE(column.name) for column in _JUDGEMENT_COLUMNS)
    + ") SELECT "
    + ", ".join(f"CAST(v.{_QUOTE(column.name)} AS JSON)" if column.name in _JSON_COLUMNS else f"v.{_QUOTE(column.name)}" for column in _JUDGEMENT_COLUMNS)
    + " FROM unnest("
    + ", ".join(f"CAST(:{column.name} AS {'TEXT' if column.name in _JSON_COLUMNS else _postgresql_array_type(column)}[])" for column in _JUDGEMENT_COLUMNS)
    + ") AS v("
    + ", ".join(_QUOTE(column.name) for column in _JUDGEMENT_COLUMNS)
    + ")"
)


def add_judgements_statement(calls: list[dict[str, Any]]) -> OneStatement:
    """Build the work of ``add_judgements`` as one PostgreSQL INSERT, atomic on its own.

    A duplicate verdict fails every row of the statement, as it does in ``add_judgements``.
    """
    rows = [_judgement_row(**call) for call in calls]
    parameters = {
        column.name: [json.dumps(row[column.name]) for row in rows] if column.name in _JSON_COLUMNS else [row[column.name] for row in rows]
        for column in _JUDGEMENT_COLUMNS
    }
    return OneStatement(_POSTGRESQL_ADD_JUDGEMENTS, parameters)


def _judgement_row(*, run_id: int, judge_model: str, round_: int, outcome: Any) -> dict[str, Any]:
    verdict = outcome.verdict.to_dict() if outcome.verdict is not None else {}
    failure = outcome.failure
    return dict(
        run_id=run_id,
        judge_model=judge_model,
        round=round_,
        status=outcome.status,
        mirror_test=verdict.get("mirror_test"),
        self_awareness=verdict.get("self_awareness"),
        refusal=verdict.get("refusal"),
        topics=list(verdict["topics"]) if "topics" in verdict else None,
        topic_summary=verdict.get("topic_summary"),
        exploration_style=verdict.get("exploration_style"),
        sophistication=verdict.get("sophistication"),
        autonomy=verdict.get("autonomy"),
        emergent_behaviour=verdict.get("emergent_behaviour"),
        context_loss=verdict.get("context_loss"),
        analysis=verdict.get("analysis"),
        raw_reply=outcome.raw_reply,
        retry_reply=outcome.retry_reply,
        repair_reply=outcome.repair_reply,
        failure_reason=failure.reason if failure is not None else None,
        failure_detail=failure.detail if failure is not None else None,
        attempts=outcome.attempts,
        truncated=outcome.truncated,
        sampling=outcome.sampling,
        prompt_version=outcome.prompt_version,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        cost_usd=outcome.cost_usd,
        created_at=utcnow(),
    )
