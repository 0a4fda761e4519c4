"""The benchmark scripts run end to end with tiny sizes, so they keep working.

Nothing here checks a timing: the scripts only have to finish and print their table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from hermitkit import metrics

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *arguments: str, timeout_s: float = 300) -> str:
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=BENCHMARKS.parent,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_efficiency_script_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    output = run_script(
        "bench_efficiency.py", "--latency", "0.001", "--runs", "4", "--turns", "2", "--concurrency", "2",
        "--database", "sqlite", "--workdir", str(tmp_path), "--json", str(results),
    )

    header = next(line for line in output.splitlines() if line.startswith("| database"))
    assert "efficiency" in header
    rows = read_rows(results)
    assert [row["database"] for row in rows] == ["sqlite", "sqlite", "none (bare httpx)", "none (bare transport)"]
    assert [row["judging"] for row in rows] == [False, True, False, False]
    assert [row["requests"] for row in rows] == [8, 12, 8, 8]


def test_overhead_script_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    run_script("bench_overhead.py", "--runs", "2", "--turns", "2", "--concurrency", "1,2", "--repeat", "1", "--workdir", str(tmp_path), "--json", str(results))

    rows = read_rows(results)
    assert [row["concurrency"] for row in rows] == [1, 2]
    assert all(row["ratio"] > 0 for row in rows)
    assert all(row["ratio_transport"] > 0 for row in rows)


def test_memory_script_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    run_script("bench_memory.py", "--runs", "2,4", "--turns", "2", "--concurrency", "2", "--workdir", str(tmp_path), "--json", str(results))

    rows = read_rows(results)
    assert [row["runs"] for row in rows] == [2, 4]
    assert all(row["peak_rss_mib"] > 0 for row in rows)


@pytest.fixture
def small_store(tmp_path) -> str:
    path = tmp_path / "store.db"
    output = run_script("generate_store.py", "--runs", "4", "--turns", "3", "--models", "2", "--path", str(path))
    assert "4 runs, 12 assistant turns, 24 turn rows" in output
    return f"sqlite:///{path}"


def test_analysis_script_runs(small_store, tmp_path):
    results = tmp_path / "results.jsonl"
    run_script("bench_analysis.py", "--url", small_store, "--repeat", "1", "--json", str(results))

    rows = {row["task"]: row for row in read_rows(results)}
    assert set(rows) == {"plain_runs", "plain_turns", "summary_sql", "summary", "self_talk"}
    assert rows["summary"]["rows"] == 2
    assert rows["self_talk"]["rows"] == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tasks", "sumary"], "--tasks 'sumary' is invalid"),
        (["--url", "sqlite:////nonexistent/hermitkit/store.db"], "generate_store.py"),
    ],
)
def test_analysis_script_rejects_bad_arguments(small_store, arguments, message):
    url = [] if "--url" in arguments else ["--url", small_store]
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_analysis.py"), *url, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=BENCHMARKS.parent,
    )

    assert finished.returncode != 0
    assert message in finished.stderr


def test_reports_script_runs(small_store, tmp_path):
    results = tmp_path / "results.jsonl"
    run_script("bench_reports.py", "--url", small_store, "--repeat", "1", "--json", str(results))

    rows = read_rows(results)
    assert rows[0]["files"] > 0


def test_generated_store_has_consistent_counts(small_store):
    from sqlalchemy import func, select

    from hermitkit.store import Run, Store, Turn

    store = Store(small_store)

    def read(session):  # type: ignore[no-untyped-def]
        runs = session.execute(select(Run.id, Run.turn_count, Run.ok_count + Run.multiple_count + Run.unbalanced_count + Run.empty_count + Run.missing_count)).all()
        assistant = dict(session.execute(select(Turn.run_id, func.count()).where(Turn.role == "assistant").group_by(Turn.run_id)).all())
        return runs, assistant

    runs, assistant = store.read(read)
    store.dispose()
    for run_id, turn_count, verdict_total in runs:
        assert turn_count == 3
        assert verdict_total == 3
        assert assistant[run_id] == 3


@pytest.mark.parametrize("code", range(128))
def test_ascii_density_fast_path_matches_general_rule(code):
    text = f"a{chr(code)} b"
    visible = [char for char in text if not char.isspace() and unicodedata.category(char) not in ("Mn", "Cf")]
    symbols = sum(1 for char in visible if unicodedata.category(char).startswith("S") or metrics._is_emoji(char))

    assert metrics.symbol_density(text) == symbols / len(visible)
    assert metrics.emoji_density(text) == 0.0
