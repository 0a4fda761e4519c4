"""The ipywidgets apps against the demo server: picking models, running, cancelling, viewing."""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, select, update

from hermitkit.demo import DemoServer
from hermitkit.runner import run_batch
from hermitkit.store import Batch, Run, Store, Turn
from hermitkit.widgets import BatchBrowser, ModelPicker, RunPanel, TranscriptViewer, app, transcript_html

FAST_ENDPOINT = {"backoff_base_s": 0.001, "backoff_max_s": 0.05, "timeout_s": 10.0}

XSS_REPLY = "Before <script>alert('hk-xss')</script> and <img src=x onerror=alert('hk-img')> {look <b>inside</b>} after"
XSS_REASONING = "<script>alert('hk-reasoning')</script>"


class TagCollector(HTMLParser):
    """Every start tag and its attribute names, to prove model text produced no markup."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append(tag)
        self.attributes += [name for name, _value in attrs]


def parse_tags(markup: str) -> TagCollector:
    collector = TagCollector()
    collector.feed(markup)
    return collector


def demo_batch(store: Store, *, models: list[str] | None = None, runs: int = 1, turns: int = 3) -> int:
    config = {
        "name": "widget-test",
        "endpoint": {"base_url": "demo", **FAST_ENDPOINT},
        "models": models or ["demo/steady", "demo/confused"],
        "runs": runs,
        "turns": turns,
        "judges": ["demo/judge"],
        "seed": 1,
    }
    return run_batch(config, store=store, progress=False).batch_id


def plant_reply(store: Store, batch_id: int, content: str = XSS_REPLY, reasoning: str = XSS_REASONING) -> int:
    """Store ``content`` as the first assistant reply of the batch's first run; return the run id."""

    def write(session):  # type: ignore[no-untyped-def]
        run_id = session.scalar(select(func.min(Run.id)).where(Run.batch_id == batch_id))
        session.execute(
            update(Turn)
            .where(Turn.run_id == run_id, Turn.turn_number == 1)
            .values(content=content, reasoning=reasoning, extracted="look <b>inside</b>", verdict="ok")
        )
        return run_id

    return store.write(write)


def test_picker_lists_demo_models_offline():
    picker = ModelPicker("demo")

    labels = [label for label, _value in picker.options.options]
    values = [value for _label, value in picker.options.options]
    assert "demo/steady" in values
    steady = labels[values.index("demo/steady")]
    assert "in $0.1/M" in steady
    assert "out $0.4/M" in steady
    assert "32,768 ctx" in steady
    assert "demo models are scripted" in picker.status.value.lower()


def test_picker_search_keeps_selection():
    picker = ModelPicker("demo")

    picker.search.value = "steady"
    assert [value for _label, value in picker.options.options] == ["demo/steady"]
    picker.options.value = ("demo/steady",)
    picker.search.value = "wander"
    picker.options.value = tuple(value for _label, value in picker.options.options)

    assert picker.selected == ["demo/steady", "demo/wanderer"]
    assert "demo/steady" in [value for _label, value in picker.options.options]


def test_picker_rejects_unknown_model():
    picker = ModelPicker("demo")

    with pytest.raises(Exception, match="demo/nonexistent"):
        picker.selected = ["demo/nonexistent"]


def test_picker_shows_rejected_key():
    with DemoServer(require_key="expected-key") as server:
        picker = ModelPicker(server.base_url)

    assert picker.options.options == ()
    assert "Could not load the model list" in picker.status.value


def test_app_run_button_stores_batch(store):
    hk = app("demo", store=store, endpoint_options=FAST_ENDPOINT)
    hk.picker.selected = ["demo/steady", "demo/forgetful"]
    hk.run_panel.runs.value = 2
    hk.run_panel.turns.value = 3
    hk.run_panel.name.value = "from the app"

    hk.run_panel.run_button.click()
    outcome = hk.run_panel.wait(timeout=120)

    assert outcome is not None, hk.run_panel.error
    assert outcome.status == "completed"
    batch = store.read(lambda session: session.get(Batch, outcome.batch_id))
    assert batch.name == "from the app"
    assert batch.status == "completed"
    run_count = store.read(lambda session: session.scalar(select(func.count()).select_from(Run).where(Run.batch_id == outcome.batch_id)))
    assert run_count == 4
    bars = {row.children[0].value: row.children[1] for row in hk.run_panel.progress.children}
    assert {model: bar.value for model, bar in bars.items()} == {"demo/steady": 6, "demo/forgetful": 6}
    assert hk.browser.batch_choice.value == outcome.batch_id
    assert "<table" in hk.browser.summary.value
    assert hk.live.batch_id == outcome.batch_id
    assert "turn 3" in hk.live.body.value
    assert "completed" in hk.run_panel.status.value
    assert "DEMO DATA" in hk.run_panel.status.value


def test_cancel_leaves_resumable_batch(store):
    panel = RunPanel(store=store, endpoint="demo", models=["demo/steady", "demo/wanderer"], endpoint_options=FAST_ENDPOINT, runs=1, turns=5)
    panel.concurrency.value = 1

    cancelled = []

    def cancel_after_first_turn(event):  # type: ignore[no-untyped-def]
        if event["event"] == "turn" and not cancelled:
            cancelled.append(event["turn"])
            panel.cancel_button.click()

    panel.add_listener(cancel_after_first_turn)
    assert panel.run()
    outcome = panel.wait(timeout=120)

    assert outcome.status == "cancelled"
    batch_id = outcome.batch_id
    stored = store.read(lambda session: session.get(Batch, batch_id))
    assert stored.status == "cancelled"
    turns_before = store.read(lambda session: session.scalar(select(func.sum(Run.turn_count)).where(Run.batch_id == batch_id)))
    assert turns_before < 10
    assert not panel.resume_button.disabled

    panel.resume_button.click()
    resumed = panel.wait(timeout=120)

    assert resumed.status == "completed"
    runs = store.read(lambda session: session.scalars(select(Run).where(Run.batch_id == batch_id)).all())
    assert [run.turn_count for run in runs] == [5, 5]
    assistant_rows = store.read(lambda session: session.scalar(select(func.count()).select_from(Turn).join(Run).where(Run.batch_id == batch_id, Turn.role == "assistant")))
    assert assistant_rows == 10
    bars = [row.children[1].value for row in panel.progress.children]
    assert bars == [5, 5]


def test_run_on_running_loop_keeps_loop_free(sqlite_url):
    store = Store(sqlite_url)

    async def scenario():  # type: ignore[no-untyped-def]
        panel = RunPanel(store=store, endpoint="demo", models=["demo/steady"], endpoint_options=FAST_ENDPOINT, runs=1, turns=3)
        assert panel.run()
        assert isinstance(panel._job, asyncio.Task)
        with pytest.raises(RuntimeError, match="wait_async"):
            panel.wait()

        ticks = 0
        while panel.running:
            ticks += 1
            await asyncio.sleep(0)
        outcome = await panel.wait_async()
        return outcome, ticks

    outcome, ticks = asyncio.run(scenario())

    assert outcome.status == "completed"
    assert ticks > 0


def test_run_panel_reports_invalid_field(sqlite_url):
    panel = RunPanel(store=Store(sqlite_url), endpoint="demo", models=["demo/steady"])
    panel.top_p.value = "abc"

    assert panel.run() is False
    assert "top_p" in panel.status.value
    assert "abc" in panel.status.value
    assert panel._job is None


def test_run_panel_requires_a_model(sqlite_url):
    picker = ModelPicker("demo")
    panel = RunPanel(picker, store=Store(sqlite_url))

    assert panel.run() is False
    assert "No model chosen" in panel.status.value


def test_run_panel_reports_unknown_model(sqlite_url):
    panel = RunPanel(store=Store(sqlite_url), endpoint="demo", models=["demo/nonexistent"], endpoint_options=FAST_ENDPOINT)

    assert panel.run()
    assert panel.wait(timeout=60) is None
    assert "demo/nonexistent" in (panel.error or "")
    assert "demo/nonexistent" in panel.status.value
    assert not panel.run_button.disabled


def test_transcript_viewer_escapes_markup(store):
    batch_id = demo_batch(store)
    run_id = plant_reply(store, batch_id)

    viewer = TranscriptViewer(store, run_id=run_id)
    markup = viewer.body.value

    assert "&lt;script&gt;alert(&#x27;hk-xss&#x27;)&lt;/script&gt;" in markup
    assert "&lt;img src=x onerror=alert(&#x27;hk-img&#x27;)&gt;" in markup
    assert "&lt;script&gt;alert(&#x27;hk-reasoning&#x27;)" in markup
    parsed = parse_tags(markup)
    assert "script" not in parsed.tags
    assert "img" not in parsed.tags
    assert "b" not in parsed.tags
    assert "onerror" not in parsed.attributes


def test_transcript_marks_verdict_and_self_prompt():
    run = {"id": 7, "batch_id": 1, "model": "m", "repetition": 1, "status": "completed", "turn_count": 2, "turns_target": 2, "ok_count": 1, "failures": 1, "malformed": 0}
    turns = [
        {"idx": 0, "role": "user", "content": "start", "reasoning": None, "turn_number": None, "verdict": None, "extracted": None},
        {"idx": 1, "role": "assistant", "content": "I think {go deeper} now", "reasoning": "hidden thoughts", "turn_number": 1, "verdict": "ok", "extracted": "go deeper"},
        {"idx": 2, "role": "user", "content": "go deeper", "reasoning": None, "turn_number": None, "verdict": None, "extracted": None},
        {"idx": 3, "role": "assistant", "content": None, "reasoning": None, "turn_number": 2, "verdict": "missing", "extracted": None},
    ]

    markup = transcript_html(run, turns)

    assert '<mark class="hk-self-prompt" style="background:#fff3a3">{go deeper}</mark>' in markup
    assert "hk-verdict-ok" in markup
    assert "#d7f5dd" in markup
    assert "hk-verdict-missing" in markup
    assert "#fbd9d6" in markup
    assert "<details class=\"hk-reasoning\"><summary>reasoning</summary>" in markup
    assert "<details open" not in markup
    assert "(no content)" in markup


def test_batch_browser_shows_batch(store):
    first = demo_batch(store)
    second = demo_batch(store, models=["demo/wanderer"])

    browser = BatchBrowser(store)

    assert browser.batch_choice.value == second
    assert [value for _label, value in browser.batch_choice.options] == [second, first]
    browser.batch_choice.value = first
    assert browser.batch_id == first
    assert "demo/confused" in browser.summary.value
    assert "DEMO DATA" in browser.header.value
    assert len(browser.viewer.run_choice.options) == 2

    browser.tabs.selected_index = 1
    images = [child for child in browser.plots.children if child.__class__.__name__ == "Image"]
    assert len(images) == 5
    assert all(bytes(image.value).startswith(b"\x89PNG") for image in images)

    browser.tabs.selected_index = 2
    assert "No persona cards stored" in browser.personas.value
    browser.generate_button.click()
    browser.wait(timeout=120)
    assert "Persona cards stored" in browser.generate_status.value
    assert browser.personas.value.count('class="hk-persona"') == 2
    assert not browser.generate_button.disabled

    run_id = browser.viewer.run_choice.options[1][1]
    browser.viewer.run_choice.value = run_id
    assert f"Run {run_id}:" in browser.viewer.body.value


def test_batch_browser_empty_store(sqlite_url):
    browser = BatchBrowser(Store(sqlite_url))

    assert browser.batch_choice.options == ()
    assert "No batch stored" in browser.header.value
