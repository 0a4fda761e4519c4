"""The batch lease: one process at a time sends a batch's requests, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select, update

from hermitkit import lease
from hermitkit.demo import DemoServer
from hermitkit.errors import BatchBusyError
from hermitkit.lease import Holder, acquire, release, renew
from hermitkit.rejudge import rejudge_batch
from hermitkit.runner import resume_batch, run_batch
from hermitkit.store import Batch, Run, Store, Turn, utcnow
from tests.test_runner import DEMO_MODELS, _config, assert_batch_exact

OTHER = Holder(token="a" * 32, host="lab-node-7", pid=4242)


def _add_batch(store: Store) -> int:
    def write(session: Any) -> int:
        now = utcnow()
        batch = Batch(name="b", config={"models": ["m"]}, protocol_id="p", protocol_hash="h" * 64, protocol={}, created_at=now, updated_at=now)
        session.add(batch)
        session.flush()
        return batch.id

    return store.write(write)


def _lease_of(store: Store, batch_id: int) -> tuple[Any, ...]:
    return store.read(lambda s: tuple(s.execute(select(Batch.lease_token, Batch.lease_host, Batch.lease_pid).where(Batch.id == batch_id)).one()))


def _assistant_turns(store: Store, batch_id: int) -> int:
    return store.read(lambda s: s.scalar(select(func.count()).select_from(Turn).join(Run, Run.id == Turn.run_id).where(Run.batch_id == batch_id, Turn.role == "assistant")))


def test_held_lease_names_holder(store: Store) -> None:
    batch_id = _add_batch(store)
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=OTHER))

    with pytest.raises(BatchBusyError) as caught:
        store.write(lambda s: acquire(s, batch_id=batch_id, holder=lease.this_process()))
    message = str(caught.value)
    assert f"Batch {batch_id} is already being run or judged by another process (pid 4242 on host lab-node-7)" in message
    assert f"hermitkit status {batch_id}" in message
    # A holder on another host can only be waited out.
    assert "UTC, in 60 s" in message or "UTC, in 59 s" in message
    assert (caught.value.host, caught.value.pid) == ("lab-node-7", 4242)
    assert caught.value.expires_at is not None

    # The holder itself may take the lease again and renew it, and nothing changes hands.
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=OTHER))
    assert store.write(lambda s: renew(s, batch_id=batch_id, holder=OTHER)) is True
    assert _lease_of(store, batch_id) == (OTHER.token, "lab-node-7", 4242)


def test_expired_lease_changes_hands(store: Store) -> None:
    batch_id = _add_batch(store)
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=OTHER, lease_s=-1.0))
    mine = lease.this_process()
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=mine))
    assert _lease_of(store, batch_id) == (mine.token, socket.gethostname(), os.getpid())

    # The old holder learns that it lost the lease, and its release leaves the new one alone.
    assert store.write(lambda s: renew(s, batch_id=batch_id, holder=OTHER)) is False
    store.write(lambda s: release(s, batch_id=batch_id, holder=OTHER))
    assert _lease_of(store, batch_id)[0] == mine.token

    store.write(lambda s: release(s, batch_id=batch_id, holder=mine))
    assert _lease_of(store, batch_id) == (None, None, None)


@pytest.mark.skipif(sys.platform == "win32", reason="a holder's process is checked only on POSIX")
def test_dead_local_holder_frees_lease(store: Store) -> None:
    batch_id = _add_batch(store)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = Holder(token="d" * 32, host=socket.gethostname(), pid=int(finished.stdout))
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=dead))
    store.write(lambda s: acquire(s, batch_id=batch_id, holder=lease.this_process()))

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            alive = Holder(token="e" * 32, host=socket.gethostname(), pid=sleeper.pid)
            store.write(lambda s: release(s, batch_id=batch_id, holder=lease.this_process()))
            store.write(lambda s: s.execute(update(Batch).where(Batch.id == batch_id).values(lease_token=None)))
            store.write(lambda s: acquire(s, batch_id=batch_id, holder=alive))
            with pytest.raises(BatchBusyError, match=f"pid {sleeper.pid} on host"):
                store.write(lambda s: acquire(s, batch_id=batch_id, holder=lease.this_process()))
        finally:
            sleeper.kill()


def _run_in_background(store: Store, config: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}
    created = threading.Event()

    def target() -> None:
        def on_created(batch_id: int) -> None:
            result["batch_id"] = batch_id
            created.set()

        result["outcome"] = run_batch(config, store=store, progress=False, on_created=on_created)

    thread = threading.Thread(target=target)
    thread.start()
    assert created.wait(30)
    return thread, result


def _wait_for_turns(store: Store, batch_id: int, turns: int) -> None:
    deadline = time.monotonic() + 60
    while _assistant_turns(store, batch_id) < turns:
        assert time.monotonic() < deadline, "the batch stored no turn"
        time.sleep(0.01)


def _wait_for_completed_run(store: Store, batch_id: int) -> None:
    deadline = time.monotonic() + 60
    while not store.read(lambda s: s.scalar(select(func.count()).select_from(Run).where(Run.batch_id == batch_id, Run.status == "completed"))):
        assert time.monotonic() < deadline, "no run of the batch completed"
        time.sleep(0.01)


def test_running_batch_rejects_resume_and_rejudge(store: Store) -> None:
    # Long enough (about 3 s) that the batch still runs when the calls below start, on a busy machine too.
    with DemoServer(latency_s=0.05) as server:
        thread, result = _run_in_background(store, _config(server.base_url, runs=3, turns=10, concurrency=2))
        batch_id = result["batch_id"]
        _wait_for_turns(store, batch_id, 2)
        budget_before = store.read(lambda s: s.get(Batch, batch_id).budget_usd)

        with pytest.raises(BatchBusyError, match=f"Batch {batch_id} is already being run or judged by this process \\(pid {os.getpid()}\\), from another thread") as caught:
            resume_batch(batch_id, store=store, budget_usd=5.0, progress=False)
        # A holder on this host frees the lease when it stops, so the message sets no time to wait.
        assert str(caught.value).endswith("or stop that process and try again.")
        # A rejudge pass only takes the lease when some run is finished and could be judged.
        _wait_for_completed_run(store, batch_id)
        with pytest.raises(BatchBusyError, match=f"Batch {batch_id} is already being run or judged by this process"):
            rejudge_batch(store, batch_id, "demo/judge")
        # The rejected resume did not store its new budget over the running batch's config.
        assert store.read(lambda s: s.get(Batch, batch_id).budget_usd) == budget_before

        thread.join(120)
        assert result["outcome"].status == "completed"
        # Each turn and verdict was requested once, because the rejected calls sent nothing.
        stats = server.stats()["chat_requests"]
        assert sum(count for model, count in stats.items() if model != "demo/judge") == len(DEMO_MODELS) * 3 * 10
        assert stats["demo/judge"] == len(DEMO_MODELS) * 3

        # The finished batch gave its lease back, so a resume runs (and has nothing to send).
        assert _lease_of(store, batch_id) == (None, None, None)
        assert resume_batch(batch_id, store=store, progress=False).status == "completed"
    assert_batch_exact(store, batch_id, turns=10)


def test_cli_resume_of_running_batch_rejected(database_url: str, tmp_path: Any) -> None:
    store = Store(database_url)
    # About 6 s, because the resume process needs a second or two to start.
    with DemoServer(latency_s=0.1) as server:
        thread, result = _run_in_background(store, _config(server.base_url, runs=3, turns=10, concurrency=2))
        batch_id = result["batch_id"]
        _wait_for_turns(store, batch_id, 1)
        env = {**os.environ, "HERMITKIT_DATABASE_URL": database_url}
        rejected = subprocess.run([sys.executable, "-m", "hermitkit.cli", "resume", str(batch_id), "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
        thread.join(120)
    assert rejected.returncode == 1, rejected.stderr
    assert f"Error: Batch {batch_id} is already being run or judged by another process (pid {os.getpid()} on host {socket.gethostname()})" in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert result["outcome"].status == "completed"


def test_lost_lease_stops_batch(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.05)
    with DemoServer(latency_s=0.05) as server:
        thread, result = _run_in_background(store, _config(server.base_url, runs=2, turns=20, concurrency=2))
        batch_id = result["batch_id"]
        _wait_for_turns(store, batch_id, 2)
        # What another process does once this one failed to renew for the whole lease.
        store.write(lambda s: s.execute(update(Batch).where(Batch.id == batch_id).values(lease_token=OTHER.token, lease_host=OTHER.host, lease_pid=OTHER.pid)))
        thread.join(120)

    outcome = result["outcome"]
    assert outcome.status == "interrupted"
    assert "another process took the batch over" in outcome.message
    assert _assistant_turns(store, batch_id) < len(DEMO_MODELS) * 2 * 20
    # The batch, its runs and the lease now belong to the other process, so none of them was rewritten.
    batch = store.read(lambda s: s.get(Batch, batch_id))
    assert (batch.status, batch.lease_token) == ("running", OTHER.token)
    statuses = store.read(lambda s: set(s.scalars(select(Run.status).where(Run.batch_id == batch_id)).all()))
    assert "cancelled" not in statuses


def test_status_shows_lease_state(database_url: str) -> None:
    store = Store(database_url)
    batch_id = _add_batch(store)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    holders = [
        (OTHER, 60.0, "lease: held by pid 4242 on host lab-node-7 until "),
        (OTHER, -1.0, "lease: left by pid 4242 on host lab-node-7, ran out at "),
        (Holder(token="d" * 32, host=socket.gethostname(), pid=dead_pid), 60.0, f"lease: left by pid {dead_pid} on host {socket.gethostname()}, which no longer runs"),
    ]
    env = {**os.environ, "HERMITKIT_DATABASE_URL": database_url}

    for holder, lease_s, expected in holders:
        store.write(lambda s: s.execute(update(Batch).where(Batch.id == batch_id).values(lease_token=None)))
        store.write(lambda s, holder=holder, lease_s=lease_s: acquire(s, batch_id=batch_id, holder=holder, lease_s=lease_s))
        status = subprocess.run([sys.executable, "-m", "hermitkit.cli", "status", str(batch_id)], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert expected in status.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_names_resume_and_frees_lease(database_url: str, tmp_path: Any) -> None:
    import signal

    from tests.test_runner import _write_params

    store = Store(database_url)
    env = {**os.environ, "HERMITKIT_DATABASE_URL": database_url}
    with DemoServer(latency_s=0.05) as server:
        params = _write_params(tmp_path, server.base_url, runs=3, turns=10, concurrency=2)
        process = subprocess.Popen([sys.executable, "-m", "hermitkit.cli", "run", str(params), "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not store.read(lambda s: s.scalar(select(func.count()).select_from(Turn).where(Turn.role == "assistant"))):
            assert time.monotonic() < deadline, "the batch stored no turn"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _stdout, stderr = process.communicate(timeout=60)

    batch_id = store.read(lambda s: s.scalar(select(func.max(Batch.id))))
    assert process.returncode != 0
    assert f"Interrupted. Batch {batch_id} keeps every stored turn, and `hermitkit resume {batch_id}` continues it." in stderr
    assert store.read(lambda s: s.get(Batch, batch_id).status) == "interrupted"
    assert _lease_of(store, batch_id) == (None, None, None)
    # No run stays marked running once its process has stopped.
    statuses = store.read(lambda s: set(s.scalars(select(Run.status).where(Run.batch_id == batch_id)).all()))
    assert "running" not in statuses
    assert "pending" in statuses


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_of_judge_names_rerun(sqlite_url: str) -> None:
    import signal

    from hermitkit.store import Judgement

    store = Store(sqlite_url)
    env = {**os.environ, "HERMITKIT_DATABASE_URL": sqlite_url}
    judge_command = [sys.executable, "-m", "hermitkit.cli", "judge", "latest", "--judge", "demo/judge", "--rounds", "2"]

    def second_round() -> int:
        return store.read(lambda s: s.scalar(select(func.count()).select_from(Judgement).where(Judgement.round == 1)))

    with DemoServer(model_latency_s={"demo/judge": 0.3}) as server:
        batch_id = run_batch(_config(server.base_url, runs=2, turns=2, concurrency=4), store=store, progress=False).batch_id
        process = subprocess.Popen(judge_command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not second_round():
            assert time.monotonic() < deadline, "the judge pass stored no verdict"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _stdout, stderr = process.communicate(timeout=60)
        assert 0 < second_round() < len(DEMO_MODELS) * 2

        finished = subprocess.run(judge_command, env=env, capture_output=True, text=True, timeout=120)

    assert "Interrupted. Every stored verdict stays. The same command with --rounds 2 judges just the runs that are left." in stderr
    assert _lease_of(store, batch_id) == (None, None, None)
    assert finished.returncode == 0, finished.stderr
    assert second_round() == len(DEMO_MODELS) * 2
