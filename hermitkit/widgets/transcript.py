"""The transcript viewer: one run's turns, chosen from a batch's runs."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from hermitkit.errors import ConfigError
from hermitkit.store import Store
from hermitkit.widgets.base import Piece, full_width, message
from hermitkit.widgets.render import batch_runs, transcript_html


class TranscriptViewer(Piece):
    """One run's transcript; choose the run from a batch's runs or call :meth:`show`."""

    def __init__(self, store: Store | None = None, *, batch_id: int | None = None, run_id: int | None = None):
        self.store = store or Store()
        self.batch_id: int | None = None
        self._syncing = False
        self.run_choice = widgets.Dropdown(description="Run", options=[], layout=widgets.Layout(width="60%"))
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.body = widgets.HTML(layout=full_width())
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
        """List the batch's runs in the chooser; keep the shown run if it is one of them."""
        self.batch_id = batch_id
        rows = batch_runs(self.store, batch_id)
        options = [(f"run {row['id']}: {row['model']} #{row['repetition']} ({row['status']}, {row['turn_count']}/{row['turns_target']} turns)", row["id"]) for row in rows]
        ids = [value for _label, value in options]
        chosen = self.run_choice.value
        if chosen not in ids:
            chosen = ids[0] if ids else None
        self._syncing = True
        try:
            self.run_choice.options = options
            self.run_choice.value = chosen
        finally:
            self._syncing = False
        if options:
            self.refresh()
        else:
            self.body.value = message(f"Batch {batch_id} has no runs.")

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
            self.body.value = message("No run chosen.")
            return
        try:
            run, turns = run_transcript(self.store, self.run_id)
        except ConfigError as exc:
            self.body.value = message(str(exc), error=True)
            return
        self.body.value = transcript_html(run, turns)

    def _on_choice(self, _change: dict[str, Any]) -> None:
        if not self._syncing:
            self.refresh()
