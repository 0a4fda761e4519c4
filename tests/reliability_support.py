"""Helpers shared by the reliability tests: configs, exactness checks, the CLI, request capture."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from hermitkit import demo
from hermitkit.config import BatchConfig, build_config
from hermitkit.protocol import Protocol, classify, next_user_message
from hermitkit.store import Batch, Judgement, Run, Store, Turn

SUBJECT_MODELS = ["demo/steady", "demo/wanderer", "demo/forgetful", "demo/confused"]
JUDGE = "demo/judge"


def fast_endpoint(base_url: str, **changes: Any) -> dict[str, Any]:
    """Endpoint settings with backoff waits small enough for tests."""
    endpoint = {"base_url": base_url, "backoff_base_s": 0.001, "backoff_max_s": 0.05, "timeout_s": 10.0, "max_retries": 4}
    endpoint.update(changes)
    return endpoint


def demo_config(base_url: str, **changes: Any) -> BatchConfig:
    data: dict[str, Any] = {
        "name": "reliability",
        "endpoint": fast_endpoint(base_url),
        "models": ["demo/steady"],
        "runs": 1,
        "turns": 3,
        "judges": [JUDGE],
        "seed": 5,
        "concurrency": 1,
    }
    data.update(changes)
    return build_config(data)


def write_params(path: Path, config: BatchConfig) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path


def hermitkit_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hermitkit.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def cli_env(database_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "HERMITKIT_DATABASE_URL": database_url, **extra}


def latest_batch_id(store: Store) -> int | None:
    return store.read(lambda session: session.scalar(select(Batch.id).order_by(Batch.id.desc()).limit(1)))


def batch_runs(store: Store, batch_id: int) -> list[Run]:
    return store.read(lambda session: list(session.scalars(select(Run).where(Run.batch_id == batch_id).order_by(Run.id))))


def run_turns(store: Store, run_id: int) -> list[Turn]:
    return store.read(lambda session: list(session.scalars(select(Turn).where(Turn.run_id == run_id).order_by(Turn.idx))))


def run_judgements(store: Store, run_id: int) -> list[Judgement]:
    return store.read(lambda session: list(session.scalars(select(Judgement).where(Judgement.run_id == run_id).order_by(Judgement.id))))


def transcripts(store: Store, batch_id: int) -> dict[tuple[str, int], list[tuple[str, str | None]]]:
    """Each run's messages as (role, content), keyed by (model, repetition)."""
    return {(run.model, run.repetition): [(turn.role, turn.content) for turn in run_turns(store, run.id)] for run in batch_runs(store, batch_id)}


def verdicts(store: Store, batch_id: int) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Each stored verdict's scores, keyed by (model, repetition, judge model)."""
    fields = ("status", "mirror_test", "self_awareness", "exploration_style", "sophistication", "autonomy", "topics", "context_loss")
    found: dict[tuple[str, int, str], dict[str, Any]] = {}
    for run in batch_runs(store, batch_id):
        for judgement in run_judgements(store, run.id):
            found[(run.model, run.repetition, judgement.judge_model)] = {name: getattr(judgement, name) for name in fields}
    return found


def assert_run_exact(store: Store, run: Run, protocol: Protocol, *, turns: int) -> None:
    """One completed run: ``turns`` replies, in order, each echo derived from the reply before it."""
    rows = run_turns(store, run.id)
    assistant = [row for row in rows if row.role == "assistant"]

    assert run.status == "completed", (run.id, run.status, run.error)
    assert [row.idx for row in rows] == list(range(len(rows))), run.id
    assert [row.role for row in rows] == ["user"] + ["assistant", "user"] * (turns - 1) + ["assistant"], run.id
    assert rows[0].content == protocol.initial_prompt
    assert [row.turn_number for row in assistant] == list(range(1, turns + 1)), run.id
    assert run.turn_count == turns

    # every echo is what the protocol derives from the reply before it
    for reply, echo in zip(rows[1::2], rows[2::2], strict=False):
        expected = next_user_message(protocol, classify(reply.content, protocol.extraction))
        assert echo.content == expected, (run.id, reply.idx)

    verdict_list = [classify(row.content, protocol.extraction).verdict for row in assistant]
    assert [row.verdict for row in assistant] == verdict_list, run.id
    assert run.ok_count == verdict_list.count("ok")
    assert run.missing_count == verdict_list.count("missing")
    assert run.empty_count == verdict_list.count("empty")
    assert run.multiple_count == verdict_list.count("multiple")
    assert run.unbalanced_count == verdict_list.count("unbalanced")


def assert_batch_exact(store: Store, batch_id: int, *, turns: int, judges: tuple[str, ...] = (JUDGE,)) -> None:
    """Every run is complete and exact, no reply is stored twice, every verdict is stored once."""
    protocol = Protocol(**store.read(lambda session: session.get(Batch, batch_id).protocol))
    runs = batch_runs(store, batch_id)
    assert runs, batch_id

    generation_ids: list[str] = []
    for run in runs:
        assert_run_exact(store, run, protocol, turns=turns)
        generation_ids += [row.generation_id for row in run_turns(store, run.id) if row.role == "assistant"]
        stored_judges = sorted(judgement.judge_model for judgement in run_judgements(store, run.id))
        assert stored_judges == sorted(judges), run.id

    # the demo server gives every reply its own id, so a reply stored twice shows up here
    assert None not in generation_ids
    assert len(set(generation_ids)) == len(generation_ids)


class RequestLog:
    """Chat request bodies received by every demo server in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []

    def for_model(self, model: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for body in self.bodies if body.get("model") == model]


@contextmanager
def recorded_requests() -> Iterator[RequestLog]:
    """Record the body of each chat request that a demo server in this process receives."""
    log = RequestLog()
    original = demo._Handler._handle_chat

    def handle_chat(handler: Any, body: Any) -> None:
        if isinstance(body, dict):
            with log.lock:
                log.bodies.append(body)
        original(handler, body)

    demo._Handler._handle_chat = handle_chat  # type: ignore[method-assign]
    try:
        yield log
    finally:
        demo._Handler._handle_chat = original  # type: ignore[method-assign]
