"""Pieces every widget shares: escaping, messages, display, and running work in the background."""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import os
import threading
from collections.abc import Coroutine
from typing import Any

import ipywidgets as widgets

from hermitkit.client import OPENROUTER_BASE_URL, OPENROUTER_KEY_ENV
from hermitkit.config import DEMO_ENDPOINT

Job = asyncio.Task[Any] | concurrent.futures.Future[Any]


def default_endpoint() -> str:
    """OpenRouter when its key is in the environment, else the offline demo server."""
    if os.environ.get(OPENROUTER_KEY_ENV, "").strip():
        return OPENROUTER_BASE_URL
    return DEMO_ENDPOINT


def escape(text: Any) -> str:
    """Untrusted text (model output, ids, error messages) made safe to put inside HTML."""
    return html.escape("" if text is None else str(text), quote=True)


def message(text: str, *, error: bool = False) -> str:
    colour = "#8c1d18" if error else "#444"
    return f'<div style="color:{colour};white-space:pre-wrap">{escape(text)}</div>'


def full_width() -> widgets.Layout:
    return widgets.Layout(width="100%")


def launch(coroutine: Coroutine[Any, Any, Any], *, thread_name: str) -> Job:
    """Run ``coroutine`` without blocking the caller's event loop.

    In a kernel (or any running loop) it becomes a task on that loop. Without a running
    loop, as in a plain script or a test, it runs on a new loop in a daemon thread, and
    the returned future carries its result.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        return loop.create_task(coroutine)

    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(asyncio.run(coroutine))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=target, name=thread_name, daemon=True).start()
    return future


def wait_for(job: Job | None, timeout: float | None) -> None:
    """Block until a thread job ends; a task on this thread's loop cannot be waited for here."""
    if job is None:
        return
    if isinstance(job, asyncio.Task):
        raise RuntimeError("The work runs on this thread's event loop: use `await ....wait_async()` instead of wait().")
    job.result(timeout=timeout)


async def wait_async(job: Job | None) -> None:
    if job is None:
        return
    if isinstance(job, asyncio.Task):
        await job
    else:
        await asyncio.wrap_future(job)


class Piece:
    """Shows ``self.widget`` when the object is the last expression of a cell."""

    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
