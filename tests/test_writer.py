"""The database writers: group commit on the event loop, with errors kept to their own caller.

Every test runs on SQLite (``LoopWriter``) and on PostgreSQL (``AsyncWriter``), as
``writer_for`` picks them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hermitkit import writer as writer_module
from hermitkit.store import Store
from hermitkit.writer import AsyncWriter, LoopWriter, OneStatement, Writer, writer_for


@pytest.fixture
def keyed_store(store: Store) -> Store:
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    return store


def insert_key(session: Session, *, k: int, note: str = "") -> int:
    session.execute(text("INSERT INTO writer_keys (k, note) VALUES (:k, :note)"), {"k": k, "note": note})
    return k


def stored_keys(store: Store) -> list[int]:
    return store.read(lambda session: [row[0] for row in session.execute(text("SELECT k FROM writer_keys ORDER BY k"))])


def run_with(writer: Writer, main: Any) -> Any:
    """Run ``main(writer)`` on a new event loop and close the writer on that loop."""

    async def wrapped() -> Any:
        try:
            return await main(writer)
        finally:
            await writer.aclose()

    return asyncio.run(wrapped())


def test_writer_for_picks_by_database(keyed_store: Store) -> None:
    writer = writer_for(keyed_store)
    expected = AsyncWriter if keyed_store.dialect == "postgresql" else LoopWriter
    assert type(writer) is expected
    run_with(writer, lambda writer: asyncio.sleep(0))


def test_results_return_in_call_order(keyed_store: Store) -> None:
    async def main(writer: Writer) -> list[int]:
        return await asyncio.gather(*(writer.run(insert_key, k=k) for k in range(20)))

    assert run_with(writer_for(keyed_store), main) == list(range(20))
    assert stored_keys(keyed_store) == list(range(20))


def test_one_loop_pass_one_commit(keyed_store: Store) -> None:
    writer = writer_for(keyed_store)

    async def main(writer: Writer) -> list[int]:
        # gather starts all ten calls in one pass of the event loop.
        return await asyncio.gather(*(writer.run(insert_key, k=k) for k in range(10)))

    assert run_with(writer, main) == list(range(10))
    assert writer.transactions == 1


def test_call_returns_after_commit(keyed_store: Store) -> None:
    seen: list[list[int]] = []

    async def main(writer: Writer) -> None:
        for k in range(3):
            await writer.run(insert_key, k=k)
            # Another connection must already see the key.
            seen.append(stored_keys(keyed_store))

    run_with(writer_for(keyed_store), main)
    assert seen == [[0], [0, 1], [0, 1, 2]]


def test_failed_call_keeps_others(keyed_store: Store) -> None:
    keyed_store.write(lambda session: insert_key(session, k=5, note="first"))
    writer = writer_for(keyed_store)

    async def main(writer: Writer) -> list[Any]:
        # One group of three in which k=5 collides: the group rolls back and each call
        # is written again alone.
        return await asyncio.gather(*(writer.run(insert_key, k=k, note="second") for k in (4, 5, 6)), return_exceptions=True)

    results = run_with(writer, main)

    assert results[0] == 4
    assert isinstance(results[1], IntegrityError)
    assert results[2] == 6
    assert stored_keys(keyed_store) == [4, 5, 6]
    note = keyed_store.read(lambda session: session.execute(text("SELECT note FROM writer_keys WHERE k = 5")).scalar_one())
    assert note == "first"
    # The failed group, then the three calls alone, of which two committed.
    assert writer.transactions == 2


def test_merged_action_writes_consecutive_calls(keyed_store: Store) -> None:
    merged_sizes: list[int] = []

    def insert_keys(session: Session, calls: list[dict[str, Any]]) -> list[int]:
        merged_sizes.append(len(calls))
        session.execute(text("INSERT INTO writer_keys (k, note) VALUES (:k, 'merged')"), [{"k": call["k"]} for call in calls])
        return [call["k"] for call in calls]

    async def main(writer: Writer) -> list[int]:
        return await asyncio.gather(*(writer.run(insert_key, k=k) for k in range(5)))

    assert run_with(writer_for(keyed_store, merged={insert_key: insert_keys}), main) == [0, 1, 2, 3, 4]
    assert merged_sizes == [5]
    assert stored_keys(keyed_store) == [0, 1, 2, 3, 4]


def test_cancelled_caller_still_written(keyed_store: Store) -> None:
    async def main(writer: Writer) -> None:
        tasks = [asyncio.ensure_future(writer.run(insert_key, k=k)) for k in range(5)]
        # Let the tasks queue their calls, then stop waiting for them.
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run_with(writer_for(keyed_store), main)
    assert stored_keys(keyed_store) == [0, 1, 2, 3, 4]


def test_run_after_close_raises(keyed_store: Store) -> None:
    async def main(writer: Writer) -> None:
        await writer.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await writer.run(insert_key, k=1)

    run_with(writer_for(keyed_store), main)
    assert stored_keys(keyed_store) == []


def test_call_from_second_event_loop_raises(keyed_store: Store) -> None:
    writer = writer_for(keyed_store)
    first_loop = asyncio.new_event_loop()
    try:
        first_loop.run_until_complete(writer.run(insert_key, k=1))

        with pytest.raises(RuntimeError, match="one event loop"):
            asyncio.run(writer.run(insert_key, k=2))
    finally:
        first_loop.run_until_complete(writer.aclose())
        first_loop.close()

    assert stored_keys(keyed_store) == [1]


def test_core_action_gets_a_connection(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    received: list[type] = []

    def insert_core(connection: Any, *, k: int) -> int:
        received.append(type(connection))
        return insert_key(connection, k=k)

    async def main(writer: Writer) -> list[int]:
        return await asyncio.gather(writer.run(insert_core, k=1), writer.run(insert_key, k=2), writer.run(insert_core, k=3))

    # A group that mixes a Core action with an ORM one runs in a session, the rest on a
    # plain connection.
    writer = LoopWriter(store, core=frozenset({insert_core}))
    assert run_with(writer, main) == [1, 2, 3]
    assert len(received) == 2
    assert all(issubclass(kind, Session) for kind in received)

    async def core_only(writer: Writer) -> list[int]:
        return await asyncio.gather(writer.run(insert_core, k=4), writer.run(insert_core, k=5))

    received.clear()
    assert run_with(LoopWriter(store, core=frozenset({insert_core})), core_only) == [4, 5]
    assert len(received) == 2
    assert all(issubclass(kind, Connection) for kind in received)


def insert_keys_statement(calls: list[dict[str, Any]]) -> OneStatement:
    statement = text("INSERT INTO writer_keys (k, note) SELECT * FROM unnest(CAST(:ks AS INTEGER[]), CAST(:notes AS TEXT[]))")
    return OneStatement(statement, {"ks": [call["k"] for call in calls], "notes": [call.get("note", "") for call in calls]})


def test_statement_group_is_one_round_trip(postgres_url: str) -> None:
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    store.write(lambda session: insert_key(session, k=5, note="first"))
    writer = AsyncWriter(store, statements={insert_key: insert_keys_statement})

    async def main(writer: Writer) -> list[Any]:
        together = await asyncio.gather(*(writer.run(insert_key, k=k, note="new") for k in range(5)))
        colliding = await asyncio.gather(*(writer.run(insert_key, k=k, note="new") for k in (5, 6)), return_exceptions=True)
        return [together, colliding]

    together, colliding = run_with(writer, main)

    # Statement actions return None: the statement reports no per-call results.
    assert together == [None] * 5
    assert isinstance(colliding[0], IntegrityError)
    assert colliding[1] is None
    assert stored_keys(store) == [0, 1, 2, 3, 4, 5, 6]
    # One statement for the five, then the failed pair and k=6 alone.
    assert writer.transactions == 2
    store.dispose()


def insert_key_in_transaction(session: Session, *, k: int) -> int:
    return insert_key(session, k=k)


def find_key(session: Session, *, k: int) -> bool:
    return session.execute(text("SELECT 1 FROM writer_keys WHERE k = :k"), {"k": k}).first() is not None


def find_keys_statement(calls: list[dict[str, Any]]) -> OneStatement:
    keys = [call["k"] for call in calls]

    def results(rows: Any) -> list[bool]:
        found = {row[0] for row in rows}
        return [k in found for k in keys]

    return OneStatement(text("SELECT k FROM writer_keys WHERE k = ANY(CAST(:ks AS INTEGER[]))"), {"ks": keys}, results)


def test_mixed_group_is_written_in_parts(postgres_url: str) -> None:
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    writer = AsyncWriter(store, statements={insert_key: insert_keys_statement, find_key: find_keys_statement})

    async def main(writer: Writer) -> list[Any]:
        return await asyncio.gather(
            writer.run(insert_key, k=1),
            writer.run(insert_key, k=2),
            writer.run(insert_key_in_transaction, k=3),
            writer.run(find_key, k=1),
            writer.run(find_key, k=3),
            writer.run(find_key, k=9),
            writer.run(insert_key, k=4),
        )

    results = run_with(writer, main)

    # Each part reads the writes of the parts before it, and find_key's statement returns one result per call.
    assert results == [None, None, 3, True, True, False, None]
    assert stored_keys(store) == [1, 2, 3, 4]
    assert stored_keys(store) == [1, 2, 3, 4]
    # Three parts, in the order their actions first appear: the statement of insert_key
    # (k=1, 2 and 4), the transaction and the statement of find_key.
    assert writer.transactions == 3
    store.dispose()


def test_async_writer_reconnects(postgres_url: str) -> None:
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    database = store.engine.url.database

    def kill_writer_connections() -> None:
        with store.engine.begin() as connection:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": database},
            )

    async def main(writer: Writer) -> list[int]:
        first = await writer.run(insert_key, k=1)
        kill_writer_connections()
        second = await writer.run(insert_key, k=2)
        return [first, second]

    assert run_with(AsyncWriter(store), main) == [1, 2]
    assert stored_keys(store) == [1, 2]
    store.dispose()


def test_loop_writer_checkpoint_thread(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "CHECKPOINT_EVERY", 10)
    store = Store(sqlite_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    writer = LoopWriter(store, core=frozenset({insert_key}))
    settings: list[int] = []

    async def main(writer: Writer) -> None:
        for k in range(25):
            await writer.run(insert_key, k=k)
        assert writer._connection is not None
        settings.append(writer._connection.connection.driver_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        checkpointer = writer._checkpointer
        assert checkpointer is not None
        await writer.aclose()
        # Requests come after 10 and 20 commits and on close. Requests made before the
        # thread got to run count once.
        assert checkpointer.checkpoints >= 1

    run_with(writer, main)

    # The writer's connection never checkpoints. Back in the pool, it has SQLite's default again.
    assert settings == [0]
    with store.engine.connect() as connection:
        assert connection.connection.driver_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert stored_keys(store) == list(range(25))
    store.dispose()


def test_loop_writer_on_postgresql(postgres_url: str) -> None:
    # The writer that Windows uses for PostgreSQL, where psycopg's asyncio mode is unavailable.
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    writer = LoopWriter(store, core=frozenset({insert_key}))

    async def main(writer: Writer) -> list[Any]:
        together = await asyncio.gather(*(writer.run(insert_key, k=k) for k in range(3)))
        alone = await writer.run(insert_key, k=3)
        return [together, alone]

    assert run_with(writer, main) == [[0, 1, 2], 3]
    assert writer._checkpointer is None
    assert stored_keys(store) == [0, 1, 2, 3]
    store.dispose()
