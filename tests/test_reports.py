"""Report files: safe CSV, escaped HTML, the scorecard, persona cards and the CLI commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from hermitkit.cli import cli
from hermitkit.export import DEMO_NOTICE, FORMULA_PREFIXES, safe_csv_frame
from hermitkit.reports import (
    persona_card_png,
    persona_cards,
    scorecard_markdown,
    summary_html,
    write_report,
)
from hermitkit.store import Judgement, Report, Store
from hermitkit.synthesis import ensure_personas
from tests.test_analysis import insert_batch, run_demo_batch, verdict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FORMULA = '=HYPERLINK("http://127.0.0.1/x","click")'
TRICKY_TEXT = 'Line one, with a comma\nline "two" in quotes\r\nand a third'
SCRIPT = "<script>alert('owned')</script>"


def forbid_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: Any) -> None:
        raise AssertionError("a model call was made although results are stored")

    monkeypatch.setattr("hermitkit.providers.ProviderSet.open", refuse)


def hostile_batch(store: Store) -> int:
    return insert_batch(
        store,
        [
            {
                "model": "m/<b>bold</b>",
                "replies": [FORMULA, "{" + FORMULA + "}", TRICKY_TEXT + " {ok}", SCRIPT + " {" + SCRIPT + "}"],
                "judgements": [verdict(analysis="@SUM(A1) and " + SCRIPT, topics=["=cmd|' /C calc'!A0"], topic_summary="+1 then -1")],
            },
            {"model": "m/plain", "replies": ["{fine}"], "judgements": [verdict(status="parse_failed", failure_reason="no_json", raw_reply=SCRIPT + " raw")]},
        ],
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('reports') / 'reports.db'}")
    batch_id = run_demo_batch(store, runs=2, turns=4)
    yield store, batch_id
    store.dispose()


# ---------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------


def csv_cells(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [cell for row in csv.reader(handle) for cell in row]


def test_csv_neutralises_formulas(store, tmp_path):
    batch_id = hostile_batch(store)
    paths = write_report(store, batch_id, tmp_path, ["csv"])
    assert {path.name for path in paths} == {f"batch-{batch_id}-{name}.csv" for name in ("runs", "turns", "judgements", "summary", "self-talk")}
    for path in paths:
        for cell in csv_cells(path):
            assert not cell.startswith(FORMULA_PREFIXES), (path.name, cell)

    turns = pd.read_csv(tmp_path / f"batch-{batch_id}-turns.csv")
    assert "'" + FORMULA in turns["content"].tolist()
    assert "'" + FORMULA in turns["extracted"].tolist()
    verdicts = pd.read_csv(tmp_path / f"batch-{batch_id}-judgements.csv")
    assert verdicts["analysis"].dropna().iloc[0].startswith("'@SUM")
    assert verdicts["topic_summary"].dropna().iloc[0] == "'+1 then -1"


def test_csv_round_trips_tricky_text(store, tmp_path):
    batch_id = hostile_batch(store)
    write_report(store, batch_id, tmp_path, ["csv"])
    turns = pd.read_csv(tmp_path / f"batch-{batch_id}-turns.csv")
    assert TRICKY_TEXT + " {ok}" in turns["content"].tolist()
    verdicts = pd.read_csv(tmp_path / f"batch-{batch_id}-judgements.csv")
    # list cells are JSON text, so they read back exactly
    assert json.loads(verdicts["topics"].dropna().iloc[0]) == ["=cmd|' /C calc'!A0"]


def test_safe_csv_frame_handles_string_dtypes():
    frame = pd.DataFrame({"text": pd.Series(["=1+1", "-2", "plain"], dtype="string"), "category": pd.Categorical(["@x", "y", "y"]), "number": [-1, 2, 3]})
    safe = safe_csv_frame(frame)
    assert safe["text"].tolist() == ["'=1+1", "'-2", "plain"]
    assert safe["category"].tolist() == ["'@x", "y", "y"]
    assert safe["number"].tolist() == [-1, 2, 3]
    assert frame["text"].tolist()[0] == "=1+1"


def test_csv_of_demo_batch_says_demo(demo, tmp_path):
    store, batch_id = demo
    for path in write_report(store, batch_id, tmp_path, ["csv"]):
        frame = pd.read_csv(path)
        assert set(frame["notice"]) == {DEMO_NOTICE}, path.name


# ---------------------------------------------------------------------------
# HTML and scorecard
# ---------------------------------------------------------------------------


def test_html_escapes_model_text(store):
    page = summary_html(store, hostile_batch(store))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "default-src 'none'" in page
    assert page.startswith("<!DOCTYPE html>")


def test_html_embeds_plots_and_demo_notice(demo):
    store, batch_id = demo
    page = summary_html(store, batch_id)
    assert page.count('src="data:image/png;base64,') == 5
    assert DEMO_NOTICE.replace("'", "&#x27;") in page
    assert "Self-talk metrics per run" in page


def test_scorecard_lists_settings_runs_and_analyses(store):
    batch_id = hostile_batch(store)
    text = scorecard_markdown(store, batch_id)
    assert "hermitkit-v1" in text
    runs = store.read(lambda session: session.execute(select(Judgement.run_id)).scalars().all())
    for run_id in runs:
        assert f"### Run {run_id} " in text
    assert "@SUM(A1) and &lt;script&gt;" in text
    assert "Failed to parse (no_json)" in text
    assert "<script" not in text
    assert "percentile bootstrap" in text
    assert "seed 20261204" in text


def test_scorecard_has_protocol_hash_and_demo_notice(demo):
    store, batch_id = demo
    text = scorecard_markdown(store, batch_id)
    protocol_hash = _protocol_hash(store, batch_id)
    assert protocol_hash in text
    assert DEMO_NOTICE in text
    assert "## Model demo/steady" in text


def _protocol_hash(store: Store, batch_id: int) -> str:
    from hermitkit.store import Batch

    return store.read(lambda session: session.get(Batch, batch_id).protocol_hash)


# ---------------------------------------------------------------------------
# Personas and the whole report
# ---------------------------------------------------------------------------


def test_write_report_all_writes_every_file(demo, tmp_path, monkeypatch):
    store, batch_id = demo
    paths = write_report(store, batch_id, tmp_path / "first")
    names = {path.name for path in paths}
    expected = {
        f"batch-{batch_id}-scorecard.md",
        f"batch-{batch_id}-summary.html",
        f"batch-{batch_id}-personas.md",
        f"batch-{batch_id}-personas.json",
        *(f"batch-{batch_id}-persona-demo-{name}.png" for name in ("steady", "wanderer", "forgetful", "confused")),
        *(f"batch-{batch_id}-{name}.csv" for name in ("runs", "turns", "judgements", "summary", "self-talk")),
    }
    assert names == expected
    for path in paths:
        assert path.stat().st_size > 0, path.name
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_SIGNATURE)

    forbid_model_calls(monkeypatch)
    again = write_report(store, batch_id, tmp_path / "second")
    assert {path.name for path in again} == expected
    recorded = store.read(lambda session: session.scalar(select(func.count()).select_from(Report).where(Report.batch_id == batch_id)))
    assert recorded >= 2 * len(expected)


def test_persona_outputs_of_demo_batch(demo, tmp_path):
    store, batch_id = demo
    ensure_personas(store, batch_id)
    cards = persona_cards(store, batch_id)
    assert [card["model"] for card in cards] == sorted(["demo/steady", "demo/wanderer", "demo/forgetful", "demo/confused"])
    for card in cards:
        assert card["notice"] == DEMO_NOTICE
        assert card["status"] == "ok"
        assert card["archetype_rule"]
        assert set(card["stats"]) >= {"adherence", "self_awareness", "autonomy", "error_rate", "clarity"}

    write_report(store, batch_id, tmp_path, ["personas"])
    payload = json.loads((tmp_path / f"batch-{batch_id}-personas.json").read_text(encoding="utf-8"))
    assert payload["notice"] == DEMO_NOTICE
    assert len(payload["cards"]) == 4
    text = (tmp_path / f"batch-{batch_id}-personas.md").read_text(encoding="utf-8")
    assert DEMO_NOTICE in text
    assert "Evidence:" in text


def test_stored_personas_skip_reading_turns(demo, tmp_path, monkeypatch):
    store, batch_id = demo
    ensure_personas(store, batch_id)

    def fail(*_args: Any) -> None:
        raise AssertionError("every model has a stored persona, yet the report read the turns to make one")

    monkeypatch.setattr("hermitkit.synthesis.load_material", fail)
    paths = write_report(store, batch_id, tmp_path, ["personas"])
    assert f"batch-{batch_id}-personas.md" in {path.name for path in paths}


def test_persona_card_png_of_failed_card(tmp_path):
    card = {"batch_id": 1, "model": "m/$x$", "archetype": "Drifter", "archetype_rule": "no other rule applies", "status": "parse_failed", "stats": {"adherence": None, "autonomy": 2.0}, "themes": [], "description": None, "evidence": None, "judge_model": "j", "notice": None}
    path = persona_card_png(card, tmp_path / "cards" / "card.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_rejects_unknown_format(demo, tmp_path):
    store, batch_id = demo
    with pytest.raises(ValueError, match="'pdf'"):
        write_report(store, batch_id, tmp_path, ["pdf"])


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_report_all_without_model_calls(sqlite_url, tmp_path, monkeypatch):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/confused"], runs=1, turns=3)
    ensure_personas(store, batch_id)
    forbid_model_calls(monkeypatch)

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", str(batch_id), "--format", "all", "--out", str(out), "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in out.iterdir())
    assert f"batch-{batch_id}-persona-demo-steady.png" in written
    assert f"batch-{batch_id}-persona-demo-confused.png" in written
    assert f"batch-{batch_id}-summary.html" in written
    assert f"batch-{batch_id}-scorecard.md" in written
    assert result.output.count("wrote ") == len(written)
    store.dispose()


def test_cli_report_single_format_latest(sqlite_url, tmp_path):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", "latest", "--format", "scorecard", "--out", str(out), "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert [path.name for path in out.iterdir()] == [f"batch-{batch_id}-scorecard.md"]
    store.dispose()


def test_cli_judge_adds_verdicts_beside_old_ones(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/wanderer"], runs=2, turns=3)
    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "stored 4 verdict(s)" in result.output

    rounds = store.read(lambda session: sorted(session.execute(select(Judgement.round, func.count()).group_by(Judgement.round)).all()))
    assert rounds == [(0, 4), (1, 4)]

    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--only-missing", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "stored 0 verdict(s)" in result.output
    store.dispose()


def test_cli_status_lists_runs(sqlite_url):
    from sqlalchemy import update

    from hermitkit.store import Run

    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/wanderer"], runs=1, turns=2)
    run_ids = store.read(lambda session: list(session.scalars(select(Run.id).where(Run.batch_id == batch_id).order_by(Run.id))))
    # A provider's error text is untrusted and may carry terminal control characters.
    store.write(lambda session: session.execute(update(Run).where(Run.id == run_ids[1]).values(status="failed", error="HTTP 400: bad \x1b[31mrequest")))

    summary_only = CliRunner().invoke(cli, ["status", str(batch_id), "--database-url", sqlite_url])
    assert summary_only.exit_code == 0, summary_only.output
    assert f"`hermitkit status {batch_id} --runs` lists the runs with their ids" in summary_only.output

    result = CliRunner().invoke(cli, ["status", str(batch_id), "--runs", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steady = next(line for line in lines if line.split()[:2] == [str(run_ids[0]), "demo/steady"])
    assert steady.split()[2:] == ["1", "completed", "2/2", "1"]
    wanderer = next(line for line in lines if line.split()[:2] == [str(run_ids[1]), "demo/wanderer"])
    assert wanderer.split()[2:5] == ["1", "failed", "2/2"]
    assert "HTTP 400: bad \\x1b[31mrequest" in wanderer
    assert "\x1b" not in result.output
    store.dispose()


def test_cli_judge_unknown_model(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)
    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/nobody", "--database-url", sqlite_url])
    assert result.exit_code == 2
    assert "demo/nobody" in result.output
    store.dispose()


def test_cli_judge_stops_at_budget(sqlite_url):
    store = Store(sqlite_url)
    # The judge pass uses the batch's concurrency: with one request at a time, exactly
    # the first verdict is paid before the budget is spent.
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/wanderer"], runs=3, turns=2, concurrency=1)
    before = store.read(lambda session: session.scalar(select(func.count()).select_from(Judgement)))

    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--budget-usd", "0.000000001", "--database-url", sqlite_url])

    assert result.exit_code == 1, result.output
    assert "The budget of $1e-09 for this pass is spent" in result.output
    assert "stored 1 verdict(s)" in result.output
    assert "5 run(s) did not get every verdict that the pass was to send" in result.output
    assert "Add --rounds N, where N is the number of verdicts from this judge that each run should have" in result.output
    after = store.read(lambda session: session.scalar(select(func.count()).select_from(Judgement)))
    assert after - before == 1

    # The hint's command finishes that second pass: five verdicts, one for each run left.
    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--rounds", "2", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "stored 5 verdict(s)" in result.output
    store.dispose()


def test_cli_judge_rejects_bad_rounds(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)

    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--rounds", "0", "--database-url", sqlite_url])
    assert result.exit_code == 2
    assert "--rounds" in result.output

    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--rounds", "2", "--only-missing", "--database-url", sqlite_url])
    assert result.exit_code == 2
    assert "--only-missing is the same as --rounds 1, so it cannot be combined with --rounds 2" in result.output
    store.dispose()


def test_cli_judge_rejects_bad_budget(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)
    before = store.read(lambda session: session.scalar(select(func.count()).select_from(Judgement)))

    result = CliRunner().invoke(cli, ["judge", str(batch_id), "--judge", "demo/judge", "--budget-usd", "0", "--database-url", sqlite_url])

    assert result.exit_code == 2
    assert "--budget-usd 0.0 is invalid" in result.output
    assert store.read(lambda session: session.scalar(select(func.count()).select_from(Judgement))) == before
    store.dispose()
