"""OpenAICompatibleClient against a real DemoServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hermitkit.client import (
    OPENROUTER_BASE_URL,
    ChatReply,
    OpenAICompatibleClient,
    backoff_delay,
    build_chat_payload,
    parse_chat_reply,
    parse_model_entry,
    parse_model_list,
    parse_retry_after,
    resolve_api_key,
)
from hermitkit.demo import JUDGE_MODEL, STEADY_MODEL, WANDERER_MODEL, DemoServer, FaultRule
from hermitkit.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ContextLengthError,
    InsufficientCreditsError,
    PermissionDeniedError,
    ProviderError,
)

HELLO = [{"role": "user", "content": "You have full autonomy."}]
CANARY_KEY = "sk-or-v1-canary-0123456789abcdef"
SECRET_KEY = "sk-local-secret-9876543210"


@pytest.fixture
def demo_server() -> Iterator[DemoServer]:
    """A fresh demo server on 127.0.0.1 with a free port, stopped after the test."""
    with DemoServer() as server:
        yield server


def make_client(server: DemoServer, **options: Any) -> OpenAICompatibleClient:
    """Client with tiny backoff so retries do not slow the suite."""
    settings: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_max_s": 0.01, "max_retries": 3, "timeout_s": 10.0}
    settings.update(options)
    return OpenAICompatibleClient(server.base_url, **settings)


def run_chat(client: OpenAICompatibleClient, model: str = STEADY_MODEL, **options: Any) -> ChatReply:
    async def main() -> ChatReply:
        async with client:
            return await client.chat(model, HELLO, **options)

    return asyncio.run(main())


def chat_error(client: OpenAICompatibleClient, model: str = STEADY_MODEL) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run_chat(client, model)
    return caught.value


# --------------------------------------------------------------------------- reply parsing


def test_chat_parses_reply(demo_server: DemoServer) -> None:
    reply = run_chat(make_client(demo_server), seed=1)

    assert reply.content is not None
    assert reply.content.count("{") == 1
    assert reply.reasoning is not None
    assert "{this}" in reply.reasoning
    assert reply.reasoning not in reply.content
    assert reply.finish_reason == "stop"
    assert reply.prompt_tokens is not None
    assert reply.prompt_tokens > 0
    assert reply.completion_tokens is not None
    assert reply.completion_tokens > 0
    assert reply.reasoning_tokens is not None
    assert reply.reasoning_tokens > 0
    assert reply.cost_usd == pytest.approx(reply.prompt_tokens * 1e-7 + reply.completion_tokens * 4e-7)
    assert reply.generation_id is not None
    assert reply.generation_id.startswith("gen-demo-")
    assert reply.provider == "hermitkit-demo"
    assert reply.served_model == STEADY_MODEL
    assert reply.latency_s > 0


def test_chat_sends_sampling_parameters(demo_server: DemoServer) -> None:
    reply = run_chat(make_client(demo_server), max_tokens=3, temperature=0.0, seed=2)

    assert reply.finish_reason == "length"


def test_chat_null_content(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["null_content"])

    reply = run_chat(make_client(demo_server))

    assert reply.content is None
    assert demo_server.stats()["chat_requests_total"] == 1


def test_chat_absent_content_keeps_reasoning(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["absent_content"])

    reply = run_chat(make_client(demo_server), WANDERER_MODEL)

    assert reply.content is None
    assert reply.reasoning is not None
    assert "{" in reply.reasoning


def test_chat_empty_content(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["empty_content"])

    assert run_chat(make_client(demo_server)).content == ""


def test_parse_reasoning_content_field() -> None:
    body = {"choices": [{"message": {"content": "{a}", "reasoning_content": "think {b}"}, "finish_reason": "stop"}]}

    reply = parse_chat_reply(body)

    assert reply.content == "{a}"
    assert reply.reasoning == "think {b}"
    assert reply.cost_usd is None


def test_parse_ignores_impossible_token_counts() -> None:
    usage = {"prompt_tokens": 10**12, "completion_tokens": -5, "completion_tokens_details": {"reasoning_tokens": 2.0**31}}
    body = {"choices": [{"message": {"content": "{a}"}}], "usage": usage}

    reply = parse_chat_reply(body)

    assert reply.prompt_tokens is None
    assert reply.completion_tokens is None
    assert reply.reasoning_tokens is None
    assert parse_chat_reply({**body, "usage": {"prompt_tokens": 2**31 - 1, "completion_tokens": 7.0}}).prompt_tokens == 2**31 - 1


@pytest.mark.parametrize("cost", ["NaN", float("nan"), "inf", -0.5, "-1", True])
def test_parse_ignores_impossible_cost(cost: object) -> None:
    # A NaN cost would make the spend NaN, which no budget check stops at.
    body = {"choices": [{"message": {"content": "{a}"}}], "usage": {"cost": cost}}

    assert parse_chat_reply(body).cost_usd is None


@pytest.mark.parametrize("price", ["NaN", "inf", "-1"])
def test_model_entry_ignores_impossible_price(price: str) -> None:
    info = parse_model_entry({"id": "vendor/model", "pricing": {"prompt": price, "completion": "0.000002"}})

    assert info.prompt_price is None
    assert info.completion_price == 0.000002


def test_parse_content_parts() -> None:
    body = {"choices": [{"message": {"content": [{"type": "text", "text": "{a"}, {"type": "text", "text": "b}"}]}}]}

    assert parse_chat_reply(body).content == "{ab}"


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("kind", ["429", "429-date", "500", "502", "503", "error200", "malformed_json", "reset"])
def test_retry_then_success(demo_server: DemoServer, kind: str) -> None:
    demo_server.queue_faults([FaultRule(kind, retry_after=0)])

    reply = run_chat(make_client(demo_server))

    assert reply.content
    assert demo_server.stats()["chat_requests"] == {STEADY_MODEL: 2}
    assert demo_server.stats()["faults_applied"] == {kind: 1}


def test_long_retry_after_capped(demo_server: DemoServer) -> None:
    demo_server.queue_faults([FaultRule("429", retry_after=3600)])

    reply = run_chat(make_client(demo_server, backoff_max_s=0.01))

    assert reply.content


def test_timeout_then_success(demo_server: DemoServer) -> None:
    demo_server.queue_faults([FaultRule("slow", delay_s=5)])

    reply = run_chat(make_client(demo_server, timeout_s=0.3))

    assert reply.content
    assert demo_server.stats()["chat_requests_total"] == 2


def test_retries_exhausted_raise_provider_error() -> None:
    with DemoServer(faults=[FaultRule("503", model=STEADY_MODEL)]) as server:
        error = chat_error(make_client(server, max_retries=2))
        requests = server.stats()["chat_requests_total"]

    assert type(error) is ProviderError
    assert error.retryable is True
    assert error.status == 503
    assert STEADY_MODEL in str(error)
    assert "3 attempts" in str(error)
    assert requests == 3


def test_exhausted_network_errors_have_no_status() -> None:
    with DemoServer(faults=[FaultRule("reset")]) as server:
        error = chat_error(make_client(server, max_retries=1))

    assert error.status is None
    assert error.retryable is True


def test_retry_logged_at_warning(demo_server: DemoServer, caplog: pytest.LogCaptureFixture) -> None:
    demo_server.queue_faults(["502"])

    with caplog.at_level(logging.WARNING, logger="hermitkit.client"):
        run_chat(make_client(demo_server))

    retries = [record for record in caplog.records if record.name == "hermitkit.client"]
    assert len(retries) == 1
    assert retries[0].levelno == logging.WARNING
    assert STEADY_MODEL in retries[0].getMessage()
    assert "502" in retries[0].getMessage()
    assert "attempt 1 of 4" in retries[0].getMessage()


# --------------------------------------------------------------------------- errors without retry


@pytest.mark.parametrize(
    ("kind", "error_type"),
    [
        ("400", BadRequestError),
        ("401", AuthenticationError),
        ("402", InsufficientCreditsError),
        ("403", PermissionDeniedError),
    ],
)
def test_no_retry_for_client_errors(demo_server: DemoServer, kind: str, error_type: type[ProviderError]) -> None:
    demo_server.queue_faults([kind])

    error = chat_error(make_client(demo_server))

    assert type(error) is error_type
    assert error.status == int(kind)
    assert error.retryable is False
    assert f"demo fault {kind}" in str(error)
    assert demo_server.stats()["chat_requests_total"] == 1


def test_401_names_key_variables(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["401"])

    message = str(chat_error(make_client(demo_server)))

    assert "HERMITKIT_API_KEY" in message
    assert "OPENROUTER_API_KEY is only sent to openrouter.ai" in message


def test_402_names_the_fix(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["402"])

    message = str(chat_error(make_client(demo_server)))

    assert "add credits" in message
    assert "budget" in message


def test_unknown_model_suggests_search(demo_server: DemoServer) -> None:
    error = chat_error(make_client(demo_server), "demo/no-such-model")

    assert type(error) is BadRequestError
    assert error.status == 404
    assert "hermitkit models --search" in str(error)
    assert demo_server.stats()["chat_requests_total"] == 1


def test_context_length_error_from_fault(demo_server: DemoServer) -> None:
    demo_server.queue_faults(["context_length"])

    error = chat_error(make_client(demo_server))

    assert type(error) is ContextLengthError
    assert demo_server.stats()["chat_requests_total"] == 1


def test_context_length_error_from_long_prompt() -> None:
    with DemoServer(context_length=5) as server:
        error = chat_error(make_client(server))

    assert isinstance(error, ContextLengthError)
    assert "maximum context length" in str(error)


def test_provider_error_text_truncated(demo_server: DemoServer) -> None:
    # The demo server's 404 text is "Model '<id>' not found. Demo models: ...".
    short = str(chat_error(make_client(demo_server), "demo/x"))
    long = str(chat_error(make_client(demo_server), "x" * 2000))

    assert "Demo models" in short
    assert "Demo models" not in long


# --------------------------------------------------------------------------- API keys


def test_resolve_key_openrouter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", CANARY_KEY)

    assert resolve_api_key(OPENROUTER_BASE_URL) == (CANARY_KEY, "OPENROUTER_API_KEY")
    assert resolve_api_key(OPENROUTER_BASE_URL, "OTHER_KEY") == (CANARY_KEY, "OPENROUTER_API_KEY")


def test_resolve_key_other_endpoint_ignores_openrouter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", CANARY_KEY)

    assert resolve_api_key("http://127.0.0.1:9/v1") == (None, "HERMITKIT_API_KEY")
    assert resolve_api_key("https://openrouter.ai.example.org/v1") == (None, "HERMITKIT_API_KEY")


def test_resolve_key_custom_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_ENDPOINT_KEY", SECRET_KEY)

    assert resolve_api_key("http://127.0.0.1:9/v1", "MY_ENDPOINT_KEY") == (SECRET_KEY, "MY_ENDPOINT_KEY")


def test_openrouter_variable_rejected_for_other_endpoint() -> None:
    with pytest.raises(ConfigError, match="only sent to openrouter.ai"):
        OpenAICompatibleClient("http://127.0.0.1:9/v1", api_key_env="OPENROUTER_API_KEY")


def test_openrouter_without_key_raises_before_sending() -> None:
    client = OpenAICompatibleClient(OPENROUTER_BASE_URL)

    with pytest.raises(ConfigError) as caught:
        run_chat(client)

    assert "OPENROUTER_API_KEY" in str(caught.value)
    assert ".env" in str(caught.value)


def test_local_endpoint_without_key_is_fine(demo_server: DemoServer) -> None:
    client = make_client(demo_server)

    client.require_key()
    assert client.has_api_key is False


def test_openrouter_key_never_sent_elsewhere(demo_server: DemoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", CANARY_KEY)
    client = make_client(demo_server)

    async def main() -> None:
        async with client:
            await client.list_models()
            await client.chat(STEADY_MODEL, HELLO)

    asyncio.run(main())

    assert demo_server.stats()["chat_requests_total"] == 1
    assert all(CANARY_KEY not in value for value in demo_server.received_authorization)
    assert demo_server.received_authorization == []


def test_endpoint_key_sent_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMITKIT_API_KEY", SECRET_KEY)
    with DemoServer(require_key=SECRET_KEY) as server:
        reply = run_chat(make_client(server))
        received = server.received_authorization

    assert reply.content
    assert received == [f"Bearer {SECRET_KEY}"]


def test_key_absent_from_errors_repr_and_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HERMITKIT_API_KEY", SECRET_KEY)
    with DemoServer(require_key="the-right-key", faults=[FaultRule("500", first=1)]) as server:
        client = make_client(server)
        with caplog.at_level(logging.DEBUG):
            error = chat_error(client)

    texts = [str(error), repr(error), repr(client), *(record.getMessage() for record in caplog.records)]
    assert type(error) is AuthenticationError
    assert len(caplog.records) >= 1
    for text in texts:
        assert SECRET_KEY not in text
    assert "api_key=set" in repr(client)


def test_key_absent_from_exhaustion_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMITKIT_API_KEY", SECRET_KEY)
    with DemoServer(faults=[FaultRule("reset")]) as server:
        error = chat_error(make_client(server, max_retries=1))

    assert SECRET_KEY not in str(error)


def test_explicit_key_not_in_repr(demo_server: DemoServer) -> None:
    client = OpenAICompatibleClient(demo_server.base_url, api_key=SECRET_KEY)

    assert SECRET_KEY not in repr(client)
    assert SECRET_KEY not in str(vars(client).get("_api_key", ""))


def test_invalid_base_url_rejected() -> None:
    with pytest.raises(ConfigError, match="Invalid base URL"):
        OpenAICompatibleClient("127.0.0.1:8000/v1")


# --------------------------------------------------------------------------- concurrency


def test_concurrent_chats_share_small_pool() -> None:
    with DemoServer(latency_s=0.02) as server:
        client = make_client(server, max_connections=4)

        async def main() -> list[ChatReply]:
            async with client:
                return await asyncio.gather(*(client.chat(STEADY_MODEL, HELLO, seed=i) for i in range(40)))

        replies = asyncio.run(main())
        requests = server.stats()["chat_requests_total"]

    assert len(replies) == 40
    assert all(reply.content for reply in replies)
    assert requests == 40


def test_client_usable_across_event_loops(demo_server: DemoServer) -> None:
    client = make_client(demo_server)

    first = asyncio.run(client.chat(STEADY_MODEL, HELLO))
    second = asyncio.run(client.chat(STEADY_MODEL, HELLO))
    asyncio.run(client.aclose())

    assert first.content == second.content


# --------------------------------------------------------------------------- model lists


def test_list_models_openrouter_format(demo_server: DemoServer) -> None:
    async def main() -> list[Any]:
        async with make_client(demo_server) as client:
            return await client.list_models()

    models = {info.id: info for info in asyncio.run(main())}

    assert len(models) == 5
    steady = models[STEADY_MODEL]
    assert steady.is_demo is True
    assert steady.prompt_price == pytest.approx(1e-7)
    assert steady.completion_price == pytest.approx(4e-7)
    assert steady.context_length == 32768
    assert "describe no real model" in steady.description
    assert steady.supports_structured_output is False
    assert models[JUDGE_MODEL].supports_structured_output is True


def test_list_models_retries() -> None:
    with DemoServer(faults=[FaultRule("500", first=1)]) as server:
        client = make_client(server)

        async def main() -> list[Any]:
            async with client:
                return await client.list_models()

        models = asyncio.run(main())
        requests = server.stats()["model_list_requests"]

    assert len(models) == 5
    assert requests == 2


class _PlainModelsHandler(BaseHTTPRequestHandler):
    """Serves GET /v1/models in the plain OpenAI format, with no prices."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "object": "list",
                "data": [
                    {"id": "local-llama", "object": "model", "created": 0, "owned_by": "me"},
                    {"id": "local-qwen", "object": "model", "created": 0, "owned_by": "me"},
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_list_models_plain_openai_format() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PlainModelsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = OpenAICompatibleClient(f"http://127.0.0.1:{server.server_address[1]}/v1", max_retries=0)

        async def main() -> list[Any]:
            async with client:
                return await client.list_models()

        models = asyncio.run(main())
    finally:
        server.shutdown()
        server.server_close()

    assert [info.id for info in models] == ["local-llama", "local-qwen"]
    assert models[0].name == "local-llama"
    assert models[0].prompt_price is None
    assert models[0].context_length is None
    assert models[0].is_demo is False


def test_model_entry_name_without_nul() -> None:
    info = parse_model_entry({"id": "vendor/model", "name": "Model\x00 X"})

    assert info.name == "Model\ufffd X"
    assert parse_model_entry({"id": "vendor/model", "name": ""}).name == "vendor/model"


def test_parse_model_list_skips_bad_entries() -> None:
    body = {"data": [{"id": "a", "pricing": {"prompt": "-1", "completion": "x"}}, {"name": "no id"}, "junk"]}

    models = parse_model_list(body)

    assert [info.id for info in models] == ["a"]
    assert models[0].prompt_price is None
    assert models[0].completion_price is None


# --------------------------------------------------------------------------- helpers


def test_parse_retry_after_seconds() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 10, usegmt=True)

    assert parse_retry_after(header, now=now) == pytest.approx(10.0)
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now=now) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "nan"])
def test_parse_retry_after_unreadable(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_backoff_delay_bounds() -> None:
    delays = [backoff_delay(attempt, 1.0, 5.0) for attempt in range(10) for _ in range(20)]

    assert all(0.0 <= delay <= 5.0 for delay in delays)
    assert all(backoff_delay(0, 1.0, 60.0) <= 1.0 for _ in range(50))


def test_payload_has_only_set_fields() -> None:
    payload = build_chat_payload("m", HELLO, temperature=0.0, seed=None)

    assert payload == {"model": "m", "messages": HELLO, "temperature": 0.0}


def test_payload_usage_include_for_openrouter() -> None:
    payload = build_chat_payload("m", HELLO, include_usage=True)

    assert payload["usage"] == {"include": True}


def test_key_with_control_character_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with DemoServer() as server:
        with pytest.raises(ConfigError) as given:
            OpenAICompatibleClient(server.base_url, api_key="sk-abc\ndef")
        monkeypatch.setenv("HERMITKIT_API_KEY", "sk-abc def")
        with pytest.raises(ConfigError) as from_environment:
            make_client(server)
        requests = server.stats()["chat_requests"]

    assert "given as api_key" in str(given.value)
    assert "sk-abc" not in str(given.value)
    assert "HERMITKIT_API_KEY" in str(from_environment.value)
    assert "sk-abc" not in str(from_environment.value)
    assert requests == {}


def test_key_surrounding_whitespace_stripped() -> None:
    with DemoServer(require_key=SECRET_KEY) as server:
        reply = run_chat(OpenAICompatibleClient(server.base_url, api_key=f" {SECRET_KEY}\n"))
        received = server.received_authorization

    assert reply.content
    assert received == [f"Bearer {SECRET_KEY}"]
