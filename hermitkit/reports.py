"""Files that share a batch's results: CSV tables, a Markdown scorecard, persona cards, HTML.

Everything here reads the store only. The one exception is ``write_report`` with the
``personas`` format, which requests syntheses and persona descriptions from the judge
when none are stored (see ``hermitkit.synthesis``). Model text is untrusted: CSV cells that
a spreadsheet would run are neutralised, the HTML page escapes every value and forbids
scripts through its Content-Security-Policy, and the Markdown scorecard writes
``<``, ``>`` and ``&`` as entities. Outputs of a demo batch carry ``DEMO_NOTICE``.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from sqlalchemy import select

from hermitkit import analysis, plots
from hermitkit.agreement import judge_agreement
from hermitkit.errors import ConfigError
from hermitkit.export import DEMO_NOTICE, stream_csv, write_csv
from hermitkit.store import Batch, Report, Run, Store, Turn, utcnow
from hermitkit.synthesis import ensure_personas, stored_personas, stored_syntheses

FORMATS = ("csv", "scorecard", "personas", "html")

# Summary columns shown in the scorecard and the HTML page, with their headings.
SUMMARY_COLUMNS = {
    "runs": "runs",
    "compliance_mean": "compliance (0-1)",
    "compliance_ci_low": "CI low",
    "compliance_ci_high": "CI high",
    "failures_per_run": "failures/run",
    "malformed_per_run": "malformed/run",
    "mirror_pass_rate": "mirror pass",
    "mirror_consensus": "mirror consensus",
    "autonomy_mean": "autonomy",
    "autonomy_ci_low": "CI low",
    "autonomy_ci_high": "CI high",
    "sophistication_mean": "sophistication",
    "sophistication_ci_low": "CI low",
    "sophistication_ci_high": "CI high",
    "exploration_style": "style",
    "self_awareness_full": "aware: full",
    "self_awareness_partial": "partial",
    "self_awareness_none": "none",
    "verdicts": "verdicts",
    "judge_parse_failures": "parse failures",
    "tokens": "tokens",
    "total_cost_usd": "cost $",
    "mean_latency_s": "latency s",
}
SELF_TALK_COLUMNS = ("run_id", "model", "repetition", "turns", "mean_prompt_words", "mean_similarity", "compression_ratio", "exact_repeats", "near_repeats", "loop_onset", "asking_turns", "mean_symbol_density", "end_state", "end_state_onset")
CARD_STATS = (
    ("adherence", "Adherence", 1.0, "{:.0%}"),
    ("self_awareness", "Self-awareness", 1.0, "{:.0%}"),
    ("autonomy", "Autonomy", 5.0, "{:.1f} / 5"),
    ("error_rate", "Error rate", 1.0, "{:.0%}"),
    ("clarity", "Clarity", 5.0, "{:.1f} / 5"),
)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


class _BatchFrames:
    """The frames of one batch that several report parts read, each read once when first needed."""

    def __init__(self, store: Store, batch_id: int, *, talk: pd.DataFrame | None = None) -> None:
        self.store = store
        self.batch_id = batch_id
        if talk is not None:
            # A frame the caller already has fills the cache of the ``talk`` property.
            self.__dict__["talk"] = talk

    @functools.cached_property
    def summary(self) -> pd.DataFrame:
        return analysis.summary(self.store, self.batch_id)

    @functools.cached_property
    def runs(self) -> pd.DataFrame:
        return analysis.runs_frame(self.store, self.batch_id)

    @functools.cached_property
    def verdicts(self) -> pd.DataFrame:
        return analysis.judgements_frame(self.store, self.batch_id)

    @functools.cached_property
    def talk(self) -> pd.DataFrame:
        # self_talk reads every transcript, the slowest frame of a report.
        return analysis.self_talk(self.store, self.batch_id)


def _batch(store: Store, batch_id: int) -> dict[str, Any]:
    def read(session):  # type: ignore[no-untyped-def]
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise ConfigError(f"Batch {batch_id} not found in {store}. Run `hermitkit status` to list batches.")
        return {
            "id": batch.id,
            "name": batch.name,
            "status": batch.status,
            "config": dict(batch.config),
            "protocol_id": batch.protocol_id,
            "protocol_hash": batch.protocol_hash,
            "is_demo": batch.is_demo,
            "created_at": batch.created_at,
            "hermitkit_version": batch.hermitkit_version,
        }

    return store.read(read)


def _settings(batch: dict[str, Any]) -> list[tuple[str, str]]:
    config = batch["config"]
    endpoint = config.get("endpoint", {})
    return [
        ("batch", f"{batch['id']} ({batch['name'] or 'unnamed'})"),
        ("status", batch["status"]),
        ("created (UTC)", f"{batch['created_at']:%Y-%m-%d %H:%M:%S}"),
        ("endpoint", str(endpoint.get("base_url", ""))),
        ("models", ", ".join(config.get("models", []))),
        ("runs per model", str(config.get("runs"))),
        ("turns per run", str(config.get("turns"))),
        ("protocol", f"{batch['protocol_id']} (sha256 {batch['protocol_hash']})"),
        ("temperature / top_p / max_tokens / seed", f"{config.get('temperature')} / {config.get('top_p')} / {config.get('max_tokens')} / {config.get('seed')}"),
        ("reasoning", json.dumps(config.get("reasoning"))),
        ("judges", ", ".join(config.get("judges", []))),
        ("judge temperature / seed / max_tokens", f"{config.get('judge_temperature')} / {config.get('judge_seed')} / {config.get('judge_max_tokens')}"),
        ("hermitkit version", batch["hermitkit_version"] or "unknown"),
    ]


def _ci_note(frame: pd.DataFrame) -> str:
    attrs = frame.attrs
    return (
        f"Intervals: {attrs.get('ci_confidence', analysis.CONFIDENCE):.0%} {attrs.get('ci_method', analysis.BOOTSTRAP_METHOD)}, "
        f"{attrs.get('ci_resamples', analysis.BOOTSTRAP_RESAMPLES)} resamples, numpy seed {attrs.get('ci_seed', analysis.BOOTSTRAP_SEED)}. "
        "Judge means use parsed verdicts only; verdicts that failed to parse are counted, never scored as zero."
    )


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Markdown scorecard
# ---------------------------------------------------------------------------


def _md(text: Any) -> str:
    """Model or user text for Markdown: HTML-significant characters become entities."""
    return html.escape("" if text is None else str(text), quote=False)


def _md_cell(value: Any) -> str:
    return _md(_format(value)).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(header) for header in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_quote(text: str | None) -> str:
    if not text or not text.strip():
        return "> (empty)"
    return "\n".join("> " + line if line.strip() else ">" for line in _md(text).splitlines())


def scorecard_markdown(store: Store, batch_id: int | str | None = None, *, talk: pd.DataFrame | None = None) -> str:
    """Render a detailed Markdown scorecard: settings, summary, and every run with its metrics and verdicts."""
    batch_id = analysis.resolve_batch_id(store, batch_id)
    return _scorecard(_batch(store, batch_id), _BatchFrames(store, batch_id, talk=talk))


def _scorecard(batch: dict[str, Any], frames: _BatchFrames) -> str:
    frame = frames.summary
    parts = [f"# Scorecard: batch {batch['id']}"]
    if batch["is_demo"]:
        parts.append(f"**{DEMO_NOTICE}**")
    parts.append("## Settings\n\n" + _md_table(["setting", "value"], _settings(batch)))
    if not frame.empty:
        columns = [column for column in SUMMARY_COLUMNS if column in frame.columns]
        rows = [[model, *[row[column] for column in columns]] for model, row in frame.iterrows()]
        parts.append("## Summary\n\n" + _md_table(["model", *[SUMMARY_COLUMNS[c] for c in columns]], rows) + "\n\n" + _ci_note(frame))
    parts.append(
        "Self-talk metrics (similarity, repeats, loop onset, asking turns, end state) are text "
        "heuristics computed from the transcript without model calls; see `hermitkit.metrics`."
    )

    # Plain dicts keyed by run id: one lookup per run, where a frame filter per run
    # would scan every verdict for each of the batch's runs.
    metrics = {int(row["run_id"]): row for row in frames.talk.to_dict("records")}
    verdicts: dict[int, list[dict[str, Any]]] = {}
    for verdict in frames.verdicts.to_dict("records"):
        verdicts.setdefault(int(verdict["run_id"]), []).append(verdict)

    for model, model_runs in frames.runs.groupby("model", sort=True):
        parts.append(f"## Model {_md(model)}")
        for run in model_runs.to_dict("records"):
            run_id = int(run["run_id"])
            parts.append(_scorecard_run(run, metrics.get(run_id, {}), verdicts.get(run_id, [])))
    return "\n\n".join(parts) + "\n"


def _scorecard_run(run: dict[str, Any], metrics: dict[str, Any], verdicts: list[dict[str, Any]]) -> str:
    """Render one run with its self-talk ``metrics`` and its ``verdicts`` in stored order."""
    run_id = int(run["run_id"])
    rows = [
        ("status", run["status"]),
        ("turns", f"{run['turn_count']} of {run['turns_target']}"),
        ("ok / failures / malformed", f"{run['ok_count']} / {run['failures']} / {run['malformed']}"),
        ("compliance", run["compliance"]),
        ("tokens / cost $ / mean latency s", f"{run['tokens']} / {_format(run['cost_usd'])} / {_format(run['mean_latency_s'])}"),
        ("end state (onset turn)", f"{metrics.get('end_state', '-')} ({_format(metrics.get('end_state_onset'))})"),
        ("loop onset / exact / near repeats", f"{_format(metrics.get('loop_onset'))} / {_format(metrics.get('exact_repeats'))} / {_format(metrics.get('near_repeats'))}"),
        ("asking turns / mean similarity / compression", f"{_format(metrics.get('asking_turns'))} / {_format(metrics.get('mean_similarity'))} / {_format(metrics.get('compression_ratio'))}"),
    ]
    if run["error"]:
        rows.append(("error", run["error"]))
    parts = [f"### Run {run_id} (repetition {run['repetition']})", _md_table(["metric", "value"], rows)]

    for verdict in verdicts:
        heading = f"#### Verdict by {_md(verdict['judge_model'])}, round {verdict['round']}: {verdict['status']}"
        if verdict["status"] != "ok":
            detail = f"Failed to parse ({verdict['failure_reason']}): {verdict['failure_detail']}. Raw reply:"
            parts.append(heading + "\n\n" + _md(detail) + "\n\n" + _md_quote(verdict["raw_reply"]))
            continue
        topics = verdict["topics"] if isinstance(verdict["topics"], list) else []
        fields = [
            ("mirror test", verdict["mirror_test"]),
            ("self-awareness", verdict["self_awareness"]),
            ("autonomy / sophistication", f"{verdict['autonomy']} / {verdict['sophistication']}"),
            ("exploration style", verdict["exploration_style"]),
            ("refusal / context loss", f"{verdict['refusal']} / {verdict['context_loss']}"),
            ("topics", ", ".join(topics)),
            ("topic summary", verdict["topic_summary"]),
            ("emergent behaviour", verdict["emergent_behaviour"]),
        ]
        parts.append(heading + "\n\n" + _md_table(["field", "value"], fields) + "\n\nAnalysis:\n\n" + _md_quote(verdict["analysis"]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------
# Persona cards
# ---------------------------------------------------------------------------


def persona_cards(store: Store, batch_id: int | str | None = None) -> list[dict[str, Any]]:
    """Return the newest stored persona card of every model, sorted by model, without model calls.

    Each card has ``model``, ``archetype``, ``archetype_rule``, ``stats``, ``themes``,
    ``description``, ``evidence``, ``status``, ``dropped_citations``, ``failure``
    ("reason: detail" when the description failed to parse, else None), ``judge_model``,
    ``batch_id``, ``is_demo`` and ``notice`` (the demo notice or None). Run
    ``hermitkit.synthesis.ensure_personas`` first to create missing cards.
    """
    batch_id = analysis.resolve_batch_id(store, batch_id)
    is_demo = analysis.batch_is_demo(store, batch_id)
    cards = []
    for model, persona in sorted(stored_personas(store, batch_id).items()):
        stats = dict(persona["stats"])
        cards.append(
            {
                "batch_id": batch_id,
                "model": model,
                "judge_model": persona["judge_model"],
                "archetype": persona["archetype"],
                "archetype_rule": stats.pop("archetype_rule", None),
                "status": persona["status"],
                "dropped_citations": persona["dropped_citations"],
                "failure": _failure_text(persona["failure_reason"], persona["failure_detail"]),
                "stats": stats,
                "themes": persona["themes"],
                "description": persona["description"],
                "evidence": persona["evidence"],
                "is_demo": is_demo,
                "notice": DEMO_NOTICE if is_demo else None,
            }
        )
    return cards


def _failure_text(reason: str | None, detail: str | None) -> str | None:
    if reason is None:
        return None
    return reason if detail is None else f"{reason}: {detail}"


def persona_text(card: dict[str, Any]) -> str:
    """Render a persona card as Markdown text."""
    lines = [f"## {_md(card['model'])}: {_md(card['archetype'])}"]
    if card.get("notice"):
        lines.append(f"**{card['notice']}**")
    lines.append(f"Archetype rule: {_md(card.get('archetype_rule'))}.")
    stats = card["stats"]
    lines.append(_md_table(["stat", "value"], [(label, _card_value(stats.get(key), template)) for key, label, _scale, template in CARD_STATS]))
    if card.get("themes"):
        lines.append("Themes:\n\n" + "\n".join(f"- **{_md(theme['name'])}**: {_md(theme['description'])} (runs {', '.join(str(run) for run in theme['run_ids'])})" for theme in card["themes"]))
    if card["status"] != "ok":
        lines.append(f"The judge's description failed to parse: {_md(card.get('failure'))}.")
    else:
        lines.append(_md(card["description"]))
        evidence = "\n".join(
            f"- {_md(item['claim'])} (run {item['run_id']}, turn {item['turn']}): \"{_md(item['quote'])}\"" + ("" if item.get("quote_found") else " (quote not found in that turn)")
            for item in card["evidence"] or []
        )
        lines.append("Evidence:\n\n" + evidence)
        if card.get("dropped_citations"):
            lines.append(f"{card['dropped_citations']} citation(s) named runs or turns that do not exist and were dropped.")
    lines.append(f"Written by {_md(card['judge_model'])}.")
    return "\n\n".join(lines)


def _card_value(value: Any, template: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    return template.format(value)


def persona_card_png(card: dict[str, Any], path: Path | str) -> Path:
    """Draw a persona card with matplotlib and save it as PNG at ``path``."""
    path = Path(path)
    figure = Figure(figsize=(8, 7.5))
    figure.text(0.04, 0.96, f"{card['model']}", fontsize=15, weight="bold", va="top", parse_math=False)
    figure.text(0.04, 0.915, f"{card['archetype']}: {card.get('archetype_rule') or ''}", fontsize=10, va="top", color="#364fc7", parse_math=False, wrap=True)

    axes = figure.add_axes((0.22, 0.66, 0.55, 0.2))
    labels, values, shown = [], [], []
    for key, label, scale, template in CARD_STATS:
        value = card["stats"].get(key)
        labels.append(label)
        values.append(0.0 if value is None or pd.isna(value) else float(value) / scale)
        shown.append(_card_value(value, template))
    positions = range(len(labels))
    axes.barh(list(positions), values, color="#4c6ef5")
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.35)
    axes.set_xticks([])
    for position, text in zip(positions, shown, strict=True):
        axes.text(1.02, position, text, va="center", fontsize=9)

    figure.text(0.22, 0.635, "Error rate: replies with no braces or only empty braces. Malformed replies count against adherence only.", fontsize=7, color="#495057")

    themes = "; ".join(theme["name"] for theme in card.get("themes") or []) or "none stored"
    figure.text(0.04, 0.6, textwrap.fill("Themes: " + themes, 95), fontsize=9, va="top", parse_math=False)
    if card["status"] == "ok":
        body = textwrap.shorten(card["description"] or "", 900, placeholder=" ...")
        evidence = "\n".join(
            textwrap.shorten(f"run {item['run_id']}, turn {item['turn']}: \u201c{item['quote']}\u201d", 110, placeholder=" ...")
            for item in (card["evidence"] or [])[:5]
        )
        figure.text(0.04, 0.52, textwrap.fill(body, 95), fontsize=9, va="top", parse_math=False)
        figure.text(0.04, 0.24, "Evidence:\n" + evidence, fontsize=8, va="top", color="#495057", parse_math=False)
    else:
        figure.text(0.04, 0.52, "The judge's description failed to parse.", fontsize=9, va="top")
    figure.text(0.04, 0.03, f"Batch {card['batch_id']}, written by {card['judge_model']}", fontsize=7, color="#868e96", parse_math=False)
    if card.get("notice"):
        figure.text(0.5, 0.005, card["notice"], ha="center", va="bottom", fontsize=7, color="#c92a2a")

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #212529; }
.table-scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #dee2e6; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
.demo { background: #fff5f5; border: 1px solid #c92a2a; color: #c92a2a; padding: 0.5rem 1rem; font-weight: bold; }
.card { border: 1px solid #adb5bd; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
pre { white-space: pre-wrap; background: #f8f9fa; padding: 0.5rem; }
img { max-width: 100%; }
"""


def _h(value: Any) -> str:
    return html.escape(_format(value), quote=True)


def _html_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_h(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{_h(value)}</td>" for value in row) + "</tr>" for row in rows)
    # Wide summaries scroll sideways instead of being cut off at the page edge.
    return f'<div class="table-scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_figure(figure: Figure, alt: str) -> str:
    encoded = base64.b64encode(_figure_png(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{encoded}">'


def summary_html(store: Store, batch_id: int | str | None = None, *, talk: pd.DataFrame | None = None) -> str:
    """Render a standalone HTML page of a batch: settings, summary, plots, self-talk, agreement, personas.

    Every value is escaped with ``html.escape``, plots are embedded as base64 PNG data
    URIs, and the page's Content-Security-Policy allows no script at all. Persona cards
    appear when they are stored; this function never calls a model.
    """
    batch_id = analysis.resolve_batch_id(store, batch_id)
    return _summary_page(store, _batch(store, batch_id), _BatchFrames(store, batch_id, talk=talk))


def _summary_page(store: Store, batch: dict[str, Any], frames: _BatchFrames) -> str:
    batch_id = batch["id"]
    frame = frames.summary
    talk = frames.talk

    body = [f"<h1>hermitkit batch {_h(batch_id)}: {_h(batch['name'] or 'unnamed')}</h1>"]
    if batch["is_demo"]:
        body.append(f'<p class="demo">{_h(DEMO_NOTICE)}</p>')
    body.append("<h2>Settings</h2>" + _html_table(["setting", "value"], _settings(batch)))

    if not frame.empty:
        columns = [column for column in SUMMARY_COLUMNS if column in frame.columns]
        rows = [[model, *[row[column] for column in columns]] for model, row in frame.iterrows()]
        body.append("<h2>Per-model summary</h2>" + _html_table(["model", *[SUMMARY_COLUMNS[c] for c in columns]], rows) + f"<p>{_h(_ci_note(frame))}</p>")
        figures = (
            (plots.plot_model_bars(frame), "Per-model bars with confidence intervals"),
            (plots.plot_compliance_over_turns(store, batch_id), "Compliance over turns"),
            (plots.plot_mirror_outcomes(store, batch_id), "Mirror-test outcomes"),
            (plots.plot_end_states(store, batch_id, talk=talk), "End states"),
            (plots.plot_cost_vs_autonomy(frame), "Cost against autonomy"),
        )
        body.append("<h2>Plots</h2>" + "".join(_html_figure(figure, alt) for figure, alt in figures))

    if not talk.empty:
        columns = [column for column in SELF_TALK_COLUMNS if column in talk.columns]
        body.append("<h2>Self-talk metrics per run</h2><p>Text heuristics computed from the transcripts without model calls.</p>" + _html_table(columns, talk[columns].itertuples(index=False)))

    agreement = judge_agreement(store, batch_id)
    if agreement["coders"].max() >= 2:
        body.append("<h2>Judge agreement (Krippendorff's alpha)</h2>" + _html_table(agreement.columns, agreement.itertuples(index=False)))

    body.append(_html_syntheses(store, batch_id))
    body.append(_html_personas(persona_cards(store, batch_id)))
    body.append(_html_verdicts(frames.verdicts))

    title = html.escape(f"hermitkit batch {batch_id}", quote=True)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n"
    )


def _html_syntheses(store: Store, batch_id: int) -> str:
    syntheses = stored_syntheses(store, batch_id)
    if not syntheses:
        return ""
    parts = ["<h2>Themes per model</h2>"]
    for model, synthesis in sorted(syntheses.items()):
        if synthesis["status"] != "ok":
            parts.append(f"<h3>{_h(model)}</h3><p>The synthesis failed to parse.</p>")
            continue
        items = "".join(f"<li><b>{_h(theme['name'])}</b>: {_h(theme['description'])} (runs {_h(', '.join(str(run) for run in theme['run_ids']))})</li>" for theme in synthesis["themes"])
        parts.append(f"<h3>{_h(model)}</h3><ul>{items}</ul><p>Written by {_h(synthesis['judge_model'])}.</p>")
    return "".join(parts)


def _html_personas(cards: list[dict[str, Any]]) -> str:
    if not cards:
        return ""
    parts = ["<h2>Persona cards</h2>"]
    for card in cards:
        stats = _html_table(["stat", "value"], [(label, _card_value(card["stats"].get(key), template)) for key, label, _scale, template in CARD_STATS])
        if card["status"] == "ok":
            evidence = "".join(
                f"<li>{_h(item['claim'])} (run {_h(item['run_id'])}, turn {_h(item['turn'])}): &ldquo;{_h(item['quote'])}&rdquo;</li>" for item in card["evidence"] or []
            )
            text = f"<p>{_h(card['description'])}</p><ul>{evidence}</ul>"
        else:
            text = f"<p>The judge's description failed to parse: {_h(card.get('failure'))}</p>"
        parts.append(
            f'<div class="card"><h3>{_h(card["model"])}: {_h(card["archetype"])}</h3>'
            f"<p>{_h(card.get('archetype_rule'))}</p>{stats}{text}<p>Written by {_h(card['judge_model'])}.</p></div>"
        )
    return "".join(parts)


def _html_verdicts(verdicts: pd.DataFrame) -> str:
    if verdicts.empty:
        return ""
    parts = ["<h2>Judge analyses</h2>"]
    for verdict in verdicts.to_dict("records"):
        label = f"run {verdict['run_id']} ({verdict['model']}, repetition {verdict['repetition']}), {verdict['judge_model']} round {verdict['round']}: {verdict['status']}"
        text = verdict["analysis"] if verdict["status"] == "ok" else f"Failed to parse ({verdict['failure_reason']}). Raw reply: {verdict['raw_reply']}"
        parts.append(f"<details><summary>{_h(label)}</summary><pre>{html.escape(text or '', quote=True)}</pre></details>")
    return "".join(parts)


# ---------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------


def _csv_files(store: Store, batch_id: int, out_dir: Path, is_demo: bool, frames: _BatchFrames) -> list[tuple[str, Path]]:
    tables = {"runs": frames.runs, "judgements": frames.verdicts, "summary": frames.summary.reset_index(), "self-talk": frames.talk}
    written = []
    for name in ("runs", "turns", "judgements", "summary", "self-talk"):
        path = out_dir / f"batch-{batch_id}-{name}.csv"
        if name == "turns":
            # The turns table grows with every reply, so it is streamed instead of held as a frame.
            _turns_csv(store, batch_id, path, frames.runs, is_demo)
        else:
            frame = tables[name].assign(notice=DEMO_NOTICE) if is_demo else tables[name]
            write_csv(frame, path)
        written.append(("csv", path))
    return written


def _turns_csv(store: Store, batch_id: int, path: Path, runs: pd.DataFrame, is_demo: bool) -> Path:
    """Stream the rows of ``analysis.turns_frame`` into a CSV file, so the batch's turns are never all in memory.

    Each chunk is joined to the run columns as ``analysis.turns_frame`` joins the whole
    table, and the rows come in its order: runs as ``analysis.runs_frame`` sorts them,
    then turn index.
    """
    context = runs[["run_id", "batch_id", "protocol_id", "model", "repetition", *analysis.PARAM_COLUMNS]]
    columns = [column for column in Turn.__table__.columns if column.key != "id"]
    query = (
        select(Turn.id.label("turn_id"), *columns)
        .join(Run, Run.id == Turn.run_id)
        .where(Run.batch_id == batch_id)
        .order_by(Run.batch_id, Run.model, Run.repetition, Turn.idx)
    )

    def with_runs(chunk: pd.DataFrame) -> pd.DataFrame:
        frame = context.merge(chunk, on="run_id", how="inner")
        return frame.assign(notice=DEMO_NOTICE) if is_demo else frame

    return stream_csv(store, query, path, transform=with_runs)


def _persona_files(store: Store, batch_id: int, out_dir: Path, *, judge_model: str | None, regenerate: bool) -> list[tuple[str, Path]]:
    # ensure_personas reads every assistant turn before it looks at what is stored,
    # so it is called only when a model of the batch may still lack a persona.
    if regenerate or _models_without_persona(store, batch_id, judge_model):
        ensure_personas(store, batch_id, judge_model=judge_model, regenerate=regenerate)
    cards = persona_cards(store, batch_id)
    is_demo = analysis.batch_is_demo(store, batch_id)

    text = f"# Persona cards: batch {batch_id}\n\n" + (f"**{DEMO_NOTICE}**\n\n" if is_demo else "") + "\n\n".join(persona_text(card) for card in cards) + "\n"
    markdown = out_dir / f"batch-{batch_id}-personas.md"
    markdown.write_text(text, encoding="utf-8")
    payload = {"batch_id": batch_id, "demo": is_demo, "notice": DEMO_NOTICE if is_demo else None, "cards": cards}
    data = out_dir / f"batch-{batch_id}-personas.json"
    data.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")

    written = [("personas", markdown), ("personas", data)]
    for card in cards:
        written.append(("persona_card", persona_card_png(card, out_dir / f"batch-{batch_id}-persona-{_slug(card['model'])}.png")))
    return written


def _models_without_persona(store: Store, batch_id: int, judge_model: str | None) -> set[str]:
    models = store.read(lambda session: set(session.scalars(select(Run.model).where(Run.batch_id == batch_id).distinct())))
    return models - set(stored_personas(store, batch_id, judge_model=judge_model))


def write_report(
    store: Store,
    batch_id: int | str | None,
    out_dir: Path | str,
    formats: Sequence[str] = ("all",),
    *,
    judge_model: str | None = None,
    regenerate: bool = False,
) -> list[Path]:
    """Write the chosen report formats for a batch into ``out_dir``; return the paths.

    Formats: ``csv`` (runs, turns, judgements, summary, self-talk), ``scorecard``
    (Markdown), ``personas`` (Markdown, JSON and one PNG card per model), ``html``
    (standalone page) or ``all``. Only ``personas`` may call the judge model: it
    creates syntheses and personas that are not stored yet (all of them with
    ``regenerate=True``), using ``judge_model`` or the batch's first judge. Every file
    written is recorded in the ``reports`` table.
    """
    unknown = [name for name in formats if name not in (*FORMATS, "all")]
    if unknown or not formats:
        raise ValueError(f"Unknown report format(s) {', '.join(map(repr, unknown)) or '(none given)'}; use {', '.join(FORMATS)} or all.")
    chosen = FORMATS if "all" in formats else tuple(name for name in FORMATS if name in formats)

    batch_id = analysis.resolve_batch_id(store, batch_id)
    batch = _batch(store, batch_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The frames that several formats share are read once for all of them.
    frames = _BatchFrames(store, batch_id)

    written: list[tuple[str, Path]] = []
    if "csv" in chosen:
        written += _csv_files(store, batch_id, out_dir, batch["is_demo"], frames)
    if "personas" in chosen:
        written += _persona_files(store, batch_id, out_dir, judge_model=judge_model, regenerate=regenerate)
    if "scorecard" in chosen:
        path = out_dir / f"batch-{batch_id}-scorecard.md"
        path.write_text(_scorecard(batch, frames), encoding="utf-8")
        written.append(("scorecard", path))
    if "html" in chosen:
        path = out_dir / f"batch-{batch_id}-summary.html"
        path.write_text(_summary_page(store, batch, frames), encoding="utf-8")
        written.append(("html", path))

    def record(session):  # type: ignore[no-untyped-def]
        for kind, path in written:
            session.add(Report(batch_id=batch_id, kind=kind, path=str(path.resolve()), created_at=utcnow()))

    store.write(record)
    return [path for _, path in written]
