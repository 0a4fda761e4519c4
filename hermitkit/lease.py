"""One process at a time per batch: a lease on the batch's row, renewed while it runs.

Two processes that run the same batch at once, for example a resume started in a
second terminal or notebook while the first still runs, would both send each missing
request. The provider bills both replies and the store keeps only the first. So a
process that runs, resumes or rejudges a batch first takes the batch's lease, renews
it while it works and gives it back at the end.

A lease that is not renewed runs out after ``LEASE_S``, so a batch whose process was
killed can be resumed after that time. On the same host hermitkit also checks whether
the holder's process still exists, so a resume right after a kill need not wait.
Times come from the database server on PostgreSQL, so the clocks of several machines
that share one store do not matter. A SQLite file is used from one machine, whose clock
serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hermitkit.errors import BatchBusyError, ConfigError
from hermitkit.store import Batch, Store, utcnow

log = logging.getLogger("hermitkit.lease")

# How long a lease lasts without renewal, and how often its holder renews it. Several
# renewals fit in one lease, so a slow database or a busy event loop does not lose it.
LEASE_S = 60.0
RENEW_EVERY_S = 15.0


@dataclass(frozen=True)
class Holder:
    """One process's claim on a batch. ``token`` distinguishes two claims of one process."""

    token: str
    host: str
    pid: int


def this_process() -> Holder:
    return Holder(token=uuid.uuid4().hex, host=socket.gethostname()[:255], pid=os.getpid())


def acquire(session: Session, *, batch_id: int, holder: Holder, lease_s: float = LEASE_S) -> None:
    """Give ``holder`` the lease of ``batch_id``, or raise BatchBusyError naming the live process that holds it."""
    # FOR UPDATE makes two processes that take the lease at once wait for each other on
    # PostgreSQL. On SQLite the BEGIN IMMEDIATE of every write does the same.
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        raise ConfigError(f"Batch {batch_id} not found. Run `hermitkit status` to list batches.")

    now = database_now(session)
    _raise_if_held(batch, now, holder)
    batch.lease_token = holder.token
    batch.lease_host = holder.host
    batch.lease_pid = holder.pid
    batch.lease_expires_at = now + timedelta(seconds=lease_s)


def check_free(session: Session, *, batch_id: int) -> None:
    """Raise BatchBusyError when a live process holds the lease of ``batch_id``, without taking the lease."""
    batch = session.get(Batch, batch_id)
    if batch is not None:
        _raise_if_held(batch, database_now(session), None)


def _raise_if_held(batch: Batch, now: datetime, holder: Holder | None) -> None:
    if batch.lease_token is None or (holder is not None and batch.lease_token == holder.token):
        return
    if lease_state(batch, now) != "held":
        return
    raise BatchBusyError(_busy_message(batch, now), host=batch.lease_host, pid=batch.lease_pid, expires_at=batch.lease_expires_at)


def lease_state(batch: Batch, now: datetime) -> str:
    """Return ``"free"``, ``"held"``, ``"expired"`` or ``"gone"`` (its process on this host no longer exists)."""
    if batch.lease_token is None:
        return "free"
    if batch.lease_expires_at is None or batch.lease_expires_at <= now:
        return "expired"
    if _holder_gone(batch):
        return "gone"
    return "held"


def _busy_message(batch: Batch, now: datetime) -> str:
    local = batch.lease_host == socket.gethostname()[:255]
    if local and batch.lease_pid == os.getpid():
        holder = f"this process (pid {batch.lease_pid}), from another thread or notebook cell"
    else:
        holder = f"another process (pid {batch.lease_pid} on host {batch.lease_host})"
    message = f"Batch {batch.id} is already being run or judged by {holder}. Two processes would both pay for each missing request. Wait until it finishes (`hermitkit status {batch.id}`)"
    if local:
        # A process on this host that no longer exists frees the lease at once, so there is nothing to wait for.
        return message + ", or stop that process and try again."
    assert batch.lease_expires_at is not None
    seconds = (batch.lease_expires_at - now).total_seconds()
    return message + (
        f". If that process was stopped, try again after its lease runs out at {batch.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC, in {seconds:.0f} s."
    )


def renew(session: Session, *, batch_id: int, holder: Holder, lease_s: float = LEASE_S) -> bool:
    """Extend ``holder``'s lease; return False when another process has taken it since."""
    expires = database_now(session) + timedelta(seconds=lease_s)
    result = session.execute(update(Batch).where(Batch.id == batch_id, Batch.lease_token == holder.token).values(lease_expires_at=expires))
    return result.rowcount == 1


def release(session: Session, *, batch_id: int, holder: Holder) -> None:
    """Give the lease back, unless another process has taken it since."""
    session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.lease_token == holder.token).values(lease_token=None, lease_host=None, lease_pid=None, lease_expires_at=None)
    )


@asynccontextmanager
async def batch_lease(store: Store, batch_id: int, *, on_lost: Callable[[], None]) -> AsyncIterator[Holder]:
    """Hold the lease of ``batch_id`` for the body of the ``async with``.

    Raises BatchBusyError before the body when another live process holds it. Calls
    ``on_lost`` when another process took the lease while the body ran, which happens
    only after this process could not renew it for ``LEASE_S``.
    """
    holder = this_process()
    await asyncio.to_thread(store.write, partial(acquire, batch_id=batch_id, holder=holder))
    renewing = asyncio.create_task(_keep_renewing(store, batch_id, holder, on_lost), name=f"hermitkit-lease-{batch_id}")
    try:
        yield holder
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
        try:
            await asyncio.to_thread(store.write, partial(release, batch_id=batch_id, holder=holder))
        except Exception:  # noqa: BLE001 - the lease then runs out on its own
            log.warning("Failed to give back the lease of batch %d. It runs out within %.0f s", batch_id, LEASE_S, exc_info=True)


async def _keep_renewing(store: Store, batch_id: int, holder: Holder, on_lost: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(RENEW_EVERY_S)
        try:
            renewed = await asyncio.to_thread(store.write, partial(renew, batch_id=batch_id, holder=holder))
        except Exception:  # noqa: BLE001 - the next renewal tries again; the lease outlasts several
            log.warning("Failed to renew the lease of batch %d. Trying again in %.0f s", batch_id, RENEW_EVERY_S, exc_info=True)
            continue
        if not renewed:
            log.error("Batch %d: another process took this batch's lease after it ran out, so this process stops sending requests", batch_id)
            on_lost()
            return


def database_now(session: Session) -> datetime:
    """Return the database server's time on PostgreSQL and this machine's time on SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))
    return utcnow()


def _holder_gone(batch: Batch) -> bool:
    """Return True when the lease's holder ran on this host and its process no longer exists.

    A process on another host cannot be checked, so its lease must run out. Neither can
    one on Windows, where signal 0 is CTRL_C_EVENT instead of a check.
    """
    if sys.platform == "win32" or batch.lease_host != socket.gethostname()[:255] or batch.lease_pid in (None, os.getpid()):
        return False
    try:
        os.kill(batch.lease_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        # The process exists but belongs to another user.
        return False
    return False
