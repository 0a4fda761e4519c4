"""ipywidgets apps for JupyterLab: model picker, run panel, transcript viewer, batch browser.

Each piece works alone, and ``app()`` shows them together in one cell. A batch runs as an
asyncio task on the kernel's event loop, so the kernel keeps answering while it runs and
Cancel takes effect between requests. Outside a running loop (a plain script or a test)
the batch runs on its own loop in a worker thread instead. Model output is untrusted:
every piece of it is escaped before it reaches an HTML widget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import io
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import ipywidgets as widgets
from sqlalchemy import func, select

from hermitkit.client import OPENROUTER_BASE_URL, OPENROUTER_KEY_ENV, ModelInfo
from hermitkit.config import DEMO_ENDPOINT, BatchConfig, build_config
from hermitkit.errors import ConfigError, HermitkitError
from hermitkit.protocol import DEFAULT_PROTOCOL_ID, builtin_protocol_ids
from hermitkit.store import Batch, Run, Store, Turn

log = logging.getLogger("hermitkit.widgets")

EventCallback = Callable[[dict[str, Any]], None]

# Text colour and background of each per-turn verdict: green for ok, amber for
# malformed replies, red for protocol failures.
VERDICT_COLOURS = {
    "ok": ("#0b5d1e", "#d7f5dd"),
    "multiple": ("#7a4b00", "#ffe8b8"),
    "unbalanced": ("#7a4b00", "#ffe8b8"),
    "empty": ("#8c1d18", "#fbd9d6"),
    "missing": ("#8c1d18", "#fbd9d6"),
}

DEFAULT_DEMO_JUDGE = "demo/judge"
DEFAULT_JUDGE = "openai/gpt-4o-mini"

_FULL_WIDTH = widgets.Layout(width="100%")


def default_endpoint() -> str:
    """OpenRouter when its key is in the environment, else the offline demo server."""
    if os.environ.get(OPENROUTER_KEY_ENV, "").strip():
        return OPENROUTER_BASE_URL
    return DEMO_ENDPOINT


def _escape(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _message(text: str, *, error: bool = False) -> str:
    colour = "#8c1d18" if error else "#444"
    return f'<div style="color:{colour};white-space:pre-wrap">{_escape(text)}</div>'


def _per_million(price: float | None) -> str:
    return "?" if price is None else f"${price * 1_000_000:.3g}"


class _Piece:
    """Shows ``self.widget`` when the object is the last expression of a cell."""

    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


# --------------------------------------------------------------------------- model picker


class ModelPicker(_Piece):
    """The endpoint's live model list with search, prices and context length; multi-select.

    ``endpoint`` is a base URL or ``"demo"`` (default: :func:`default_endpoint`).
    Pass ``models`` to show a fixed list without asking the endpoint.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        api_key_env: str | None = None,
        selected: Iterable[str] = (),
        models: list[ModelInfo] | None = None,
        rows: int = 12,
    ):
        self.endpoint = endpoint or default_endpoint()
        self.api_key_env = api_key_env
        self._models: dict[str, ModelInfo] = {}
        self._chosen: list[str] = list(selected)
        self._syncing = False

        self.search = widgets.Text(placeholder="part of a model id or name", description="Search", continuous_update=True)
        self.options = widgets.SelectMultiple(options=[], rows=rows, layout=_FULL_WIDTH)
        self.reload_button = widgets.Button(description="Reload list", icon="refresh", tooltip="Ask the endpoint for its model list again")
        self.clear_button = widgets.Button(description="Clear selection")
        self.status = widgets.HTML()
        self.chosen_label = widgets.HTML()
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<b>Models</b> at {_escape(self.endpoint)} (prices in US dollars per million tokens)"),
                widgets.HBox([self.search, self.reload_button, self.clear_button]),
                self.options,
                self.chosen_label,
                self.status,
            ]
        )

        self.search.observe(lambda _change: self._render_options(), names="value")
        self.options.observe(self._on_pick, names="value")
        self.reload_button.on_click(lambda _button: self.load())
        self.clear_button.on_click(lambda _button: self._set_chosen([]))

        if models is None:
            self.load()
        else:
            self.set_models(models)

    @property
    def selected(self) -> list[str]:
        """The chosen model ids, in the order they were picked."""
        return list(self._chosen)

    @selected.setter
    def selected(self, model_ids: Iterable[str]) -> None:
        unknown = [model for model in model_ids if self._models and model not in self._models]
        if unknown:
            raise ConfigError(f"Model(s) not in the list of {self.endpoint}: {', '.join(unknown)}. Search the picker for the exact id.")
        self._set_chosen(list(model_ids))

    @property
    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def load(self) -> None:
        """Fetch the endpoint's model list; a failure is shown in the picker, not raised."""
        from hermitkit.catalogue import list_all_models
        from hermitkit.runner import run_sync

        self.status.value = _message(f"Loading the model list of {self.endpoint} ...")
        try:
            infos = run_sync(list_all_models(self.endpoint, api_key_env=self.api_key_env))
        except (HermitkitError, OSError) as exc:
            self.status.value = _message(f"Could not load the model list: {exc}", error=True)
            return
        self.set_models(infos)

    def set_models(self, infos: Iterable[ModelInfo]) -> None:
        self._models = {info.id: info for info in sorted(infos, key=lambda item: item.id)}
        demo = any(info.is_demo for info in self._models.values()) or self.endpoint == DEMO_ENDPOINT
        note = " Demo models are scripted and describe no real model." if demo else ""
        self.status.value = _message(f"{len(self._models)} models listed.{note}")
        self._set_chosen([model for model in self._chosen if model in self._models])

    def label(self, info: ModelInfo) -> str:
        """One option line: id, name, prices per million tokens and context length."""
        context = f"{info.context_length:,} ctx" if info.context_length else "? ctx"
        name = f" ({info.name})" if info.name and info.name != info.id else ""
        return f"{info.id}{name} | in {_per_million(info.prompt_price)}/M, out {_per_million(info.completion_price)}/M | {context}"

    def _matches(self, info: ModelInfo) -> bool:
        needle = self.search.value.strip().lower()
        return not needle or needle in info.id.lower() or needle in info.name.lower()

    def _render_options(self) -> None:
        # Chosen models stay listed whatever the search says, so a search never drops them.
        shown = [info for info in self._models.values() if info.id in self._chosen or self._matches(info)]
        self._syncing = True
        try:
            self.options.options = [(self.label(info), info.id) for info in shown]
            self.options.value = tuple(model for model in self._chosen if model in self._models)
        finally:
            self._syncing = False
        self._render_chosen()

    def _render_chosen(self) -> None:
        if not self._chosen:
            self.chosen_label.value = _message("No model chosen yet: click models in the list (Ctrl or Shift adds more).")
            return
        self.chosen_label.value = f"<b>Chosen ({len(self._chosen)}):</b> {_escape(', '.join(self._chosen))}"

    def _set_chosen(self, model_ids: list[str]) -> None:
        self._chosen = list(dict.fromkeys(model_ids))
        self._render_options()

    def _on_pick(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        picked = list(change["new"])
        visible = {value for _label, value in self.options.options}
        # Keep choices hidden by the search; take the visible part from the widget.
        kept = [model for model in self._chosen if model not in visible or model in picked]
        added = [model for model in picked if model not in kept]
        self._set_chosen(kept + added)


# --------------------------------------------------------------------------- run panel


class _OptionalFloat(widgets.Text):
    """A text box for a number that may be left blank (blank means: not set)."""

    def number(self, name: str) -> float | None:
        text = self.value.strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name} {text!r} is not a number: enter a number or leave it blank.") from None


class RunPanel(_Piece):
    """Batch parameters, Run / Cancel / Resume buttons and a progress bar per model.

    Models come from ``picker`` when one is given, otherwise from a text box. Cancel
    stops sending new requests; the stored batch ends as ``cancelled`` and Resume (or
    ``hermitkit resume BATCH_ID``) finishes it later. ``endpoint_options`` are extra
    ``endpoint`` keys of the batch config, such as ``timeout_s``.
    """

    def __init__(
        self,
        picker: ModelPicker | None = None,
        *,
        endpoint: str | None = None,
        store: Store | None = None,
        models: Iterable[str] = (),
        judges: Iterable[str] | None = None,
        endpoint_options: dict[str, Any] | None = None,
        runs: int = 3,
        turns: int = 10,
    ):
        self.picker = picker
        self.endpoint = endpoint or (picker.endpoint if picker else default_endpoint())
        self.endpoint_options = dict(endpoint_options or {})
        self.store = store or Store()
        self.batch_id: int | None = None
        self.outcome: Any = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._job: asyncio.Task[Any] | concurrent.futures.Future[Any] | None = None
        self._listeners: list[EventCallback] = []
        self._bars: dict[str, tuple[widgets.IntProgress, widgets.Label]] = {}
        self._judged: dict[str, int] = {}

        if judges is None:
            judges = [DEFAULT_DEMO_JUDGE] if self.endpoint == DEMO_ENDPOINT else [DEFAULT_JUDGE]
        label_style = {"description_width": "110px"}
        self.name = widgets.Text(description="Batch name", style=label_style)
        self.models = widgets.Text(value=", ".join(models), description="Models", placeholder="comma-separated model ids", style=label_style, layout=_FULL_WIDTH)
        self.runs = widgets.BoundedIntText(value=runs, min=1, max=10_000, description="Runs/model", style=label_style)
        self.turns = widgets.BoundedIntText(value=turns, min=1, max=10_000, description="Turns/run", style=label_style)
        self.temperature = widgets.BoundedFloatText(value=1.0, min=0.0, max=2.0, step=0.1, description="Temperature", style=label_style)
        self.top_p = _OptionalFloat(description="top_p", placeholder="blank: provider default", style=label_style)
        self.protocol = widgets.Dropdown(options=builtin_protocol_ids(), value=DEFAULT_PROTOCOL_ID, description="Protocol", style=label_style)
        self.judges = widgets.Text(value=", ".join(judges), description="Judge models", placeholder="comma-separated model ids", style=label_style, layout=_FULL_WIDTH)
        self.concurrency = widgets.BoundedIntText(value=8, min=1, max=1024, description="Concurrency", style=label_style)
        self.budget = _OptionalFloat(description="Budget (USD)", placeholder="blank: no budget", style=label_style)

        self.run_button = widgets.Button(description="Run", button_style="success", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", button_style="danger", icon="stop", disabled=True)
        self.resume_button = widgets.Button(description="Resume", icon="repeat", disabled=True, tooltip="Continue the last batch: only missing turns and verdicts are sent")
        self.status = widgets.HTML()
        self.progress = widgets.VBox()

        fields: list[widgets.Widget] = [self.name]
        if picker is None:
            fields.append(self.models)
        fields += [
            widgets.HBox([self.runs, self.turns]),
            widgets.HBox([self.temperature, self.top_p]),
            widgets.HBox([self.protocol, self.concurrency]),
            self.judges,
            self.budget,
        ]
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<b>Run a batch</b> on {_escape(self.endpoint)}"),
                *fields,
                widgets.HBox([self.run_button, self.cancel_button, self.resume_button]),
                self.status,
                self.progress,
            ]
        )

        self.run_button.on_click(lambda _button: self.run())
        self.cancel_button.on_click(lambda _button: self.cancel())
        self.resume_button.on_click(lambda _button: self.resume())


    @property
    def running(self) -> bool:
        return self._job is not None and not self._job.done()

    def add_listener(self, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every runner event, after the panel's own update."""
        self._listeners.append(callback)

    def selected_models(self) -> list[str]:
        if self.picker is not None:
            return self.picker.selected
        return _split_ids(self.models.value)

    def config(self) -> BatchConfig:
        """The batch config the fields describe; raises ConfigError naming the bad field."""
        endpoint: dict[str, Any] = {"base_url": self.endpoint, **self.endpoint_options}
        if self.picker is not None and self.picker.api_key_env:
            endpoint.setdefault("api_key_env", self.picker.api_key_env)
        models = self.selected_models()
        if not models:
            raise ConfigError("No model chosen: pick at least one model in the list (or type ids in Models).")

        data: dict[str, Any] = {
            "name": self.name.value.strip(),
            "endpoint": endpoint,
            "models": models,
            "runs": int(self.runs.value),
            "turns": int(self.turns.value),
            "protocol": self.protocol.value,
            "temperature": float(self.temperature.value),
            "top_p": self.top_p.number("top_p"),
            "judges": _split_ids(self.judges.value),
            "concurrency": int(self.concurrency.value),
            "budget_usd": self.budget.number("Budget"),
        }
        return build_config(data, source="run panel")

    def run(self) -> bool:
        """Start a new batch from the fields and return at once; progress shows in the panel.

        Returns False, with the reason shown in the panel, when the fields are invalid or
        a batch is already running.
        """
        if self.running:
            self._show("A batch is already running: cancel it or wait for it to finish.", error=True)
            return False
        try:
            config = self.config()
        except ConfigError as exc:
            self._show(str(exc), error=True)
            return False

        from hermitkit.runner import run_batch_async

        self.batch_id = None
        self._reset_progress(config, {})
        self._show(f"Starting {config.total_runs} run(s) of {config.turns} turn(s) ...")
        self._start(
            lambda cancel: run_batch_async(config, store=self.store, progress=False, on_event=self._on_event, cancel=cancel, on_created=self._on_created)
        )
        return True

    def resume(self, batch_id: int | None = None) -> None:
        """Continue a stored batch (default: the panel's last one) without repeating any turn."""
        batch_id = batch_id if batch_id is not None else self.batch_id
        if batch_id is None:
            self._show("No batch to resume: run one first, or pass a batch id.", error=True)
            return
        if self.running:
            self._show("A batch is already running: cancel it or wait for it to finish.", error=True)
            return

        from hermitkit.runner import load_batch, resume_batch_async

        try:
            config, _protocol, _batch = load_batch(self.store, batch_id)
        except ConfigError as exc:
            self._show(str(exc), error=True)
            return
        self.batch_id = batch_id
        self._reset_progress(config, _stored_turns(self.store, batch_id))
        self._show(f"Resuming batch {batch_id} ...")
        self._start(lambda cancel: resume_batch_async(batch_id, store=self.store, progress=False, on_event=self._on_event, cancel=cancel))

    def cancel(self) -> None:
        """Stop sending new requests; requests in flight finish and are stored."""
        if not self.running:
            return
        self._cancel.set()
        self.cancel_button.disabled = True
        self._show("Cancelling: waiting for requests in flight to finish ...")

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the batch ends and return its outcome (scripts and tests only).

        Inside a kernel the batch runs on the kernel's own loop, which this would block:
        use ``await panel.wait_async()`` in a cell instead.
        """
        job = self._job
        if job is None:
            return None
        if isinstance(job, asyncio.Task):
            raise RuntimeError("The batch runs on this thread's event loop: use `await panel.wait_async()` instead of wait().")
        job.result(timeout=timeout)
        return self.outcome

    async def wait_async(self) -> Any:
        """Wait for the batch to end without blocking the event loop; return its outcome."""
        job = self._job
        if job is None:
            return None
        if isinstance(job, asyncio.Task):
            await job
        else:
            await asyncio.wrap_future(job)
        return self.outcome

    def _start(self, make: Callable[[threading.Event], Coroutine[Any, Any, Any]]) -> None:
        self._cancel = threading.Event()
        self.outcome = None
        self.error = None
        self.run_button.disabled = True
        self.resume_button.disabled = True
        self.cancel_button.disabled = False
        coroutine = self._guarded(make(self._cancel))

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._job = loop.create_task(coroutine)
            return

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def target() -> None:
            try:
                future.set_result(asyncio.run(coroutine))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

        self._job = future
        threading.Thread(target=target, name="hermitkit-batch", daemon=True).start()

    async def _guarded(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run the batch and show how it ended; errors go to the panel, not to a traceback."""
        try:
            self.outcome = await coroutine
        except (HermitkitError, OSError) as exc:
            self.error = str(exc)
            self._show(f"The batch stopped: {exc}", error=True)
        except asyncio.CancelledError:
            self.error = "The batch task was cancelled."
            self._show(self.error, error=True)
            raise
        except Exception as exc:  # noqa: BLE001 - a notebook user needs the message in the panel
            log.exception("Batch failed in the run panel")
            self.error = f"{type(exc).__name__}: {exc}"
            self._show(f"The batch failed: {self.error}", error=True)
        else:
            self._show_outcome(self.outcome)
        finally:
            self.run_button.disabled = False
            self.cancel_button.disabled = True
            self.resume_button.disabled = self.batch_id is None
        return self.outcome

    def _on_created(self, batch_id: int) -> None:
        self.batch_id = batch_id
        self._show(f"Batch {batch_id} created; running ...")

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        model = event.get("model")
        if kind == "turn" and model in self._bars:
            bar, _label = self._bars[model]
            bar.value = min(bar.value + 1, bar.max)
            self._label_bar(model)
        elif kind == "judged" and model in self._bars:
            self._judged[model] = self._judged.get(model, 0) + 1
            self._label_bar(model)
        elif kind == "run_finished" and event.get("status") not in (None, "completed") and model in self._bars:
            self._label_bar(model, note=f"a run ended {event.get('status')}")

        for listener in list(self._listeners):
            listener(event)

    def _reset_progress(self, config: BatchConfig, stored: dict[str, int]) -> None:
        total = config.runs * config.turns
        self._bars = {}
        self._judged = {}
        rows = []
        for model in config.models:
            bar = widgets.IntProgress(value=min(stored.get(model, 0), total), min=0, max=total, layout=widgets.Layout(width="40%"))
            label = widgets.Label()
            self._bars[model] = (bar, label)
            self._label_bar(model)
            rows.append(widgets.HBox([widgets.Label(model, layout=widgets.Layout(width="260px")), bar, label]))
        self.progress.children = rows

    def _label_bar(self, model: str, note: str = "") -> None:
        bar, label = self._bars[model]
        text = f"{bar.value}/{bar.max} turns, {self._judged.get(model, 0)} judged"
        label.value = f"{text} ({note})" if note else text

    def _show(self, text: str, *, error: bool = False) -> None:
        self.status.value = _message(text, error=error)

    def _show_outcome(self, outcome: Any) -> None:
        text = f"Batch {outcome.batch_id}: {outcome.status}, spent ${outcome.spent_usd:.4f}."
        if outcome.message:
            text += f" {outcome.message}"
        if outcome.is_demo:
            from hermitkit.export import DEMO_NOTICE

            text += f"\n{DEMO_NOTICE}"
        self._show(text, error=outcome.status != "completed")


def _split_ids(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def _stored_turns(store: Store, batch_id: int) -> dict[str, int]:
    """Assistant turns already stored per model, so a resumed batch's bars start there."""
    query = select(Run.model, func.coalesce(func.sum(Run.turn_count), 0)).where(Run.batch_id == batch_id).group_by(Run.model)
    return store.read(lambda session: {model: int(count) for model, count in session.execute(query).all()})


# --------------------------------------------------------------------------- transcripts


def _verdict_badge(verdict: str | None) -> str:
    if not verdict:
        return ""
    colour, background = VERDICT_COLOURS.get(verdict, ("#333", "#eee"))
    return f'<span class="hk-verdict hk-verdict-{_escape(verdict)}" style="color:{colour};background:{background};padding:0 6px;border-radius:3px;font-weight:600">{_escape(verdict)}</span>'


def _highlight(content: str, extracted: str | None) -> str:
    """Escaped ``content`` with the extracted self-prompt marked, braces included."""
    if not extracted:
        return _escape(content)
    start = content.find("{" + extracted + "}")
    length = len(extracted) + 2
    if start == -1:
        start = content.find(extracted)
        length = len(extracted)
    if start == -1:
        return _escape(content)
    end = start + length
    marked = f'<mark class="hk-self-prompt" style="background:#fff3a3">{_escape(content[start:end])}</mark>'
    return _escape(content[:start]) + marked + _escape(content[end:])


def transcript_html(run: dict[str, Any], turns: list[dict[str, Any]]) -> str:
    """One run as HTML: role, coloured verdict, highlighted self-prompt, reasoning collapsed.

    ``run`` and ``turns`` are what :func:`hermitkit.status.run_transcript` returns.
    Every model-written string is escaped, so a reply that contains markup shows as text.
    """
    pre = 'style="white-space:pre-wrap;word-break:break-word;margin:2px 0;font-family:var(--jp-code-font-family, monospace)"'
    head = (
        f"Run {run['id']}: {_escape(run['model'])}, repetition {run['repetition']} of batch {run['batch_id']}, {_escape(run['status'])}. "
        f"Turns {run['turn_count']}/{run['turns_target']}, ok {run['ok_count']}, failures {run['failures']}, malformed {run['malformed']}."
    )
    parts = [f'<div class="hk-transcript"><div class="hk-run-head" style="font-weight:600;margin-bottom:6px">{head}</div>']
    for turn in turns:
        if turn["role"] == "assistant":
            role = f"turn {turn['turn_number']} &middot; assistant {_verdict_badge(turn['verdict'])}"
            border = "#4a7fd4"
        else:
            role = "initial prompt &middot; user" if turn["idx"] == 0 else "echo &middot; user"
            border = "#aaa"
        parts.append(f'<div class="hk-turn hk-{_escape(turn["role"])}" style="border-left:3px solid {border};padding:2px 8px;margin:6px 0">')
        parts.append(f'<div class="hk-role" style="font-size:90%;color:#555">{role}</div>')
        if turn.get("reasoning"):
            parts.append(f'<details class="hk-reasoning"><summary>reasoning</summary><pre {pre}>{_escape(turn["reasoning"])}</pre></details>')
        if turn["content"] is None:
            parts.append("<i>(no content)</i>")
        elif turn["role"] == "assistant":
            parts.append(f"<pre {pre}>{_highlight(turn['content'], turn.get('extracted'))}</pre>")
        else:
            parts.append(f"<pre {pre}>{_escape(turn['content'])}</pre>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def batch_runs(store: Store, batch_id: int) -> list[dict[str, Any]]:
    """The runs of one batch in model and repetition order."""
    query = select(Run.id, Run.model, Run.repetition, Run.status, Run.turn_count, Run.turns_target).where(Run.batch_id == batch_id).order_by(Run.model, Run.repetition)
    return store.read(lambda session: [dict(row) for row in session.execute(query).mappings().all()])


class TranscriptViewer(_Piece):
    """One run's transcript; choose the run from a batch's runs or call :meth:`show`."""

    def __init__(self, store: Store | None = None, *, batch_id: int | None = None, run_id: int | None = None):
        self.store = store or Store()
        self.batch_id: int | None = None
        self._syncing = False
        self.run_choice = widgets.Dropdown(description="Run", options=[], layout=widgets.Layout(width="60%"))
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.body = widgets.HTML(layout=_FULL_WIDTH)
        self.widget = widgets.VBox([widgets.HBox([self.run_choice, self.refresh_button]), self.body])

        self.run_choice.observe(self._on_choice, names="value")
        self.refresh_button.on_click(lambda _button: self.refresh())
        if batch_id is not None:
            self.set_batch(batch_id)
        if run_id is not None:
            self.show(run_id)


    @property
    def run_id(self) -> int | None:
        return self.run_choice.value

    def set_batch(self, batch_id: int) -> None:
        """List the batch's runs in the chooser and show the first one."""
        self.batch_id = batch_id
        rows = batch_runs(self.store, batch_id)
        options = [(f"run {row['id']}: {row['model']} #{row['repetition']} ({row['status']}, {row['turn_count']}/{row['turns_target']} turns)", row["id"]) for row in rows]
        self._syncing = True
        try:
            self.run_choice.options = options
            self.run_choice.value = options[0][1] if options else None
        finally:
            self._syncing = False
        if options:
            self.refresh()
        else:
            self.body.value = _message(f"Batch {batch_id} has no runs.")

    def show(self, run_id: int) -> None:
        """Show one run, adding it to the chooser when it belongs to another batch."""
        if run_id not in [value for _label, value in self.run_choice.options]:
            self._syncing = True
            try:
                self.run_choice.options = [*self.run_choice.options, (f"run {run_id}", run_id)]
            finally:
                self._syncing = False
        self._syncing = True
        try:
            self.run_choice.value = run_id
        finally:
            self._syncing = False
        self.refresh()

    def refresh(self) -> None:
        from hermitkit.status import run_transcript

        if self.run_id is None:
            self.body.value = _message("No run chosen.")
            return
        try:
            run, turns = run_transcript(self.store, self.run_id)
        except ConfigError as exc:
            self.body.value = _message(str(exc), error=True)
            return
        self.body.value = transcript_html(run, turns)

    def _on_choice(self, _change: dict[str, Any]) -> None:
        if not self._syncing:
            self.refresh()


# --------------------------------------------------------------------------- batch browser


SUMMARY_COLUMNS = {
    "runs": "runs",
    "compliance_pct": "compliance %",
    "failures_per_run": "failures/run",
    "malformed_per_run": "malformed/run",
    "mirror_pass_rate": "mirror pass",
    "autonomy_mean": "autonomy",
    "sophistication_mean": "sophistication",
    "verdicts": "verdicts",
    "judge_parse_failures": "parse fails",
    "cost_usd": "cost $",
}


def summary_table_html(store: Store, batch_id: int) -> str:
    """The per-model summary as an escaped HTML table."""
    from hermitkit.analysis import summary

    frame = summary(store, batch_id)
    if frame.empty:
        return _message(f"Batch {batch_id} has no runs yet.")
    shown = frame[[column for column in SUMMARY_COLUMNS if column in frame.columns]].rename(columns=SUMMARY_COLUMNS)
    return shown.to_html(escape=True, float_format=lambda value: f"{value:.2f}", na_rep="-", classes="hk-summary", border=0)


def figure_png(figure: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def batch_figures(store: Store, batch_id: int) -> list[tuple[str, Any]]:
    """(title, figure or error message) for each standard plot of a batch."""
    from hermitkit import plots
    from hermitkit.analysis import summary

    frame = summary(store, batch_id)
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("Per-model scores", lambda: plots.plot_model_bars(frame)),
        ("Compliance over turns", lambda: plots.plot_compliance_over_turns(store, batch_id)),
        ("Mirror test outcomes", lambda: plots.plot_mirror_outcomes(store, batch_id)),
        ("How runs ended", lambda: plots.plot_end_states(store, batch_id)),
        ("Cost and autonomy", lambda: plots.plot_cost_vs_autonomy(frame)),
    ]
    results: list[tuple[str, Any]] = []
    for title, make in makers:
        try:
            results.append((title, make()))
        except Exception as exc:  # noqa: BLE001 - one broken plot must not hide the others
            log.warning("Plot %r failed for batch %d: %s", title, batch_id, exc)
            results.append((title, f"{title}: could not draw the plot ({type(exc).__name__}: {exc})"))
    return results


def persona_cards_html(store: Store, batch_id: int) -> str:
    """Persona cards of a batch as escaped HTML, or a note when none is stored."""
    from hermitkit.reports import persona_cards

    cards = persona_cards(store, batch_id)
    if not cards:
        return _message("No persona cards stored for this batch yet (`hermitkit report` creates them).")
    return '<div style="display:flex;flex-wrap:wrap;gap:10px">' + "".join(_card_html(card) for card in cards) + "</div>"


def _card_html(card: dict[str, Any]) -> str:
    stats = card.get("stats") or {}
    rows = "".join(f"<tr><td>{_escape(key)}</td><td>{_escape(_format_stat(value))}</td></tr>" for key, value in stats.items())
    themes = card.get("themes") or []
    theme_names = [theme.get("name") or theme.get("theme") or "" if isinstance(theme, dict) else str(theme) for theme in themes]
    theme_line = f"<div><i>Themes:</i> {_escape(', '.join(name for name in theme_names if name))}</div>" if any(theme_names) else ""
    return (
        '<div class="hk-persona" style="border:1px solid #ccc;border-radius:6px;padding:8px 12px;width:320px">'
        f"<div style='font-weight:700'>{_escape(card.get('model'))}</div>"
        f"<div style='color:#4a4a8a;font-style:italic'>{_escape(card.get('archetype'))}</div>"
        f"<p style='white-space:pre-wrap'>{_escape(card.get('description'))}</p>"
        f"{theme_line}<table style='font-size:90%'>{rows}</table></div>"
    )


def _format_stat(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class BatchBrowser(_Piece):
    """Choose a stored batch: summary table, plots, persona cards and any run's transcript."""

    def __init__(self, store: Store | None = None, *, batch_id: int | None = None):
        self.store = store or Store()
        self.batch_id: int | None = None
        self._syncing = False
        self.batch_choice = widgets.Dropdown(description="Batch", options=[], layout=widgets.Layout(width="60%"))
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh", tooltip="Reload the list of stored batches")
        self.header = widgets.HTML()
        self.summary = widgets.HTML()
        self.plots = widgets.VBox()
        self.personas = widgets.HTML()
        self.viewer = TranscriptViewer(self.store)
        self.tabs = widgets.Tab(
            children=[self.summary, self.plots, self.personas, self.viewer.widget],
            titles=("Summary", "Plots", "Persona cards", "Transcripts"),
        )
        self.widget = widgets.VBox([widgets.HBox([self.batch_choice, self.refresh_button]), self.header, self.tabs])

        self.batch_choice.observe(self._on_choice, names="value")
        self.refresh_button.on_click(lambda _button: self.refresh())
        self.tabs.observe(self._on_tab, names="selected_index")
        self.refresh(select=batch_id)


    def refresh(self, select: int | None = None) -> None:
        """Reload the batch list and show ``select`` (default: the chosen or newest batch)."""
        from hermitkit.status import list_batches

        rows = list_batches(self.store)
        options = [(f"{row['id']}: {row['name'] or '(no name)'} - {row['status']}, {row['runs']} runs{' [demo]' if row['is_demo'] else ''}", row["id"]) for row in rows]
        target = select if select is not None else self.batch_choice.value
        if target not in [value for _label, value in options]:
            target = options[0][1] if options else None
        self._syncing = True
        try:
            self.batch_choice.options = options
            self.batch_choice.value = target
        finally:
            self._syncing = False
        if target is None:
            self.header.value = _message(f"No batch stored in {self.store} yet: run one in the run panel or with `hermitkit run params/demo.yaml`.")
            return
        self.show(target)

    def show(self, batch_id: int) -> None:
        from hermitkit.status import batch_status

        self.batch_id = batch_id
        if self.batch_choice.value != batch_id:
            self._syncing = True
            try:
                self.batch_choice.value = batch_id
            finally:
                self._syncing = False

        info = batch_status(self.store, batch_id)
        text = f"Batch {batch_id} ({info['name'] or 'no name'}): {info['status']}, {info['turns']}/{info['turns_target']} turns, {info['verdicts']} verdicts, spent ${info['spent_usd']:.4f}."
        if info["is_demo"]:
            from hermitkit.export import DEMO_NOTICE

            text += f"\n{DEMO_NOTICE}"
        self.header.value = _message(text)
        self.summary.value = summary_table_html(self.store, batch_id)
        self.viewer.set_batch(batch_id)
        # Plots and cards take a moment to build: they load when their tab opens.
        self.plots.children = []
        self.personas.value = ""
        self._load_tab(self.tabs.selected_index)

    def _on_choice(self, change: dict[str, Any]) -> None:
        if not self._syncing and change["new"] is not None:
            self.show(change["new"])

    def _on_tab(self, change: dict[str, Any]) -> None:
        self._load_tab(change["new"])

    def _load_tab(self, index: int | None) -> None:
        if self.batch_id is None:
            return
        if index == 1 and not self.plots.children:
            self.load_plots()
        elif index == 2 and not self.personas.value:
            self.load_personas()

    def load_plots(self) -> None:
        assert self.batch_id is not None
        try:
            figures = batch_figures(self.store, self.batch_id)
        except ImportError as exc:
            self.plots.children = [widgets.HTML(_message(f"Plots are not available: {exc}", error=True))]
            return
        children: list[widgets.Widget] = []
        for title, figure in figures:
            children.append(widgets.HTML(f"<b>{_escape(title)}</b>"))
            if isinstance(figure, str):
                children.append(widgets.HTML(_message(figure, error=True)))
            else:
                children.append(widgets.Image(value=figure_png(figure), format="png", layout=widgets.Layout(max_width="100%")))
        self.plots.children = children

    def load_personas(self) -> None:
        assert self.batch_id is not None
        try:
            self.personas.value = persona_cards_html(self.store, self.batch_id)
        except ImportError as exc:
            self.personas.value = _message(f"Persona cards are not available: {exc}", error=True)


# --------------------------------------------------------------------------- the app


class HermitApp(_Piece):
    """Model picker, run panel with a live transcript, and the batch browser in tabs."""

    def __init__(self, endpoint: str | None = None, *, store: Store | None = None, api_key_env: str | None = None, **panel_options: Any):
        self.store = store or Store()
        self.picker = ModelPicker(endpoint, api_key_env=api_key_env)
        self.run_panel = RunPanel(self.picker, store=self.store, **panel_options)
        self.live = TranscriptViewer(self.store)
        self.browser = BatchBrowser(self.store)
        self.tabs = widgets.Tab(
            children=[
                self.picker.widget,
                widgets.VBox([self.run_panel.widget, widgets.HTML("<b>Live transcript</b>"), self.live.widget]),
                self.browser.widget,
            ],
            titles=("1. Models", "2. Run", "3. Results"),
        )
        self.widget = widgets.VBox([widgets.HTML("<h3 style='margin:0'>hermitkit</h3>"), self.tabs])
        self.run_panel.add_listener(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "batch_started":
            self.live.set_batch(event["batch_id"])
        elif kind == "turn" and event.get("run_id") == self.live.run_id:
            self.live.refresh()
        elif kind == "batch_finished":
            self.browser.refresh(select=event["batch_id"])


def app(endpoint: str | None = None, **options: Any) -> HermitApp:
    """Build the whole hermitkit app; show it by making it the last expression of a cell.

    ``endpoint`` is a base URL or ``"demo"``; by default OpenRouter when
    OPENROUTER_API_KEY is set, else the offline demo server.
    """
    return HermitApp(endpoint, **options)
