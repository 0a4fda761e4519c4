"""Parameterised notebooks: run them with papermill, export HTML with nbconvert.

``run_batch.ipynb`` and ``report.ipynb`` are executed into ``reports/<batch_id>/`` and
exported to HTML next to the executed copy. Both files are the shareable report, so no
secret may enter them. Parameters that look like a key, or URLs with a password, are
rejected. The kernel reads keys and credentials from its environment. Every written file
is checked for the values of secret environment variables.

The ``show_*`` functions are what the notebooks' cells call to render a batch as static
outputs (HTML tables, PNG images), so the exported HTML shows everything without a kernel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hermitkit.errors import ConfigError, HermitkitError

log = logging.getLogger("hermitkit.notebooks")

NOTEBOOK_NAMES = ("explore", "run_batch", "report")
REPORT_SECTIONS = ("summary", "plots", "synthesis", "personas", "transcripts")
DATABASE_URL_ENV = "HERMITKIT_DATABASE_URL"

# Shapes of common API keys and tokens. A parameter matching one is rejected before a
# notebook runs, because parameters are written into the executed notebook.
_KEY_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),  # OpenAI, OpenRouter (sk-or-v1-...), Anthropic (sk-ant-...)
    re.compile(r"\b(?:hf|ghp|gho|ghs|github_pat|xox[abp]|glpat)_[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),
    re.compile(r"\bBearer\s+[A-Za-z0-9._\-]{16,}", re.IGNORECASE),
)
# A URL with credentials, such as postgresql://user:password@host/db.
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:[^/\s@]+@")
# Override keys that would put a secret into a config, e.g. ``endpoint.api_key=...``.
_SECRET_KEY_NAMES = re.compile(r"(?:^|[._])(?:api_?key|key|token|secret|password|passwd)$", re.IGNORECASE)
# Environment variables whose values must never appear in a written notebook or HTML.
_SECRET_ENV_NAMES = re.compile(r"(?:API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
# Shorter values are too likely to occur by chance in a report to be worth flagging.
_MIN_SECRET_CHARS = 8


# --------------------------------------------------------------------------- secrets


def database_url_has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password is not None
    except ArgumentError:
        raise ConfigError(f"Invalid database URL {url.split('://')[0]}://...: use a SQLAlchemy URL such as sqlite:///path/to/hermitkit.db.") from None


def check_database_url(url: str | None) -> None:
    """Reject a database URL that carries a password, naming where the password belongs."""
    if url and "://" in url and database_url_has_password(url):
        raise ConfigError(
            "The database_url parameter contains a password, which would be saved in the notebook. "
            f"Pass the URL without it and put the full URL in the {DATABASE_URL_ENV} (or DATABASE_URL) environment variable."
        )


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple, set)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def secret_values() -> dict[str, str]:
    """Secret-looking environment variables (name to value), including database passwords."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    found = {name: value for name, value in os.environ.items() if _SECRET_ENV_NAMES.search(name) and len(value) >= _MIN_SECRET_CHARS}
    for name in (DATABASE_URL_ENV, "DATABASE_URL"):
        url = os.environ.get(name, "")
        try:
            password = make_url(url).password if "://" in url else None
        except (ArgumentError, ValueError):
            # The password cannot be found in a URL that does not parse, so guard all of it.
            password = url
        if password and len(password) >= _MIN_SECRET_CHARS:
            found[f"the password in {name}"] = password
    return found


def check_parameters(**parameters: Any) -> None:
    """Reject notebook parameters that hold a secret, with a message naming the parameter.

    A value fails when it looks like an API key or token, contains the value of a secret
    environment variable, is a database URL with a password, or is a ``key=value``
    override whose key names a secret. Keys belong in the environment (or ``.env``).
    """
    secrets = secret_values()
    for name, value in parameters.items():
        for where, text in _strings(value, name):
            if any(pattern.search(text) for pattern in _KEY_PATTERNS):
                raise ConfigError(
                    f"Parameter {where} looks like an API key or token, and parameters are saved in the executed notebook. "
                    "Put keys in the environment (OPENROUTER_API_KEY, or the variable named by endpoint.api_key_env) or in .env."
                )
            for variable, secret in secrets.items():
                if secret in text:
                    raise ConfigError(f"Parameter {where} contains the value of {variable}; pass no secret as a parameter, the kernel reads it from the environment.")
            if _URL_WITH_PASSWORD.search(text):
                raise ConfigError(
                    f"Parameter {where} contains a URL with a password, which would be saved in the notebook. "
                    f"Leave the password out and put the full URL in an environment variable, such as {DATABASE_URL_ENV} for the database."
                )
            key, separator, _value = text.partition("=")
            if separator and _SECRET_KEY_NAMES.search(key.strip()):
                raise ConfigError(f"Override {text.split('=')[0]}=... in {where} sets a secret; keys come from the environment, never from parameters.")


def check_files_for_secrets(paths: Iterable[Path], extra: Mapping[str, str] | None = None) -> None:
    """Delete every written file if any contains a secret value, and raise naming the variable.

    ``extra`` adds secrets that are not in the environment (name to value).
    """
    secrets = {**secret_values(), **(extra or {})}
    paths = [path for path in paths if path.exists()]
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for variable, secret in secrets.items():
            if secret in text:
                for other in paths:
                    other.unlink(missing_ok=True)
                raise HermitkitError(f"{path} contained the value of {variable}, so the report files were deleted. Find what printed it and run the report again.")


# --------------------------------------------------------------------------- locating notebooks and params


def notebooks_dir() -> Path:
    """Find the folder of the bundled notebooks: ``notebooks/`` of the hermitkit checkout.

    HERMITKIT_NOTEBOOKS overrides it, e.g. for an installed package without the checkout.
    """
    override = os.environ.get("HERMITKIT_NOTEBOOKS", "").strip()
    candidates = [Path(override).expanduser()] if override else []
    candidates += [Path(__file__).resolve().parent.parent / "notebooks", Path.cwd() / "notebooks"]
    for folder in candidates:
        if (folder / "report.ipynb").is_file():
            return folder
    raise ConfigError(
        f"The hermitkit notebooks were not found in {', '.join(str(folder) for folder in candidates)}. "
        "Run from a hermitkit checkout or set HERMITKIT_NOTEBOOKS to the folder that holds report.ipynb."
    )


def notebook_path(name: str) -> Path:
    if name not in NOTEBOOK_NAMES:
        raise ConfigError(f"Unknown notebook {name!r}: use one of {', '.join(NOTEBOOK_NAMES)}.")
    return notebooks_dir() / f"{name}.ipynb"


def resolve_params_path(path: str | os.PathLike[str]) -> Path:
    """Find a params file as given, else relative to the folder above the working directory.

    JupyterLab starts a kernel in ``notebooks/``, so ``params/demo.yaml`` written for the
    repository root is found from there too.
    """
    given = Path(path).expanduser()
    for candidate in (given, Path.cwd().parent / given):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"Params file not found: {given} (also looked in {Path.cwd().parent}). Pass the path of a YAML file such as params/demo.yaml.")


# --------------------------------------------------------------------------- executing


def _current_python_kernel_manager() -> type:
    """Build a kernel manager class that starts ipykernel with this interpreter.

    The notebooks name the kernel ``python3``. On a machine where that kernel belongs to
    another Python without hermitkit, papermill would fail, so the CLI runs them with the
    Python it runs in.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], display_name="Python 3 (ipykernel)", language="python")

    class CurrentPythonKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return spec

    return CurrentPythonKernelManager


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set environment variables for the kernel papermill starts, and restore them after."""
    previous = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebook(
    source: Path,
    output: Path,
    parameters: dict[str, Any],
    *,
    kernel_name: str | None = None,
    database_url: str | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Run ``source`` with papermill into ``output``; raise HermitkitError naming the failed cell.

    ``kernel_name`` None runs this Python's ipykernel. ``database_url`` reaches the kernel
    through HERMITKIT_DATABASE_URL, so a password in it stays out of the notebook.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    check_parameters(**parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    engine_options: dict[str, Any] = {}
    if kernel_name is None:
        engine_options["kernel_manager_class"] = _current_python_kernel_manager()
        kernel_name = "python3"

    log.info("Executing %s into %s", source, output)
    try:
        with _environment(**{DATABASE_URL_ENV: database_url}):
            papermill.execute_notebook(
                str(source),
                str(output),
                parameters=parameters,
                kernel_name=kernel_name,
                progress_bar=False,
                cwd=str(Path.cwd()),
                execution_timeout=timeout_s,
                **engine_options,
            )
    except PapermillExecutionError as exc:
        raise HermitkitError(f"Notebook {source.name} failed in cell {exc.exec_count} with {exc.ename}: {exc.evalue}. The partly executed notebook is {output}.") from None
    return output


def export_html(notebook: Path, html_path: Path | None = None) -> Path:
    """Export an executed notebook to HTML (JupyterLab template, code cells included)."""
    import nbformat
    from nbconvert import HTMLExporter

    html_path = html_path or notebook.with_suffix(".html")
    node = nbformat.read(str(notebook), as_version=4)
    body, _resources = HTMLExporter(template_name="lab").from_notebook_node(node)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def _database_secret(database_url: str | None) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    if not database_url or not database_url_has_password(database_url):
        return {}
    return {"the password of the database URL": str(make_url(database_url).password)}


def _parameter_database_url(database_url: str | None) -> str:
    """Return the URL to write into the notebook: the real one when it has no password, else blank."""
    if not database_url:
        return ""
    return "" if database_url_has_password(database_url) else database_url


def run_report_notebook(
    batch_id: int | str,
    *,
    out_dir: Path | str | None = None,
    database_url: str | None = None,
    sections: Iterable[str] = REPORT_SECTIONS,
    kernel_name: str | None = None,
) -> list[Path]:
    """Execute ``report.ipynb`` for a batch into ``out_dir`` (default ``reports/<batch_id>/``).

    ``batch_id`` may be ``"latest"``. Returns the executed notebook and its HTML export.
    """
    from hermitkit.analysis import resolve_batch_id
    from hermitkit.store import Store

    sections = check_sections(sections)
    store = Store(database_url)
    try:
        resolved = resolve_batch_id(store, batch_id)
    finally:
        store.dispose()
    folder = Path(out_dir) if out_dir is not None else Path("reports") / str(resolved)
    notebook = folder / "report.ipynb"
    parameters = {"batch_id": resolved, "database_url": _parameter_database_url(database_url), "sections": list(sections)}

    execute_notebook(notebook_path("report"), notebook, parameters, kernel_name=kernel_name, database_url=database_url)
    paths = [notebook, export_html(notebook)]
    check_files_for_secrets(paths, _database_secret(database_url))
    return paths


def run_batch_notebook(
    params: Path | str,
    overrides: Iterable[str] = (),
    *,
    database_url: str | None = None,
    reports_dir: Path | str = "reports",
    sections: Iterable[str] = REPORT_SECTIONS,
    kernel_name: str | None = None,
) -> list[Path]:
    """Execute ``run_batch.ipynb`` for a params file into ``reports/<batch_id>/``.

    The config is validated here first, so a bad params file fails before a kernel
    starts. Returns the executed notebook and its HTML export. When the batch fails
    after it was created, the partly executed notebook is still moved there and exported
    before the error is raised.
    """
    from hermitkit.config import load_params

    overrides = list(overrides)
    check_parameters(params=str(params), overrides=overrides)
    params_path = Path(params).expanduser().resolve()
    load_params(params_path, overrides)
    sections = check_sections(sections)

    staging = Path(reports_dir) / f".running-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    batch_id_file = staging / "batch_id"
    staged = staging / "run_batch.ipynb"
    parameters = {
        "params": str(params_path),
        "overrides": overrides,
        "database_url": _parameter_database_url(database_url),
        "sections": list(sections),
        "batch_id_file": str(batch_id_file.resolve()),
    }

    failure: HermitkitError | None = None
    try:
        execute_notebook(notebook_path("run_batch"), staged, parameters, kernel_name=kernel_name, database_url=database_url)
    except HermitkitError as exc:
        failure = exc

    if not batch_id_file.is_file():
        # The batch was never created: keep the notebook in the staging folder for reading.
        raise failure or HermitkitError(f"The notebook ended without creating a batch; see {staged}.")

    folder = Path(reports_dir) / batch_id_file.read_text(encoding="utf-8").strip()
    folder.mkdir(parents=True, exist_ok=True)
    notebook = folder / "run_batch.ipynb"
    shutil.move(str(staged), notebook)
    shutil.rmtree(staging, ignore_errors=True)
    paths = [notebook, export_html(notebook)]
    check_files_for_secrets(paths, _database_secret(database_url))
    if failure is not None:
        raise HermitkitError(f"{failure} The notebook and its HTML are in {folder}.")
    return paths


def check_sections(sections: Iterable[str]) -> list[str]:
    chosen = [sections] if isinstance(sections, str) else list(sections)
    unknown = [name for name in chosen if name not in REPORT_SECTIONS]
    if unknown:
        raise ConfigError(f"Unknown report section(s) {', '.join(map(repr, unknown))}: use any of {', '.join(REPORT_SECTIONS)}.")
    return chosen


def record_batch_id(path: str, batch_id: int) -> None:
    """Write the batch id for ``run_batch_notebook`` to find; a blank path does nothing."""
    if path:
        Path(path).write_text(str(batch_id), encoding="utf-8")


# --------------------------------------------------------------------------- what the notebook cells show


def open_store(database_url: str = "") -> Any:
    """Open the store a notebook reads: ``database_url`` if given, else the environment's."""
    from hermitkit.store import Store

    check_database_url(database_url)
    return Store(database_url or None)


def _display_html(markup: str) -> None:
    from IPython.display import HTML, display

    display(HTML(markup))


def create_syntheses_and_personas(store: Any, batch_id: int, sections: Iterable[str] = REPORT_SECTIONS) -> None:
    """Ask the batch's first judge for the missing syntheses and persona cards the sections show.

    Sends requests to the batch's endpoint (free on the demo server). A failure is
    printed and the report goes on without the missing parts.
    """
    from hermitkit.synthesis import ensure_personas, ensure_syntheses

    chosen = check_sections(sections)
    try:
        if "personas" in chosen:
            ensure_personas(store, batch_id)
        elif "synthesis" in chosen:
            ensure_syntheses(store, batch_id)
    except HermitkitError as exc:
        print(f"Could not create syntheses or persona cards: {exc}")


def show_header(store: Any, batch_id: int) -> None:
    from hermitkit.export import DEMO_NOTICE
    from hermitkit.status import batch_status
    from hermitkit.widgets.base import escape

    info = batch_status(store, batch_id)
    lines = [
        f"<h2>Batch {batch_id}: {escape(info['name'] or 'no name')}</h2>",
        f"<p>Status <b>{escape(info['status'])}</b>; protocol {escape(info['protocol_id'])} ({escape(info['protocol_hash'][:12])}); "
        f"endpoint {escape(info['endpoint'])}; created {info['created_at']:%Y-%m-%d %H:%M} UTC.<br>"
        f"Assistant turns {info['turns']} of {info['turns_target']}; verdicts {info['verdicts']} ({info['parse_failures']} failed to parse); spent ${info['spent_usd']:.4f}.</p>",
    ]
    if info["is_demo"]:
        lines.append(f"<p style='color:#8c1d18;font-weight:600'>{escape(DEMO_NOTICE)}</p>")
    if info["error"]:
        lines.append(f"<p><i>Note:</i> {escape(info['error'])}</p>")
    _display_html("".join(lines))


def show_summary(store: Any, batch_id: int) -> None:
    from hermitkit.widgets.render import summary_table_html

    _display_html("<h3>Per-model summary</h3><p>Judge means exclude verdicts that failed to parse.</p>" + summary_table_html(store, batch_id))


def show_plots(store: Any, batch_id: int) -> None:
    from IPython.display import Image, display

    from hermitkit.widgets.base import escape, message
    from hermitkit.widgets.render import batch_figures, figure_png

    for title, figure in batch_figures(store, batch_id):
        _display_html(f"<h3>{escape(title)}</h3>")
        if isinstance(figure, str):
            _display_html(message(figure, error=True))
        else:
            display(Image(data=figure_png(figure), format="png"))


def show_syntheses(store: Any, batch_id: int) -> None:
    """Show the newest stored thematic synthesis of each model."""
    from hermitkit.synthesis import stored_syntheses
    from hermitkit.widgets.base import escape, message

    parts = ["<h3>Thematic synthesis</h3>"]
    syntheses = stored_syntheses(store, batch_id)
    if not syntheses:
        parts.append(message("No synthesis stored for this batch."))
    for model, synthesis in sorted(syntheses.items()):
        parts.append(f"<h4>{escape(model)} <small>(written by {escape(synthesis['judge_model'])})</small></h4>")
        if synthesis["status"] != "ok":
            parts.append(message("The synthesis failed to parse.", error=True))
            continue
        items = "".join(
            f"<li><b>{escape(theme.get('name'))}</b>: {escape(theme.get('description'))} (runs {escape(', '.join(str(run) for run in theme.get('run_ids') or []))})</li>"
            for theme in synthesis["themes"]
        )
        parts.append(f"<ul>{items}</ul>")
    _display_html("".join(parts))


def show_personas(store: Any, batch_id: int) -> None:
    from hermitkit.widgets.render import persona_cards_html

    _display_html("<h3>Persona cards</h3>" + persona_cards_html(store, batch_id))


def selected_run_ids(store: Any, batch_id: int, *, per_model: int = 1) -> list[int]:
    """Pick the first ``per_model`` runs of each model, in model order."""
    from hermitkit.widgets.render import batch_runs

    picked: list[int] = []
    counts: dict[str, int] = {}
    for row in batch_runs(store, batch_id):
        if counts.get(row["model"], 0) < per_model:
            picked.append(row["id"])
            counts[row["model"]] = counts.get(row["model"], 0) + 1
    return picked


def show_transcripts(store: Any, batch_id: int, run_ids: Iterable[int] | None = None) -> None:
    from hermitkit.status import run_transcript
    from hermitkit.widgets.render import transcript_html

    chosen = list(run_ids) if run_ids else selected_run_ids(store, batch_id)
    _display_html("<h3>Selected transcripts</h3>")
    for run_id in chosen:
        run, turns = run_transcript(store, run_id)
        _display_html(transcript_html(run, turns))


def show_report(store: Any, batch_id: int, sections: Iterable[str] = REPORT_SECTIONS, *, run_ids: Iterable[int] | None = None) -> None:
    """Render the chosen report sections of a batch as static outputs."""
    chosen = check_sections(sections)
    show_header(store, batch_id)
    renderers = {
        "summary": lambda: show_summary(store, batch_id),
        "plots": lambda: show_plots(store, batch_id),
        "synthesis": lambda: show_syntheses(store, batch_id),
        "personas": lambda: show_personas(store, batch_id),
        "transcripts": lambda: show_transcripts(store, batch_id, run_ids),
    }
    for name in REPORT_SECTIONS:
        if name in chosen:
            renderers[name]()
