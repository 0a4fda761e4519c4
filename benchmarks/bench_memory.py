"""Memory: peak RSS of a batch process, for a small and a large batch.

Each batch runs in a fresh Python process (this script with ``--child``) against a
demo server in another process, judged by ``demo/judge``, and reports its own peak RSS
(``ru_maxrss``) at the end. Flat memory means the large batch peaks within 20 % of the
small one: transcripts of finished runs must not stay in memory.

    python benchmarks/bench_memory.py --runs 100,1000 --turns 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import DEMO_MODELS, JUDGE_MODEL, add_database_arguments, add_server_argument, database_kinds, demo_server, emit, fresh_database, kind_of_url, machine_info, print_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="100,1000", help="Comma-separated batch sizes in runs; the first is the reference (default: %(default)s).")
    parser.add_argument("--turns", type=int, default=10, help="Assistant turns per run (default: %(default)s).")
    parser.add_argument("--concurrency", type=int, default=64, help="Batch concurrency (default: %(default)s).")
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds the demo server waits before each reply (default: %(default)s).")
    parser.add_argument("--json", type=Path, default=None, help="Append results as JSON lines to this file.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    add_server_argument(parser)
    add_database_arguments(parser, default="sqlite")
    return parser.parse_args()


def child(args: argparse.Namespace) -> None:
    """Run one batch in this process and print its peak RSS as JSON."""
    from hermitkit.config import build_config
    from hermitkit.runner import run_batch_async
    from hermitkit.store import Store

    runs = int(args.runs)
    models = DEMO_MODELS if runs % len(DEMO_MODELS) == 0 else DEMO_MODELS[:1]
    config = build_config(
        {
            "name": "bench-memory",
            "endpoint": {"base_url": args.base_url},
            "models": models,
            "runs": runs // len(models),
            "turns": args.turns,
            "judges": [JUDGE_MODEL],
            "seed": 1,
            "concurrency": args.concurrency,
        }
    )
    store = Store(args.url)
    started = time.perf_counter()
    outcome = asyncio.run(run_batch_async(config, store=store, progress=False))
    wall_s = time.perf_counter() - started
    if outcome.status != "completed":
        raise SystemExit(f"Batch {outcome.batch_id} ended as {outcome.status}: {outcome.message}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak_mib, "wall_s": wall_s}))


def measure(args: argparse.Namespace, base_url: str, url: str, runs: int) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--child", "--runs", str(runs), "--turns", str(args.turns),
        "--concurrency", str(args.concurrency), "--url", url, "--base-url", base_url,
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"The {runs}-run batch process failed with code {finished.returncode}: {finished.stderr.strip()[-2000:]}")
    child_result = json.loads(finished.stdout.strip().splitlines()[-1])
    return {"benchmark": "memory", "database": kind_of_url(url), "runs": runs, "turns": args.turns, "concurrency": args.concurrency, **child_result}


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return

    sizes = [int(value) for value in args.runs.split(",") if value.strip()]
    kinds = database_kinds(args.database)
    results = []
    with demo_server(args, args.latency) as base_url:
        for kind in kinds:
            reference = None
            for runs in sizes:
                with fresh_database(kind, args) as url:
                    row = measure(args, base_url, url, runs)
                reference = reference or row["peak_rss_mib"]
                row["vs_first"] = row["peak_rss_mib"] / reference
                results.append(row)

    machine = machine_info(args.postgres_url if "postgresql" in kinds else None)
    for row in results:
        row["machine"] = machine
        row["server_overhead_ms"] = args.server_overhead_ms
    print_table(results, ["database", "runs", "turns", "concurrency", "wall_s", "peak_rss_mib", "vs_first"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
