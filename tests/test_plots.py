"""Every plot returns a Figure that renders to PNG, without pyplot state."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from matplotlib.figure import Figure

from hermitkit import analysis, plots
from hermitkit.store import Store
from tests.test_analysis import insert_batch, run_demo_batch, verdict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('plots') / 'plots.db'}")
    batch_id = run_demo_batch(store, runs=2, turns=4)
    yield store, batch_id
    store.dispose()


def render(figure: Figure) -> bytes:
    assert isinstance(figure, Figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data.startswith(PNG_SIGNATURE)
    return data


def test_model_bars_render(demo):
    store, batch_id = demo
    figure = plots.plot_model_bars(analysis.summary(store, batch_id))
    render(figure)
    assert len(figure.axes) == 3
    assert any("DEMO DATA" in text.get_text() for text in figure.texts)


def test_compliance_over_turns_render(demo):
    store, batch_id = demo
    figure = plots.plot_compliance_over_turns(store, batch_id)
    render(figure)
    assert len(figure.axes[0].get_lines()) == 4


def test_mirror_outcomes_render(demo):
    store, batch_id = demo
    render(plots.plot_mirror_outcomes(store, batch_id))


def test_end_states_render(demo):
    store, batch_id = demo
    render(plots.plot_end_states(store, batch_id))


def test_cost_vs_autonomy_render(demo):
    store, batch_id = demo
    render(plots.plot_cost_vs_autonomy(analysis.summary(store, batch_id)))


def test_plots_open_no_pyplot_figures(demo):
    import matplotlib.pyplot as plt

    store, batch_id = demo
    before = plt.get_fignums()
    plots.plot_model_bars(analysis.summary(store, batch_id))
    plots.plot_end_states(store, batch_id)
    assert plt.get_fignums() == before


def test_plots_of_empty_summary_render():
    render(plots.plot_model_bars(pd.DataFrame()))
    render(plots.plot_cost_vs_autonomy(pd.DataFrame()))


def test_plots_with_unrated_model_render(sqlite_url):
    store = Store(sqlite_url)
    batch_id = insert_batch(store, [{"model": "m/a", "replies": ["{x}"], "judgements": [verdict(status="parse_failed")]}, {"model": "m/b", "replies": ["{$x$ and $y}"], "judgements": [verdict()]}])
    frame = analysis.summary(store, batch_id)
    render(plots.plot_model_bars(frame))
    render(plots.plot_cost_vs_autonomy(frame))
    render(plots.plot_mirror_outcomes(store, batch_id))
    store.dispose()
