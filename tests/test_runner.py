"""Batches end to end against the demo server over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select, text

from hermitkit.config import build_config
from hermitkit.demo import DemoServer, FaultRule
from hermitkit.errors import AuthenticationError, ConfigError
from hermitkit.protocol import classify
from hermitkit.runner import resume_batch, run_batch
from hermitkit.store import Batch, Judgement, Run, Store, Turn

DEMO_MODELS = ["demo/steady", "demo/wanderer", "demo/forgetful", "demo/confused"]


def _config(base_url: str, **changes):
    data = {
        "name": "test",
        "endpoint": {"base_url": base_url, "backoff_base_s": 0.001, "backoff_max_s": 0.05, "timeout_s": 10.0},
        "models": DEMO_MODELS,
        "runs": 2,
        "turns": 4,
        "judges": ["demo/judge"],
        "seed": 3,
        "concurrency": 4,
    }
    data.update(changes)
    return build_config(data)


def assert_batch_exact(store: Store, batch_id: int, turns: int, judges: int = 1) -> None:
    """Every run has exactly ``turns`` assistant turns, no duplicate, counts that match the text."""

    def read(session):  # type: ignore[no-untyped-def]
        runs = session.scalars(select(Run).where(Run.batch_id == batch_id)).all()
        for run in runs:
            rows = session.scalars(select(Turn).where(Turn.run_id == run.id).order_by(Turn.idx)).all()
            assistant = [row for row in rows if row.role == "assistant"]
            assert run.status == "completed", (run.id, run.status, run.error)
            assert len(assistant) == turns, run.id
            assert [row.idx for row in rows] == list(range(len(rows))), run.id
            assert [row.turn_number for row in assistant] == list(range(1, turns + 1))
            roles = [row.role for row in rows]
            assert roles == ["user", "assistant"] * turns, run.id
            assert run.turn_count == turns
            verdicts = [classify(row.content).verdict for row in assistant]
            assert [row.verdict for row in assistant] == verdicts
            assert run.ok_count == verdicts.count("ok")
            assert run.missing_count == verdicts.count("missing")
            assert run.multiple_count == verdicts.count("multiple")
            stored = session.scalar(select(func.count()).select_from(Judgement).where(Judgement.run_id == run.id))
            assert stored == judges, run.id
        return len(runs)

    assert store.read(read) > 0


def _chat_requests(server: DemoServer, *, judge: bool = False) -> int:
    counts = server.stats()["chat_requests"]
    return sum(count for model, count in counts.items() if (model == "demo/judge") == judge)


def test_batch_completes_and_is_exact(store):
    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url), store=store, progress=False)
        assert outcome.status == "completed"
        assert_batch_exact(store, outcome.batch_id, turns=4)
        assert _chat_requests(server) == len(DEMO_MODELS) * 2 * 4
        assert _chat_requests(server, judge=True) == len(DEMO_MODELS) * 2

        again = resume_batch(outcome.batch_id, store=store, progress=False)
        assert again.status == "completed"
        assert _chat_requests(server) == len(DEMO_MODELS) * 2 * 4
        assert _chat_requests(server, judge=True) == len(DEMO_MODELS) * 2


def test_batch_stores_usage_and_protocol(store):
    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url, models=["demo/steady"], runs=1, turns=2), store=store, progress=False)

    def read(session):  # type: ignore[no-untyped-def]
        batch = session.get(Batch, outcome.batch_id)
        run = session.scalars(select(Run).where(Run.batch_id == batch.id)).one()
        turn = session.scalars(select(Turn).where(Turn.run_id == run.id, Turn.role == "assistant")).first()
        return batch, run, turn

    batch, run, turn = store.read(read)
    assert batch.protocol_id == "hermitkit-v1"
    assert run.protocol_hash == batch.protocol_hash
    assert run.params["seed"] == 3
    assert run.cost_usd > 0
    assert turn.prompt_tokens > 0
    assert turn.provider == "hermitkit-demo"
    assert turn.generation_id.startswith("gen-demo-")
    assert turn.reasoning
    assert turn.latency_s >= 0


def test_faults_are_survived(store):
    faults = [
        FaultRule("429", model="demo/steady", every=3, retry_after=0.01),
        FaultRule("500", model="demo/wanderer", every=2),
        FaultRule("error200", model="demo/forgetful", every=3),
        FaultRule("null_content", model="demo/confused", every=2),
        FaultRule("502", model="demo/judge", first=1),
    ]
    with DemoServer(faults=faults) as server:
        outcome = run_batch(_config(server.base_url), store=store, progress=False)
        applied = server.stats()["faults_applied"]
    assert outcome.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=4)
    assert applied["429"] > 0
    assert applied["500"] > 0
    assert applied["error200"] > 0
    assert applied["null_content"] > 0


def test_null_content_is_missing_turn(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer(faults=[FaultRule("null_content", model="demo/steady")]) as server:
        outcome = run_batch(_config(server.base_url, models=["demo/steady"], runs=1, turns=2), store=store, progress=False)
    run = store.read(lambda s: s.scalars(select(Run).where(Run.batch_id == outcome.batch_id)).one())
    assert run.missing_count == 2
    assert run.ok_count == 0


def test_unauthorized_stops_batch(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer(faults=[FaultRule("401", model="demo/steady")]) as server:
        with pytest.raises(AuthenticationError) as info:
            run_batch(_config(server.base_url, models=["demo/steady"], runs=3, turns=3, concurrency=1), store=store, progress=False)
        assert _chat_requests(server) == 1
    assert "OPENROUTER_API_KEY" in str(info.value)
    batch = store.read(lambda s: s.scalars(select(Batch)).one())
    assert batch.status == "failed"
    assert "OPENROUTER_API_KEY" in batch.error


def test_unauthorized_model_list_creates_no_batch(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer(faults=[FaultRule("401")]) as server:
        with pytest.raises(AuthenticationError, match="OPENROUTER_API_KEY"):
            run_batch(_config(server.base_url), store=store, progress=False)
        assert server.stats()["chat_requests_total"] == 0
    assert store.read(lambda s: s.scalar(select(func.count()).select_from(Batch))) == 0


def test_unknown_model_sends_nothing(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer() as server:
        with pytest.raises(ConfigError, match="demo/stedy"):
            run_batch(_config(server.base_url, models=["demo/stedy"]), store=store, progress=False)
        assert server.stats()["chat_requests_total"] == 0
    assert store.read(lambda s: s.scalar(select(func.count()).select_from(Batch))) == 0


def test_context_length_ends_run(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer(context_length=400) as server:
        outcome = run_batch(_config(server.base_url, models=["demo/steady"], runs=1, turns=30), store=store, progress=False)
    run = store.read(lambda s: s.scalars(select(Run).where(Run.batch_id == outcome.batch_id)).one())
    assert run.status == "context_exhausted"
    assert 0 < run.turn_count < 30
    assert outcome.status == "completed"
    judgement = store.read(lambda s: s.scalars(select(Judgement)).one())
    assert judgement.status == "context_exhausted"
    assert judgement.autonomy is None


def test_budget_stops_and_resume_finishes(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url, budget_usd=0.0002, concurrency=1), store=store, progress=False)
        assert outcome.status == "budget_exhausted"
        sent = server.stats()["chat_requests_total"]
        assert sent < len(DEMO_MODELS) * 2 * 4

        finished = resume_batch(outcome.batch_id, store=store, budget_usd=10.0, progress=False)
    assert finished.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=4)


def test_cancel_leaves_resumable_batch(sqlite_url):
    store = Store(sqlite_url)
    cancel = threading.Event()
    seen: list[int] = []

    def on_event(event):  # type: ignore[no-untyped-def]
        if event["event"] == "turn":
            seen.append(1)
            if len(seen) == 5:
                cancel.set()

    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url, concurrency=2), store=store, progress=False, on_event=on_event, cancel=cancel)
        assert outcome.status == "cancelled"
        finished = resume_batch(outcome.batch_id, store=store, progress=False)
    assert finished.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=4)


def test_sync_api_inside_running_loop(sqlite_url):
    import asyncio

    store = Store(sqlite_url)

    async def notebook_cell():  # type: ignore[no-untyped-def]
        with DemoServer() as server:
            return run_batch(_config(server.base_url, models=["demo/steady"], runs=1, turns=2), store=store, progress=False)

    outcome = asyncio.run(notebook_cell())
    assert outcome.status == "completed"


def _write_params(tmp_path: Path, base_url: str, **changes) -> Path:
    config = _config(base_url, **changes).model_dump(mode="json")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _hermitkit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hermitkit.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def _count_assistant_turns(store: Store) -> int:
    return store.read(lambda s: s.scalar(select(func.count()).select_from(Turn).where(Turn.role == "assistant")))


@pytest.mark.parametrize("kill_after", [3, 17])
def test_sigkill_then_resume(database_url, tmp_path, kill_after):
    env = {**os.environ, "HERMITKIT_DATABASE_URL": database_url}
    store = Store(database_url)
    with DemoServer(latency_s=0.03) as server:
        params = _write_params(tmp_path, server.base_url, runs=3, turns=5)
        process = subprocess.Popen([sys.executable, "-m", "hermitkit.cli", "run", str(params), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _count_assistant_turns(store) < kill_after and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert _count_assistant_turns(store) < len(DEMO_MODELS) * 3 * 5

        batch_id = store.read(lambda s: s.scalar(select(func.max(Batch.id))))
        result = _hermitkit("resume", str(batch_id), "--no-progress", env=env)
        assert result.returncode == 0, result.stderr
    assert_batch_exact(store, batch_id, turns=5)


def test_cli_rejects_bad_values_before_sending(tmp_path):
    env = {**os.environ}
    with DemoServer() as server:
        for override, expected in [("turns=0", "turns = 0"), ("temperature=3", "temperature = 3"), ("models=[demo/nope]", "demo/nope")]:
            params = _write_params(tmp_path, server.base_url)
            result = _hermitkit("run", str(params), "--set", override, env=env)
            assert result.returncode != 0
            assert expected in result.stderr
        assert server.stats()["chat_requests_total"] == 0


def test_canary_key_leaks_nowhere(tmp_path, monkeypatch):
    canary_openrouter = "sk-or-v1-CANARY-openrouter-0123456789"
    canary_endpoint = "sk-CANARY-endpoint-9876543210"
    database = tmp_path / "canary.db"
    env = {**os.environ, "OPENROUTER_API_KEY": canary_openrouter, "MY_ENDPOINT_KEY": canary_endpoint, "HERMITKIT_DATABASE_URL": f"sqlite:///{database}"}
    with DemoServer(require_key=canary_endpoint) as server:
        params = _write_params(tmp_path, server.base_url, endpoint={"base_url": server.base_url, "api_key_env": "MY_ENDPOINT_KEY", "backoff_base_s": 0.001})
        result = _hermitkit("-vv", "run", str(params), "--no-progress", env=env)
        assert result.returncode == 0, result.stderr
        assert all(canary_openrouter not in header for header in server.received_authorization)
        export = _hermitkit("export", "1", "--format", "csv", "--out", str(tmp_path / "out"), env=env)
        assert export.returncode == 0, export.stderr
        shown = _hermitkit("show", "1", env=env)

    for canary in (canary_openrouter, canary_endpoint):
        assert canary not in result.stdout + result.stderr
        assert canary not in shown.stdout + shown.stderr
        for path in [database, *database.parent.glob("canary.db*"), *(tmp_path / "out").iterdir()]:
            assert canary.encode() not in path.read_bytes(), path


def test_each_repetition_gets_own_seed(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url, models=["demo/steady"], runs=3, turns=1, seed=10), store=store, progress=False)
    seeds = store.read(lambda s: s.scalars(select(Run.params).where(Run.batch_id == outcome.batch_id).order_by(Run.repetition)).all())
    assert [params["seed"] for params in seeds] == [10, 11, 12]


_REJECT_TURN_TWO = {
    "sqlite": [
        "CREATE TRIGGER reject_turn BEFORE INSERT ON turns WHEN NEW.role = 'assistant' AND NEW.turn_number = 2 "
        "BEGIN SELECT RAISE(ABORT, 'turn 2 rejected by a test trigger'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION reject_turn() RETURNS trigger AS $$ BEGIN "
        "IF NEW.role = 'assistant' AND NEW.turn_number = 2 THEN "
        "RAISE EXCEPTION 'turn 2 rejected by a test trigger' USING ERRCODE = 'check_violation'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER reject_turn BEFORE INSERT ON turns FOR EACH ROW EXECUTE FUNCTION reject_turn()",
    ],
}


def test_rejected_turn_fails_run_once(store: Store) -> None:
    # A turn that the database rejects for a reason other than a duplicate is requested once.
    with store.engine.begin() as connection:
        for statement in _REJECT_TURN_TWO[store.dialect]:
            connection.execute(text(statement))

    with DemoServer() as server:
        outcome = run_batch(_config(server.base_url, models=["demo/steady"], runs=2, turns=3), store=store, progress=False)
        requests = _chat_requests(server)
        judge_requests = _chat_requests(server, judge=True)

    runs = store.read(lambda session: list(session.scalars(select(Run).order_by(Run.id))))
    assert outcome.status == "failed"
    assert requests == 2 * 2
    assert judge_requests == 0
    assert [run.status for run in runs] == ["failed", "failed"]
    assert [run.turn_count for run in runs] == [1, 1]
    assert all("Turn 2 could not be stored" in run.error for run in runs)
    assert all("turn 2 rejected by a test trigger" in run.error for run in runs)
