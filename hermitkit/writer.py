"""Group commit for the runner's event loop: the database writes of a batch, queued and committed together.

Every call waits until its transaction has committed, so the runner keeps its
guarantee: a turn is stored before the next request of its run is sent. Calls that
arrive while a group is being written are queued and then written together as the next
group, so under load one commit covers many calls.

Both writers work on the event loop's own thread. An earlier writer thread lost most of
its time waiting for the GIL. After each database call it had to reacquire the GIL from
the busy event loop, and each such wait can last the switch interval (5 ms by default).

- ``LoopWriter`` (SQLite, and PostgreSQL on Windows) writes a group synchronously at
  the start of the next pass of the event loop. A SQLite commit in WAL mode does not
  wait for the disk, so a group of one or two exchanges takes 0.2 to 0.3 ms on the
  benchmark machine (benchmarks/README.md).
- ``AsyncWriter`` (PostgreSQL) writes through psycopg's asyncio connection, so the event
  loop serves HTTP replies while a group is in flight. The exchanges of a group are one
  statement and one round trip (``batches.add_exchanges_statement``), and so are its run
  starts, its judge inputs and its verdicts.

When any call of a group raises, the whole group rolls back. Every call of that group
then runs again in its own transaction, so an error reaches only its caller and never
undoes another call's write. An example is the IntegrityError of a turn that another
process stored first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, Row
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from hermitkit.errors import StoreError
from hermitkit.store import Store

log = logging.getLogger("hermitkit.writer")

T = TypeVar("T")

# Upper bound on calls per transaction, so one commit stays short.
MAX_GROUP = 256

# LoopWriter commits between two WAL checkpoints. A commit of one exchange adds about
# four pages to the WAL, so this is near SQLite's own default of 1,000 pages.
CHECKPOINT_EVERY = 250
SQLITE_AUTOCHECKPOINT = 1000

Action = Callable[..., Any]
# A function that does the work of several calls of one action at once. It takes the
# session and the list of their keyword arguments and returns the list of their results.
Merged = Callable[[Session, list[dict[str, Any]]], list[Any]]


class OneStatement(NamedTuple):
    """One statement, atomic on its own, that does the work of several calls of one action.

    ``results`` turns the statement's rows into the calls' results, in call order. Without
    it, every call returns None.
    """

    statement: Executable
    parameters: dict[str, Any]
    results: Callable[[Sequence[Row[Any]]], list[Any]] | None = None


# A function that builds the OneStatement of several calls (their keyword arguments).
Statement = Callable[[list[dict[str, Any]]], OneStatement]

_Call = tuple[Action, dict[str, Any], "asyncio.Future[Any]"]


class Writer:
    """Run ``action(session, **kwargs)`` calls in groups, one transaction per group.

    ``merged`` maps an action to a function that does the work of several consecutive
    calls at once. A writer serves the event loop of its first call.
    """

    def __init__(self, store: Store, *, merged: dict[Action, Merged] | None = None, max_group: int = MAX_GROUP):
        self.store = store
        self.merged = dict(merged or {})
        self.max_group = max_group
        self.transactions = 0
        self._pending: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    async def run(self, action: Callable[..., T], /, **kwargs: Any) -> T:
        """Queue ``action`` and return its result once its transaction has committed."""
        if self._closing:
            raise RuntimeError("The database writer is closed; no more writes are accepted.")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("A database writer serves one event loop; this call came from another one. Create one writer per loop.")

        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((action, kwargs, future))
        self._wake()
        return await future

    async def aclose(self) -> None:
        """Write every queued call, then accept no more. Safe to call twice."""
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _take_group(self) -> list[_Call]:
        group, self._pending = self._pending[: self.max_group], self._pending[self.max_group :]
        return group

    def _merge(self, group: list[tuple[Action, dict[str, Any]]]) -> Callable[[Session], list[Any]]:
        """Return one function that does the work of every call in ``group``, in order."""

        def write_all(session: Session) -> list[Any]:
            results: list[Any] = []
            start = 0
            while start < len(group):
                action = group[start][0]
                end = start + 1
                while end < len(group) and group[end][0] is action:
                    end += 1
                if action in self.merged and end - start > 1:
                    results.extend(self.merged[action](session, [kwargs for _, kwargs in group[start:end]]))
                else:
                    results.extend(action(session, **kwargs) for _, kwargs in group[start:end])
                start = end
            return results

        return write_all


class LoopWriter(Writer):
    """Write each group synchronously on the event loop's thread, for SQLite (and PostgreSQL on Windows).

    The calls that reach ``run`` during one pass of the event loop are written as one
    transaction at the start of the next pass. The event loop waits while a group is
    written. A group made only of ``core`` actions (and their merged forms), which
    execute nothing but Core statements, runs on a connection that the writer keeps
    open, without an ORM session. Opening a session and taking a connection from the
    pool cost more than the group's own statements.

    That connection never checkpoints the WAL into the database file: a commit that
    crosses SQLite's checkpoint threshold syncs the file and stalled the event loop for
    up to 30 ms on the benchmark machine. A ``_Checkpointer`` thread does it instead,
    after every ``CHECKPOINT_EVERY`` commits.
    """

    def __init__(self, store: Store, *, merged: dict[Action, Merged] | None = None, core: frozenset[Action] = frozenset(), max_group: int = MAX_GROUP, attempts: int = 10):
        super().__init__(store, merged=merged, max_group=max_group)
        self.core = core
        self.attempts = attempts
        self._scheduled = False
        self._connection: Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._commits = 0
        self._sqlite = store.dialect == "sqlite"

    async def aclose(self) -> None:
        self._closing = True
        while self._pending:
            self._flush()
        self._close_connection()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None

    def _wake(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        group = self._take_group()
        if self._pending:
            self._wake()
        if not group:
            return

        outcomes = self._write_group([(action, kwargs) for action, kwargs, _ in group])
        _set_results([(future, ok, value) for (_, _, future), (ok, value) in zip(group, outcomes, strict=True)])

    def _write_group(self, group: list[tuple[Action, dict[str, Any]]]) -> list[tuple[bool, Any]]:
        """Write one group as one transaction and return (succeeded, result or exception) per call."""
        core = all(action in self.core for action, _ in group)
        if len(group) > 1:
            try:
                results = self._write(self._merge(group), core=core)
            except StoreError as exc:
                # The database stayed unreachable through Store.write's retries: retrying
                # each call alone would only repeat that wait once per call.
                return [(False, exc)] * len(group)
            except Exception:  # noqa: BLE001 - each call is retried alone and gets its own error
                pass
            else:
                self.transactions += 1
                return [(True, result) for result in results]

        outcomes: list[tuple[bool, Any]] = []
        for action, kwargs in group:
            try:
                outcomes.append((True, self._write(partial(action, **kwargs), core=action in self.core)))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                outcomes.append((False, exc))
            else:
                self.transactions += 1
        return outcomes

    def _write(self, action: Callable[[Any], T], *, core: bool) -> T:
        """Run ``action`` as one transaction, on the kept connection when ``core`` and through ``Store.write`` otherwise."""
        if not core:
            return self.store.write(action, attempts=self.attempts)
        for attempt in range(1, self.attempts + 1):
            try:
                connection = self._open_connection()
                with connection.begin():
                    result = action(connection)
            except IntegrityError:
                raise
            except (OperationalError, DBAPIError) as exc:
                time.sleep(self.store.retry_delay_s(exc, attempt, self.attempts))
            else:
                self._commits += 1
                if self._sqlite and self._commits % CHECKPOINT_EVERY == 0:
                    self._checkpoint().request()
                return result
        raise AssertionError("unreachable")

    def _open_connection(self) -> Connection:
        if self._connection is not None and self._connection.invalidated:
            self._close_connection()
        if self._connection is None:
            connection = self.store.engine.connect()
            if self._sqlite:
                # Straight on the sqlite3 connection, which has no open transaction here.
                connection.connection.driver_connection.execute("PRAGMA wal_autocheckpoint = 0")
            self._connection = connection
        return self._connection

    def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._sqlite and not connection.invalidated:
            # The connection goes back to the pool, whose other users keep the default.
            connection.connection.driver_connection.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_AUTOCHECKPOINT}")
        connection.close()

    def _checkpoint(self) -> _Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self.store)
        return self._checkpointer


class _Checkpointer:
    """Copy SQLite's WAL into the database file on a thread of its own, when asked to.

    A passive checkpoint neither waits for nor blocks readers and writers, and the
    sqlite3 module releases the GIL while SQLite works, so the event loop goes on.
    """

    def __init__(self, store: Store):
        self._store = store
        self._due = threading.Event()
        self._stopping = False
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="hermitkit-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._due.set()

    def close(self) -> None:
        """Run a last checkpoint, then stop the thread."""
        self._stopping = True
        self._due.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            connection = self._store.engine.raw_connection()
            try:
                # The raw sqlite3 connection is in autocommit mode (store._configure_sqlite),
                # so no transaction is open around the checkpoint.
                connection.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            except Exception:  # noqa: BLE001 - a later checkpoint, or the next connection to open the file, catches up
                log.warning("SQLite checkpoint failed; the WAL file stays larger until the next one", exc_info=True)
            finally:
                connection.close()
            if self._stopping:
                return


class AsyncWriter(Writer):
    """Write each group through an asyncio database driver, for PostgreSQL.

    One task writes the groups one after the other; calls queued while a group is in
    flight form the next group. ``statements`` maps an action to a function that turns
    several of its calls into one statement, atomic on its own. A group is split into
    one part per such action, sent as its statement outside a transaction block in one
    round trip, and one part for the other calls, which run in a transaction through
    ``AsyncSession.run_sync``. Each part's callers get their results as soon as that
    part is written.
    """

    def __init__(
        self,
        store: Store,
        *,
        merged: dict[Action, Merged] | None = None,
        statements: dict[Action, Statement] | None = None,
        max_group: int = MAX_GROUP,
        attempts: int = 10,
    ):
        super().__init__(store, merged=merged, max_group=max_group)
        self.statements = dict(statements or {})
        self.attempts = attempts
        # No pre-ping: it costs a round trip per group, and a connection that the server
        # closed fails its first statement, which is then retried like any lost connection.
        self._engine = create_async_engine(store.url, pool_size=2, max_overflow=2, pool_pre_ping=False)
        self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._connection: AsyncConnection | None = None

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._wake()
            await asyncio.shield(self._task)
        await self._close_statement_connection()
        await self._engine.dispose()

    def _wake(self) -> None:
        if self._loop is None:
            return
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = self._loop.create_task(self._write_loop(), name="hermitkit-db")
        assert self._wakeup is not None
        self._wakeup.set()

    async def _write_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                for part in self._parts(self._take_group()):
                    outcomes = await self._write_group([(action, kwargs) for action, kwargs, _ in part])
                    _set_results([(future, ok, value) for (_, _, future), (ok, value) in zip(part, outcomes, strict=True)])
            if self._closing:
                return

    def _parts(self, group: list[_Call]) -> list[list[_Call]]:
        """Split ``group`` into one part per statement action and one for the other calls.

        The calls of a group wait at the same time, so each comes from a different task
        and none can depend on another's write. Any order of them is therefore one that
        could have happened. Parts keep the order in which their actions first appear, and
        calls keep their order within a part.
        """
        parts: dict[Action | None, list[_Call]] = {}
        for call in group:
            key = call[0] if call[0] in self.statements else None
            parts.setdefault(key, []).append(call)
        return list(parts.values())

    async def _write_group(self, group: list[tuple[Action, dict[str, Any]]]) -> list[tuple[bool, Any]]:
        if len(group) > 1:
            try:
                results = await self._write(group)
            except StoreError as exc:
                return [(False, exc)] * len(group)
            except Exception:  # noqa: BLE001 - each call is retried alone and gets its own error
                pass
            else:
                return [(True, result) for result in results]

        outcomes: list[tuple[bool, Any]] = []
        for call in group:
            try:
                outcomes.append((True, (await self._write([call]))[0]))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                outcomes.append((False, exc))
        return outcomes

    async def _write(self, group: list[tuple[Action, dict[str, Any]]]) -> list[Any]:
        """Write ``group`` as one transaction, retrying when the connection drops."""
        action = group[0][0]
        one_statement = action in self.statements and all(call[0] is action for call in group)
        for attempt in range(1, self.attempts + 1):
            try:
                if one_statement:
                    statement = self.statements[action]([kwargs for _, kwargs in group])
                    connection = await self._statement_connection()
                    result = await connection.execute(statement.statement, statement.parameters)
                    results: list[Any] = [None] * len(group) if statement.results is None else statement.results(result.all())
                else:
                    async with self._sessions() as session, session.begin():
                        results = await session.run_sync(self._merge(group))
            except IntegrityError:
                raise
            except (OperationalError, DBAPIError) as exc:
                if self._connection is not None and self._connection.invalidated:
                    await self._close_statement_connection()
                await asyncio.sleep(self.store.retry_delay_s(exc, attempt, self.attempts))
            else:
                self.transactions += 1
                return results
        raise AssertionError("unreachable")

    async def _statement_connection(self) -> AsyncConnection:
        # Kept open between groups: taking a connection from the pool and returning it
        # (with its reset) took 0.4 ms per group, a fifth of the group's time.
        if self._connection is None:
            self._connection = await self._autocommit.connect()
        return self._connection

    async def _close_statement_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


def writer_for(
    store: Store,
    *,
    merged: dict[Action, Merged] | None = None,
    core: frozenset[Action] = frozenset(),
    statements: dict[Action, Statement] | None = None,
) -> Writer:
    """Create the writer that suits ``store``'s database: ``AsyncWriter`` for PostgreSQL, ``LoopWriter`` otherwise.

    On Windows PostgreSQL also gets a ``LoopWriter``, which blocks the event loop for
    each round trip. ``asyncio.run`` starts a Proactor event loop there, and psycopg
    3.3 rejects it in asyncio mode ("Psycopg cannot use the 'ProactorEventLoop'").
    """
    if store.dialect == "postgresql" and sys.platform != "win32":
        return AsyncWriter(store, merged=merged, statements=statements)
    return LoopWriter(store, merged=merged, core=core)


def _set_results(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Resolve the futures of one written group."""
    for future, ok, value in results:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
