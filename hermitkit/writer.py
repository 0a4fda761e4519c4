"""One database writer thread with group commit, for the runner's event loop.

Every call waits until its transaction has committed, so the runner keeps its
guarantee: a turn is stored before the next request of its run is sent. Calls that
arrive while a transaction is being written are queued and then run together in the
next transaction, so under load one commit covers many calls. On PostgreSQL a commit
waits for the WAL flush (about 2 ms on the benchmark machine), which a single writer
thread would otherwise pay once per turn.

When any call of a group raises, the whole transaction rolls back. Every call of that
group then runs again in its own transaction, so an error reaches only its caller and
never undoes another call's write. An example is the IntegrityError of a turn that
another process stored first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from hermitkit.errors import StoreError
from hermitkit.store import Store

T = TypeVar("T")

# Upper bound on calls per transaction, so one commit stays short.
MAX_GROUP = 256

_Call = tuple[Callable[..., Any], dict[str, Any], "asyncio.Future[Any]"]


class GroupWriter:
    """Run ``action(session, **kwargs)`` calls on one thread, committing queued calls together.

    ``merged`` maps an action to a function that does the work of several consecutive
    calls at once: it takes the session and the list of their keyword arguments and
    returns the list of their results. Use from one event loop only. ``close`` waits
    for the transaction in progress.
    """

    def __init__(self, store: Store, *, merged: dict[Callable[..., Any], Callable[..., list[Any]]] | None = None, max_group: int = MAX_GROUP):
        self.store = store
        self.merged = dict(merged or {})
        self.max_group = max_group
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hermitkit-db")
        self._pending: list[_Call] = []
        self._writing = False
        self.transactions = 0

    async def run(self, action: Callable[..., T], /, **kwargs: Any) -> T:
        """Queue ``action`` and return its result once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((action, kwargs, future))
        if not self._writing:
            self._start_group(loop)
        return await future

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _start_group(self, loop: asyncio.AbstractEventLoop) -> None:
        group, self._pending = self._pending[: self.max_group], self._pending[self.max_group :]
        self._writing = True
        done = loop.run_in_executor(self._thread, self._write_group, [(action, kwargs) for action, kwargs, _ in group])
        done.add_done_callback(partial(self._finish_group, loop, group))

    def _finish_group(self, loop: asyncio.AbstractEventLoop, group: list[_Call], done: asyncio.Future[list[tuple[bool, Any]]]) -> None:
        if done.cancelled():
            outcomes: list[tuple[bool, Any]] = [(False, asyncio.CancelledError())] * len(group)
        elif done.exception() is not None:
            outcomes = [(False, done.exception())] * len(group)
        else:
            outcomes = done.result()

        for (_action, _kwargs, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        self._writing = False
        if self._pending:
            self._start_group(loop)

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
