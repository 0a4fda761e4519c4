"""The run panel: batch parameters, Run / Cancel / Resume and a progress bar per model."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import ipywidgets as widgets
from sqlalchemy import func, select

from hermitkit.config import DEMO_ENDPOINT, BatchConfig, build_config
from hermitkit.errors import ConfigError, HermitkitError
from hermitkit.protocol import DEFAULT_PROTOCOL_ID, builtin_protocol_ids
from hermitkit.store import Run, Store
from hermitkit.widgets.base import Job, Piece, default_endpoint, escape, full_width, launch, message, wait_async, wait_for
from hermitkit.widgets.picker import ModelPicker

log = logging.getLogger("hermitkit.widgets")

EventCallback = Callable[[dict[str, Any]], None]

DEFAULT_DEMO_JUDGE = "demo/judge"
DEFAULT_JUDGE = "openai/gpt-4o-mini"


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


class RunPanel(Piece):
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
        self._job: Job | None = None
        self._listeners: list[EventCallback] = []
        self._bars: dict[str, tuple[widgets.IntProgress, widgets.Label]] = {}
        self._judged: dict[str, int] = {}

        if judges is None:
            judges = [DEFAULT_DEMO_JUDGE] if self.endpoint == DEMO_ENDPOINT else [DEFAULT_JUDGE]
        label_style = {"description_width": "110px"}
        self.name = widgets.Text(description="Batch name", style=label_style)
        self.models = widgets.Text(value=", ".join(models), description="Models", placeholder="comma-separated model ids", style=label_style, layout=full_width())
        self.runs = widgets.BoundedIntText(value=runs, min=1, max=10_000, description="Runs/model", style=label_style)
        self.turns = widgets.BoundedIntText(value=turns, min=1, max=10_000, description="Turns/run", style=label_style)
        self.temperature = widgets.BoundedFloatText(value=1.0, min=0.0, max=2.0, step=0.1, description="Temperature", style=label_style)
        self.top_p = _OptionalFloat(description="top_p", placeholder="blank: provider default", style=label_style)
        self.protocol = widgets.Dropdown(options=builtin_protocol_ids(), value=DEFAULT_PROTOCOL_ID, description="Protocol", style=label_style)
        self.judges = widgets.Text(value=", ".join(judges), description="Judge models", placeholder="comma-separated model ids", style=label_style, layout=full_width())
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
                widgets.HTML(f"<b>Run a batch</b> on {escape(self.endpoint)}"),
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
        """Build the batch config from the fields; raise ConfigError naming the invalid field."""
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
        wait_for(self._job, timeout)
        return self.outcome

    async def wait_async(self) -> Any:
        """Wait for the batch to end without blocking the event loop; return its outcome."""
        await wait_async(self._job)
        return self.outcome

    def _start(self, make: Callable[[threading.Event], Coroutine[Any, Any, Any]]) -> None:
        self._cancel = threading.Event()
        self.outcome = None
        self.error = None
        self.run_button.disabled = True
        self.resume_button.disabled = True
        self.cancel_button.disabled = False
        self._job = launch(self._guarded(make(self._cancel)), thread_name="hermitkit-batch")

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
        self.status.value = message(text, error=error)

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
