"""Efficiency: wall time of a batch against the latency limit.

A run's turns are sequential, so R runs of S sequential requests each, at concurrency
C and latency L, cannot finish before ``max(S*L, R*S*L/C)``. S is T (turns) without
judging and T + J with J judge models, because each verdict request follows the run's
last turn. Efficiency is that limit divided by the measured wall time.

The demo server runs in its own process (``python -m hermitkit.cli demo-server``) with
a fixed latency added to every chat reply. The last two rows time the bare loops of
``bench_overhead.py`` on the same number of requests, storing nothing: one through
``httpx.AsyncClient``, one through hermitkit's own HTTP path (``PooledTransport``).
The second is the ceiling for hermitkit's batches on this machine.

    python benchmarks/bench_efficiency.py --latency 0.05 --runs 256 --turns 10 --concurrency 64 --database sqlite,postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from _common import DEMO_MODELS, JUDGE_MODEL, add_database_arguments, add_server_argument, database_kinds, demo_server, emit, fresh_database, kind_of_url, machine_info, print_table
from sqlalchemy import func, select

from hermitkit.config import BatchConfig, build_config
from hermitkit.runner import run_batch_async
from hermitkit.store import Judgement, Run, Store, Turn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds the demo server waits before each chat reply (default: %(default)s).")
    parser.add_argument("--runs", type=int, default=256, help="Runs in the batch, spread evenly over the demo models (default: %(default)s).")
    parser.add_argument("--turns", type=int, default=10, help="Assistant turns per run (default: %(default)s).")
    parser.add_argument("--concurrency", type=int, default=64, help="Batch concurrency C (default: %(default)s).")
    parser.add_argument("--models", type=int, default=4, choices=range(1, len(DEMO_MODELS) + 1), help="How many demo models share the runs (default: %(default)s).")
    parser.add_argument("--judge", choices=["on", "off", "both"], default="both", help="Measure with judging, without, or both (default: %(default)s).")
    parser.add_argument("--repeat", type=int, default=1, help="Batches per setting; the table shows each one (default: %(default)s).")
    parser.add_argument("--bare", choices=["on", "off"], default="on", help="Also time two bare loops that send the same requests and store nothing (default: %(default)s).")
    parser.add_argument("--json", type=Path, default=None, help="Append results as JSON lines to this file.")
    add_server_argument(parser)
    add_database_arguments(parser, default="sqlite,postgresql")
    return parser.parse_args()


def batch_config(args: argparse.Namespace, base_url: str, judge: bool) -> BatchConfig:
    models = DEMO_MODELS[: args.models]
    if args.runs % len(models):
        raise SystemExit(f"--runs {args.runs} is not a multiple of --models {len(models)}: pick values that divide evenly.")
    config = build_config(
        {
            "name": "bench-efficiency",
            "endpoint": {"base_url": base_url, "timeout_s": 120.0},
            "models": models,
            "runs": args.runs // len(models),
            "turns": args.turns,
            "judges": [JUDGE_MODEL],
            "seed": 1,
            "concurrency": args.concurrency,
        }
    )
    if judge:
        return config
    # A batch config needs a judge, so an unjudged batch is made by copying a valid config
    # without validation: the runner then skips judging.
    return config.model_copy(update={"judges": []})


def check_batch(store: Store, batch_id: int, runs: int, turns: int, judges: int) -> None:
    """Raise RuntimeError unless the batch stored exactly the runs, turns and verdicts requested."""

    def read(session: Any) -> tuple[int, int, int]:
        completed = session.scalar(select(func.count()).select_from(Run).where(Run.batch_id == batch_id, Run.status == "completed"))
        stored_turns = session.scalar(select(func.count()).select_from(Turn).join(Run).where(Run.batch_id == batch_id, Turn.role == "assistant"))
        verdicts = session.scalar(select(func.count()).select_from(Judgement).join(Run).where(Run.batch_id == batch_id))
        return completed, stored_turns, verdicts

    completed, stored_turns, verdicts = store.read(read)
    expected = (runs, runs * turns, runs * judges)
    if (completed, stored_turns, verdicts) != expected:
        raise RuntimeError(f"Batch {batch_id} stored (completed runs, turns, verdicts) = {(completed, stored_turns, verdicts)}, expected {expected}.")


def measure(args: argparse.Namespace, base_url: str, url: str, judge: bool) -> dict[str, Any]:
    config = batch_config(args, base_url, judge)
    store = Store(url)
    try:
        started = time.perf_counter()
        outcome = asyncio.run(run_batch_async(config, store=store, progress=False))
        wall_s = time.perf_counter() - started
        if outcome.status != "completed":
            raise RuntimeError(f"Batch {outcome.batch_id} ended as {outcome.status}: {outcome.message}")
        check_batch(store, outcome.batch_id, args.runs, args.turns, len(config.judges))
    finally:
        store.dispose()

    sequential = args.turns + len(config.judges)
    limit_s = max(sequential * args.latency, args.runs * sequential * args.latency / args.concurrency)
    return {
        "benchmark": "efficiency",
        "database": kind_of_url(url),
        "judging": judge,
        "latency_s": args.latency,
        "runs": args.runs,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "requests": args.runs * sequential,
        "wall_s": wall_s,
        "limit_s": limit_s,
        "efficiency": limit_s / wall_s if wall_s > 0 else float("nan"),
    }


def measure_bare(args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    """Time bench_overhead's two bare loops on the requests of an unjudged one-model batch of the same size."""
    from bench_overhead import bare_loop, bare_transport_loop, hermitkit_loop, stored_requests

    with fresh_database("sqlite", args) as url:
        store = Store(url)
        try:
            _, batch_id = asyncio.run(hermitkit_loop(args, base_url, store, args.concurrency))
            requests = stored_requests(store, batch_id)
        finally:
            store.dispose()

    rows = []
    for label, loop in (("none (bare httpx)", bare_loop), ("none (bare transport)", bare_transport_loop)):
        wall_s = asyncio.run(loop(base_url, requests, args.concurrency))
        rows.append(bare_row(args, label, wall_s))
    return rows


def bare_row(args: argparse.Namespace, label: str, wall_s: float) -> dict[str, Any]:
    limit_s = max(args.turns * args.latency, args.runs * args.turns * args.latency / args.concurrency)
    return {
        "benchmark": "efficiency",
        "database": label,
        "judging": False,
        "latency_s": args.latency,
        "runs": args.runs,
        "turns": args.turns,
        "concurrency": args.concurrency,
        "requests": args.runs * args.turns,
        "wall_s": wall_s,
        "limit_s": limit_s,
        "efficiency": limit_s / wall_s if wall_s > 0 else float("nan"),
    }


def main() -> None:
    args = parse_args()
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.judge]
    kinds = database_kinds(args.database)
    results = []

    with demo_server(args, args.latency) as base_url:
        for kind in kinds:
            for judge in modes:
                for _ in range(args.repeat):
                    with fresh_database(kind, args) as url:
                        results.append(measure(args, base_url, url, judge))
        if args.bare == "on":
            results.extend(measure_bare(args, base_url))

    postgres = args.postgres_url if "postgresql" in kinds else None
    machine = machine_info(postgres)
    for row in results:
        row["machine"] = machine
        row["server_overhead_ms"] = args.server_overhead_ms
    print_table(results, ["database", "judging", "latency_s", "runs", "turns", "concurrency", "requests", "wall_s", "limit_s", "efficiency"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
