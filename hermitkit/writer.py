"""One database writer thread with group commit, for the runner's event loop.

Every call waits until its transaction has committed, so the runner keeps its
guarantee: a turn is stored before the next request of its run is sent. Calls that
arrive while a transaction is being written are queued and then run together in the
next transaction, so under load one commit covers many calls. A transaction of four
turns costs about 0.5 ms on SQLite and 1.4 ms on PostgreSQL on the benchmark machine
(benchmarks/README.md), which one transaction per turn would pay for every turn.

The writer thread takes the next group as soon as a commit ends, without a round trip
through the event loop, and hands each group's results back with one
``call_soon_threadsafe``. A busy event loop (many replies arriving at once) therefore
delays only the delivery of results, never the next commit.

When any call of a group raises, the whole transaction rolls back. Every call of that
group then runs again in its own transaction, so an error reaches only its caller and
never undoes another call's write. An example is the IntegrityError of a turn that
another process stored first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from hermitkit.errors import StoreError
from hermitkit.store import Store

log = logging.getLogger("hermitkit.writer")

T = TypeVar("T")

# Upper bound on calls per transaction, so one commit stays short.
MAX_GROUP = 256

_Call = tuple[Callable[..., Any], dict[str, Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class GroupWriter:
    """Run ``action(session, **kwargs)`` calls on one thread, committing queued calls together.

    ``merged`` maps an action to a function that does the work of several consecutive
    calls at once: it takes the session and the list of their keyword arguments and
    returns the list of their results. ``run`` may be awaited from any event loop.
    ``close`` writes what is queued, then stops the thread.
    """

    def __init__(self, store: Store, *, merged: dict[Callable[..., Any], Callable[..., list[Any]]] | None = None, max_group: int = MAX_GROUP):
        self.store = store
        self.merged = dict(merged or {})
        self.max_group = max_group
        self.transactions = 0
        self._pending: list[_Call] = []
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._write_loop, name="hermitkit-db", daemon=True)
        self._thread.start()

    async def run(self, action: Callable[..., T], /, **kwargs: Any) -> T:
        """Queue ``action`` and return its result once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._wakeup:
            if self._closing:
                raise RuntimeError("The database writer is closed; no more writes are accepted.")
            self._pending.append((action, kwargs, future, loop))
            self._wakeup.notify()
        return await future

    def close(self) -> None:
        """Write every queued call, then stop the writer thread. Safe to call twice."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()

    def _write_loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._closing:
                    self._wakeup.wait()
                if not self._pending:
                    return
                group, self._pending = self._pending[: self.max_group], self._pending[self.max_group :]

            outcomes = self._write_group([(action, kwargs) for action, kwargs, _, _ in group])
            self._deliver(group, outcomes)

    @staticmethod
    def _deliver(group: list[_Call], outcomes: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_action, _kwargs, future, loop), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))

        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_results, results)
            except RuntimeError as exc:
                # The loop has closed, so no caller awaits these results. The writes
                # themselves are committed.
                log.warning("Committed %d write(s), but their event loop closed before the results arrived: %s", len(results), exc)

    def _write_group(self, group: list[tuple[Callable[..., Any], dict[str, Any]]]) -> list[tuple[bool, Any]]:
        """Write one group on the writer thread; return (succeeded, result or exception) per call."""
        if len(group) == 1:
            return [self._write_one(*group[0])]

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

        try:
            results = self.store.write(write_all)
        except StoreError as exc:
            # The database stayed unreachable through Store.write's retries: retrying each
            # call alone would only repeat that wait once per call.
            return [(False, exc)] * len(group)
        except Exception:  # noqa: BLE001 - each call is retried alone and gets its own error
            return [self._write_one(action, kwargs) for action, kwargs in group]
        self.transactions += 1
        return [(True, result) for result in results]

    def _write_one(self, action: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        try:
            result = self.store.write(partial(action, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            return False, exc
        self.transactions += 1
        return True, result


def _set_results(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Resolve the futures of one committed group, on their event loop's thread."""
    for future, ok, value in results:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
