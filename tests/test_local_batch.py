"""A real batch on the bundled tiny Gemma model, judged by the demo judge."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hermitkit.config import build_config
from hermitkit.protocol import classify
from hermitkit.runner import run_batch
from hermitkit.store import Judgement, Run, Store, Turn
from tests.test_local import local_batch_params, skip_without_local_extra

pytestmark = [pytest.mark.local, skip_without_local_extra]


def test_tiny_model_batch_end_to_end(sqlite_url):
    store = Store(sqlite_url)
    config = build_config(local_batch_params(runs=2, turns=3))
    outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed"

    def read(session):  # type: ignore[no-untyped-def]
        runs = session.scalars(select(Run).where(Run.batch_id == outcome.batch_id)).all()
        turns = session.scalars(select(Turn).where(Turn.role == "assistant").order_by(Turn.run_id, Turn.idx)).all()
        judgements = session.scalars(select(Judgement)).all()
        return runs, turns, judgements

    runs, turns, judgements = store.read(read)
    assert len(runs) == 2
    assert len(turns) == 6
    assert len(judgements) == 2
    assert {run.params["seed"] for run in runs} == {7, 8}
    for run in runs:
        assert run.status == "completed"
        assert run.turn_count == 3
        assert run.cost_usd == 0.0
    for turn in turns:
        assert turn.provider == "llama.cpp"
        assert turn.completion_tokens > 0
        assert turn.prompt_tokens > 0
        assert turn.verdict == classify(turn.content).verdict
