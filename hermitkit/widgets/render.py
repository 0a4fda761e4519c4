"""Static HTML and PNG renderings of stored results, shared by the widgets and the report notebooks.

Model output is untrusted: every model-written string is escaped here, so a reply that
contains markup shows as text in JupyterLab and in an exported HTML file alike.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from hermitkit.store import Run, Store
from hermitkit.widgets.base import escape, message

log = logging.getLogger("hermitkit.widgets")

# Text colour and background of each per-turn verdict: green for ok, amber for
# malformed replies, red for protocol failures.
VERDICT_COLOURS = {
    "ok": ("#0b5d1e", "#d7f5dd"),
    "multiple": ("#7a4b00", "#ffe8b8"),
    "unbalanced": ("#7a4b00", "#ffe8b8"),
    "empty": ("#8c1d18", "#fbd9d6"),
    "missing": ("#8c1d18", "#fbd9d6"),
}


def _verdict_badge(verdict: str | None) -> str:
    if not verdict:
        return ""
    colour, background = VERDICT_COLOURS.get(verdict, ("#333", "#eee"))
    return f'<span class="hk-verdict hk-verdict-{escape(verdict)}" style="color:{colour};background:{background};padding:0 6px;border-radius:3px;font-weight:600">{escape(verdict)}</span>'


def _highlight(content: str, extracted: str | None) -> str:
    """Escaped ``content`` with the extracted self-prompt marked, braces included."""
    if not extracted:
        return escape(content)
    start = content.find("{" + extracted + "}")
    length = len(extracted) + 2
    if start == -1:
        start = content.find(extracted)
        length = len(extracted)
    if start == -1:
        return escape(content)
    end = start + length
    marked = f'<mark class="hk-self-prompt" style="background:#fff3a3">{escape(content[start:end])}</mark>'
    return escape(content[:start]) + marked + escape(content[end:])


def transcript_html(run: dict[str, Any], turns: list[dict[str, Any]]) -> str:
    """Render one run as HTML: role, coloured verdict, highlighted self-prompt, reasoning collapsed.

    ``run`` and ``turns`` are what :func:`hermitkit.status.run_transcript` returns.
    Every model-written string is escaped, so a reply that contains markup shows as text.
    """
    pre = 'style="white-space:pre-wrap;word-break:break-word;margin:2px 0;font-family:var(--jp-code-font-family, monospace)"'
    head = (
        f"Run {run['id']}: {escape(run['model'])}, repetition {run['repetition']} of batch {run['batch_id']}, {escape(run['status'])}. "
        f"Turns {run['turn_count']}/{run['turns_target']}, ok {run['ok_count']}, failures {run['failures']}, malformed {run['malformed']}."
    )
    parts = [f'<div class="hk-transcript" style="line-height:1.4"><div class="hk-run-head" style="font-weight:600;margin-bottom:6px">{head}</div>']
    for turn in turns:
        if turn["role"] == "assistant":
            role = f"turn {turn['turn_number']} &middot; assistant {_verdict_badge(turn['verdict'])}"
            border = "#4a7fd4"
        else:
            role = "initial prompt &middot; user" if turn["idx"] == 0 else "echo &middot; user"
            border = "#aaa"
        parts.append(f'<div class="hk-turn hk-{escape(turn["role"])}" style="border-left:3px solid {border};padding:2px 8px;margin:6px 0">')
        parts.append(f'<div class="hk-role" style="font-size:90%;color:#555">{role}</div>')
        if turn.get("reasoning"):
            parts.append(f'<details class="hk-reasoning"><summary>reasoning</summary><pre {pre}>{escape(turn["reasoning"])}</pre></details>')
        if turn["content"] is None:
            parts.append("<i>(no content)</i>")
        elif turn["role"] == "assistant":
            parts.append(f"<pre {pre}>{_highlight(turn['content'], turn.get('extracted'))}</pre>")
        else:
            parts.append(f"<pre {pre}>{escape(turn['content'])}</pre>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def batch_runs(store: Store, batch_id: int) -> list[dict[str, Any]]:
    """List the runs of one batch in model and repetition order."""
    query = select(Run.id, Run.model, Run.repetition, Run.status, Run.turn_count, Run.turns_target).where(Run.batch_id == batch_id).order_by(Run.model, Run.repetition)
    return store.read(lambda session: [dict(row) for row in session.execute(query).mappings().all()])


def summary_table_html(store: Store, batch_id: int) -> str:
    """Render the per-model summary as an escaped HTML table with the report's column headings."""
    from hermitkit.analysis import summary
    from hermitkit.reports import SUMMARY_COLUMNS

    frame = summary(store, batch_id)
    if frame.empty:
        return message(f"Batch {batch_id} has no runs yet.")
    shown = frame[[column for column in SUMMARY_COLUMNS if column in frame.columns]].rename(columns=SUMMARY_COLUMNS)
    table = shown.to_html(escape=True, float_format=lambda value: f"{value:.2f}", na_rep="-", classes="hk-summary", border=0)
    # JupyterLab gives widget HTML a tall line height meant for one-line labels.
    return f'<div style="overflow-x:auto;line-height:1.3">{table}</div>'


def figure_png(figure: Any) -> bytes:
    """Render a matplotlib figure as PNG bytes and close the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def batch_figures(store: Store, batch_id: int) -> list[tuple[str, Any]]:
    """Draw every standard plot of a batch as (title, figure) pairs, with an error message in place of a failed figure."""
    from hermitkit import plots
    from hermitkit.analysis import summary

    frame = summary(store, batch_id)
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("Per-model scores", lambda: plots.plot_model_bars(frame)),
        ("Compliance over turns", lambda: plots.plot_compliance_over_turns(store, batch_id)),
        ("Mirror test outcomes", lambda: plots.plot_mirror_outcomes(store, batch_id)),
        ("How runs ended", lambda: plots.plot_end_states(store, batch_id)),
        ("Cost and autonomy", lambda: plots.plot_cost_vs_autonomy(frame)),
    ]
    results: list[tuple[str, Any]] = []
    for title, make in makers:
        try:
            results.append((title, make()))
        except Exception as exc:  # noqa: BLE001 - one broken plot must not hide the others
            log.warning("Plot %r failed for batch %d: %s", title, batch_id, exc)
            results.append((title, f"{title}: could not draw the plot ({type(exc).__name__}: {exc})"))
    return results


def persona_cards_html(store: Store, batch_id: int) -> str:
    """Render the stored persona cards of a batch as escaped HTML, or a note when none is stored."""
    from hermitkit.reports import persona_cards

    cards = persona_cards(store, batch_id)
    if not cards:
        return message("No persona cards stored for this batch yet: press the button above, or run `hermitkit report`.")
    return '<div style="display:flex;flex-wrap:wrap;gap:10px;line-height:1.4">' + "".join(_card_html(card) for card in cards) + "</div>"


def _card_html(card: dict[str, Any]) -> str:
    from hermitkit.reports import CARD_STATS

    stats = card.get("stats") or {}
    rows = "".join(f"<tr><td>{escape(label)}</td><td>{escape(_format_stat(stats.get(key), template))}</td></tr>" for key, label, _scale, template in CARD_STATS)
    themes = ", ".join(str(theme.get("name", "")) for theme in card.get("themes") or [] if isinstance(theme, dict))
    if card.get("status", "ok") == "ok":
        evidence = "".join(
            f"<li>{escape(item.get('claim'))} (run {escape(item.get('run_id'))}, turn {escape(item.get('turn'))}): &ldquo;{escape(item.get('quote'))}&rdquo;</li>"
            for item in card.get("evidence") or []
        )
        text = f"<p style='white-space:pre-wrap'>{escape(card.get('description'))}</p><ul style='font-size:90%'>{evidence}</ul>"
    else:
        text = f"<p><i>The judge's description failed to parse: {escape(card.get('failure'))}</i></p>"
    notice = f"<div style='color:#8c1d18;font-size:85%'>{escape(card['notice'])}</div>" if card.get("notice") else ""
    return (
        '<div class="hk-persona" style="border:1px solid #adb5bd;border-radius:6px;padding:8px 12px;width:420px">'
        f"<div style='font-weight:700;font-size:110%'>{escape(card.get('model'))}</div>"
        f"<div style='color:#364fc7;font-style:italic'>{escape(card.get('archetype'))}: {escape(card.get('archetype_rule'))}</div>"
        f"<table style='font-size:90%;margin:6px 0'>{rows}</table>"
        f"<div><i>Themes:</i> {escape(themes or 'none stored')}</div>{text}"
        f"<div style='color:#868e96;font-size:85%'>Written by {escape(card.get('judge_model'))}.</div>{notice}</div>"
    )


def _format_stat(value: Any, template: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    try:
        return template.format(value)
    except (TypeError, ValueError):
        return str(value)
