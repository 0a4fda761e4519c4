"""Analysis at scale: per-model summary and objective metrics against plain SQL.

Reads a store written by ``generate_store.py`` (10,000 runs, 500,000 turns by
default). Each measurement runs in a fresh child process, so its time includes
nothing cached by an earlier one and its peak RSS belongs to it alone. Times are the
minimum over ``--repeat`` children.

- ``summary``: ``hermitkit.analysis.summary(store, batch_id)``.
- ``summary_sql``: only the SQL queries that ``summary`` sends, fetched, without the
  pandas work and the bootstrap intervals.
- ``self_talk``: ``hermitkit.analysis.self_talk(store, batch_id)``, the objective
  text metrics of every run.
- ``plain_runs``: ``SELECT model, count(*), sum(turn_count), ... FROM runs ... GROUP BY model``.
- ``plain_turns``: ``SELECT runs.model, count(*), avg(latency_s) FROM turns JOIN runs
  ... GROUP BY runs.model``, one pass over the turns table, which the summary also reads.

    python benchmarks/bench_analysis.py --url sqlite:////tmp/hermitkit-bench/store.db
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

from _common import emit, kind_of_url, machine_info, print_table
from sqlalchemy.engine import make_url

PLAIN_RUNS = """
SELECT model, count(*), sum(turn_count), sum(ok_count), avg(missing_count + empty_count), sum(cost_usd)
FROM runs WHERE batch_id = :batch_id GROUP BY model
"""
PLAIN_TURNS = """
SELECT runs.model, count(*), avg(turns.latency_s)
FROM turns JOIN runs ON runs.id = turns.run_id
WHERE runs.batch_id = :batch_id AND turns.role = 'assistant'
GROUP BY runs.model
"""
TASKS = ("plain_runs", "plain_turns", "summary_sql", "summary", "self_talk")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Database URL printed by generate_store.py.")
    parser.add_argument("--batch-id", type=int, default=None, help="Batch to analyse (default: the newest).")
    parser.add_argument("--repeat", type=int, default=3, help="Children per measurement; the minimum time is kept (default: %(default)s).")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks to run, from: %(default)s (default: all).")
    parser.add_argument("--json", type=Path, default=None, help="Append results as JSON lines to this file.")
    return parser.parse_args()


def run_task(task: str, url: str, batch_id: int | None) -> tuple[float, float, int]:
    """Run one task in this (child) process; return seconds, peak RSS in MiB and result rows."""
    from sqlalchemy import text

    from hermitkit import analysis
    from hermitkit.store import Store

    store = Store(url)
    batch = analysis.resolve_batch_id(store, batch_id)
    started = time.perf_counter()
    if task == "summary":
        rows = len(analysis.summary(store, batch))
    elif task == "self_talk":
        rows = len(analysis.self_talk(store, batch))
    elif task == "summary_sql":
        queries = analysis._summary_queries(batch, None)
        rows = store.read(lambda session: sum(len(session.execute(query).all()) for query in queries.values()))
    else:
        query = PLAIN_RUNS if task == "plain_runs" else PLAIN_TURNS
        with store.engine.connect() as connection:
            rows = len(connection.execute(text(query), {"batch_id": batch}).all())
    elapsed = time.perf_counter() - started
    store.dispose()
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rows


def measure(task: str, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    times, peaks = [], []
    for _ in range(args.repeat):
        with context.Pool(1) as pool:
            elapsed, peak_mib, rows = pool.apply(run_task, (task, args.url, args.batch_id))
        times.append(elapsed)
        peaks.append(peak_mib)
    return {"benchmark": "analysis", "database": kind_of_url(args.url), "task": task, "seconds": min(times), "peak_rss_mib": max(peaks), "rows": rows, "all_seconds": times}


def check_args(args: argparse.Namespace) -> list[str]:
    """Return the requested tasks, or exit with a message before any child process starts."""
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"--tasks {args.tasks!r} is invalid: use a comma-separated subset of {', '.join(TASKS)}.")

    if kind_of_url(args.url) == "sqlite":
        path = make_url(args.url).database or ""
        if not Path(path).expanduser().is_file():
            raise SystemExit(f"No SQLite store at {path!r}: write one first with `python benchmarks/generate_store.py --database sqlite --path {path}`.")
    return tasks


def main() -> None:
    args = parse_args()
    tasks = check_args(args)
    results = [measure(task, args) for task in tasks]

    baseline = {row["task"]: row["seconds"] for row in results}
    for row in results:
        if "plain_turns" in baseline:
            row["x_plain_turns"] = row["seconds"] / baseline["plain_turns"]
        if "plain_runs" in baseline:
            row["x_plain_runs"] = row["seconds"] / baseline["plain_runs"]

    machine = machine_info(args.url if kind_of_url(args.url) == "postgresql" else None)
    for row in results:
        row["machine"] = machine
    print_table(results, ["database", "task", "rows", "seconds", "x_plain_turns", "x_plain_runs", "peak_rss_mib"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
