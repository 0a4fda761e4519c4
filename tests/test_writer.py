"""GroupWriter: group commit on one thread, with errors kept to their own caller."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hermitkit.store import Store
from hermitkit.writer import GroupWriter


@pytest.fixture
def keyed_store(store: Store) -> Store:
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE writer_keys (k INTEGER PRIMARY KEY, note TEXT)"))
    return store


def insert_key(session: Session, *, k: int, note: str = "") -> int:
    session.execute(text("INSERT INTO writer_keys (k, note) VALUES (:k, :note)"), {"k": k, "note": note})
    return k


class Gate:
    """An insert that keeps the writer thread inside its transaction until ``release``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.released = threading.Event()

    def insert(self, session: Session, *, k: int) -> int:
        self.started.set()
        self.released.wait(10)
        return insert_key(session, k=k)

    async def hold(self, writer: GroupWriter, k: int) -> asyncio.Future[Any]:
        """Queue the held insert of ``k`` and return once the writer thread is inside it."""
        first = asyncio.ensure_future(writer.run(self.insert, k=k))
        await asyncio.to_thread(self.started.wait, 10)
        return first

    async def release(self) -> None:
        # A short pause lets calls queued just before reach the writer's list.
        await asyncio.sleep(0.05)
        self.released.set()


def stored_keys(store: Store) -> list[int]:
    return store.read(lambda session: [row[0] for row in session.execute(text("SELECT k FROM writer_keys ORDER BY k"))])


def test_results_return_in_call_order(keyed_store: Store) -> None:
    writer = GroupWriter(keyed_store)

    async def main() -> list[int]:
        return await asyncio.gather(*(writer.run(insert_key, k=k) for k in range(20)))

    try:
        results = asyncio.run(main())
    finally:
        writer.close()

    assert results == list(range(20))
    assert stored_keys(keyed_store) == list(range(20))


def test_queued_calls_share_one_commit(keyed_store: Store) -> None:
    gate = Gate()
    writer = GroupWriter(keyed_store)

    async def main() -> list[int]:
        first = await gate.hold(writer, 0)
        # The writer thread is inside the first transaction, so these ten queue up.
        rest = [asyncio.ensure_future(writer.run(insert_key, k=k)) for k in range(1, 11)]
        await gate.release()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(main())
    finally:
        writer.close()

    assert results == list(range(11))
    assert writer.transactions == 2


def test_failed_call_keeps_others(keyed_store: Store) -> None:
    keyed_store.write(lambda session: insert_key(session, k=5, note="first"))
    gate = Gate()
    writer = GroupWriter(keyed_store)

    async def main() -> list[Any]:
        first = await gate.hold(writer, 100)
        # One group of three in which k=5 collides: the group rolls back and each call
        # is written again alone.
        group = [asyncio.ensure_future(writer.run(insert_key, k=k, note="second")) for k in (4, 5, 6)]
        await gate.release()
        return await asyncio.gather(first, *group, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        writer.close()

    assert results[0] == 100
    assert results[1] == 4
    assert isinstance(results[2], IntegrityError)
    assert results[3] == 6
    assert stored_keys(keyed_store) == [4, 5, 6, 100]
    notes = keyed_store.read(lambda session: session.execute(text("SELECT note FROM writer_keys WHERE k = 5")).scalar_one())
    assert notes == "first"


def test_merged_action_writes_consecutive_calls(keyed_store: Store) -> None:
    merged_sizes: list[int] = []

    def insert_keys(session: Session, calls: list[dict[str, Any]]) -> list[int]:
        merged_sizes.append(len(calls))
        session.execute(text("INSERT INTO writer_keys (k, note) VALUES (:k, 'merged')"), [{"k": call["k"]} for call in calls])
        return [call["k"] for call in calls]

    gate = Gate()
    writer = GroupWriter(keyed_store, merged={insert_key: insert_keys})

    async def main() -> list[int]:
        first = await gate.hold(writer, 0)
        rest = [asyncio.ensure_future(writer.run(insert_key, k=k)) for k in range(1, 6)]
        await gate.release()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(main())
    finally:
        writer.close()

    assert results == [0, 1, 2, 3, 4, 5]
    assert merged_sizes == [5]
    assert stored_keys(keyed_store) == [0, 1, 2, 3, 4, 5]


def test_close_writes_queued_calls(keyed_store: Store) -> None:
    writer = GroupWriter(keyed_store)

    async def main() -> None:
        tasks = [asyncio.ensure_future(writer.run(insert_key, k=k)) for k in range(5)]
        # Let the tasks queue their calls, then stop waiting for them.
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    writer.close()

    assert stored_keys(keyed_store) == [0, 1, 2, 3, 4]


def test_run_after_close_raises(keyed_store: Store) -> None:
    writer = GroupWriter(keyed_store)
    writer.close()
    writer.close()

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(writer.run(insert_key, k=1))
    assert stored_keys(keyed_store) == []


def test_calls_from_two_event_loops(keyed_store: Store) -> None:
    writer = GroupWriter(keyed_store)
    results: dict[str, list[int]] = {}

    def loop_in_thread(name: str, keys: range) -> None:
        async def main() -> list[int]:
            return await asyncio.gather(*(writer.run(insert_key, k=k) for k in keys))

        results[name] = asyncio.run(main())

    threads = [
        threading.Thread(target=loop_in_thread, args=("a", range(0, 10))),
        threading.Thread(target=loop_in_thread, args=("b", range(10, 20))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close()

    assert results == {"a": list(range(0, 10)), "b": list(range(10, 20))}
    assert stored_keys(keyed_store) == list(range(20))
