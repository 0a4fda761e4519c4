"""The ``hermitkit`` command: a thin layer over the library."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from hermitkit.errors import AuthenticationError, ConfigError, HermitkitError, InsufficientCreditsError

# Terminal control sequences in model output could rewrite the screen; show them as text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def printable(text: str | None) -> str:
    """Model text made safe for a terminal: control characters shown as escapes."""
    if text is None:
        return ""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _load_dotenv() -> None:
    from dotenv import find_dotenv, load_dotenv

    # Values already in the environment win over the file.
    load_dotenv(find_dotenv(usecwd=True), override=False)


def _store(database_url: str | None, *, create: bool = False) -> Any:
    """Open the store at ``database_url``. A SQLite file named there must exist unless ``create`` is set.

    Only ``run`` creates a store. Any other command given the path of a SQLite file that is
    not there would otherwise create an empty store, and its folders, and then report that
    the batch is not found, when the path has a typo.
    """
    from hermitkit.store import Store

    if database_url is not None and not create:
        path = _sqlite_path(database_url)
        if path is not None and not path.exists():
            raise ConfigError(
                f"No hermitkit store at {path}: the file does not exist. Check --database-url (or HERMITKIT_DATABASE_URL), "
                "or create a new store with `hermitkit run PARAMS.yaml`."
            )
    return Store(database_url)


def _sqlite_path(database_url: str) -> Path | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(database_url)
    except ArgumentError:
        # Store names the invalid URL and the accepted forms.
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


class _Group(click.Group):
    """Turns hermitkit's own errors into one readable line and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            sys.exit(2)
        except (AuthenticationError, InsufficientCreditsError, HermitkitError, LookupError) as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            sys.exit(1)


class BatchIdType(click.ParamType):
    """A batch id: a positive number or ``latest`` (the newest batch in the store)."""

    name = "BATCH_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "latest":
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a batch id: give a number or 'latest'.", param, ctx)
        if number < 1:
            self.fail(f"{value!r} is not a batch id: batch ids start at 1.", param, ctx)
        return number


BATCH_ID = BatchIdType()


def _resolve(store: Any, batch_id: int | str) -> int:
    from hermitkit.analysis import resolve_batch_id

    return resolve_batch_id(store, batch_id)


database_option = click.option(
    "--database-url",
    envvar="HERMITKIT_DATABASE_URL",
    default=None,
    help="SQLAlchemy URL of the store (default: HERMITKIT_DATABASE_URL, then DATABASE_URL, then hermitkit.db in HERMITKIT_HOME or the user data folder).",
)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="Show INFO (-v) or DEBUG (-vv) log lines on stderr.")
def cli(verbose: int) -> None:
    """Run and judge the HermitBench autonomy experiment."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _load_dotenv()


@cli.command()
@click.option("--search", default=None, help="Only models whose id or name contains TEXT (case-insensitive).")
@click.option("--endpoint", "base_url", default=None, help="Base URL of an OpenAI-compatible endpoint, or 'demo' (default: OpenRouter).")
@click.option("--api-key-env", default=None, help="Environment variable holding the key for a non-OpenRouter endpoint.")
def models(search: str | None, base_url: str | None, api_key_env: str | None) -> None:
    """List the endpoint's models with prices (USD per million tokens) and context length."""
    from hermitkit.catalogue import list_all_models

    infos = asyncio.run(list_all_models(base_url, api_key_env=api_key_env))
    if search:
        needle = search.lower()
        infos = [info for info in infos if needle in info.id.lower() or needle in info.name.lower()]
    if not infos:
        click.echo("No model matches." if search else "The endpoint listed no models.")
        return

    click.echo(f"{'model':<50} {'prompt $/M':>11} {'completion $/M':>15} {'context':>9}")
    for info in sorted(infos, key=lambda item: item.id):
        click.echo(f"{printable(info.id):<50} {_per_million(info.prompt_price):>11} {_per_million(info.completion_price):>15} {info.context_length or '-':>9}")


def _per_million(price: float | None) -> str:
    return "-" if price is None else f"{price * 1_000_000:.3f}"


@cli.command()
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a params key; the value is read as YAML (e.g. --set runs=3 --set endpoint.timeout_s=30).")
@click.option("--dry-run", is_flag=True, help="Check the config and models, print the plan and the maximum cost, and send no chat request.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--notebook", is_flag=True, help="Run through notebooks/run_batch.ipynb with papermill and write the executed notebook and HTML to reports/<batch_id>/.")
@database_option
def run(params: Path, overrides: tuple[str, ...], dry_run: bool, no_progress: bool, notebook: bool, database_url: str | None) -> None:
    """Run a batch described by a params YAML file, judge it and print a per-model summary."""
    from hermitkit.config import load_params

    config = load_params(params, list(overrides))
    if dry_run:
        _dry_run(config)
        return
    if notebook:
        from hermitkit.notebooks import run_batch_notebook

        paths = run_batch_notebook(params, list(overrides), database_url=database_url)
        for path in paths:
            click.echo(f"wrote {path}")
        return

    from hermitkit.runner import run_batch

    store = _store(database_url, create=True)
    created: list[int] = []

    def on_created(batch_id: int) -> None:
        created.append(batch_id)
        click.echo(f"Batch {batch_id} created in {store}.")

    with _hint_on_interrupt(lambda: _resume_hint(created[0]) if created else None):
        outcome = run_batch(config, store=store, progress=not no_progress, on_created=on_created)
    _print_outcome(store, outcome)


@contextlib.contextmanager
def _hint_on_interrupt(hint: Callable[[], str | None]) -> Iterator[None]:
    """Print ``hint()``, the way to continue, when Ctrl-C stops the command."""
    try:
        yield
    except KeyboardInterrupt:
        message = hint()
        if message:
            click.secho(message, fg="yellow", err=True)
        raise


def _resume_hint(batch_id: int) -> str:
    return f"Interrupted. Batch {batch_id} keeps every stored turn, and `hermitkit resume {batch_id}` continues it."


def _dry_run(config: Any) -> None:
    from hermitkit.estimate import estimate_batch
    from hermitkit.runner import _prepare

    async def plan() -> Any:
        providers, catalogue = await _prepare(config)
        await providers.close()
        return providers, catalogue

    providers, catalogue = asyncio.run(plan())
    protocol = config.load_protocol()
    lines = estimate_batch(config, protocol, catalogue)

    click.echo(f"Plan: {len(config.models)} model(s) x {config.runs} run(s) x {config.turns} turn(s) = {config.total_runs * config.turns} model requests")
    click.echo(f"Endpoint: {config.endpoint.base_url}   protocol: {protocol.id} ({protocol.hash[:12]})   judges: {', '.join(config.judges)}")
    click.echo(f"{'model':<40} {'role':<6} {'requests':>8} {'max prompt tok':>15} {'max compl tok':>14} {'max cost $':>11}")
    total = 0.0
    unknown = False
    for line in lines:
        cost = "unknown" if line.max_cost_usd is None else f"{line.max_cost_usd:.4f}"
        total += line.max_cost_usd or 0.0
        unknown = unknown or line.max_cost_usd is None
        click.echo(f"{line.model:<40} {line.role:<6} {line.requests:>8} {line.max_prompt_tokens:>15} {line.max_completion_tokens:>14} {cost:>11}")
    suffix = " (some prices unknown)" if unknown else ""
    click.echo(f"Maximum cost (estimate, every reply at max_tokens): ${total:.4f}{suffix}")
    if config.budget_usd is not None:
        click.echo(f"Budget: ${config.budget_usd:.4f}; no new request is sent once it is spent.")
    if providers.is_demo:
        click.echo("Demo endpoint: no real model is called and nothing is paid.")


def _print_outcome(store: Any, outcome: Any) -> None:
    from hermitkit.analysis import summary
    from hermitkit.export import DEMO_NOTICE

    click.echo(f"\nBatch {outcome.batch_id}: {outcome.status}   spent ${outcome.spent_usd:.4f}")
    if outcome.message:
        click.echo(outcome.message)
    _print_summary(store, outcome.batch_id)
    if outcome.is_demo:
        click.secho(DEMO_NOTICE, fg="yellow")
    if outcome.status != "completed":
        sys.exit(1)


def _print_summary(store: Any, batch_id: int) -> None:
    from hermitkit.analysis import summary

    frame = summary(store, batch_id)
    if frame.empty:
        click.echo("No runs stored.")
        return
    shown = frame[["runs", "completed", "compliance_pct", "failures_per_run", "malformed_per_run", "mirror_pass_rate", "autonomy_mean", "sophistication_mean", "verdicts", "judge_parse_failures", "tokens", "cost_usd"]].copy()
    # PostgreSQL returns averages as Decimal; the table is for reading, so floats suffice.
    shown = shown.astype(float)
    shown.columns = ["runs", "completed", "compliance %", "failures/run", "malformed/run", "mirror pass", "autonomy", "sophistication", "verdicts", "parse fails", "tokens", "cost $"]
    formats = {column: "{:.2f}".format for column in shown.columns}
    formats.update({"runs": "{:.0f}".format, "completed": "{:.0f}".format, "verdicts": "{:.0f}".format, "parse fails": "{:.0f}".format, "tokens": "{:.0f}".format, "cost $": "{:.4f}".format})
    click.echo("\nPer-model summary (judge means exclude verdicts that failed to parse):")
    with _pandas_display():
        click.echo(shown.to_string(formatters=formats, na_rep="-"))


def _pandas_display() -> Any:
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 20)


@cli.command()
@click.argument("batch_id", type=BATCH_ID)
@click.option("--budget-usd", type=float, default=None, help="New cost budget for the batch in US dollars (e.g. to finish a batch that spent its budget).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@database_option
def resume(batch_id: int | str, budget_usd: float | None, no_progress: bool, database_url: str | None) -> None:
    """Continue an interrupted batch: only missing turns and verdicts are sent."""
    from hermitkit.runner import resume_batch

    if budget_usd is not None and budget_usd <= 0:
        raise ConfigError(f"--budget-usd {budget_usd} is invalid: give a positive amount in US dollars.")
    store = _store(database_url)
    resolved = _resolve(store, batch_id)
    with _hint_on_interrupt(lambda: _resume_hint(resolved)):
        outcome = resume_batch(resolved, store=store, budget_usd=budget_usd, progress=not no_progress)
    _print_outcome(store, outcome)


@cli.command()
@click.argument("batch_id", type=BATCH_ID, required=False)
@click.option("--runs", "list_runs", is_flag=True, help="Also list every run of the batch: id (for `hermitkit show`), model, status, turns and verdicts.")
@database_option
def status(batch_id: int | str | None, list_runs: bool, database_url: str | None) -> None:
    """List stored batches, or show one batch's runs by status."""
    from hermitkit.status import batch_runs, batch_status, list_batches

    store = _store(database_url)
    if batch_id is None:
        rows = list_batches(store)
        if not rows:
            click.echo(f"No batches in {store}.")
            return
        click.echo(f"{'id':>5}  {'status':<17} {'created (UTC)':<20} {'runs':>5}  name / models")
        for row in rows:
            demo = " [demo]" if row["is_demo"] else ""
            click.echo(f"{row['id']:>5}  {row['status']:<17} {row['created_at']:%Y-%m-%d %H:%M:%S}  {row['runs']:>5}  {printable(row['name'])}{demo} {', '.join(row['models'])}")
        return

    batch_id = _resolve(store, batch_id)
    info = batch_status(store, batch_id)
    click.echo(f"Batch {batch_id}: {info['status']}{' [demo]' if info['is_demo'] else ''}")
    click.echo(f"  name: {printable(info['name'])}   protocol: {info['protocol_id']} ({info['protocol_hash'][:12]})   endpoint: {info['endpoint']}")
    click.echo(f"  created {info['created_at']:%Y-%m-%d %H:%M:%S} UTC, updated {info['updated_at']:%Y-%m-%d %H:%M:%S} UTC")
    click.echo(f"  runs: {', '.join(f'{count} {name}' for name, count in sorted(info['run_statuses'].items()))}")
    click.echo(f"  assistant turns stored: {info['turns']} of {info['turns_target']}   verdicts: {info['verdicts']} ({info['parse_failures']} failed to parse)")
    click.echo(f"  spent: ${info['spent_usd']:.4f}" + (f" of a ${info['budget_usd']:.4f} budget" if info["budget_usd"] else ""))
    if info["error"]:
        click.echo(f"  note: {info['error']}")
    lease = info["lease"]
    if lease is not None:
        holder = f"pid {lease['pid']} on host {printable(lease['host'] or '')}"
        if lease["state"] == "held":
            click.echo(f"  lease: held by {holder} until {lease['expires_at']:%Y-%m-%d %H:%M:%S} UTC unless renewed, so that process is running this batch")
        elif lease["state"] == "gone":
            click.echo(f"  lease: left by {holder}, which no longer runs, so resume can take it at once")
        else:
            click.echo(f"  lease: left by {holder}, ran out at {lease['expires_at']:%Y-%m-%d %H:%M:%S} UTC, so resume can take it")
    if info["status"] in ("running", "pending", "interrupted") and (lease is None or lease["state"] != "held"):
        # A killed process cannot update the status, so "running" may be stale.
        click.echo(f"  If no process is running this batch any more (for example it was killed), `hermitkit resume {batch_id}` continues it.")

    if not list_runs:
        click.echo(f"  `hermitkit status {batch_id} --runs` lists the runs with their ids, and `hermitkit show RUN_ID` shows one.")
        return
    click.echo(f"\n{'run':>7}  {'model':<32} {'rep':>4}  {'status':<17} {'turns':>9}  {'verdicts':>8}  error")
    for run in batch_runs(store, batch_id):
        turns = f"{run['turns']}/{run['turns_target']}"
        error = printable((run["error"] or "")[:100])
        click.echo(f"{run['id']:>7}  {printable(run['model']):<32} {run['repetition']:>4}  {run['status']:<17} {turns:>9}  {run['verdicts']:>8}  {error}".rstrip())


@cli.command()
@click.argument("run_id", type=int)
@click.option("--reasoning/--no-reasoning", default=False, help="Also print the reasoning text of each reply.")
@database_option
def show(run_id: int, reasoning: bool, database_url: str | None) -> None:
    """Print one run's transcript with the verdict of every reply."""
    from hermitkit.status import run_transcript

    store = _store(database_url)
    run, turns = run_transcript(store, run_id)
    click.echo(f"Run {run_id}: {run['model']} repetition {run['repetition']} of batch {run['batch_id']}, {run['status']}")
    click.echo(f"  turns {run['turn_count']}/{run['turns_target']}, ok {run['ok_count']}, failures {run['failures']}, malformed {run['malformed']}")
    for turn in turns:
        if turn["role"] == "assistant":
            header = f"--- turn {turn['turn_number']} assistant [{turn['verdict']}]"
        else:
            header = "--- initial prompt" if turn["idx"] == 0 else "--- echo (user)"
        click.echo(header)
        if reasoning and turn.get("reasoning"):
            click.echo(f"(reasoning) {printable(turn['reasoning'])}")
        click.echo(printable(turn["content"]) if turn["content"] is not None else "(no content)")


@cli.command()
@click.argument("batch_id", type=BATCH_ID)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True, help="File format of the exported tables.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("exports"), show_default=True, help="Folder to write into.")
@database_option
def export(batch_id: int | str, fmt: str, out_dir: Path, database_url: str | None) -> None:
    """Write a batch's runs, turns and judgements as CSV or JSON files."""
    from hermitkit.export import export_batch

    from hermitkit.status import batch_status

    store = _store(database_url)
    batch_id = _resolve(store, batch_id)
    batch_status(store, batch_id)
    for path in export_batch(store, batch_id, out_dir, fmt):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("batch_id", type=BATCH_ID)
@click.option("--format", "formats", multiple=True, type=click.Choice(["csv", "scorecard", "personas", "html", "all"]), default=("all",), show_default=True, help="Report to write; repeat the option for several.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder to write into (default: reports/BATCH_ID).")
@click.option("--judge", "judge_model", default=None, help="Judge model that writes missing syntheses and persona text (default: the batch's first judge).")
@click.option("--regenerate", is_flag=True, help="Ask the judge for new syntheses and persona text even when they are stored.")
@click.option("--notebook", is_flag=True, help="Also execute notebooks/report.ipynb with papermill into the output folder.")
@database_option
def report(batch_id: str, formats: tuple[str, ...], out_dir: Path | None, judge_model: str | None, regenerate: bool, notebook: bool, database_url: str | None) -> None:
    """Write CSV tables, a Markdown scorecard, persona cards and an HTML page for a stored batch.

    BATCH_ID is a number or 'latest'. Only persona cards may call the judge model, and
    only when no synthesis or persona is stored for a model yet (or with --regenerate).
    """
    from hermitkit.analysis import resolve_batch_id
    from hermitkit.reports import write_report

    store = _store(database_url)
    resolved = resolve_batch_id(store, batch_id)
    folder = out_dir or Path("reports") / str(resolved)
    for path in write_report(store, resolved, folder, formats, judge_model=judge_model, regenerate=regenerate):
        click.echo(f"wrote {path}")
    if notebook:
        from hermitkit.notebooks import run_report_notebook

        for path in run_report_notebook(resolved, out_dir=folder, database_url=database_url):
            click.echo(f"wrote {path}")


@cli.command()
@click.argument("batch_id", type=BATCH_ID)
@click.option("--judge", "judge_model", required=True, help="Judge model id (e.g. openai/gpt-4o-mini) whose verdicts are stored beside the existing ones.")
@click.option("--only-missing", is_flag=True, help="Judge only runs that have no verdict from this judge yet (the same as --rounds 1).")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="Judge each finished run until it has this many verdicts from this judge. Running the same command again finishes a pass that stopped.",
)
@click.option("--budget-usd", type=float, default=None, help="Stop sending verdict requests once this pass has cost this many US dollars. Requests in flight still finish.")
@database_option
def judge(batch_id: str, judge_model: str, only_missing: bool, rounds: int | None, budget_usd: float | None, database_url: str | None) -> None:
    """Judge the finished runs of a stored batch again, without generating them again.

    BATCH_ID is a number or 'latest'. The judge's sampling settings come from the
    batch's stored config, and each new verdict goes into the next round for that judge.
    To judge every run a second time and be able to finish that pass if it stops, use
    --rounds 2.
    """
    from hermitkit.analysis import resolve_batch_id, summary
    from hermitkit.rejudge import rejudge_batch

    if budget_usd is not None and not budget_usd > 0:
        raise ConfigError(f"--budget-usd {budget_usd} is invalid: give a positive amount in US dollars.")
    if only_missing:
        if rounds not in (None, 1):
            raise ConfigError(f"--only-missing is the same as --rounds 1, so it cannot be combined with --rounds {rounds}. Pass one of them.")
        rounds = 1
    store = _store(database_url)
    resolved = resolve_batch_id(store, batch_id)
    with _hint_on_interrupt(lambda: f"Interrupted. Every stored verdict stays. {_finish_pass_hint(rounds)}"):
        outcome = rejudge_batch(store, resolved, judge_model, rounds=rounds, budget_usd=budget_usd)
    click.echo(f"Batch {resolved}: stored {outcome.judged} verdict(s) from {printable(judge_model)}, {outcome.parse_failures} failed to parse, cost ${outcome.cost_usd:.4f}.")
    if outcome.skipped:
        click.echo(f"Skipped {len(outcome.skipped)} unfinished run(s): {', '.join(map(str, outcome.skipped))}.")

    frame = summary(store, resolved, judge_model=judge_model)
    if not frame.empty:
        shown = frame[["runs", "verdicts", "judge_parse_failures", "mirror_pass_rate", "autonomy_mean", "sophistication_mean"]]
        shown.columns = ["runs", "verdicts", "parse fails", "mirror pass", "autonomy", "sophistication"]
        click.echo(f"\nVerdicts of {printable(judge_model)} (means exclude verdicts that failed to parse):")
        with _pandas_display():
            click.echo(shown.to_string(float_format=lambda value: f"{value:.2f}"))
    if outcome.errors:
        for run_id, error in sorted(outcome.errors.items()):
            click.secho(f"Run {run_id}: {printable(error)}", fg="red", err=True)
        click.echo(f"{len(outcome.errors)} run(s) got no verdict because the judge request failed. {_finish_pass_hint(rounds)}")
    if outcome.over_budget:
        click.echo(
            f"The budget of {_usd(budget_usd)} for this pass is spent ({_usd(outcome.cost_usd)}): {len(outcome.over_budget)} run(s) did not get "
            f"every verdict that the pass was to send. Run the command again, with a --budget-usd for that pass. {_finish_pass_hint(rounds)}"
        )
    if outcome.errors or outcome.over_budget:
        sys.exit(1)


def _usd(amount: float) -> str:
    # Four decimals hide a budget below a hundredth of a cent, so such amounts keep two significant digits.
    return f"${amount:.4f}" if amount == 0 or amount >= 0.0001 else f"${amount:.2g}"


def _finish_pass_hint(rounds: int | None) -> str:
    if rounds is not None:
        return f"The same command with --rounds {rounds} judges just the runs that are left."
    return "Add --rounds N, where N is the number of verdicts from this judge that each run should have, to judge just the runs that are left."


@cli.command("demo-server")
@click.option("--port", type=int, default=8765, show_default=True, help="TCP port on 127.0.0.1.")
@click.option("--latency", "latency_s", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Delay added to every reply, in seconds.")
@click.option("--fault", "faults", multiple=True, metavar="RULE", help="Fault rule such as 429:rate=0.1, 500:every=7 or null_content:model=demo/forgetful:first=2.")
def demo_server(port: int, latency_s: float, faults: tuple[str, ...]) -> None:
    """Serve the offline demo models on http://127.0.0.1:PORT/v1 until interrupted."""
    from hermitkit.demo import serve_forever

    try:
        serve_forever("127.0.0.1", port, latency_s=latency_s, faults=list(faults))
    except OSError as exc:
        raise HermitkitError(f"Could not listen on 127.0.0.1:{port}: {exc.strerror or exc}. Pick another port with --port.") from None


def main() -> None:
    cli(prog_name="hermitkit")


if __name__ == "__main__":
    main()
