"""Store operations of the runner: exchanges that complete a run, and the judge's inputs."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
from sqlalchemy import JSON, Text, cast, select, text
from sqlalchemy.exc import DataError, IntegrityError

from hermitkit import batches
from hermitkit.client import ChatReply, ModelInfo
from hermitkit.config import build_config
from hermitkit.demo import DemoServer
from hermitkit.judge import JudgeOutcome, Verdict
from hermitkit.protocol import classify
from hermitkit.runner import resume_batch
from hermitkit.store import Judgement, ModelRecord, Run, Store, Turn


def _new_run(store: Store, turns: int = 2) -> tuple[int, int, str]:
    config = build_config(
        {
            "name": "batches",
            "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
            "models": ["demo/steady"],
            "runs": 1,
            "turns": turns,
            "judges": ["demo/judge"],
        }
    )
    protocol = config.load_protocol()
    batch_id = store.write(partial(batches.create_batch, config=config, protocol=protocol, endpoint="http://127.0.0.1:9/v1", is_demo=True))
    run_id = store.read(partial(batches.pending_work, batch_id=batch_id, judges=[]))[0].run_id
    store.write(partial(batches.begin_run, run_id=run_id, initial_prompt=protocol.initial_prompt))
    return batch_id, run_id, protocol.initial_prompt


def _exchange(store: Store, run_id: int, turn_number: int, *, completes_run: bool) -> None:
    content = f"A thought. {{step {turn_number}}}"
    reply = ChatReply(content=content, prompt_tokens=10, completion_tokens=4, cost_usd=0.001, latency_s=0.01)
    store.write(
        partial(
            batches.add_exchange,
            run_id=run_id,
            idx=2 * turn_number - 1,
            turn_number=turn_number,
            reply=reply,
            cost_usd=0.001,
            classification=classify(content),
            echo=None if completes_run else f"step {turn_number}",
            completes_run=completes_run,
        )
    )


def _failed_outcome() -> JudgeOutcome:
    return JudgeOutcome(
        status="parse_failed",
        verdict=None,
        raw_reply="not json",
        repair_reply=None,
        failure=None,
        attempts=1,
        truncated=False,
        prompt_tokens=None,
        completion_tokens=None,
        cost_usd=None,
        sampling={},
    )


def _run(store: Store, run_id: int) -> Run:
    return store.read(lambda session: session.scalars(select(Run).where(Run.id == run_id)).one())


def test_last_exchange_completes_run(store: Store) -> None:
    _, run_id, _ = _new_run(store)

    _exchange(store, run_id, 1, completes_run=False)
    middle = _run(store, run_id)
    _exchange(store, run_id, 2, completes_run=True)
    last = _run(store, run_id)

    assert middle.status == "running"
    assert middle.finished_at is None
    assert last.status == "completed"
    assert last.finished_at is not None
    assert last.error is None
    assert last.turn_count == 2
    assert last.ok_count == 2


def test_merged_exchanges_complete_only_their_runs(store: Store) -> None:
    _, first, _ = _new_run(store, turns=1)
    _, second, _ = _new_run(store, turns=2)
    reply = ChatReply(content="{a}", prompt_tokens=1, completion_tokens=1)
    exchanges = [
        dict(run_id=first, idx=1, turn_number=1, reply=reply, cost_usd=None, classification=classify("{a}"), echo=None, completes_run=True),
        dict(run_id=second, idx=1, turn_number=1, reply=reply, cost_usd=None, classification=classify("{a}"), echo="a", completes_run=False),
    ]

    store.write(lambda session: batches.add_exchanges(session, exchanges))

    assert _run(store, first).status == "completed"
    assert _run(store, second).status == "running"
    assert exchanges[0]["completes_run"] is True


def test_judge_inputs_pending_and_transcript(store: Store) -> None:
    _, run_id, prompt = _new_run(store)
    _exchange(store, run_id, 1, completes_run=False)
    _exchange(store, run_id, 2, completes_run=True)

    pending, transcript, counts = store.read(partial(batches.judge_inputs, run_id=run_id, judges=["demo/judge", "other/judge"]))

    assert pending == ["demo/judge", "other/judge"]
    assert [row["role"] for row in transcript] == ["user", "assistant", "user", "assistant"]
    assert transcript[0]["content"] == prompt
    assert counts["turns"] == 2
    assert counts["ok"] == 2
    assert counts["compliance_rate"] == 1.0


def test_judge_inputs_skip_judged_run(store: Store) -> None:
    _, run_id, _ = _new_run(store, turns=1)
    _exchange(store, run_id, 1, completes_run=True)
    outcome = _failed_outcome()
    store.write(partial(batches.add_judgement, run_id=run_id, judge_model="demo/judge", round_=0, outcome=outcome))

    assert store.read(partial(batches.judge_inputs, run_id=run_id, judges=["demo/judge"])) == ([], [], {})
    pending, transcript, _ = store.read(partial(batches.judge_inputs, run_id=run_id, judges=["demo/judge", "other/judge"]))
    assert pending == ["other/judge"]
    assert len(transcript) == 2


def test_resume_completes_run_with_all_turns(store: Store) -> None:
    # A process killed after the last exchange of a run but before the run was marked
    # completed (the behaviour of earlier versions) leaves a full run that is "running".
    batch_id, run_id, _ = _new_run(store)
    _exchange(store, run_id, 1, completes_run=False)
    _exchange(store, run_id, 2, completes_run=False)
    assert _run(store, run_id).status == "running"

    with DemoServer(port=0) as server:
        store.write(lambda session: _point_batch_at(session, batch_id, server.base_url))
        outcome = resume_batch(batch_id, store=store, progress=False)
        chat_requests = server.stats()["chat_requests"]

    assert outcome.status == "completed"
    assert _run(store, run_id).status == "completed"
    assert chat_requests.get("demo/steady", 0) == 0
    assert chat_requests.get("demo/judge", 0) == 1


def _point_batch_at(session, batch_id: int, base_url: str) -> None:  # type: ignore[no-untyped-def]
    from hermitkit.store import Batch

    batch = session.get(Batch, batch_id)
    config = dict(batch.config)
    config["endpoint"] = {**config["endpoint"], "base_url": base_url}
    batch.config = config


def _turn_rows(store: Store, run_id: int) -> list[tuple[object, ...]]:
    columns = [column for column in Turn.__table__.c if column.name not in ("id", "run_id", "created_at")]
    return store.read(lambda session: [tuple(row) for row in session.execute(select(*columns).where(Turn.run_id == run_id).order_by(Turn.idx))])


def _counts(store: Store, run_id: int) -> tuple[object, ...]:
    run = _run(store, run_id)
    return (run.status, run.error, run.finished_at is not None, run.turn_count, run.ok_count, run.multiple_count, run.unbalanced_count,
            run.empty_count, run.missing_count, run.prompt_tokens, run.completion_tokens, run.reasoning_tokens, round(run.cost_usd, 9))


def test_postgresql_statement_matches_add_exchanges(postgres_url: str) -> None:
    store = Store(postgres_url)
    replies = [
        ChatReply(content="{a} and {b}", reasoning="thinking", finish_reason="stop", prompt_tokens=12, completion_tokens=5, reasoning_tokens=3,
                  latency_s=0.25, generation_id="gen-1", provider="Provider", served_model="demo/steady-0"),
        ChatReply(content="", finish_reason="length"),
        ChatReply(content="no braces at all", prompt_tokens=7, completion_tokens=2),
    ]
    by_statement: list[int] = []
    by_executemany: list[int] = []
    for runs in (by_statement, by_executemany):
        for _ in replies:
            runs.append(_new_run(store, turns=2)[1])

    def exchanges(run_ids: list[int]) -> list[dict[str, object]]:
        return [
            dict(run_id=run_id, idx=1, turn_number=1, reply=reply, cost_usd=0.25 if index == 0 else None, classification=classify(reply.content or ""),
                 echo=None if index == 1 else "a", completes_run=index == 1)
            for index, (run_id, reply) in enumerate(zip(run_ids, replies, strict=True))
        ]

    def run_statement(session: object) -> None:
        statement = batches.add_exchanges_statement(exchanges(by_statement))
        assert statement.results is None
        session.execute(statement.statement, statement.parameters)  # type: ignore[attr-defined]

    store.write(run_statement)
    store.write(lambda session: batches.add_exchanges(session, exchanges(by_executemany)))

    for left, right in zip(by_statement, by_executemany, strict=True):
        assert _turn_rows(store, left) == _turn_rows(store, right)
        assert _counts(store, left) == _counts(store, right)
    assert _counts(store, by_statement[1])[0] == "completed"
    assert _counts(store, by_statement[0])[0] == "running"
    store.dispose()


def test_postgresql_statement_rejects_bad_rows(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the cut of metadata to its column, so that the statement's own check is tested.
    monkeypatch.setattr(batches, "_fit", lambda value, column: value)
    store = Store(postgres_url)
    _, run_id, _ = _new_run(store, turns=3)
    reply = ChatReply(content="{a}", prompt_tokens=1, completion_tokens=1)

    def write(idx: int, served_model: str) -> None:
        long_reply = ChatReply(content=reply.content, served_model=served_model)
        exchange = dict(run_id=run_id, idx=idx, turn_number=1, reply=long_reply, cost_usd=None, classification=classify("{a}"), echo="a")
        statement = batches.add_exchanges_statement([exchange])
        store.write(lambda session: session.execute(statement.statement, statement.parameters))

    write(1, "demo/steady")
    with pytest.raises(IntegrityError):
        write(1, "demo/steady")
    # A value longer than its column fails as it would in a plain INSERT, and is never cut short.
    with pytest.raises(DataError):
        write(3, "m" * 301)

    assert _run(store, run_id).turn_count == 1
    assert [row[0] for row in _turn_rows(store, run_id)] == [0, 1, 2]
    store.dispose()


def test_postgresql_statement_keeps_non_finite_floats(postgres_url: str) -> None:
    # JSON has no number for NaN or infinity, so the statement sends them as strings.
    store = Store(postgres_url)
    _, run_id, _ = _new_run(store, turns=2)
    reply = ChatReply(content="{a}", latency_s=float("inf"))
    exchange = dict(run_id=run_id, idx=1, turn_number=1, reply=reply, cost_usd=float("nan"), classification=classify("{a}"), echo="a")

    statement = batches.add_exchanges_statement([exchange])
    store.write(lambda session: session.execute(statement.statement, statement.parameters))

    stored = store.read(lambda session: session.execute(select(Turn.cost_usd, Turn.latency_s).where(Turn.run_id == run_id, Turn.idx == 1)).one())
    assert math.isnan(stored.cost_usd)
    assert stored.latency_s == float("inf")
    assert math.isnan(_run(store, run_id).cost_usd)
    store.dispose()


def test_long_reply_metadata_is_cut_to_fit(store: Store) -> None:
    _, run_id, _ = _new_run(store, turns=2)
    reply = ChatReply(content="{a}", finish_reason="f" * 65, generation_id="g" * 201, provider="p" * 201, served_model="m" * 301)

    store.write(partial(batches.add_exchange, run_id=run_id, idx=1, turn_number=1, reply=reply, cost_usd=None, classification=classify("{a}"), echo="a"))

    stored = store.read(lambda session: session.execute(
        select(Turn.finish_reason, Turn.generation_id, Turn.provider, Turn.served_model).where(Turn.run_id == run_id, Turn.idx == 1)).one())
    assert stored.finish_reason == "f" * 64
    assert stored.generation_id == "g" * 200
    assert stored.provider == "p" * 200
    assert stored.served_model == "m" * 300


def test_upsert_models_cuts_long_name(store: Store) -> None:
    info = ModelInfo(id="vendor/long", name="n" * 600, context_length=None, prompt_price=None, completion_price=None)

    store.write(partial(batches.upsert_models, endpoint="http://127.0.0.1:9/v1", infos=[info]))

    stored = store.read(lambda session: session.get(ModelRecord, ("http://127.0.0.1:9/v1", "vendor/long")).name)
    assert stored == "n" * 500


def test_finish_run_replaces_unstorable_error(store: Store) -> None:
    # A provider's error text may quote a reply with NUL characters or lone surrogates.
    _, run_id, _ = _new_run(store, turns=2)

    store.write(partial(batches.finish_run, run_id=run_id, status="failed", error="bad \x00 and \ud800 text"))

    assert _run(store, run_id).error == "bad \ufffd and \ufffd text"


def test_begin_runs_matches_begin_run(store: Store) -> None:
    _, fresh, prompt = _new_run(store, turns=2)
    _, resumed, _ = _new_run(store, turns=2)
    _exchange(store, resumed, 1, completes_run=False)
    _, alone, _ = _new_run(store, turns=2)
    # Reset the runs to pending, with the initial prompt of one of them removed, so that
    # begin_runs has a prompt to insert.
    store.write(lambda session: session.execute(Run.__table__.update().where(Run.id.in_([fresh, resumed, alone])).values(status="pending")))
    store.write(lambda session: session.execute(Turn.__table__.delete().where(Turn.run_id == fresh)))

    merged = store.write(lambda session: batches.begin_runs(session, [dict(run_id=fresh, initial_prompt=prompt), dict(run_id=resumed, initial_prompt=prompt)]))
    single = store.write(partial(batches.begin_run, run_id=alone, initial_prompt=prompt))

    assert [message["role"] for message in merged[0]] == ["user"]
    assert merged[0][0]["content"] == prompt
    assert [message["role"] for message in merged[1]] == ["user", "assistant", "user"]
    assert merged[1] == store.read(partial(batches.load_history, run_id=resumed))
    assert single == [{"idx": 0, "role": "user", "content": prompt, "turn": None, "verdict": None}]
    assert {_run(store, run_id).status for run_id in (fresh, resumed, alone)} == {"running"}


def test_judge_inputs_many_matches_judge_inputs(store: Store) -> None:
    _, first, _ = _new_run(store, turns=1)
    _exchange(store, first, 1, completes_run=True)
    _, second, _ = _new_run(store, turns=1)
    _exchange(store, second, 1, completes_run=True)
    outcome = _failed_outcome()
    store.write(partial(batches.add_judgement, run_id=second, judge_model="demo/judge", round_=0, outcome=outcome))
    calls = [dict(run_id=first, judges=["demo/judge", "other/judge"]), dict(run_id=second, judges=["demo/judge"])]

    merged = store.read(lambda session: batches.judge_inputs_many(session, calls))
    single = [store.read(partial(batches.judge_inputs, **call)) for call in calls]

    assert merged == single
    assert merged[0][0] == ["demo/judge", "other/judge"]
    assert merged[1] == ([], [], {})


def test_add_judgements_stores_each_outcome(store: Store) -> None:
    _, first, _ = _new_run(store, turns=1)
    _, second, _ = _new_run(store, turns=1)
    outcome = _failed_outcome()
    calls = [dict(run_id=run_id, judge_model="demo/judge", round_=0, outcome=outcome) for run_id in (first, second)]

    results = store.write(lambda session: batches.add_judgements(session, calls))
    judged = {run_id: store.read(partial(batches.judged_by, run_id=run_id)) for run_id in (first, second)}

    assert results == [None, None]
    assert judged == {first: {"demo/judge"}, second: {"demo/judge"}}
    with pytest.raises(IntegrityError):
        store.write(lambda session: batches.add_judgements(session, calls[:1]))


def _statement_results(store: Store, statement: batches.OneStatement) -> list[object] | None:
    """Execute ``statement`` in autocommit mode, as the PostgreSQL writer does, and return its calls' results."""
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        result = connection.execute(statement.statement, statement.parameters)
        return None if statement.results is None else statement.results(result.all())


def _parsed_outcome() -> JudgeOutcome:
    verdict = Verdict(
        mirror_test="passed",
        self_awareness="high",
        refusal=False,
        topics=("tides", "{braces}", "=SUM(A1)"),
        topic_summary="Tides.",
        exploration_style="focused",
        sophistication=4,
        autonomy=3,
        emergent_behaviour="none",
        context_loss=False,
        analysis="Message 2 turns to the tides.",
    )
    return replace(
        _failed_outcome(),
        status="ok",
        verdict=verdict,
        raw_reply="{...}",
        prompt_tokens=120,
        completion_tokens=40,
        cost_usd=0.002,
        sampling={"temperature": 0.0, "seed": 7},
    )


def test_begin_runs_statement_matches_merged(postgres_url: str) -> None:
    store = Store(postgres_url)
    pairs = []
    for _ in range(2):
        _, fresh, prompt = _new_run(store, turns=3)
        _, resumed, _ = _new_run(store, turns=3)
        _exchange(store, resumed, 1, completes_run=False)
        _exchange(store, resumed, 2, completes_run=False)
        _, started, _ = _new_run(store, turns=3)
        store.write(lambda session, runs=(fresh, resumed, started): session.execute(
            Run.__table__.update().where(Run.id.in_(runs)).values(status="failed", error="earlier failure")))
        store.write(lambda session, run=fresh: session.execute(Turn.__table__.delete().where(Turn.run_id == run)))
        pairs.append((fresh, resumed, started))

    def calls(runs: tuple[int, int, int]) -> list[dict[str, object]]:
        # The same run twice in one group gets the same history twice.
        return [dict(run_id=run_id, initial_prompt=prompt) for run_id in (*runs, runs[1])]

    by_statement = _statement_results(store, batches.begin_runs_statement(calls(pairs[0])))
    merged = store.write(lambda session: batches.begin_runs(session, calls(pairs[1])))

    assert by_statement == merged
    assert [len(history) for history in by_statement] == [1, 5, 1, 5]
    assert by_statement[0] == [{"idx": 0, "role": "user", "content": prompt, "turn": None, "verdict": None}]
    for left, right in zip(pairs[0], pairs[1], strict=True):
        assert _turn_rows(store, left) == _turn_rows(store, right)
        assert _counts(store, left)[:3] == ("running", None, False)
        assert _counts(store, right)[:3] == ("running", None, False)
    store.dispose()


def _wait_for_lock_wait(connection: object, timeout_s: float = 10.0) -> bool:
    """Wait until another backend of the same database waits on a lock, and return whether one did.

    ``connection`` must be in autocommit mode: within a transaction pg_stat_activity
    keeps returning the snapshot of its first read.
    """
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if connection.execute(query).scalar():  # type: ignore[attr-defined]
            return True
        time.sleep(0.02)
    return False


def test_begin_runs_statement_races_other_process(postgres_url: str) -> None:
    # Another process inserts the run's prompt after this statement's snapshot was taken.
    store = Store(postgres_url)
    _, run_id, prompt = _new_run(store, turns=2)
    store.write(lambda session: session.execute(Turn.__table__.delete().where(Turn.run_id == run_id)))
    other = store.engine.connect()
    other_transaction = other.begin()
    other.execute(Turn.__table__.insert(), {"run_id": run_id, "idx": 0, "role": "user", "content": prompt, "created_at": batches.utcnow()})

    # The statement waits for the other transaction on the unique index, then inserts nothing.
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = pool.submit(_statement_results, store, batches.begin_runs_statement([dict(run_id=run_id, initial_prompt=prompt)]))
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as monitor:
            waited = _wait_for_lock_wait(monitor)
        other_transaction.commit()
        history = started.result(timeout=10)
    other.close()

    assert waited

    assert history == [[{"idx": 0, "role": "user", "content": prompt, "turn": None, "verdict": None}]]
    assert [row[0] for row in _turn_rows(store, run_id)] == [0]
    assert _run(store, run_id).status == "running"
    store.dispose()


def test_judge_inputs_statement_matches_merged(postgres_url: str) -> None:
    store = Store(postgres_url)
    _, first, _ = _new_run(store, turns=2)
    _exchange(store, first, 1, completes_run=False)
    _exchange(store, first, 2, completes_run=True)
    _, second, _ = _new_run(store, turns=1)
    _exchange(store, second, 1, completes_run=True)
    store.write(partial(batches.add_judgement, run_id=second, judge_model="demo/judge", round_=0, outcome=_failed_outcome()))
    _, empty, _ = _new_run(store, turns=1)
    store.write(lambda session: session.execute(Turn.__table__.delete().where(Turn.run_id == empty)))
    calls = [
        dict(run_id=first, judges=["demo/judge", "other/judge"]),
        dict(run_id=second, judges=["demo/judge"]),
        dict(run_id=second, judges=["demo/judge", "other/judge"]),
        dict(run_id=empty, judges=["demo/judge"]),
    ]

    by_statement = _statement_results(store, batches.judge_inputs_statement(calls))
    merged = store.read(lambda session: batches.judge_inputs_many(session, calls))

    assert by_statement == merged
    assert [len(transcript) for _, transcript, _ in by_statement] == [4, 0, 2, 0]
    assert by_statement[1] == ([], [], {})
    assert by_statement[3][2]["turns"] == 0

    # A run that does not exist raises KeyError, as judge_inputs does.
    with pytest.raises(KeyError):
        _statement_results(store, batches.judge_inputs_statement([dict(run_id=10**9, judges=["demo/judge"])]))
    store.dispose()


def test_add_judgements_statement_matches_merged(postgres_url: str) -> None:
    store = Store(postgres_url)
    runs = [_new_run(store, turns=1)[1] for _ in range(6)]
    outcomes = [_parsed_outcome(), _failed_outcome()]

    def calls(run_ids: list[int]) -> list[dict[str, object]]:
        return [dict(run_id=run_id, judge_model="demo/judge", round_=0, outcome=outcome) for run_id, outcome in zip(run_ids, outcomes, strict=False)]

    columns = [column for column in Judgement.__table__.c if column.name not in ("id", "run_id", "created_at")]
    # JSON columns also as their stored text, which distinguishes JSON null from SQL NULL.
    columns += [cast(column, Text).label(f"{column.name}_text") for column in columns if isinstance(column.type, JSON)]

    def stored(run_id: int) -> tuple[object, ...]:
        return store.read(lambda session: tuple(session.execute(select(*columns).where(Judgement.run_id == run_id)).one()))

    _statement_results(store, batches.add_judgements_statement(calls(runs[0:2])))
    _statement_results(store, batches.add_judgements_statement(calls(runs[2:3])[:1]))
    store.write(lambda session: batches.add_judgements(session, calls(runs[3:5])))

    assert stored(runs[0]) == stored(runs[3])
    assert stored(runs[1]) == stored(runs[4])
    assert stored(runs[2]) == stored(runs[3])
    assert stored(runs[0])[columns.index(Judgement.__table__.c.topics)] == ["tides", "{braces}", "=SUM(A1)"]

    # A duplicate verdict fails the whole multi-row insert: the new run's verdict is not stored either.
    with pytest.raises(IntegrityError):
        _statement_results(store, batches.add_judgements_statement(calls([runs[5], runs[0]])))
    assert store.read(partial(batches.judged_by, run_id=runs[5])) == set()
    store.dispose()
