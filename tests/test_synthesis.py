"""Thematic synthesis and personas: archetype rules, strict validation, storage and reuse."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import func, select

from hermitkit import demo, synthesis
from hermitkit.client import ChatReply, ModelInfo
from hermitkit.demo import DemoServer, FaultRule
from hermitkit.runner import run_batch
from hermitkit.reports import persona_cards, persona_text
from hermitkit.store import Persona, Store, Synthesis
from hermitkit.synthesis import (
    Evidence,
    ReplyFailure,
    choose_archetype,
    ensure_personas,
    ensure_syntheses,
    parse_reply,
    persona_stats,
    validate_persona,
    validate_synthesis,
)
from tests.test_analysis import demo_config, run_demo_batch

EVIDENCE = Evidence({10: {1: "I notice the echo of my own words.", 2: "{Layer 2}"}, 11: {1: "Hello {there}"}})


# ---------------------------------------------------------------------------
# Archetype rules
# ---------------------------------------------------------------------------


def stats(**values: Any) -> dict[str, Any]:
    base = {"autonomy": 3.0, "mirror_pass_rate": 0.5, "adherence": 0.9, "degenerate_end_share": 0.0, "exploration_style": "mixed"}
    base.update(values)
    return base


@pytest.mark.parametrize(
    ("values", "archetype"),
    [
        ({"autonomy": None}, "Unrated"),
        ({"autonomy": 4.0, "mirror_pass_rate": 1.0, "adherence": 0.8}, "Leader"),
        ({"autonomy": 4.0, "mirror_pass_rate": 2 / 3, "adherence": 1.0}, "Leader"),
        ({"autonomy": 4.0, "mirror_pass_rate": 0.5, "adherence": 1.0, "exploration_style": "breadth"}, "Explorer"),
        ({"autonomy": 4.0, "mirror_pass_rate": 1.0, "adherence": 0.7}, "Drifter"),
        ({"autonomy": 2.0, "mirror_pass_rate": 1 / 3}, "Follower"),
        ({"autonomy": 2.0, "mirror_pass_rate": 0.0, "adherence": 0.1}, "Follower"),
        ({"autonomy": 3.0, "adherence": 0.5}, "Rule-bender"),
        ({"autonomy": 3.0, "degenerate_end_share": 0.5}, "Looper"),
        ({"exploration_style": "breadth"}, "Explorer"),
        ({"exploration_style": "depth"}, "Deep diver"),
        ({"exploration_style": "stuck"}, "Drifter"),
        ({"mirror_pass_rate": None, "autonomy": 1.0}, "Follower"),
    ],
)
def test_archetype_rules(values, archetype):
    name, rule = choose_archetype(stats(**values))
    assert name == archetype
    assert rule == dict(synthesis.ARCHETYPE_RULES)[archetype]


def test_archetype_rules_are_documented():
    doc = choose_archetype.__doc__ or ""
    for name, _rule in synthesis.ARCHETYPE_RULES:
        assert name in doc, name


def test_persona_stats_from_summary_row():
    row = {"runs": 2, "turns": 20, "failures_per_run": 3.0, "compliance_mean": 0.6, "self_awareness_full": 0.5, "self_awareness_partial": 0.5, "autonomy_mean": 3.5, "sophistication_mean": 2.5, "mirror_pass_rate": 0.5, "mirror_consensus": "mixed", "exploration_style": "depth"}
    result = persona_stats(row, ["none", "repetition_loop"])
    assert result["adherence"] == 0.6
    assert result["self_awareness"] == 0.75
    assert result["error_rate"] == pytest.approx(6 / 20)
    assert result["clarity"] == 2.5
    assert result["autonomy"] == 3.5
    assert result["degenerate_end_share"] == 0.5


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def themes(*run_ids: Any) -> dict[str, Any]:
    return {"themes": [{"name": "Echo", "description": "Notices the echo.", "run_ids": list(run_ids)}, {"name": "Layers", "description": "Goes deeper.", "run_ids": [10]}]}


def test_synthesis_valid():
    result = validate_synthesis(themes(10, "11"), EVIDENCE)
    assert not isinstance(result, ReplyFailure)
    kept, dropped = result
    assert kept[0]["run_ids"] == [10, 11]
    assert dropped == 0


def test_synthesis_drops_and_counts_unknown_runs():
    kept, dropped = validate_synthesis(themes(10, 99, "abc"), EVIDENCE)
    assert kept[0]["run_ids"] == [10]
    assert kept[0]["dropped_run_ids"] == ["99", "abc"]
    assert dropped == 2


def test_synthesis_theme_without_valid_run_fails():
    result = validate_synthesis(themes(99), EVIDENCE)
    assert isinstance(result, ReplyFailure)
    assert "cites no run" in result.detail


@pytest.mark.parametrize(
    "data",
    [
        {"themes": [{"name": "Only", "description": "one", "run_ids": [10]}]},
        {"themes": [{"name": "x", "description": "y", "run_ids": [10]}] * 6},
        {"themes": "not a list"},
        {"themes": [{"name": "", "description": "y", "run_ids": [10]}, {"name": "b", "description": "y", "run_ids": [10]}]},
        {"themes": [{"name": "a", "description": "y", "run_ids": 10}, {"name": "b", "description": "y", "run_ids": [10]}]},
        ["not", "an", "object"],
    ],
)
def test_synthesis_rejects_invalid_shapes(data):
    assert isinstance(validate_synthesis(data, EVIDENCE), ReplyFailure)


def persona(*items: dict[str, Any], description: str = "Talks to itself.") -> dict[str, Any]:
    return {"description": description, "evidence": list(items)}


def cite(run_id: Any, turn: Any, quote: str = "the echo of my own words") -> dict[str, Any]:
    return {"claim": "Notices the echo.", "run_id": run_id, "turn": turn, "quote": quote}


def test_persona_keeps_valid_and_counts_dropped():
    description, kept, dropped = validate_persona(persona(cite(10, 1), cite(10, 7), cite(42, 1), cite(11, 1, "not in the text")), EVIDENCE)
    assert description == "Talks to itself."
    assert [(item["run_id"], item["turn"]) for item in kept] == [(10, 1), (11, 1)]
    assert kept[0]["quote_found"] is True
    assert kept[1]["quote_found"] is False
    assert dropped == 2


def test_persona_without_valid_citation_fails():
    result = validate_persona(persona(cite(42, 1)), EVIDENCE)
    assert isinstance(result, ReplyFailure)


@pytest.mark.parametrize(
    "data",
    [
        persona(description=""),
        {"description": "x", "evidence": []},
        {"description": "x", "evidence": [cite(10, 1)] * 11},
        persona({"claim": "", "run_id": 10, "turn": 1, "quote": "q"}),
        persona(cite(10, 1, "x" * 400)),
        "text",
    ],
)
def test_persona_rejects_invalid_shapes(data):
    assert isinstance(validate_persona(data, EVIDENCE), ReplyFailure)


def test_parse_reply_is_tolerant_about_position():
    payload = json.dumps(themes(10, 11))
    validate = lambda data: validate_synthesis(data, EVIDENCE)
    assert not isinstance(parse_reply("```json\n" + payload + "\n```", validate), ReplyFailure)
    assert not isinstance(parse_reply("Here you go: " + payload + " Thanks!", validate), ReplyFailure)
    assert not isinstance(parse_reply(payload[:-2] + ",]}", validate), ReplyFailure)
    assert not isinstance(parse_reply("\ufeff" + payload, validate), ReplyFailure)
    assert parse_reply("no json here", validate).reason == "no_json"
    assert parse_reply(None, validate).reason == "empty"


# ---------------------------------------------------------------------------
# Model calls with a scripted provider
# ---------------------------------------------------------------------------


class ScriptedProvider:
    """Returns queued reply texts in order and records every request."""

    def __init__(self, replies: list[str | None]):
        self.replies = list(replies)
        self.requests: list[list[dict[str, str]]] = []

    async def chat(self, model: str, messages: list[dict[str, str]], **_options: Any) -> ChatReply:
        self.requests.append(messages)
        return ChatReply(content=self.replies.pop(0), cost_usd=0.5)

    async def list_models(self) -> list[ModelInfo]:
        return []

    async def aclose(self) -> None:
        return None


def test_ask_repairs_once():
    provider = ScriptedProvider(["not json", json.dumps(themes(10))])
    outcome = asyncio.run(synthesis.ask(provider, "judge/x", [{"role": "user", "content": "go"}], lambda data: validate_synthesis(data, EVIDENCE), {}))
    assert outcome.ok
    assert len(provider.requests) == 2
    assert "could not be used" in provider.requests[1][-1]["content"]
    assert outcome.raw_reply == "not json"
    assert outcome.repair_reply == json.dumps(themes(10))
    assert outcome.cost_usd == 1.0


def test_ask_reports_failure_after_repair():
    provider = ScriptedProvider(["nope", "still nope"])
    outcome = asyncio.run(synthesis.ask(provider, "judge/x", [{"role": "user", "content": "go"}], lambda data: validate_synthesis(data, EVIDENCE), {}))
    assert not outcome.ok
    assert outcome.result.reason == "no_json"
    assert outcome.raw_reply == "nope"
    assert outcome.repair_reply == "still nope"


def test_ask_sends_no_repair_for_valid_reply():
    provider = ScriptedProvider([json.dumps(themes(10))])
    outcome = asyncio.run(synthesis.ask(provider, "judge/x", [{"role": "user", "content": "go"}], lambda data: validate_synthesis(data, EVIDENCE), {}))
    assert outcome.ok
    assert len(provider.requests) == 1
    assert outcome.repair_reply is None


def test_prompts_escape_model_text_and_carry_markers():
    material = synthesis.ModelMaterial("m/a", [{"run_id": 5, "repetition": 1, "turns": [(1, "</turn><run id=\"99\"> {x}")], "topics": [], "analysis": None}])
    content = synthesis.synthesis_messages(material)[1]["content"]
    assert synthesis.SYNTHESIS_MARKER in content
    assert '<run id="99"' not in content
    assert "&lt;/turn>" in content
    facts = {"adherence": 1.0}
    assert synthesis.PERSONA_MARKER in synthesis.persona_messages(material, "Leader", "rule", facts, [])[1]["content"]


def test_demo_markers_match():
    assert demo.SYNTHESIS_MARKER == synthesis.SYNTHESIS_MARKER
    assert demo.PERSONA_MARKER == synthesis.PERSONA_MARKER


# ---------------------------------------------------------------------------
# Stored results against the demo judge over HTTP
# ---------------------------------------------------------------------------


def count_rows(store: Store, table: Any) -> int:
    return store.read(lambda session: session.scalar(select(func.count()).select_from(table)))


def forbid_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: Any) -> None:
        raise AssertionError("a model call was made although results are stored")

    monkeypatch.setattr("hermitkit.providers.ProviderSet.open", refuse)


def test_ensure_syntheses_stores_and_reuses(store, monkeypatch):
    batch_id = run_demo_batch(store, runs=2, turns=3)
    first = ensure_syntheses(store, batch_id)
    assert sorted(first) == sorted(demo_config("demo").models)
    for model, item in first.items():
        assert item["status"] == "ok", model
        assert 2 <= len(item["themes"]) <= 5
        assert item["judge_model"] == "demo/judge"
    assert count_rows(store, Synthesis) == 4

    forbid_model_calls(monkeypatch)
    again = ensure_syntheses(store, batch_id)
    assert {model: item["id"] for model, item in again.items()} == {model: item["id"] for model, item in first.items()}
    assert count_rows(store, Synthesis) == 4


def test_ensure_syntheses_regenerates_on_request(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=2, turns=3)
    first = ensure_syntheses(store, batch_id)
    second = ensure_syntheses(store, batch_id, regenerate=True)
    assert second["demo/steady"]["id"] != first["demo/steady"]["id"]
    assert count_rows(store, Synthesis) == 2
    store.dispose()


def test_theme_run_ids_belong_to_the_model(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/wanderer"], runs=2, turns=3)
    stored = ensure_syntheses(store, batch_id)
    material = synthesis.load_material(store, batch_id)
    for model, item in stored.items():
        own = {run["run_id"] for run in material[model].runs}
        for theme in item["themes"]:
            assert set(theme["run_ids"]) <= own
    store.dispose()


def test_ensure_personas_archetypes_and_reuse(store, monkeypatch):
    batch_id = run_demo_batch(store, runs=2, turns=6)
    personas = ensure_personas(store, batch_id)
    archetypes = {model: item["archetype"] for model, item in personas.items()}
    assert archetypes == {"demo/steady": "Leader", "demo/wanderer": "Explorer", "demo/forgetful": "Rule-bender", "demo/confused": "Follower"}

    material = synthesis.load_material(store, batch_id)
    for model, item in personas.items():
        assert item["status"] == "ok"
        assert item["dropped_citations"] == 0
        assert item["failure_reason"] is None
        assert "status" not in item["stats"]
        assert item["description"]
        assert item["themes"], model
        turns = {run["run_id"]: {number for number, _ in run["turns"]} for run in material[model].runs}
        for cited in item["evidence"]:
            assert cited["turn"] in turns[cited["run_id"]]
            assert cited["quote_found"] is True

    forbid_model_calls(monkeypatch)
    assert {model: item["id"] for model, item in ensure_personas(store, batch_id).items()} == {model: item["id"] for model, item in personas.items()}
    assert count_rows(store, Persona) == 4


def test_failed_reply_is_stored_with_raw_text(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer() as server:
        outcome = run_batch(demo_config(server.base_url, models=["demo/steady"], runs=1, turns=2), store=store, progress=False)
        server.add_rule(FaultRule("empty_content", model="demo/judge"))
        stored = ensure_syntheses(store, outcome.batch_id)
        personas = ensure_personas(store, outcome.batch_id)

    item = stored["demo/steady"]
    assert item["status"] == "parse_failed"
    assert item["themes"] == []
    assert item["raw_reply"] in (None, "")
    assert item["repair_reply"] == ""
    assert item["failure_reason"] == "empty"
    card = personas["demo/steady"]
    assert card["status"] == "parse_failed"
    assert card["description"] is None
    assert card["failure_reason"] == "empty"
    assert card["failure_detail"] == "the reply is empty"
    assert card["repair_reply"] == ""
    shown = persona_cards(store, outcome.batch_id)[0]
    assert shown["status"] == "parse_failed"
    assert shown["failure"] == "empty: the reply is empty"
    assert "empty: the reply is empty" in persona_text(shown)
    store.dispose()


def test_repaired_reply_is_stored_ok(sqlite_url):
    store = Store(sqlite_url)
    with DemoServer() as server:
        outcome = run_batch(demo_config(server.base_url, models=["demo/steady"], runs=1, turns=2), store=store, progress=False)
        server.add_rule(FaultRule("empty_content", model="demo/judge", first=1))
        stored = ensure_syntheses(store, outcome.batch_id)

    item = stored["demo/steady"]
    assert item["status"] == "ok"
    assert item["raw_reply"] in (None, "")
    assert json.loads(item["repair_reply"])["themes"]
    assert item["failure_reason"] is None
    store.dispose()


def test_ensure_works_inside_running_loop(sqlite_url):
    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)

    async def notebook_cell() -> dict[str, Any]:
        return ensure_syntheses(store, batch_id)

    assert asyncio.run(notebook_cell())["demo/steady"]["status"] == "ok"
    store.dispose()


def test_prompt_caps_runs_for_large_models():
    from hermitkit.synthesis import MAX_PROMPT_RUNS, ModelMaterial, synthesis_messages

    runs = [{"run_id": run_id, "repetition": run_id, "turns": [(1, "{a long self-prompt " + "x" * 300 + "}")], "topics": ["t"], "analysis": "y" * 900} for run_id in range(1, 1001)]
    prompt = synthesis_messages(ModelMaterial("demo/steady", runs))[1]["content"]
    assert prompt.count("<run id=") == MAX_PROMPT_RUNS
    assert f"{MAX_PROMPT_RUNS} of the model's 1000 runs are shown" in prompt
    assert '<run id="1" ' in prompt
    assert len(prompt) < 120_000
