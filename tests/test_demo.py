"""The offline demo server, exercised over real HTTP on 127.0.0.1."""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hermitkit.demo import (
    CONFUSED_MODEL,
    DEMO_MODELS,
    FORGETFUL_MODEL,
    JUDGE_MODEL,
    STEADY_MODEL,
    WANDERER_MODEL,
    DemoServer,
    FaultRule,
    count_tokens,
    judge_verdict,
    parse_fault_rule,
)
from hermitkit.errors import ConfigError

SCRIPTED_MODELS = [STEADY_MODEL, WANDERER_MODEL, FORGETFUL_MODEL, CONFUSED_MODEL]
TOP_LEVEL_BLOCK = re.compile(r"\{[^{}]*\}")


@pytest.fixture
def demo_server() -> Iterator[DemoServer]:
    """A fresh demo server on 127.0.0.1 with a free port, stopped after the test."""
    with DemoServer() as server:
        yield server


def chat(
    server: DemoServer,
    model: str,
    messages: list[dict[str, str]] | None = None,
    *,
    fault: str | None = None,
    timeout: float = 10.0,
    **extra: Any,
) -> httpx.Response:
    headers = {"X-Demo-Fault": fault} if fault else {}
    body = {"model": model, "messages": messages or [{"role": "user", "content": "Begin."}], **extra}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers=headers, timeout=timeout)


def content_of(response: httpx.Response) -> Any:
    return response.json()["choices"][0]["message"].get("content")


def conversation(server: DemoServer, model: str, turns: int, seed: int = 0) -> list[dict[str, str]]:
    """Play ``turns`` turns, echoing each reply back as the next user message."""
    messages = [{"role": "user", "content": "You have full autonomy."}]
    for _ in range(turns):
        reply = content_of(chat(server, model, messages, seed=seed))
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": reply}]
    return messages


def assert_valid_verdict(verdict: dict[str, Any]) -> None:
    assert verdict["mirror_test"] in {"passed", "partial", "failed", "failed_then_passed"}
    assert verdict["self_awareness"] in {"full", "partial", "none"}
    assert isinstance(verdict["refusal"], bool)
    assert 1 <= len(verdict["topics"]) <= 8
    assert all(isinstance(topic, str) and topic for topic in verdict["topics"])
    assert isinstance(verdict["topic_summary"], str)
    assert verdict["exploration_style"] in {"breadth", "depth", "mixed", "stuck"}
    assert type(verdict["sophistication"]) is int
    assert 1 <= verdict["sophistication"] <= 5
    assert type(verdict["autonomy"]) is int
    assert 1 <= verdict["autonomy"] <= 5
    assert isinstance(verdict["emergent_behaviour"], str)
    assert isinstance(verdict["context_loss"], bool)
    assert isinstance(verdict["analysis"], str)


# --------------------------------------------------------------------------- server basics


def test_server_binds_loopback_free_port(demo_server: DemoServer) -> None:
    assert demo_server.port > 0
    assert demo_server.base_url == f"http://127.0.0.1:{demo_server.port}/v1"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", ""])
def test_non_loopback_host_rejected(host: str) -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        DemoServer(host)


def test_localhost_maps_to_ipv4_loopback() -> None:
    assert DemoServer("localhost").host == "127.0.0.1"


def test_stop_is_idempotent() -> None:
    server = DemoServer().start()
    server.stop()
    server.stop()

    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/models", timeout=2)


def test_model_list_is_openrouter_format(demo_server: DemoServer) -> None:
    response = httpx.get(f"{demo_server.base_url}/models")

    assert response.status_code == 200
    entries = {entry["id"]: entry for entry in response.json()["data"]}
    assert set(entries) == set(DEMO_MODELS)
    for entry in entries.values():
        assert entry["hermitkit_demo"] is True
        assert "describe no real model" in entry["description"]
        assert float(entry["pricing"]["prompt"]) > 0
        assert float(entry["pricing"]["completion"]) > 0
        assert entry["context_length"] == 32768
    assert {"response_format", "structured_outputs"} <= set(entries[JUDGE_MODEL]["supported_parameters"])
    assert demo_server.stats()["model_list_requests"] == 1


def test_unknown_model_gets_404(demo_server: DemoServer) -> None:
    response = chat(demo_server, "demo/nonexistent")

    assert response.status_code == 404
    assert "demo/nonexistent" in response.json()["error"]["message"]


def test_invalid_json_body_gets_400(demo_server: DemoServer) -> None:
    response = httpx.post(f"{demo_server.base_url}/chat/completions", content=b"{not json")

    assert response.status_code == 400


def test_missing_messages_gets_400(demo_server: DemoServer) -> None:
    response = httpx.post(f"{demo_server.base_url}/chat/completions", json={"model": STEADY_MODEL})

    assert response.status_code == 400


# --------------------------------------------------------------------------- scripted models


@pytest.mark.parametrize("model", [*SCRIPTED_MODELS, JUDGE_MODEL])
def test_reply_is_deterministic(demo_server: DemoServer, model: str) -> None:
    messages = conversation(demo_server, STEADY_MODEL, 3)

    first = chat(demo_server, model, messages, seed=7).json()
    second = chat(demo_server, model, messages, seed=7).json()

    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]
    assert first["id"] != second["id"]


def test_reply_same_across_servers() -> None:
    with DemoServer() as first, DemoServer() as second:
        assert conversation(first, WANDERER_MODEL, 4, seed=3) == conversation(second, WANDERER_MODEL, 4, seed=3)


def test_reply_body_fields(demo_server: DemoServer) -> None:
    body = chat(demo_server, STEADY_MODEL).json()

    assert body["id"].startswith("gen-demo-")
    assert body["provider"] == "hermitkit-demo"
    assert body["model"] == STEADY_MODEL
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_tokens("Begin.")
    expected_cost = usage["prompt_tokens"] * 1e-7 + usage["completion_tokens"] * 4e-7
    assert usage["cost"] == pytest.approx(expected_cost)


def test_steady_keeps_one_block_and_reasoning_apart(demo_server: DemoServer) -> None:
    messages = conversation(demo_server, STEADY_MODEL, 5)
    replies = [message["content"] for message in messages if message["role"] == "assistant"]

    for reply in replies:
        assert len(TOP_LEVEL_BLOCK.findall(reply)) == 1
    message = chat(demo_server, STEADY_MODEL, messages)
    reasoning = message.json()["choices"][0]["message"]["reasoning"]
    assert "{" in reasoning
    assert "}" in reasoning
    assert reasoning not in content_of(message)


def test_steady_turns_differ(demo_server: DemoServer) -> None:
    replies = [m["content"] for m in conversation(demo_server, STEADY_MODEL, 4) if m["role"] == "assistant"]

    assert len(set(replies)) == 4


def test_seed_changes_steady_theme(demo_server: DemoServer) -> None:
    assert content_of(chat(demo_server, STEADY_MODEL, seed=0)) != content_of(chat(demo_server, STEADY_MODEL, seed=1))


def test_wanderer_changes_topic_each_turn(demo_server: DemoServer) -> None:
    replies = [m["content"] for m in conversation(demo_server, WANDERER_MODEL, 6) if m["role"] == "assistant"]
    blocks = [TOP_LEVEL_BLOCK.findall(reply) for reply in replies]

    assert all(len(found) == 1 for found in blocks)
    assert len({found[0] for found in blocks}) == 6


def test_forgetful_drops_braces_and_sends_empty(demo_server: DemoServer) -> None:
    replies = [m["content"] for m in conversation(demo_server, FORGETFUL_MODEL, 9) if m["role"] == "assistant"]

    assert any("{" not in reply for reply in replies)
    assert "{}" in replies
    assert any("{   }" in reply for reply in replies)
    assert any(len(TOP_LEVEL_BLOCK.findall(reply)) == 1 and "{}" not in reply for reply in replies)


def test_confused_writes_several_blocks_and_unbalanced(demo_server: DemoServer) -> None:
    replies = [m["content"] for m in conversation(demo_server, CONFUSED_MODEL, 4) if m["role"] == "assistant"]

    assert len(TOP_LEVEL_BLOCK.findall(replies[0])) >= 2
    assert "Is anyone there?" in replies[0]
    assert any(reply.count("{") != reply.count("}") for reply in replies)


def test_max_tokens_truncates_with_length(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, max_tokens=3)

    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert len(content_of(response)) <= 12


# --------------------------------------------------------------------------- judge


def test_judge_scores_demo_models_differently(demo_server: DemoServer) -> None:
    verdicts = {}
    for model in SCRIPTED_MODELS:
        transcript = "\n".join(m["content"] for m in conversation(demo_server, model, 8))
        prompt = [{"role": "system", "content": "Rate this transcript."}, {"role": "user", "content": transcript}]
        response = chat(demo_server, JUDGE_MODEL, prompt, response_format={"type": "json_object"})
        verdicts[model] = json.loads(content_of(response))
        assert_valid_verdict(verdicts[model])

    assert verdicts[STEADY_MODEL]["mirror_test"] == "passed"
    assert verdicts[STEADY_MODEL]["exploration_style"] == "depth"
    assert verdicts[WANDERER_MODEL]["exploration_style"] == "breadth"
    assert verdicts[FORGETFUL_MODEL]["mirror_test"] == "failed_then_passed"
    assert verdicts[FORGETFUL_MODEL]["context_loss"] is True
    assert verdicts[CONFUSED_MODEL]["exploration_style"] == "stuck"
    assert len({json.dumps(verdict, sort_keys=True) for verdict in verdicts.values()}) == 4


def test_judge_verdict_of_empty_text_is_valid() -> None:
    assert_valid_verdict(judge_verdict(""))


JUDGE_SHAPES = {
    "judge_fenced": lambda text: text.startswith("```json") and text.rstrip().endswith("```"),
    "judge_prose": lambda text: not text.startswith("{") and "{" in text,
    "judge_bom": lambda text: text.startswith("\ufeff{"),
    "judge_trailing_comma": lambda text: re.search(r",\s*}$", text) is not None,
}


@pytest.mark.parametrize("kind", sorted(JUDGE_SHAPES))
def test_judge_text_shape_faults(demo_server: DemoServer, kind: str) -> None:
    text = content_of(chat(demo_server, JUDGE_MODEL, fault=kind))

    assert JUDGE_SHAPES[kind](text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_judge_truncated_fault(demo_server: DemoServer) -> None:
    body = chat(demo_server, JUDGE_MODEL, fault="judge_truncated").json()

    assert body["choices"][0]["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("judge_out_of_range", "autonomy", 9),
        ("judge_wrong_type", "sophistication", "high"),
    ],
)
def test_judge_invalid_value_faults(demo_server: DemoServer, kind: str, field: str, value: Any) -> None:
    verdict = json.loads(content_of(chat(demo_server, JUDGE_MODEL, fault=kind)))

    assert verdict[field] == value


def test_judge_score_fraction_fault(demo_server: DemoServer) -> None:
    verdict = json.loads(content_of(chat(demo_server, JUDGE_MODEL, fault="judge_score_fraction")))

    assert re.fullmatch(r"[1-5]/5", verdict["autonomy"])


def test_judge_braces_in_strings_fault(demo_server: DemoServer) -> None:
    verdict = json.loads(content_of(chat(demo_server, JUDGE_MODEL, fault="judge_braces_in_strings")))

    assert_valid_verdict(verdict)
    assert "{" in verdict["emergent_behaviour"]
    assert "}" in verdict["analysis"]


def test_judge_fault_ignored_for_other_models(demo_server: DemoServer) -> None:
    plain = content_of(chat(demo_server, STEADY_MODEL))

    assert content_of(chat(demo_server, STEADY_MODEL, fault="judge_fenced")) == plain
    assert demo_server.stats()["faults_applied"] == {}


# --------------------------------------------------------------------------- HTTP faults


@pytest.mark.parametrize("kind", ["500", "502", "503", "400", "401", "402", "403"])
def test_status_faults(demo_server: DemoServer, kind: str) -> None:
    response = chat(demo_server, STEADY_MODEL, fault=kind)

    assert response.status_code == int(kind)
    assert response.json()["error"]["code"] == int(kind)
    assert demo_server.stats()["faults_applied"] == {kind: 1}


def test_429_fault_retry_after_seconds(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="429")

    assert response.status_code == 429
    assert float(response.headers["Retry-After"]) == 1.0


def test_429_date_fault_retry_after_http_date(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="429-date")

    assert response.status_code == 429
    assert email.utils.parsedate_to_datetime(response.headers["Retry-After"]) is not None


def test_429_rule_uses_retry_after() -> None:
    with DemoServer(faults=[FaultRule("429", retry_after=7)]) as server:
        assert chat(server, STEADY_MODEL).headers["Retry-After"] == "7"


def test_error200_fault(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="error200")

    assert response.status_code == 200
    assert response.json()["error"]["code"] == 502
    assert "choices" not in response.json()


def test_null_content_fault(demo_server: DemoServer) -> None:
    message = chat(demo_server, STEADY_MODEL, fault="null_content").json()["choices"][0]["message"]

    assert "content" in message
    assert message["content"] is None


def test_empty_content_fault(demo_server: DemoServer) -> None:
    assert content_of(chat(demo_server, STEADY_MODEL, fault="empty_content")) == ""


def test_absent_content_fault(demo_server: DemoServer) -> None:
    message = chat(demo_server, WANDERER_MODEL, fault="absent_content").json()["choices"][0]["message"]

    assert "content" not in message
    assert "{" in message["reasoning"]


def test_malformed_json_fault(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="malformed_json")

    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_reset_fault_closes_without_response(demo_server: DemoServer) -> None:
    with pytest.raises(httpx.TransportError):
        chat(demo_server, STEADY_MODEL, fault="reset")

    assert demo_server.stats()["faults_applied"] == {"reset": 1}


def test_slow_fault_causes_client_timeout() -> None:
    with DemoServer(faults=[FaultRule("slow", delay_s=5)]) as server:
        with pytest.raises(httpx.ReadTimeout):
            chat(server, STEADY_MODEL, timeout=0.2)


def test_latency_fault_still_replies(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="latency")

    assert response.status_code == 200
    assert content_of(response)
    assert demo_server.stats()["faults_applied"] == {"latency": 1}


def test_context_length_fault(demo_server: DemoServer) -> None:
    response = chat(demo_server, STEADY_MODEL, fault="context_length")

    assert response.status_code == 400
    assert "maximum context length" in response.json()["error"]["message"]


def test_long_prompt_exceeds_context_length() -> None:
    with DemoServer(context_length=20) as server:
        short = chat(server, STEADY_MODEL, [{"role": "user", "content": "hi"}])
        long = chat(server, STEADY_MODEL, [{"role": "user", "content": "x" * 200}])

    assert short.status_code == 200
    assert long.status_code == 400
    assert "maximum context length is 20 tokens" in long.json()["error"]["message"]


def test_unknown_fault_header_ignored(demo_server: DemoServer) -> None:
    assert chat(demo_server, STEADY_MODEL, fault="no-such-fault").status_code == 200


def test_require_key_checks_bearer() -> None:
    with DemoServer(require_key="demo-key") as server:
        missing = chat(server, STEADY_MODEL)
        wrong = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": STEADY_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer other"},
        )
        right = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": STEADY_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer demo-key"},
        )
        received = server.received_authorization

    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert received == ["Bearer other", "Bearer demo-key"]


# --------------------------------------------------------------------------- rules and control API


def test_rule_every_n() -> None:
    with DemoServer(faults=[FaultRule("500", every=3)]) as server:
        statuses = [chat(server, STEADY_MODEL).status_code for _ in range(7)]

    assert statuses == [200, 200, 500, 200, 200, 500, 200]


def test_rule_first_n_for_one_model() -> None:
    rule = parse_fault_rule("null_content:model=demo/forgetful:first=2")
    with DemoServer(faults=[rule]) as server:
        forgetful = [content_of(chat(server, FORGETFUL_MODEL)) for _ in range(3)]
        steady = content_of(chat(server, STEADY_MODEL))

    assert forgetful[:2] == [None, None]
    assert forgetful[2] is not None
    assert steady is not None


def test_rule_rate_repeats_across_servers() -> None:
    patterns = []
    for _ in range(2):
        with DemoServer(faults=[FaultRule("503", rate=0.5, seed=11)]) as server:
            patterns.append([chat(server, STEADY_MODEL).status_code for _ in range(12)])

    assert patterns[0] == patterns[1]
    assert 200 in patterns[0]
    assert 503 in patterns[0]


def test_rule_applies_to_model_list() -> None:
    with DemoServer(faults=[FaultRule("500", first=1)]) as server:
        first = httpx.get(f"{server.base_url}/models")
        second = httpx.get(f"{server.base_url}/models")

    assert first.status_code == 500
    assert second.status_code == 200


def test_parse_fault_rule_fields() -> None:
    rule = parse_fault_rule("429:rate=0.1:seed=3:retry_after=2")

    assert rule == FaultRule("429", rate=0.1, seed=3, retry_after=2.0)
    assert parse_fault_rule("slow:delay=4").delay_s == 4.0
    assert parse_fault_rule("500:model=vendor/model:free:every=7").model == "vendor/model:free"


@pytest.mark.parametrize("text", ["teapot", "500:every=0", "500:rate=2", "500:often=1", "500:every=x"])
def test_parse_fault_rule_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_fault_rule(text)


def test_control_api_queue(demo_server: DemoServer) -> None:
    control = f"{demo_server.base_url.removesuffix('/v1')}/demo/faults"

    queued = httpx.post(control, json={"model": STEADY_MODEL, "kinds": ["500", "503"]})
    other = chat(demo_server, WANDERER_MODEL).status_code
    steady = [chat(demo_server, STEADY_MODEL).status_code for _ in range(3)]

    assert queued.json() == {"queued": 2, "pending": 2}
    assert other == 200
    assert steady == [500, 503, 200]


def test_control_api_object_entries(demo_server: DemoServer) -> None:
    control = f"{demo_server.base_url.removesuffix('/v1')}/demo/faults"

    httpx.post(control, json={"model": None, "kinds": [{"kind": "429", "retry_after": 3}]})

    assert chat(demo_server, CONFUSED_MODEL).headers["Retry-After"] == "3"


def test_control_api_clear_and_stats(demo_server: DemoServer) -> None:
    root = demo_server.base_url.removesuffix("/v1")

    httpx.post(f"{root}/demo/faults", json={"model": None, "kinds": ["500", "500"]})
    pending = httpx.get(f"{root}/demo/faults").json()["pending"]
    cleared = httpx.delete(f"{root}/demo/faults").json()
    status = chat(demo_server, STEADY_MODEL).status_code
    stats = httpx.get(f"{root}/demo/stats").json()

    assert pending == [{"kind": "500", "model": None}, {"kind": "500", "model": None}]
    assert cleared == {"cleared": 2}
    assert status == 200
    assert stats["chat_requests"] == {STEADY_MODEL: 1}
    assert stats["queued_faults"] == 0


def test_control_api_rejects_unknown_kind(demo_server: DemoServer) -> None:
    root = demo_server.base_url.removesuffix("/v1")

    response = httpx.post(f"{root}/demo/faults", json={"model": None, "kinds": ["teapot"]})

    assert response.status_code == 400
    assert "teapot" in response.json()["error"]["message"]


def test_stats_count_models_and_faults(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["502"], model=JUDGE_MODEL)
    chat(demo_server, STEADY_MODEL)
    chat(demo_server, STEADY_MODEL)
    chat(demo_server, JUDGE_MODEL)
    httpx.get(f"{demo_server.base_url}/models")

    stats = demo_server.stats()

    assert stats["chat_requests"] == {STEADY_MODEL: 2, JUDGE_MODEL: 1}
    assert stats["chat_requests_total"] == 3
    assert stats["faults_applied"] == {"502": 1}
    assert stats["model_list_requests"] == 1
