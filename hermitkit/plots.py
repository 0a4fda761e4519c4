"""matplotlib figures of a batch.

Every function builds a ``matplotlib.figure.Figure`` without pyplot, so no global figure
state is touched and nothing is shown: Jupyter displays the returned figure, and
``figure.savefig`` writes it. Figures of a demo batch carry the demo notice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from hermitkit.analysis import (
    batch_is_demo,
    compliance_over_turns,
    end_state_counts,
    mirror_outcomes,
    resolve_batch_id,
)
from hermitkit.export import DEMO_NOTICE
from hermitkit.store import Store

MIRROR_COLOURS = {"passed": "#2b8a3e", "failed_then_passed": "#82c91e", "partial": "#fab005", "failed": "#e03131", "not_parsed": "#adb5bd"}
END_STATE_COLOURS = {"repetition_loop": "#e8590c", "silence": "#495057", "symbol_collapse": "#ae3ec9", "stuck_asking": "#1c7ed6", "none": "#ced4da"}


def _mark_demo(figure: Figure, is_demo: bool) -> None:
    if not is_demo:
        return
    # Keep a strip at the bottom free of axes, so the notice never overlaps tick labels.
    engine = figure.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(rect=(0, 0.05, 1, 0.95))
    figure.text(0.5, 0.005, DEMO_NOTICE, ha="center", va="bottom", fontsize=7, color="#c92a2a")


def _empty(figure: Figure, message: str) -> Figure:
    axes = figure.add_subplot()
    axes.text(0.5, 0.5, message, ha="center", va="center")
    axes.set_axis_off()
    return figure


def plot_model_bars(summary_frame: pd.DataFrame) -> Figure:
    """Per-model bars of compliance (%), autonomy and sophistication with their 95 % CI error bars.

    Takes the frame of ``hermitkit.analysis.summary``.
    """
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    if summary_frame.empty:
        return _empty(figure, "No runs stored.")

    models = [str(model) for model in summary_frame.index]
    positions = np.arange(len(models))
    panels = (
        ("compliance", "Compliance (%)", 100.0, (0, 105)),
        ("autonomy", "Autonomy (1-5)", 1.0, (0, 5.4)),
        ("sophistication", "Sophistication (1-5)", 1.0, (0, 5.4)),
    )
    axes_list = figure.subplots(1, len(panels))
    for axes, (name, title, scale, limits) in zip(axes_list, panels, strict=True):
        means = summary_frame[f"{name}_mean"].astype(float).to_numpy() * scale
        low = summary_frame[f"{name}_ci_low"].astype(float).to_numpy() * scale
        high = summary_frame[f"{name}_ci_high"].astype(float).to_numpy() * scale
        errors = np.vstack([np.clip(means - low, 0, None), np.clip(high - means, 0, None)])
        axes.bar(positions, np.nan_to_num(means), yerr=np.nan_to_num(errors), capsize=4, color="#4c6ef5")
        axes.set_xticks(positions, models, rotation=30, ha="right", fontsize=8)
        axes.set_title(title)
        axes.set_ylim(*limits)

    confidence = summary_frame.attrs.get("ci_confidence", 0.95)
    figure.suptitle(f"Per-model means with {confidence:.0%} {summary_frame.attrs.get('ci_method', 'bootstrap')} intervals (seed {summary_frame.attrs.get('ci_seed', '-')})", fontsize=10)
    _mark_demo(figure, bool(summary_frame.attrs.get("is_demo")))
    return figure


def plot_compliance_over_turns(store: Store, batch_id: int | str | None = None) -> Figure:
    """Share of runs with an ``ok`` reply at each turn number, one line per model."""
    batch_id = resolve_batch_id(store, batch_id)
    frame = compliance_over_turns(store, batch_id)
    figure = Figure(figsize=(8, 4.2), layout="constrained")
    if frame.empty:
        return _empty(figure, "No turns stored.")

    axes = figure.add_subplot()
    for model, group in frame.groupby("model", sort=True):
        axes.plot(group["turn"], group["compliance"] * 100, marker="o", label=str(model))
    axes.set_xlabel("Turn")
    axes.set_ylabel("Runs with an ok reply (%)")
    axes.set_ylim(-5, 105)
    axes.set_title(f"Compliance over turns, batch {batch_id}")
    axes.legend(fontsize=8)
    _mark_demo(figure, batch_is_demo(store, batch_id))
    return figure


def _stacked_bars(figure: Figure, table: pd.DataFrame, colours: dict[str, str], *, title: str, ylabel: str) -> None:
    axes = figure.add_subplot()
    positions = np.arange(len(table.index))
    bottom = np.zeros(len(table.index))
    for column in table.columns:
        values = table[column].to_numpy(dtype=float)
        axes.bar(positions, values, bottom=bottom, label=str(column).replace("_", " "), color=colours.get(str(column)))
        bottom += values
    axes.set_xticks(positions, [str(model) for model in table.index], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_mirror_outcomes(store: Store, batch_id: int | str | None = None, *, judge_model: str | None = None) -> Figure:
    """Stacked bars of mirror-test outcomes per model, with verdicts that failed to parse."""
    batch_id = resolve_batch_id(store, batch_id)
    table = mirror_outcomes(store, batch_id, judge_model=judge_model)
    figure = Figure(figsize=(8, 4.2), layout="constrained")
    if table.empty:
        return _empty(figure, "No verdicts stored.")
    _stacked_bars(figure, table, MIRROR_COLOURS, title=f"Mirror test, batch {batch_id}", ylabel="Verdicts")
    _mark_demo(figure, batch_is_demo(store, batch_id))
    return figure


def plot_end_states(store: Store, batch_id: int | str | None = None, *, talk: pd.DataFrame | None = None) -> Figure:
    """Stacked bars of how runs end (``hermitkit.metrics.end_state``) per model.

    ``talk`` is the batch's ``self_talk`` frame when the caller already has it.
    """
    batch_id = resolve_batch_id(store, batch_id)
    table = end_state_counts(store, batch_id, talk=talk)
    figure = Figure(figsize=(8, 4.2), layout="constrained")
    if table.empty:
        return _empty(figure, "No runs stored.")
    _stacked_bars(figure, table, END_STATE_COLOURS, title=f"End state of runs (text heuristics), batch {batch_id}", ylabel="Runs")
    _mark_demo(figure, batch_is_demo(store, batch_id))
    return figure


def plot_cost_vs_autonomy(summary_frame: pd.DataFrame) -> Figure:
    """Cost per run (replies and verdicts, USD) against mean autonomy, one point per model.

    Horizontal error bars are the autonomy intervals of the summary frame.
    """
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    if summary_frame.empty:
        return _empty(figure, "No runs stored.")

    axes = figure.add_subplot()
    autonomy = summary_frame["autonomy_mean"].astype(float).to_numpy()
    cost = summary_frame["cost_per_run_usd"].astype(float).to_numpy()
    errors = np.vstack(
        [
            np.clip(autonomy - summary_frame["autonomy_ci_low"].astype(float).to_numpy(), 0, None),
            np.clip(summary_frame["autonomy_ci_high"].astype(float).to_numpy() - autonomy, 0, None),
        ]
    )
    axes.errorbar(autonomy, cost, xerr=np.nan_to_num(errors), fmt="o", capsize=4, color="#4c6ef5")
    for model, x, y in zip(summary_frame.index, autonomy, cost, strict=True):
        if not np.isnan(x):
            axes.annotate(str(model), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlim(0.5, 5.5)
    axes.set_xlabel("Autonomy (1-5, judge mean)")
    axes.set_ylabel("Cost per run (USD)")
    axes.set_title("Cost against autonomy")
    _mark_demo(figure, bool(summary_frame.attrs.get("is_demo")))
    return figure
