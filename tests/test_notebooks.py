"""The notebooks executed by papermill against the demo server, their HTML, and secret hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from click.testing import CliRunner
from papermill.exceptions import PapermillExecutionError
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from hermitkit.cli import cli
from hermitkit.errors import ConfigError
from hermitkit.notebooks import check_parameters, export_html, run_batch_notebook, run_report_notebook
from hermitkit.store import Batch, Store
from tests.test_widgets import XSS_REPLY, demo_batch, plant_reply

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DEMO_PARAMS = REPO / "params" / "demo.yaml"

CANARY_KEY = "sk-or-v1-canary0123456789abcdef0123456789abcdef"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

notebook_run = pytest.mark.slow


@pytest.fixture
def canary_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fake OpenRouter key in the environment that no written file may contain."""
    monkeypatch.setenv("OPENROUTER_API_KEY", CANARY_KEY)
    return CANARY_KEY


def assert_no_canary(*paths: Path) -> None:
    for path in paths:
        assert CANARY_KEY not in path.read_text(encoding="utf-8"), path


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def html_outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(output.get("data", {}).get("text/html", "") for output in outputs(notebook))


@pytest.mark.parametrize("name", ["explore", "run_batch", "report"])
def test_repo_notebook_has_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)

    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], cell.source[:60]
            assert cell.execution_count is None, cell.source[:60]
    assert notebook.metadata.kernelspec.name == "python3"
    assert "widgets" not in notebook.metadata


@pytest.mark.parametrize("name", ["explore", "run_batch", "report"])
def test_notebook_has_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)

    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert tagged[0].cell_type == "code"


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"params": "sk-or-v1-0123456789abcdef0123456789abcdef"}, "looks like an API key"),
        ({"overrides": ["runs=2", "endpoint.api_key=abc"]}, "sets a secret"),
        ({"overrides": ["token=xyz"]}, "sets a secret"),
        ({"database_url": "postgresql://hermit:hunter2hunter2@127.0.0.1/db"}, "URL with a password"),
        ({"note": "Bearer abcdefghijklmnopqrstuvwxyz"}, "looks like an API key"),
        ({"nested": {"deep": ["ghp_0123456789abcdefghij0123"]}}, "nested.deep\\[0\\]"),
    ],
)
def test_check_parameters_rejects_secrets(parameters, expected):
    with pytest.raises(ConfigError, match=expected):
        check_parameters(**parameters)


def test_check_parameters_rejects_environment_secret(monkeypatch):
    monkeypatch.setenv("MY_ENDPOINT_API_KEY", "plainvalue-without-shape")

    with pytest.raises(ConfigError, match="MY_ENDPOINT_API_KEY"):
        check_parameters(params="x plainvalue-without-shape y")


def test_check_parameters_accepts_plain_values():
    check_parameters(
        params="params/demo.yaml",
        overrides=["runs=2", "endpoint.api_key_env=MY_KEY", "endpoint.base_url=http://127.0.0.1:8765/v1"],
        database_url="postgresql://hermit@127.0.0.1:5432/hermitkit",
        sections=["summary"],
        batch_id="latest",
    )


@notebook_run
def test_report_notebook_with_papermill_cli(canary_key, tmp_path):
    store = Store()
    batch_id = demo_batch(store, models=["demo/steady", "demo/forgetful"], turns=3)
    output = tmp_path / "out.ipynb"

    # The command a researcher types, with the notebook's own kernel name.
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS / "report.ipynb"), str(output), "-p", "batch_id", "latest", "--no-progress-bar"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    notebook = nbformat.read(output, as_version=4)
    markup = html_outputs(notebook)
    assert f"Batch {batch_id}:" in markup
    assert "hk-summary" in markup
    assert "hk-persona" in markup
    assert "hk-transcript" in markup
    assert "Thematic synthesis" in markup
    assert "DEMO DATA" in markup
    assert sum(1 for output in outputs(notebook) if "image/png" in output.get("data", {})) == 5

    page = export_html(output)
    text = page.read_text(encoding="utf-8")
    assert "hk-persona" in text
    assert "data:image/png;base64," in text
    assert '<table class="dataframe hk-summary">' in text
    assert_no_canary(output, page)


@notebook_run
def test_run_command_notebook_writes_report(canary_key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(cli, ["run", str(DEMO_PARAMS), "--set", "runs=1", "--set", "turns=3", "--set", "name=from-notebook", "--notebook"])

    assert result.exit_code == 0, result.output
    batch = Store().read(lambda session: session.scalars(select(Batch).where(Batch.name == "from-notebook")).one())
    assert batch.status == "completed"
    folder = tmp_path / "reports" / str(batch.id)
    notebook_path = folder / "run_batch.ipynb"
    html_path = folder / "run_batch.html"
    assert notebook_path.is_file()
    assert html_path.is_file()
    assert f"wrote {notebook_path.relative_to(tmp_path)}" in result.output
    assert [path.name for path in (tmp_path / "reports").iterdir()] == [str(batch.id)]

    notebook = nbformat.read(notebook_path, as_version=4)
    streams = "".join(output.get("text", "") for output in outputs(notebook))
    assert f"Batch {batch.id}: completed" in streams
    assert "hk-persona" in html_outputs(notebook)
    injected = next(cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", []))
    assert "name=from-notebook" in injected.source
    assert_no_canary(notebook_path, html_path)


@notebook_run
def test_report_command_notebook(canary_key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch_id = demo_batch(Store(), models=["demo/wanderer"], turns=2)

    result = CliRunner().invoke(cli, ["report", "latest", "--format", "csv", "--notebook"])

    assert result.exit_code == 0, result.output
    folder = tmp_path / "reports" / str(batch_id)
    notebook_path = folder / "report.ipynb"
    html_path = folder / "report.html"
    assert notebook_path.is_file()
    assert html_path.is_file()
    assert "hk-persona" in html_path.read_text(encoding="utf-8")
    assert_no_canary(notebook_path, html_path)


@notebook_run
def test_run_batch_notebook_resumes_batch(tmp_path):
    store = Store()
    batch_id = demo_batch(store, models=["demo/steady"], turns=2)

    notebook = tmp_path / "resume.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "run_batch.ipynb"),
        str(notebook),
        parameters={"resume_batch_id": batch_id, "sections": ["summary"], "generate": False},
        progress_bar=False,
    )

    executed = nbformat.read(notebook, as_version=4)
    streams = "".join(output.get("text", "") for output in outputs(executed))
    assert f"Batch {batch_id}: completed" in streams
    count = store.read(lambda session: session.scalar(select(func.count()).select_from(Batch)))
    assert count == 1


@notebook_run
def test_report_notebook_function(canary_key, tmp_path):
    store = Store()
    batch_id = demo_batch(store)

    paths = run_report_notebook(batch_id, out_dir=tmp_path / "report", sections=["summary", "plots"])

    assert [path.name for path in paths] == ["report.ipynb", "report.html"]
    notebook = nbformat.read(paths[0], as_version=4)
    markup = html_outputs(notebook)
    assert "hk-summary" in markup
    assert "hk-persona" not in markup
    assert "hk-transcript" not in markup
    assert_no_canary(*paths)


@notebook_run
def test_explore_notebook_runs_demo_batch(canary_key, tmp_path):
    output = tmp_path / "explore.ipynb"

    papermill.execute_notebook(
        str(NOTEBOOKS / "explore.ipynb"),
        str(output),
        parameters={"endpoint": "demo", "autorun_demo": True},
        progress_bar=False,
    )

    notebook = nbformat.read(output, as_version=4)
    views = [output for output in outputs(notebook) if WIDGET_VIEW in output.get("data", {})]
    assert len(views) == 2
    assert notebook.metadata.widgets[WIDGET_STATE]["state"]
    streams = "".join(output.get("text", "") for output in outputs(notebook))
    assert "Batch 1: completed" in streams
    assert [output for output in outputs(notebook) if output.output_type == "error"] == []
    batch = Store().read(lambda session: session.get(Batch, 1))
    assert batch.status == "completed"
    assert batch.config["models"] == ["demo/steady", "demo/confused"]

    page = export_html(output)
    assert WIDGET_STATE in page.read_text(encoding="utf-8")
    assert_no_canary(output, page)


@notebook_run
def test_markup_in_reply_stays_text(tmp_path):
    store = Store()
    batch_id = demo_batch(store, models=["demo/steady"])
    run_id = plant_reply(store, batch_id)

    notebook_path, html_path = run_report_notebook(batch_id, out_dir=tmp_path, sections=["transcripts"])

    for text in (html_outputs(nbformat.read(notebook_path, as_version=4)), html_path.read_text(encoding="utf-8")):
        assert f"Run {run_id}:" in text
        assert "<script>alert('hk-xss')" not in text
        assert "<img src=x onerror" not in text
        assert "<script>alert('hk-reasoning')" not in text
        assert "<b>inside</b>" not in text
    page = html_path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert('hk-xss')&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert('hk-img')&gt;" in page
    assert XSS_REPLY not in page


@notebook_run
def test_report_rejects_password_parameter(tmp_path):
    demo_batch(Store(), models=["demo/steady"], turns=1)

    with pytest.raises(PapermillExecutionError, match="URL with a password"):
        papermill.execute_notebook(
            str(NOTEBOOKS / "report.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"database_url": "postgresql://hermit:hunter2hunter2@127.0.0.1/db", "batch_id": "latest"},
            progress_bar=False,
        )


def test_run_batch_notebook_rejects_key_override(tmp_path):
    with pytest.raises(ConfigError, match="sets a secret"):
        run_batch_notebook(DEMO_PARAMS, ["endpoint.api_key=plain-text-key"], reports_dir=tmp_path / "reports")

    assert not (tmp_path / "reports").exists()


@notebook_run
def test_database_password_stays_out_of_report(postgres_url, tmp_path):
    # The test server trusts local connections, so any password is accepted and ignored.
    with_password = make_url(postgres_url).set(username="postgres", password="canary-db-password-42").render_as_string(hide_password=False)
    store = Store(with_password)
    batch_id = demo_batch(store, models=["demo/steady"], turns=2)

    paths = run_report_notebook(batch_id, out_dir=tmp_path, database_url=with_password, sections=["summary"])

    for path in paths:
        assert "canary-db-password-42" not in path.read_text(encoding="utf-8"), path
    notebook = nbformat.read(paths[0], as_version=4)
    injected = next(cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", []))
    assert 'database_url = ""' in injected.source
    assert "hk-summary" in html_outputs(notebook)
    store.dispose()


def test_executed_notebook_json_is_valid_for_nbconvert(tmp_path):
    notebook = nbformat.read(NOTEBOOKS / "report.ipynb", as_version=4)
    path = tmp_path / "copy.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")

    page = export_html(path)

    assert "hermitkit batch report" in page.read_text(encoding="utf-8")
