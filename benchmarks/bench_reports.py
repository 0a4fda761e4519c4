"""Reports: wall time and peak RSS of ``hermitkit report --format all`` on a large store.

Runs the command as a separate process on a store written by ``generate_store.py``.
``generate_store.py`` stores a synthesis and a persona per model, so the command
calls no judge and the time is that of reading the store and writing the files.

    python benchmarks/bench_reports.py --url sqlite:////tmp/hermitkit-bench/store.db
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, emit, kind_of_url, machine_info, print_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Database URL printed by generate_store.py.")
    parser.add_argument("--batch-id", default="latest", help="Batch to report on (default: %(default)s).")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of the command, each shown in the table (default: %(default)s).")
    parser.add_argument("--json", type=Path, default=None, help="Append results as JSON lines to this file.")
    return parser.parse_args()


def run_report(url: str, batch_id: str) -> tuple[float, float, int]:
    """Run the command once; return seconds, its peak RSS in MiB and the number of files written."""
    out_dir = Path(tempfile.mkdtemp(prefix="hermitkit-bench-report-"))
    command = [sys.executable, "-m", "hermitkit.cli", "report", batch_id, "--format", "all", "--out", str(out_dir), "--database-url", url]
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait4 returns the resource usage of this one child, so no other process mixes in.
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"hermitkit report failed with code {os.waitstatus_to_exitcode(status)}: {stderr.strip()[-2000:]}")
        return elapsed, usage.ru_maxrss / 1024, sum(1 for _ in out_dir.iterdir())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> None:
    args = parse_args()
    results: list[dict[str, Any]] = []
    for attempt in range(1, max(args.repeat, 1) + 1):
        seconds, peak_mib, files = run_report(args.url, args.batch_id)
        results.append({"benchmark": "reports", "database": kind_of_url(args.url), "run": attempt, "seconds": seconds, "peak_rss_mib": peak_mib, "files": files})

    machine = machine_info(args.url if kind_of_url(args.url) == "postgresql" else None)
    for row in results:
        row["machine"] = machine
    print_table(results, ["database", "run", "files", "seconds", "peak_rss_mib"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
