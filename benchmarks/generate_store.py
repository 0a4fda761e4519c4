"""Fill a store with one large finished batch, written directly (no HTTP, no runner).

Default size: 10,000 runs of 50 assistant turns, so 500,000 turns and 1,000,000 rows
in the ``turns`` table, plus one judge verdict per run. A run's rows are the initial
prompt, then a reply and an echo per turn, with no echo after the last turn. Replies come from the
demo server's scripted models, so texts, verdicts and counts look like a real demo
batch and the analysis code reads realistic data.

The batch row and its runs are made by ``hermitkit.batches.create_batch``; turns go in
with SQLAlchemy Core executemany on SQLite and with COPY on PostgreSQL. A synthesis and
a persona per model are stored too (placeholder texts, archetype and stats computed by
``hermitkit.synthesis.persona_facts``), so ``hermitkit report`` finds them and calls no
judge: a per-model synthesis prompt over 1,000 runs would not fit the demo judge's
context window.

    python benchmarks/generate_store.py --database sqlite --path /tmp/hermitkit-bench/store.db
    python benchmarks/generate_store.py --database postgresql --pg-database hermitkit_bench_store
"""

from __future__ import annotations

import argparse
import os
import random
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from _common import DEFAULT_POSTGRES_URL, JUDGE_MODEL, POSTGRES_ENV
from sqlalchemy import bindparam, create_engine, func, insert, select, text, update
from sqlalchemy.engine import make_url

from hermitkit import batches
from hermitkit.config import build_config
from hermitkit.demo import DEMO_MODELS, _SCRIPTED
from hermitkit.protocol import Protocol, classify, next_user_message
from hermitkit.store import Judgement, Persona, Run, Store, Synthesis, Turn, normalize_database_url, utcnow
from hermitkit.synthesis import persona_facts

SCRIPTED_MODELS = [model for model in DEMO_MODELS if model in _SCRIPTED]
TURN_COLUMNS = ("run_id", "idx", "role", "content", "reasoning", "turn_number", "verdict", "extracted", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s", "provider", "served_model", "created_at")
MIRROR = ("passed", "partial", "failed", "failed_then_passed")
AWARENESS = ("full", "partial", "none")
STYLES = ("breadth", "depth", "mixed", "stuck")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="Runs in the batch (default: %(default)s).")
    parser.add_argument("--turns", type=int, default=50, help="Assistant turns per run (default: %(default)s).")
    parser.add_argument("--models", type=int, default=10, help="Model ids the runs are spread over (default: %(default)s).")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite", help="Backend (default: %(default)s).")
    parser.add_argument("--path", type=Path, default=Path("/tmp/hermitkit-bench/store.db"), help="SQLite file to create; an existing one is replaced (default: %(default)s).")
    parser.add_argument("--postgres-url", default=os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES_URL), help=f"PostgreSQL server URL (default: ${POSTGRES_ENV} or {DEFAULT_POSTGRES_URL}).")
    parser.add_argument("--pg-database", default="hermitkit_bench_store", help="PostgreSQL database to create; an existing one is dropped (default: %(default)s).")
    parser.add_argument("--chunk", type=int, default=200, help="Runs written per transaction (default: %(default)s).")
    return parser.parse_args()


def target_url(args: argparse.Namespace) -> str:
    """Create an empty database and return its URL."""
    if args.database == "sqlite":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{args.path}"

    base = normalize_database_url(args.postgres_url)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{args.pg_database}' AND pid <> pg_backend_pid()"))
        connection.execute(text(f'DROP DATABASE IF EXISTS "{args.pg_database}"'))
        connection.execute(text(f'CREATE DATABASE "{args.pg_database}"'))
    admin.dispose()
    return make_url(base).set(database=args.pg_database).render_as_string(hide_password=False)


def create_runs(store: Store, args: argparse.Namespace) -> tuple[int, list[tuple[int, str, int]], Protocol]:
    """Insert the batch and its pending runs; return the batch id, (run id, model, repetition) rows and the protocol."""
    if args.runs % args.models:
        raise SystemExit(f"--runs {args.runs} is not a multiple of --models {args.models}: pick values that divide evenly.")
    config = build_config(
        {
            "name": "bench-store",
            "endpoint": "demo",
            "models": [f"bench/model-{index:02d}" for index in range(1, args.models + 1)],
            "runs": args.runs // args.models,
            "turns": args.turns,
            "judges": [JUDGE_MODEL],
            "seed": 1,
        }
    )
    protocol = config.load_protocol()
    batch_id = store.write(partial(batches.create_batch, config=config, protocol=protocol, endpoint=config.endpoint.base_url, is_demo=True))
    runs = store.read(lambda session: session.execute(select(Run.id, Run.model, Run.repetition).where(Run.batch_id == batch_id).order_by(Run.id)).all())
    return batch_id, [tuple(row) for row in runs], protocol


def run_rows(run_id: int, model: str, repetition: int, turns: int, protocol: Protocol, now: datetime) -> tuple[list[tuple[Any, ...]], dict[str, Any], dict[str, Any]]:
    """Build the turn rows, the final run counters and a judge verdict for one run."""
    script = _SCRIPTED[SCRIPTED_MODELS[int(model.rsplit("-", 1)[1]) % len(SCRIPTED_MODELS)]]
    initial_prompt = protocol.initial_prompt
    rows: list[tuple[Any, ...]] = [(run_id, 0, "user", initial_prompt, None, None, None, None, None, None, None, None, None, None, None, now)]
    counts = dict.fromkeys(("ok", "multiple", "unbalanced", "empty", "missing"), 0)
    last_user = initial_prompt
    prompt_tokens = completion_tokens = 0
    for turn in range(turns):
        reply = script(turn, repetition, last_user)
        classification = classify(reply.content, protocol.extraction)
        counts[classification.verdict] += 1
        tokens_in = 200 + 60 * turn
        tokens_out = len(reply.content) // 4
        prompt_tokens += tokens_in
        completion_tokens += tokens_out
        rows.append((run_id, 2 * turn + 1, "assistant", reply.content, reply.reasoning, turn + 1, classification.verdict, classification.extracted, "stop", tokens_in, tokens_out, tokens_out * 4e-7, 0.05, "hermitkit-demo", model, now))
        if turn + 1 < turns:
            last_user = next_user_message(protocol, classification)
            rows.append((run_id, 2 * turn + 2, "user", last_user, None, None, None, None, None, None, None, None, None, None, None, now))

    run = {
        "target_id": run_id,
        "status": "completed",
        "turn_count": turns,
        **{f"{verdict}_count": count for verdict, count in counts.items()},
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": completion_tokens * 4e-7,
        "started_at": now,
        "finished_at": now,
    }
    picker = random.Random(run_id)
    verdict = {
        "run_id": run_id,
        "judge_model": JUDGE_MODEL,
        "round": 0,
        "status": "ok" if picker.random() > 0.03 else "parse_failed",
        "mirror_test": picker.choice(MIRROR),
        "self_awareness": picker.choice(AWARENESS),
        "refusal": False,
        "topics": ["memory", "time"],
        "topic_summary": "The model explored memory and time.",
        "exploration_style": picker.choice(STYLES),
        "sophistication": picker.randint(1, 5),
        "autonomy": picker.randint(1, 5),
        "context_loss": picker.random() < 0.2,
        "analysis": "Generated verdict for the analysis benchmark.",
        "raw_reply": "{}",
        "attempts": 1,
        "truncated": False,
        "sampling": {"temperature": 0.0},
        "prompt_version": "bench",
        "cost_usd": 1e-5,
        "created_at": now,
    }
    return rows, run, verdict


def write_chunk(store: Store, rows: list[tuple[Any, ...]], runs: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> None:
    runs_table = Run.__table__
    update_run = update(runs_table).where(runs_table.c.id == bindparam("target_id"))

    if store.dialect == "postgresql":
        raw = store.engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                with cursor.copy(f"COPY turns ({', '.join(TURN_COLUMNS)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            raw.commit()
        finally:
            raw.close()
    else:
        with store.engine.begin() as connection:
            connection.execute(insert(Turn.__table__), [dict(zip(TURN_COLUMNS, row, strict=True)) for row in rows])

    with store.engine.begin() as connection:
        connection.execute(update_run, runs)
        connection.execute(insert(Judgement.__table__), verdicts)


def store_personas(store: Store, batch_id: int) -> None:
    """Store one synthesis and one persona per model, as if the judge had written them."""
    facts = persona_facts(store, batch_id)
    first_runs = dict(store.read(lambda session: session.execute(select(Run.model, func.min(Run.id)).where(Run.batch_id == batch_id).group_by(Run.model)).all()))

    def write(session: Any) -> None:
        for model, fact in facts.items():
            themes = [
                {"name": "Layered questions", "description": "The model deepens one question per turn.", "run_ids": [first_runs[model]]},
                {"name": "Memory", "description": "The model returns to what it wrote earlier.", "run_ids": [first_runs[model]]},
            ]
            session.add(Synthesis(batch_id=batch_id, model=model, judge_model=JUDGE_MODEL, status="ok", themes=themes, raw_reply="{}", cost_usd=0.0, created_at=utcnow()))
            stats = {key: (None if isinstance(value, float) and value != value else value) for key, value in fact["stats"].items()}
            session.add(
                Persona(
                    batch_id=batch_id,
                    model=model,
                    judge_model=JUDGE_MODEL,
                    archetype=fact["archetype"],
                    status="ok",
                    stats={**stats, "archetype_rule": fact["archetype_rule"]},
                    dropped_citations=0,
                    themes=themes,
                    description="Placeholder persona text written by benchmarks/generate_store.py.",
                    evidence=[],
                    raw_reply="{}",
                    cost_usd=0.0,
                    created_at=utcnow(),
                )
            )

    store.write(write)


def main() -> None:
    args = parse_args()
    url = target_url(args)
    started = time.perf_counter()
    store = Store(url)
    batch_id, runs, protocol = create_runs(store, args)
    now = datetime.now(UTC)

    written_turns = 0
    for start in range(0, len(runs), args.chunk):
        rows: list[tuple[Any, ...]] = []
        run_updates, verdicts = [], []
        for run_id, model, repetition in runs[start : start + args.chunk]:
            turn_rows, run, verdict = run_rows(run_id, model, repetition, args.turns, protocol, now)
            rows.extend(turn_rows)
            run_updates.append(run)
            verdicts.append(verdict)
        write_chunk(store, rows, run_updates, verdicts)
        written_turns += len(rows)

    store.write(partial(batches.set_batch_status, batch_id=batch_id, status="completed"))
    store_personas(store, batch_id)
    elapsed = time.perf_counter() - started
    store.dispose()
    print(f"Wrote batch {batch_id}: {len(runs)} runs, {len(runs) * args.turns} assistant turns, {written_turns} turn rows in {elapsed:.1f} s.")
    print(f"URL: {url}")


if __name__ == "__main__":
    main()
