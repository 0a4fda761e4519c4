"""Provider faults from the demo server, in the model phase and in the judge phase.

Every fault ends in a completed batch or a named status, never in a crash or a silently
wrong stored value, and a batch that stopped is finished by ``resume``. FAULT_TABLE is
the contract: fault x phase -> expected outcome. docs/reliability.md shows the same table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from hermitkit.demo import DemoServer, FaultRule
from hermitkit.errors import AuthenticationError, InsufficientCreditsError
from hermitkit.runner import resume_batch, run_batch
from hermitkit.store import Batch, Judgement, Run, Store, Turn
from tests.reliability_support import (
    JUDGE,
    SUBJECT_MODELS,
    RequestLog,
    assert_batch_exact,
    batch_runs,
    demo_config,
    fast_endpoint,
    recorded_requests,
    run_judgements,
    run_turns,
    transcripts,
)

TURNS = 3
MODELS = ["demo/steady", "demo/wanderer"]
TARGET = "demo/steady"

# fault kind -> (outcome in the model phase, outcome in the judge phase).
# In the model phase the fault hits the second request of demo/steady, which is its turn 2.
# In the judge phase it hits the first judge request.
FAULT_TABLE: dict[str, tuple[str | None, str]] = {
    "429": ("retried", "retried"),
    "429-date": ("retried", "retried"),
    "500": ("retried", "retried"),
    "502": ("retried", "retried"),
    "503": ("retried", "retried"),
    "slow": ("retried", "retried"),
    "reset": ("retried", "retried"),
    "error200": ("retried", "retried"),
    "malformed_json": ("retried", "retried"),
    "null_content": ("empty_reply", "repaired"),
    "empty_content": ("empty_reply", "repaired"),
    "absent_content": ("empty_reply", "repaired"),
    "judge_truncated": (None, "truncation_retried"),
    "400": ("run_failed", "judge_failed"),
    "403": ("run_failed", "judge_failed"),
    "401": ("batch_stopped", "batch_stopped"),
    "402": ("batch_stopped", "batch_stopped"),
    "context_length": ("context_exhausted", "judge_context_exhausted"),
}

CASES = [(fault, phase, outcomes[index]) for fault, outcomes in FAULT_TABLE.items() for index, phase in enumerate(("model", "judge")) if outcomes[index] is not None]

# The timeout case: the server delays the reply longer than the client waits.
CLIENT_TIMEOUT_S = 0.3
SLOW_REPLY_S = 1.5


def _rule(fault: str, phase: str) -> FaultRule:
    options: dict[str, Any] = {}
    if fault == "slow":
        options["delay_s"] = SLOW_REPLY_S
    if fault.startswith("429"):
        options["retry_after"] = 0.0
    if phase == "model":
        return FaultRule(fault, model=TARGET, every=2, first=2, **options)
    return FaultRule(fault, model=JUDGE, first=1, **options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], list[tuple[str, str | None]]]:
    """Transcripts of the same batch without any fault."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('reference') / 'reference.db'}")
    with DemoServer() as server:
        outcome = run_batch(demo_config(server.base_url, models=MODELS, turns=TURNS), store=store, progress=False)
    return transcripts(store, outcome.batch_id)


@pytest.fixture
def requests_seen() -> Iterator[RequestLog]:
    with recorded_requests() as log:
        yield log


def _store(tmp_path) -> Store:  # type: ignore[no-untyped-def]
    return Store(f"sqlite:///{tmp_path / 'faults.db'}")


def _batch(store: Store, batch_id: int) -> Batch:
    return store.read(lambda session: session.get(Batch, batch_id))


def _run(store: Store, batch_id: int, model: str) -> Run:
    return next(run for run in batch_runs(store, batch_id) if run.model == model)


@pytest.mark.parametrize(("fault", "phase", "expected"), CASES, ids=[f"{fault}-{phase}" for fault, phase, _ in CASES])
def test_fault_table(fault, phase, expected, tmp_path, reference, requests_seen):
    store = _store(tmp_path)

    with DemoServer(faults=[_rule(fault, phase)]) as server:
        endpoint = fast_endpoint(server.base_url, timeout_s=CLIENT_TIMEOUT_S if fault == "slow" else 10.0)
        config = demo_config(server.base_url, models=MODELS, turns=TURNS, endpoint=endpoint)
        created: list[int] = []
        error: Exception | None = None
        try:
            outcome = run_batch(config, store=store, progress=False, on_created=created.append)
        except (AuthenticationError, InsufficientCreditsError) as exc:
            error, outcome = exc, None
        batch_id = created[0]
        stats = server.stats()

        CHECKS[expected](store=store, batch_id=batch_id, outcome=outcome, error=error, fault=fault, stats=stats, requests=requests_seen, reference=reference)

        # whatever happened, resume finishes the batch exactly
        finished = resume_batch(batch_id, store=store, progress=False)
    assert finished.status == "completed", finished.message
    if expected != "context_exhausted":
        assert_batch_exact(store, batch_id, turns=TURNS)


def _check_retried(*, store, batch_id, outcome, stats, reference, fault, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    assert stats["faults_applied"].get(fault, 0) >= 1
    assert_batch_exact(store, batch_id, turns=TURNS)

    # a failed reply, such as a 200 that carries an error object, is never stored
    assert transcripts(store, batch_id) == reference
    for run in batch_runs(store, batch_id):
        judgements = run_judgements(store, run.id)
        assert [judgement.status for judgement in judgements] == ["ok"]
        assert judgements[0].attempts == 1


def _check_empty_reply(*, store, batch_id, outcome, fault, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    assert_batch_exact(store, batch_id, turns=TURNS)

    run = _run(store, batch_id, TARGET)
    turn = next(row for row in run_turns(store, run.id) if row.turn_number == 2)
    assert turn.verdict == "missing"
    assert turn.content in (None, "")
    if fault == "absent_content":
        # the demo server moves the reply text, braces included, into `reasoning`,
        # which is stored apart and never searched for braces
        assert "{" in turn.reasoning
    assert run.missing_count >= 1


def _check_repaired(*, store, batch_id, outcome, requests, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    first = batch_runs(store, batch_id)[0]
    judgement = run_judgements(store, first.id)[0]
    assert judgement.status == "ok"
    assert judgement.attempts == 2
    assert judgement.raw_reply in (None, "")
    assert judgement.repair_reply
    assert judgement.failure_reason is None
    assert len(requests.for_model(JUDGE)) == len(MODELS) + 1


def _check_truncation_retried(*, store, batch_id, outcome, requests, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    first = batch_runs(store, batch_id)[0]
    judgement = run_judgements(store, first.id)[0]
    assert judgement.status == "ok"
    assert judgement.truncated is True
    assert judgement.attempts == 2
    assert judgement.retry_reply

    # the retry requests twice the token budget
    budgets = [body["max_tokens"] for body in requests.for_model(JUDGE)]
    configured = demo_config("http://127.0.0.1:1").judge_max_tokens
    assert budgets[:2] == [configured, 2 * configured]


def _check_run_failed(*, store, batch_id, outcome, fault, stats, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "failed"
    assert "did not finish" in outcome.message
    assert f"hermitkit resume {batch_id}" in outcome.message

    run = _run(store, batch_id, TARGET)
    assert run.status == "failed"
    assert f"HTTP {fault}" in run.error
    assert run.turn_count == 1
    # a 4xx other than 408 and 429 is not retried
    assert stats["chat_requests"][TARGET] == 2
    assert _run(store, batch_id, "demo/wanderer").status == "completed"


def _check_judge_failed(*, store, batch_id, outcome, stats, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "failed"
    assert "verdict(s) are missing" in outcome.message
    assert stats["chat_requests"][JUDGE] == len(MODELS)
    judged = [len(run_judgements(store, run.id)) for run in batch_runs(store, batch_id)]
    assert sorted(judged) == [0, 1]


def _check_batch_stopped(*, store, batch_id, outcome, error, fault, stats, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome is None
    assert error is not None
    expected_fix = "API key" if fault == "401" else "credits"
    assert expected_fix in str(error)
    assert f"hermitkit resume {batch_id}" in str(error)
    assert "stored turns are kept" in str(error)

    batch = _batch(store, batch_id)
    assert batch.status == "failed"
    assert expected_fix in batch.error

    # exactly one request got the fault and nothing was sent after it
    assert stats["faults_applied"][fault] == 1
    stored = store.read(lambda session: session.scalar(select(Run.turn_count).where(Run.batch_id == batch_id, Run.model == TARGET)))
    if stats["chat_requests"].get(JUDGE):
        assert stats["chat_requests"] == {TARGET: TURNS, JUDGE: 1}
        assert stored == TURNS
    else:
        assert stats["chat_requests"] == {TARGET: 2}
        assert stored == 1


def _check_context_exhausted(*, store, batch_id, outcome, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    run = _run(store, batch_id, TARGET)
    assert run.status == "context_exhausted"
    assert run.turn_count == 1
    assert "context" in run.error
    assert _run(store, batch_id, "demo/wanderer").status == "completed"
    # the run's one turn is still judged
    assert [judgement.status for judgement in run_judgements(store, run.id)] == ["ok"]


def _check_judge_context_exhausted(*, store, batch_id, outcome, stats, **_: Any) -> None:  # type: ignore[no-untyped-def]
    assert outcome.status == "completed", outcome.message
    statuses = sorted(judgement.status for run in batch_runs(store, batch_id) for judgement in run_judgements(store, run.id))
    assert statuses == ["context_exhausted", "ok"]
    # asking again cannot help, so the failure is stored and not retried
    assert stats["chat_requests"][JUDGE] == len(MODELS)
    failed = store.read(lambda session: session.scalars(select(Judgement).where(Judgement.status == "context_exhausted")).one())
    assert failed.autonomy is None
    assert failed.failure_reason == "context_length"


CHECKS = {
    "retried": _check_retried,
    "empty_reply": _check_empty_reply,
    "repaired": _check_repaired,
    "truncation_retried": _check_truncation_retried,
    "run_failed": _check_run_failed,
    "judge_failed": _check_judge_failed,
    "batch_stopped": _check_batch_stopped,
    "context_exhausted": _check_context_exhausted,
    "judge_context_exhausted": _check_judge_context_exhausted,
}


def test_fault_table_covers_every_status_fault():
    required = {"429", "429-date", "500", "502", "503", "slow", "reset", "error200", "malformed_json", "null_content", "empty_content", "absent_content", "judge_truncated", "401", "402", "context_length"}
    assert required <= set(FAULT_TABLE)
    assert set(CHECKS) >= {outcome for pair in FAULT_TABLE.values() for outcome in pair if outcome}


@pytest.mark.parametrize(("kind", "retry_after", "backoff_max_s", "expected_wait"), [("429", 0.25, 5.0, 0.25), ("429-date", 30.0, 0.3, 0.3)])
def test_retry_after_is_honoured(kind, retry_after, backoff_max_s, expected_wait, tmp_path, caplog):
    """The logged wait follows Retry-After (capped by backoff_max_s), not the tiny backoff."""
    store = _store(tmp_path)
    caplog.set_level(logging.WARNING, logger="hermitkit.client")
    with DemoServer(faults=[FaultRule(kind, model=TARGET, first=1, retry_after=retry_after)]) as server:
        config = demo_config(server.base_url, turns=1, endpoint=fast_endpoint(server.base_url, backoff_max_s=backoff_max_s))
        outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed"

    waits = [float(match) for match in re.findall(r"waiting ([0-9.]+) s", caplog.text)]
    assert len(waits) == 1
    assert expected_wait - 0.01 <= waits[0] <= expected_wait + 0.01


def test_error_200_persisting_fails_run_without_storing_it(tmp_path):
    store = _store(tmp_path)
    with DemoServer(faults=[FaultRule("error200", model=TARGET, every=1, first=3)]) as server:
        config = demo_config(server.base_url, models=MODELS, endpoint=fast_endpoint(server.base_url, max_retries=2))
        outcome = run_batch(config, store=store, progress=False)
        assert outcome.status == "failed"
        run = _run(store, outcome.batch_id, TARGET)
        assert run.status == "failed"
        assert "error in the body" in run.error
        assert [row.role for row in run_turns(store, run.id)] == ["user"]

        finished = resume_batch(outcome.batch_id, store=store, progress=False)
    assert finished.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=TURNS)
    contents = store.read(lambda session: list(session.scalars(select(Turn.content))))
    assert not any("Upstream provider returned an error" in (content or "") for content in contents)


def test_more_runs_than_connections(tmp_path, caplog):
    """40 concurrent runs over a pool of 4 connections wait for a connection instead of failing."""
    store = _store(tmp_path)
    caplog.set_level(logging.WARNING)
    with DemoServer(latency_s=0.01) as server:
        config = demo_config(
            server.base_url,
            models=SUBJECT_MODELS,
            runs=10,
            turns=2,
            concurrency=40,
            endpoint=fast_endpoint(server.base_url, max_connections=4, timeout_s=5.0, max_retries=0),
        )
        outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed", outcome.message
    assert outcome.run_statuses == {"completed": 40}
    assert_batch_exact(store, outcome.batch_id, turns=2)
    assert all(run.error is None for run in batch_runs(store, outcome.batch_id))
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING and record.name.startswith("hermitkit")]


def _costs_in_order(store: Store, batch_id: int) -> list[float]:
    def read(session):  # type: ignore[no-untyped-def]
        turns = session.execute(
            select(Turn.created_at, Turn.id, Turn.cost_usd).join(Run, Run.id == Turn.run_id).where(Run.batch_id == batch_id, Turn.role == "assistant")
        ).all()
        judgements = session.execute(
            select(Judgement.created_at, Judgement.id, Judgement.cost_usd).join(Run, Run.id == Judgement.run_id).where(Run.batch_id == batch_id)
        ).all()
        return [(created, kind, row_id, cost) for kind, rows in (("turn", turns), ("judgement", judgements)) for created, row_id, cost in rows]

    return [cost for *_, cost in sorted(store.read(read))]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_stops_sending_and_resume_finishes(concurrency, tmp_path):
    store = _store(tmp_path)
    budget = 0.0006
    with DemoServer() as server:
        config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=2, turns=4, concurrency=concurrency, budget_usd=budget)
        outcome = run_batch(config, store=store, progress=False)
        sent = server.stats()["chat_requests_total"]

        assert outcome.status == "budget_exhausted"
        assert f"hermitkit resume {outcome.batch_id} --budget-usd" in outcome.message
        assert _batch(store, outcome.batch_id).status == "budget_exhausted"
        costs = _costs_in_order(store, outcome.batch_id)
        assert sum(costs) >= budget
        # Every request was sent while the spend was below the budget. Requests already in
        # flight when it was reached may finish, at most one per other worker.
        assert sent == len(costs)
        running = 0.0
        crossed_at = None
        for index, cost in enumerate(costs):
            running += cost
            if running >= budget and crossed_at is None:
                crossed_at = index
        assert len(costs) - 1 - crossed_at <= concurrency - 1

        # resuming with the same budget sends nothing
        again = resume_batch(outcome.batch_id, store=store, progress=False)
        assert again.status == "budget_exhausted"
        assert server.stats()["chat_requests_total"] == sent

        finished = resume_batch(outcome.batch_id, store=store, budget_usd=1.0, progress=False)
    assert finished.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=4)


def test_context_length_error_ends_only_that_run(tmp_path):
    store = _store(tmp_path)
    with DemoServer(faults=[FaultRule("context_length", model="demo/forgetful", every=3)]) as server:
        config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=2, turns=5, concurrency=4)
        outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed"
    for run in batch_runs(store, outcome.batch_id):
        if run.model == "demo/forgetful":
            assert run.status == "context_exhausted"
            assert run.turn_count < 5
        else:
            assert run.status == "completed"
            assert run.turn_count == 5
        assert len(run_judgements(store, run.id)) == 1
