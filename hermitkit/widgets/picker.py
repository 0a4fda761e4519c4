"""The model picker: the endpoint's live model list with search, prices and context length."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ipywidgets as widgets

from hermitkit.client import ModelInfo
from hermitkit.config import DEMO_ENDPOINT
from hermitkit.errors import ConfigError, HermitkitError
from hermitkit.widgets.base import Piece, default_endpoint, escape, full_width, message


def _per_million(price: float | None) -> str:
    return "?" if price is None else f"${price * 1_000_000:.3g}"


class ModelPicker(Piece):
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
        self.options = widgets.SelectMultiple(options=[], rows=rows, layout=full_width())
        self.reload_button = widgets.Button(description="Reload list", icon="refresh", tooltip="Ask the endpoint for its model list again")
        self.clear_button = widgets.Button(description="Clear selection")
        self.status = widgets.HTML()
        self.chosen_label = widgets.HTML()
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<b>Models</b> at {escape(self.endpoint)} (prices in US dollars per million tokens)"),
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

        self.status.value = message(f"Loading the model list of {self.endpoint} ...")
        try:
            infos = run_sync(list_all_models(self.endpoint, api_key_env=self.api_key_env))
        except (HermitkitError, OSError) as exc:
            self.status.value = message(f"Could not load the model list: {exc}", error=True)
            return
        self.set_models(infos)

    def set_models(self, infos: Iterable[ModelInfo]) -> None:
        self._models = {info.id: info for info in sorted(infos, key=lambda item: item.id)}
        demo = any(info.is_demo for info in self._models.values()) or self.endpoint == DEMO_ENDPOINT
        note = " Demo models are scripted and describe no real model." if demo else ""
        self.status.value = message(f"{len(self._models)} models listed.{note}")
        self._set_chosen([model for model in self._chosen if model in self._models])

    def label(self, info: ModelInfo) -> str:
        """Format one option line: id, name, prices per million tokens and context length."""
        context = f"{info.context_length:,} ctx" if info.context_length else "? ctx"
        name = f" ({info.name})" if info.name and info.name != info.id else ""
        return f"{info.id}{name} | in {_per_million(info.prompt_price)}/M, out {_per_million(info.completion_price)}/M | {context}"

    def _matches(self, info: ModelInfo) -> bool:
        needle = self.search.value.strip().lower()
        return not needle or needle in info.id.lower() or needle in info.name.lower()

    def _render_options(self) -> None:
        # Chosen models stay listed whatever the search text is, so a search never drops them.
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
            self.chosen_label.value = message("No model chosen yet: click models in the list (Ctrl or Shift adds more).")
            return
        self.chosen_label.value = f"<b>Chosen ({len(self._chosen)}):</b> {escape(', '.join(self._chosen))}"

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
