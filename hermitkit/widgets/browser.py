"""The batch browser: a stored batch's summary table, plots, persona cards and transcripts."""

from __future__ import annotations

import logging
from typing import Any

import ipywidgets as widgets

from hermitkit.errors import HermitkitError
from hermitkit.store import Store
from hermitkit.widgets.base import Job, Piece, escape, launch, message, wait_async, wait_for
from hermitkit.widgets.render import batch_figures, figure_png, persona_cards_html, summary_table_html
from hermitkit.widgets.transcript import TranscriptViewer

log = logging.getLogger("hermitkit.widgets")


class BatchBrowser(Piece):
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
        self.generate_button = widgets.Button(
            description="Create persona cards",
            icon="magic",
            layout=widgets.Layout(width="auto"),
            tooltip="Ask the batch's first judge model for the missing syntheses and persona cards (sends requests)",
        )
        self.generate_status = widgets.HTML()
        self.viewer = TranscriptViewer(self.store)
        self._job: Job | None = None
        self.tabs = widgets.Tab(
            children=[self.summary, self.plots, widgets.VBox([self.generate_button, self.generate_status, self.personas]), self.viewer.widget],
            titles=("Summary", "Plots", "Persona cards", "Transcripts"),
        )
        self.widget = widgets.VBox([widgets.HBox([self.batch_choice, self.refresh_button]), self.header, self.tabs])

        self.batch_choice.observe(self._on_choice, names="value")
        self.refresh_button.on_click(lambda _button: self.refresh())
        self.generate_button.on_click(lambda _button: self.generate_personas())
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
            self.header.value = message(f"No batch stored in {self.store} yet: run one in the run panel or with `hermitkit run params/demo.yaml`.")
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
        self.header.value = message(text)
        self.summary.value = summary_table_html(self.store, batch_id)
        self.viewer.set_batch(batch_id)
        # Plots and cards take a moment to build: they load when their tab opens.
        self.plots.children = []
        self.personas.value = ""
        self.generate_status.value = ""
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
        figures = batch_figures(self.store, self.batch_id)
        children: list[widgets.Widget] = []
        for title, figure in figures:
            children.append(widgets.HTML(f"<b>{escape(title)}</b>"))
            if isinstance(figure, str):
                children.append(widgets.HTML(message(figure, error=True)))
            else:
                children.append(widgets.Image(value=figure_png(figure), format="png", layout=widgets.Layout(max_width="100%")))
        self.plots.children = children

    def load_personas(self) -> None:
        assert self.batch_id is not None
        self.personas.value = persona_cards_html(self.store, self.batch_id)

    def generate_personas(self) -> None:
        """Ask the judge for missing syntheses and persona cards without blocking the kernel."""
        if self.batch_id is None or (self._job is not None and not self._job.done()):
            return
        self.generate_button.disabled = True
        self.generate_status.value = message("Asking the judge for syntheses and persona cards ...")
        self._job = launch(self._generate(self.batch_id), thread_name="hermitkit-personas")

    def wait(self, timeout: float | None = None) -> None:
        """Block until persona cards are created (scripts and tests; in a kernel use ``await wait_async()``)."""
        wait_for(self._job, timeout)

    async def wait_async(self) -> None:
        await wait_async(self._job)

    async def _generate(self, batch_id: int) -> None:
        from hermitkit.synthesis import ensure_personas_async

        try:
            await ensure_personas_async(self.store, batch_id)
        except (HermitkitError, OSError) as exc:
            self.generate_status.value = message(f"Could not create persona cards: {exc}", error=True)
        else:
            self.generate_status.value = message("Persona cards stored.")
            if self.batch_id == batch_id:
                self.load_personas()
        finally:
            self.generate_button.disabled = False
