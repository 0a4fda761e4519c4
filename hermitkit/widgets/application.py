"""The whole app in one cell: model picker, run panel with a live transcript, batch browser."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from hermitkit.store import Store
from hermitkit.widgets.base import Piece
from hermitkit.widgets.browser import BatchBrowser
from hermitkit.widgets.picker import ModelPicker
from hermitkit.widgets.run_panel import RunPanel
from hermitkit.widgets.transcript import TranscriptViewer


class HermitApp(Piece):
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
        elif kind in ("turn", "run_finished") and event.get("run_id") == self.live.run_id:
            self.live.refresh()
        elif kind == "batch_finished":
            self.live.set_batch(event["batch_id"])
            self.browser.refresh(select=event["batch_id"])


def app(endpoint: str | None = None, **options: Any) -> HermitApp:
    """Build the whole hermitkit app; show it by making it the last expression of a cell.

    ``endpoint`` is a base URL or ``"demo"``; by default OpenRouter when
    OPENROUTER_API_KEY is set, else the offline demo server.
    """
    return HermitApp(endpoint, **options)
