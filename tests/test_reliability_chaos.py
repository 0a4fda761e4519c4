"""Chaos: a batch is killed with SIGKILL again and again, resumed each time, and ends exact.

`hermitkit run` and then `hermitkit resume` run as subprocesses against a demo server in
this process. A seeded generator picks each kill point: either after a few more stored
rows (assistant turns plus verdicts), or while a judge request is in flight, which the
slow demo judge makes likely. At the end every run must have exactly the configured
turns, equal to a batch that was never killed, with no reply stored twice, one verdict
per run, and every stored reply traced to a request that the server received.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from hermitkit.demo import DemoServer
from hermitkit.runner import resume_batch, run_batch
from hermitkit.store import Store, normalize_database_url
from tests.reliability_support import (
    JUDGE,
    SUBJECT_MODELS,
    assert_batch_exact,
    batch_runs,
    cli_env,
    demo_config,
    hermitkit_cli,
    latest_batch_id,
    recorded_requests,
    run_judgements,
    run_turns,
    transcripts,
    verdicts,
    write_params,
)

KILLS = 22
MIN_JUDGE_PHASE_KILLS = 5
RUNS = 4
TURNS = 10
CONCURRENCY = 4
SEED = 20261204
CYCLE_TIMEOUT_S = 60
# Slow enough that a batch stores a few rows between two polls, so that 22 kill
# points fit into one batch before it finishes.
SUBJECT_LATENCY_S = 0.06

ROWS_SQL = text("SELECT (SELECT count(*) FROM turns WHERE role = 'assistant') + (SELECT count(*) FROM judgements)")
JUDGEMENTS_SQL = text("SELECT count(*) FROM judgements")


def _scalar(engine: Engine, query) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0)


def _kill_when(process: subprocess.Popen[bytes], ready) -> bool:  # type: ignore[no-untyped-def]
    """SIGKILL ``process`` once ``ready()`` is true. Returns False when it exited first."""
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.003)
    process.kill()
    process.wait()
    raise AssertionError(f"kill point not reached within {CYCLE_TIMEOUT_S} s: the batch stalled")


@pytest.mark.slow
def test_sigkill_chaos_then_resume(database_url, tmp_path):
    rng = random.Random(SEED)
    store = Store(database_url)
    # Plain connections for polling, so the poll never takes SQLite's write lock.
    poll = create_engine(normalize_database_url(database_url))
    env = cli_env(database_url)

    with recorded_requests() as requests, DemoServer(latency_s=SUBJECT_LATENCY_S, model_latency_s={JUDGE: 0.2}) as server:
        config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=RUNS, turns=TURNS, concurrency=CONCURRENCY)
        params = write_params(tmp_path / "params.yaml", config)

        def judge_requests() -> int:
            return server.stats()["chat_requests"].get(JUDGE, 0)

        batch_id: int | None = None
        kinds: Counter[str] = Counter()
        judge_lost = 0
        for _ in range(KILLS):
            kind = "judge" if rng.random() < 0.35 else "rows"
            target = _scalar(poll, ROWS_SQL) + rng.randint(1, 3)
            args = ["run", str(params)] if batch_id is None else ["resume", str(batch_id)]
            process = subprocess.Popen([sys.executable, "-m", "hermitkit.cli", *args, "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            if kind == "rows":
                killed = _kill_when(process, lambda: _scalar(poll, ROWS_SQL) >= target)
            else:
                lost = judge_lost
                killed = _kill_when(process, lambda: judge_requests() - lost > _scalar(poll, JUDGEMENTS_SQL))
            if not killed:
                break
            kinds[kind] += 1
            # a judge request in flight at the kill gets a reply that no process stores
            judge_lost = judge_requests() - _scalar(poll, JUDGEMENTS_SQL)
            batch_id = batch_id or latest_batch_id(store)

        assert batch_id is not None
        finished = hermitkit_cli("resume", str(batch_id), "--no-progress", env=env)
        assert finished.returncode == 0, finished.stdout + finished.stderr
        sent = list(requests.bodies)

        reference_store = Store(f"sqlite:///{tmp_path / 'reference.db'}")
        reference = run_batch(config, store=reference_store, progress=False)
    poll.dispose()

    kills = sum(kinds.values())
    assert kills >= 20, kinds
    assert kinds["judge"] >= MIN_JUDGE_PHASE_KILLS, kinds
    assert kinds["rows"] >= 10, kinds

    # exact, and the same as a batch that was never killed
    assert_batch_exact(store, batch_id, turns=TURNS)
    assert transcripts(store, batch_id) == transcripts(reference_store, reference.batch_id)
    assert verdicts(store, batch_id) == verdicts(reference_store, reference.batch_id)

    # every stored reply matches a request that the server received with exactly the stored history
    received = Counter()
    for body in sent:
        if body["model"] != JUDGE:
            received[(body["model"], body.get("seed"), tuple((m["role"], m["content"]) for m in body["messages"]))] += 1
    stored_turns = 0
    for run in batch_runs(store, batch_id):
        rows = run_turns(store, run.id)
        for row in rows:
            if row.role != "assistant":
                continue
            stored_turns += 1
            history = tuple((turn.role, turn.content) for turn in rows[: row.idx])
            assert received[(run.model, run.params["seed"], history)] >= 1, (run.id, row.idx)

    # requests in flight at a kill are sent but never stored, so they are sent again
    subject_sent = sum(received.values())
    assert stored_turns == len(SUBJECT_MODELS) * RUNS * TURNS
    assert 0 <= subject_sent - stored_turns <= kills * CONCURRENCY
    judge_sent = sum(1 for body in sent if body["model"] == JUDGE)
    assert 0 <= judge_sent - len(SUBJECT_MODELS) * RUNS <= kills * CONCURRENCY
    assert judge_sent > len(SUBJECT_MODELS) * RUNS


def _killed_batch(tmp_path, server: DemoServer) -> tuple[Store, int, dict[str, str]]:  # type: ignore[no-untyped-def]
    """A batch whose first process was killed after storing three rows."""
    database_url = f"sqlite:///{tmp_path / 'race.db'}"
    store = Store(database_url)
    poll = create_engine(database_url)
    env = cli_env(database_url)
    config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=2, turns=6, concurrency=4)
    params = write_params(tmp_path / "params.yaml", config)
    first = subprocess.Popen([sys.executable, "-m", "hermitkit.cli", "run", str(params), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(first, lambda: _scalar(poll, ROWS_SQL) >= 3)
    poll.dispose()
    batch_id = latest_batch_id(store)
    assert batch_id is not None
    return store, batch_id, env


def _missing_requests(store: Store, batch_id: int) -> int:
    runs = batch_runs(store, batch_id)
    turns = sum(run.turns_target - sum(1 for turn in run_turns(store, run.id) if turn.role == "assistant") for run in runs)
    return turns + sum(1 for run in runs if not run_judgements(store, run.id))


@pytest.mark.slow
def test_concurrent_resumes_pay_once(tmp_path):
    """Two processes resuming the same batch at once: the batch's lease lets one send, and the other sends nothing.

    The second either stops with an error that names the first, or starts after the
    first finished and finds nothing to send. Either way each missing request is sent
    exactly once.
    """
    with DemoServer(latency_s=0.02) as server:
        store, batch_id, env = _killed_batch(tmp_path, server)
        missing = _missing_requests(store, batch_id)
        sent_before = server.stats()["chat_requests_total"]

        racers = [
            subprocess.Popen([sys.executable, "-m", "hermitkit.cli", "resume", str(batch_id), "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [racer.communicate(timeout=300) for racer in racers]
        sent = server.stats()["chat_requests_total"] - sent_before

    finished = 0
    for racer, (stdout, stderr) in zip(racers, results, strict=True):
        assert "Traceback" not in stderr
        if racer.returncode == 0:
            finished += 1
        else:
            assert racer.returncode == 1, stdout + stderr
            assert f"Error: Batch {batch_id} is already being run or judged by another process" in stderr
    assert finished >= 1
    assert sent == missing
    assert_batch_exact(store, batch_id, turns=6)


@pytest.mark.slow
def test_racing_writers_store_once(tmp_path, monkeypatch):
    """Two resumes that both send, as after a lease ran out, race for every turn, and the store keeps one copy.

    The lease is switched off here, so both processes (two threads standing in for them)
    send every missing request and the unique (run_id, idx) key decides which reply stays.
    """
    from contextlib import asynccontextmanager

    from hermitkit import runner

    @asynccontextmanager
    async def no_lease(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        yield None

    monkeypatch.setattr(runner, "batch_lease", no_lease)
    monkeypatch.setattr(runner, "check_free", lambda session, batch_id: None)

    with DemoServer(latency_s=0.005) as server:
        store, batch_id, _env = _killed_batch(tmp_path, server)
        outcomes: list[str] = []
        racers = [threading.Thread(target=lambda: outcomes.append(resume_batch(batch_id, store=store, progress=False).status)) for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(300)

    assert outcomes == ["completed", "completed"]
    assert_batch_exact(store, batch_id, turns=6)
