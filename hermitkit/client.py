"""Async client for OpenAI-compatible chat completions and model lists.

OpenRouter is the default endpoint. The data types below are the contract shared by the
runner, the judge, the demo server and the local provider.

API keys: the OpenRouter key (``OPENROUTER_API_KEY``) is only ever sent to openrouter.ai.
Any other base URL reads its key from the variable named by ``api_key_env``
(``HERMITKIT_API_KEY`` by default). Keys never appear in logs, exception messages or
``repr``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from hermitkit.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ContextLengthError,
    InsufficientCreditsError,
    PermissionDeniedError,
    ProviderError,
)
from hermitkit.http_pool import PooledTransport

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
OPENROUTER_KEY_ENV = "OPENROUTER_API_KEY"
DEFAULT_KEY_ENV = "HERMITKIT_API_KEY"

# OpenRouter attributes traffic to an app by this header; HTTP-Referer is left out
# because hermitkit has no public home page to name.
APP_TITLE = "hermitkit"

# Provider error text quoted in exception messages is cut to this many characters.
ERROR_TEXT_MAX_CHARS = 300

logger = logging.getLogger("hermitkit.client")

# httpx and httpcore log every request at INFO, which floods notebooks during a batch.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ChatReply:
    """One assistant reply with what the provider reported about it."""

    content: str | None
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float = 0.0
    generation_id: str | None = None
    provider: str | None = None
    served_model: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One entry of an endpoint's model list. Prices are USD per token."""

    id: str
    name: str = ""
    context_length: int | None = None
    prompt_price: float | None = None
    completion_price: float | None = None
    description: str = ""
    is_demo: bool = False
    supports_structured_output: bool = False
    raw: dict[str, Any] = field(default_factory=dict)


class ChatProvider(Protocol):
    """The interface the runner and judge use for any model source (HTTP endpoint or local)."""

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
    ) -> ChatReply: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def aclose(self) -> None: ...


# Statuses retried with backoff. Everything else in 4xx fails at once.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

# Statuses that carry a Retry-After header worth honouring.
RETRY_AFTER_STATUSES = frozenset({429, 503})

_CONTEXT_LENGTH_PATTERN = re.compile(
    r"maximum context length|context length|context[_ ]length[_ ]exceeded|context window"
    r"|too many tokens|prompt is too long|input is too long|reduce the length",
    re.IGNORECASE,
)

MODEL_LIST_LABEL = "the model list"


def is_openrouter_url(base_url: str) -> bool:
    """Return True when ``base_url`` points at openrouter.ai or one of its subdomains."""
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def environment_proxy(base_url: str) -> str | None:
    """Return the proxy URL that the environment sets for ``base_url``, or None.

    Reads HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY (either case) as httpx and
    urllib do.
    """
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = parts.hostname or ""
    if "no" in proxies and urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxy


def _default_transport(base_url: str, max_connections: int) -> httpx.AsyncBaseTransport:
    proxy = environment_proxy(base_url)
    if proxy is not None:
        # httpx's own transport speaks to HTTP and SOCKS proxies.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        return httpx.AsyncHTTPTransport(proxy=proxy, limits=limits)
    return PooledTransport(max_connections=max_connections)


def resolve_api_key(base_url: str, api_key_env: str | None = None) -> tuple[str | None, str]:
    """Look up the API key for ``base_url`` in the environment.

    Returns the key (``None`` when the variable is unset or blank) and the name of the
    variable read. openrouter.ai always reads OPENROUTER_API_KEY and ignores
    ``api_key_env``. Any other endpoint reads ``api_key_env`` (default HERMITKIT_API_KEY)
    and may not read OPENROUTER_API_KEY, so the OpenRouter key never reaches another host.
    """
    if is_openrouter_url(base_url):
        env_name = OPENROUTER_KEY_ENV
    else:
        env_name = api_key_env or DEFAULT_KEY_ENV
        if env_name == OPENROUTER_KEY_ENV:
            raise ConfigError(
                f"api_key_env={env_name!r} is not allowed for base URL {display_url(base_url)!r}: "
                f"{OPENROUTER_KEY_ENV} is only sent to openrouter.ai, so that the OpenRouter key "
                f"never reaches another server. Put this endpoint's key in {DEFAULT_KEY_ENV} "
                "or in a variable of your choice and pass its name as api_key_env."
            )

    key = os.environ.get(env_name, "").strip() or None
    return key, env_name


# An API key is sent in the Authorization header, so it may only contain visible ASCII.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")

# Request headers that carry credentials; their values never appear in logs.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"})


def masked_headers(headers: Any) -> dict[str, str]:
    """Return a copy of ``headers`` with every credential value replaced by "[redacted]"."""
    return {name: "[redacted]" if name.lower() in SECRET_HEADERS else value for name, value in headers.items()}


def display_url(url: str) -> str:
    """Return ``url`` without user name, password, query or fragment, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Convert a Retry-After header value to seconds from ``now`` (default: the clock).

    The header contains either a delay in seconds or an HTTP date. Returns ``None`` when the
    value is missing or unreadable, and 0.0 for a date in the past.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()

    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        current = time.time() if now is None else now
        seconds = when.timestamp() - current

    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Return a full-jitter delay: uniform in [0, min(max_s, base_s * 2**attempt)]."""
    ceiling = min(max_s, base_s * 2 ** min(attempt, 62))
    return random.uniform(0.0, ceiling)


def build_chat_payload(
    model: str,
    messages: list[dict[str, str]],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    reasoning: dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """Build a chat completions request body that contains only the fields that are set.

    ``include_usage`` adds OpenRouter's ``"usage": {"include": true}``, which makes it
    report the cost of each reply. Strict OpenAI-compatible servers reject unknown
    fields, so it is only set for openrouter.ai.
    """
    payload: dict[str, Any] = {"model": model, "messages": messages}
    optional = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
        "reasoning": reasoning,
        "response_format": response_format,
    }
    payload.update({name: value for name, value in optional.items() if value is not None})

    if include_usage:
        payload["usage"] = {"include": True}
    return payload


# Token counts and context lengths are stored in 32-bit INTEGER columns.
_MAX_COUNT = 2**31 - 1


def _as_count(value: Any) -> int | None:
    """Read a token count or context length: a whole number from 0 to 2**31 - 1, or None.

    A provider's value outside that range is treated as not reported, because storing it
    raised on PostgreSQL (and above 2**63 on SQLite) and stopped the whole batch.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def _as_amount(value: Any) -> float | None:
    """Read a cost or price in USD: a finite number of at least 0, given as a number or a string, or None.

    A NaN cost made the batch's spend NaN, and no budget check stops at NaN.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _as_text(value: Any) -> str | None:
    """Read a message field that is a string, a list of content parts or absent."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        texts = [part.get("text") for part in value if isinstance(part, dict)]
        return storable_text("".join(text for text in texts if isinstance(text, str)))
    return None


# NUL, which PostgreSQL cannot store in a text column, and lone UTF-16 surrogates, which
# have no UTF-8 encoding. A JSON body can carry both as escapes ("\u0000", "\ud800").
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Replace NUL characters and lone surrogates with U+FFFD, the Unicode replacement character.

    Either one in a reply made the exchange write raise and stopped the whole batch.
    They are replaced on every database and before the reply is echoed, so the stored
    transcript is the one the model was sent.
    """
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else text


def _as_name(value: Any) -> str | None:
    """Read a string field of the reply's metadata (id, provider, model, finish reason)."""
    return storable_text(value) if isinstance(value, str) else None


def parse_chat_reply(body: dict[str, Any], *, latency_s: float = 0.0) -> ChatReply:
    """Build a ChatReply from a chat completions response body that has a choice.

    ``content: null`` and a missing ``content`` both become ``None``. Reasoning text
    (``reasoning`` or ``reasoning_content``) is kept in its own field.
    """
    choice = body["choices"][0]
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}

    reasoning = _as_text(message.get("reasoning"))
    if reasoning is None:
        reasoning = _as_text(message.get("reasoning_content"))

    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    details = usage.get("completion_tokens_details")
    if not isinstance(details, dict):
        details = {}

    return ChatReply(
        content=_as_text(message.get("content")),
        reasoning=reasoning,
        finish_reason=_as_name(choice.get("finish_reason")),
        prompt_tokens=_as_count(usage.get("prompt_tokens")),
        completion_tokens=_as_count(usage.get("completion_tokens")),
        reasoning_tokens=_as_count(details.get("reasoning_tokens")),
        cost_usd=_as_amount(usage.get("cost")),
        latency_s=latency_s,
        generation_id=_as_name(body.get("id")),
        provider=_as_name(body.get("provider")),
        served_model=_as_name(body.get("model")),
    )


def _parse_price(value: Any) -> float | None:
    # OpenRouter writes "-1" for routers whose price is not known in advance, which
    # _as_amount reads as None.
    return _as_amount(value)


def parse_model_entry(entry: dict[str, Any]) -> ModelInfo:
    """Build a ModelInfo from one OpenRouter-style or plain OpenAI-style model entry."""
    pricing = entry.get("pricing")
    if not isinstance(pricing, dict):
        pricing = {}

    context_length = _as_count(entry.get("context_length"))
    top_provider = entry.get("top_provider")
    if context_length is None and isinstance(top_provider, dict):
        context_length = _as_count(top_provider.get("context_length"))

    parameters = entry.get("supported_parameters")
    if not isinstance(parameters, list):
        parameters = []
    structured = "structured_outputs" in parameters or "response_format" in parameters

    model_id = str(entry["id"])
    name = _as_name(entry.get("name"))
    description = entry.get("description")
    return ModelInfo(
        id=model_id,
        name=name or model_id,
        context_length=context_length,
        prompt_price=_parse_price(pricing.get("prompt")),
        completion_price=_parse_price(pricing.get("completion")),
        description=description if isinstance(description, str) else "",
        is_demo=entry.get("hermitkit_demo") is True,
        supports_structured_output=structured,
        raw=entry,
    )


def parse_model_list(body: Any) -> list[ModelInfo]:
    """Parse a model list body: ``{"data": [...]}`` or a bare list of entries.

    Entries without a string ``id`` are skipped.
    """
    entries = body.get("data") if isinstance(body, dict) else body
    if not isinstance(entries, list):
        return []
    return [
        parse_model_entry(entry)
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


def _chat_body_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "with a JSON body that is not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "with no choices in the body"
    return None


def _model_list_problem(body: Any) -> str | None:
    if isinstance(body, list):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return "with no data list in the body"
    return None


def _is_unknown_host(exc: BaseException) -> bool:
    """Tell whether a transport error comes from a host name that does not exist.

    EAI_NONAME ("Name or service not known") is final; EAI_AGAIN ("Temporary failure in
    name resolution") is not, so it stays retryable like other network errors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return current.errno == socket.EAI_NONAME
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class _Failure:
    """One failed attempt that may be retried."""

    reason: str
    status: int | None
    retry_after_s: float | None = None


class OpenAICompatibleClient:
    """ChatProvider for OpenRouter or any OpenAI-compatible HTTP endpoint.

    Retries 408, 429, 5xx, network errors, timeouts and malformed 200 replies with
    exponential backoff and full jitter. Raises at once for 400, 401, 402, 403 and 404.
    ``max_retries`` counts retries, so a request is sent at most ``max_retries + 1``
    times. A Retry-After header (seconds or HTTP date) replaces the backoff delay. It is
    capped at ``backoff_max_s``, so a provider that requests an hour does not stall a
    batch. ``timeout_s`` limits connecting and each read or write, not the whole
    request. Waiting for a free connection from the pool (``max_connections``) has no
    timeout and never counts as a failure.
    """

    def __init__(
        self,
        base_url: str = OPENROUTER_BASE_URL,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"Invalid base URL {base_url!r}: expected an http(s) URL such as "
                f"{OPENROUTER_BASE_URL!r} or 'http://127.0.0.1:8000/v1'."
            )
        if max_retries < 0:
            raise ConfigError(f"max_retries={max_retries} is invalid: use 0 or more.")
        if max_connections < 1:
            raise ConfigError(f"max_connections={max_connections} is invalid: use 1 or more.")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s} is invalid: use a positive number of seconds.")

        self._base_url = base_url.rstrip("/")
        self._display_url = display_url(self._base_url)
        self._is_openrouter = is_openrouter_url(self._base_url)

        env_key, self._api_key_env = resolve_api_key(self._base_url, api_key_env)
        self.__api_key = api_key.strip() if api_key else env_key
        if self.__api_key is not None and not _HEADER_TOKEN.fullmatch(self.__api_key):
            source = "given as api_key" if api_key else f"in {self._api_key_env}"
            # The message never shows the key, because it would reach logs and notebook outputs.
            raise ConfigError(
                f"The API key {source} contains a space, line break or other character that an HTTP "
                "header cannot carry. Copy the key again, without them."
            )

        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._max_connections = max_connections
        self._given_transport = transport
        self._transport: httpx.AsyncBaseTransport | None = None
        self._transport_loop: asyncio.AbstractEventLoop | None = None
        self._headers = self._request_headers()
        # Parsed once: httpx.Request copies a URL object and a Headers object cheaply,
        # but parses strings and dicts on every request.
        self._json_headers = httpx.Headers({**self._headers, "Content-Type": "application/json"})
        self._plain_headers = httpx.Headers(self._headers)
        self._urls: dict[str, httpx.URL] = {}
        self._raw_headers: dict[tuple[str, bool], list[tuple[bytes, bytes]]] = {}
        self._timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}

    @property
    def base_url(self) -> str:
        """Base URL without a trailing slash."""
        return self._base_url

    @property
    def api_key_env(self) -> str:
        """Name of the environment variable the key is read from."""
        return self._api_key_env

    @property
    def has_api_key(self) -> bool:
        """Whether a key will be sent."""
        return self.__api_key is not None

    @property
    def is_openrouter(self) -> bool:
        """Whether the base URL points at openrouter.ai."""
        return self._is_openrouter

    def __repr__(self) -> str:
        key_state = "set" if self.__api_key else "not set"
        return (
            f"OpenAICompatibleClient(base_url={self._display_url!r}, "
            f"api_key_env={self._api_key_env!r}, api_key={key_state})"
        )

    def require_key(self) -> None:
        """Raise ConfigError when OpenRouter is the endpoint and no key is set.

        Other endpoints (local servers, the demo server) may run without a key.
        """
        if self._is_openrouter and not self.__api_key:
            raise ConfigError(
                f"No API key for {self._display_url}: set {OPENROUTER_KEY_ENV} in the "
                "environment or in a .env file in the working directory, or use the "
                "offline demo server (`hermitkit demo-server`) to try hermitkit without a key."
            )

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
        """Send one chat completion request and return the parsed reply.

        Raises a ProviderError subclass as described in the class docstring.
        """
        self.require_key()
        payload = build_chat_payload(
            model,
            messages,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            reasoning=reasoning,
            response_format=response_format,
            include_usage=self._is_openrouter,
        )

        body, latency_s = await self._request_with_retries(
            "POST", "/chat/completions", label=f"model {model}", payload=payload, check=_chat_body_problem
        )
        return parse_chat_reply(body, latency_s=latency_s)

    async def list_models(self) -> list[ModelInfo]:
        """Fetch the endpoint's model list, with the same retry rules as chat."""
        body, _ = await self._request_with_retries(
            "GET", "/models", label=MODEL_LIST_LABEL, payload=None, check=_model_list_problem
        )
        return parse_model_list(body)

    async def aclose(self) -> None:
        """Close pooled connections. The client opens a new pool if used again."""
        transport, loop = self._transport, self._transport_loop
        self._transport, self._transport_loop = None, None

        # A pool opened by an event loop that has since closed cannot be closed from
        # another loop, so its sockets are released when it is garbage-collected.
        if transport is not None and loop is asyncio.get_running_loop():
            await transport.aclose()

    async def __aenter__(self) -> OpenAICompatibleClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _request_headers(self) -> dict[str, str]:
        # httpx.AsyncClient's default headers, with Accept narrowed to the JSON these APIs return.
        headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
            "User-Agent": APP_TITLE,
        }
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        if self._is_openrouter:
            headers["X-Title"] = APP_TITLE
        return headers

    def _http_transport(self) -> httpx.AsyncBaseTransport:
        # Pooled connections belong to the event loop that opened them, so a new loop
        # (a second asyncio.run, a new notebook cell) gets a new pool.
        loop = asyncio.get_running_loop()
        if self._transport is not None and self._transport_loop is loop:
            return self._transport

        if self._given_transport is not None:
            self._transport = self._given_transport
        else:
            self._transport = _default_transport(self._base_url, self._max_connections)
        self._transport_loop = loop
        return self._transport

    async def _send(self, method: str, url: str, payload: dict[str, Any] | None) -> httpx.Response:
        """Send one request straight to the transport and read the whole response.

        httpx.AsyncClient would add auth, redirect, cookie and event-hook handling that
        these requests never use. Skipping it saves about a fifth of the CPU time per
        request (benchmarks/README.md).
        """
        if url not in self._urls:
            self._urls[url] = httpx.URL(url)
        headers = self._plain_headers
        content = None
        if payload is not None:
            headers = self._json_headers
            content = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")

        transport = self._http_transport()
        if isinstance(transport, PooledTransport):
            key = (url, content is not None)
            if key not in self._raw_headers:
                # httpx.Request adds Host and, for a body, Content-Length. One request
                # per URL shows which headers httpx would send.
                example = httpx.Request(method, self._urls[url], headers=headers, content=content)
                self._raw_headers[key] = [(name, value) for name, value in example.headers.raw if name.lower() != b"content-length"]
            raw = self._raw_headers[key]
            if content is not None:
                raw = [*raw, (b"Content-Length", str(len(content)).encode("ascii"))]
            response = await transport.send(method, self._urls[url], raw, content or b"", self._timeouts)
        else:
            request = httpx.Request(method, self._urls[url], headers=headers, content=content, extensions={"timeout": self._timeouts})
            response = await transport.handle_async_request(request)
            response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def _request_with_retries(
        self,
        method: str,
        path: str,
        *,
        label: str,
        payload: dict[str, Any] | None,
        check: Any,
    ) -> tuple[Any, float]:
        """Send a request until it succeeds, fails for good, or runs out of retries.

        Returns the decoded JSON body and the seconds taken by the successful attempt.
        """
        url = f"{self._base_url}{path}"
        attempts = self._max_retries + 1
        failure = _Failure("no attempt made", None)

        for attempt in range(attempts):
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "Sending %s %s%s for %s, attempt %d of %d, headers %s",
                    method, self._display_url, path, label, attempt + 1, attempts,
                    masked_headers(self._headers),
                )
            started = time.perf_counter()
            try:
                response = await self._send(method, url, payload)
            except httpx.TimeoutException as exc:
                failure = _Failure(
                    f"timed out after {self._timeout_s:g} s ({type(exc).__name__})", None
                )
            except httpx.TransportError as exc:
                if _is_unknown_host(exc):
                    # A name that does not resolve will not resolve on a retry either.
                    raise ProviderError(
                        f"Cannot reach {self._display_url}: the host name does not resolve "
                        f"({self._clean(str(exc))}). Check the network connection, proxy "
                        "settings and the endpoint's base_url.",
                        status=None,
                        retryable=False,
                    ) from None
                failure = _Failure(f"network error ({type(exc).__name__}: {self._clean(str(exc))})", None)
            else:
                latency_s = time.perf_counter() - started
                outcome = self._check_response(response, label=label, path=path, check=check)
                if not isinstance(outcome, _Failure):
                    return outcome, latency_s
                failure = outcome

            if attempt == attempts - 1:
                break

            wait_s = self._wait_before_retry(attempt, failure)
            logger.warning(
                "Retrying request for %s: %s (status %s), attempt %d of %d failed, "
                "waiting %.2f s",
                label,
                failure.reason,
                failure.status,
                attempt + 1,
                attempts,
                wait_s,
            )
            await asyncio.sleep(wait_s)

        status_text = "" if failure.status is None else f" (HTTP status {failure.status})"
        if failure.status is None:
            advice = "Check the network connection and that the endpoint is up, then try again."
        else:
            advice = "The endpoint may be overloaded or down: try again later, raise max_retries, or lower the concurrency."
        raise ProviderError(
            f"Request for {label} to {self._display_url}{path} failed after "
            f"{attempts} attempts{status_text}: {failure.reason}. {advice}",
            status=failure.status,
            retryable=True,
        )

    def _wait_before_retry(self, attempt: int, failure: _Failure) -> float:
        if failure.retry_after_s is None:
            return backoff_delay(attempt, self._backoff_base_s, self._backoff_max_s)

        # Jitter on top of Retry-After spreads out workers that received the same header.
        honoured = min(failure.retry_after_s, self._backoff_max_s)
        return honoured + random.uniform(0.0, min(self._backoff_base_s, self._backoff_max_s))

    def _check_response(
        self, response: httpx.Response, *, label: str, path: str, check: Any
    ) -> Any:
        """Return the decoded body, a retryable _Failure, or raise a final error."""
        status = response.status_code

        if status in RETRYABLE_STATUSES:
            retry_after = None
            if status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            text = self._provider_text(response)
            return _Failure(f"HTTP {status}: {text[:ERROR_TEXT_MAX_CHARS]}", status, retry_after)

        if not 200 <= status < 300:
            raise self._final_error(status, self._provider_text(response), label=label, path=path)

        try:
            body = response.json()
        except ValueError:
            return _Failure(f"HTTP {status} with a body that is not valid JSON", status)

        if isinstance(body, dict) and body.get("error"):
            code = body["error"].get("code") if isinstance(body["error"], dict) else None
            text = self._error_body_text(body)
            if code in (400, 401, 402, 403, 404):
                raise self._final_error(code, text, label=label, path=path)
            return _Failure(
                f"HTTP {status} with an error in the body (code {code}): "
                f"{text[:ERROR_TEXT_MAX_CHARS]}",
                status,
            )

        problem = check(body)
        if problem is not None:
            return _Failure(f"HTTP {status} {problem}", status)
        return body

    def _final_error(self, status: int, text: str, *, label: str, path: str) -> ProviderError:
        """Build the non-retryable error for an HTTP status."""
        quoted = text[:ERROR_TEXT_MAX_CHARS].rstrip(". ")
        where = f"Request for {label} to {self._display_url}{path} failed with HTTP {status}"

        if status == 401:
            if self._is_openrouter:
                fix = (
                    f"The API key is missing or invalid: set {OPENROUTER_KEY_ENV} (OpenRouter) "
                    "in the environment or in .env."
                )
            else:
                fix = (
                    f"The API key is missing or invalid: set {self._api_key_env} for this "
                    f"endpoint; {OPENROUTER_KEY_ENV} is only sent to openrouter.ai."
                )
            return AuthenticationError(f"{where}: {quoted}. {fix}", status=status)

        if status == 402:
            return InsufficientCreditsError(
                f"{where}: {quoted}. The account has too few credits: add credits at "
                "https://openrouter.ai/settings/credits (or your provider's billing page), "
                "or lower the batch budget, the number of runs or max_tokens.",
                status=status,
            )

        if status == 403:
            return PermissionDeniedError(
                f"{where}: {quoted}. This key may not use the model (moderation, region or "
                "an allow-list): pick another model or check the key's settings.",
                status=status,
            )

        if status == 404:
            if path == "/models":
                fix = "Check the base URL: it usually ends in /v1 (OpenRouter: /api/v1)."
            else:
                fix = (
                    f"Check the model id {label.removeprefix('model ')!r}: run `hermitkit models --search` to list "
                    "the ids this endpoint serves, and check that the base URL ends in /v1."
                )
            return BadRequestError(f"{where}: {quoted}. {fix}", status=status)

        if status == 413 or (status == 400 and _CONTEXT_LENGTH_PATTERN.search(text)):
            return ContextLengthError(
                f"{where}: {quoted}. The conversation no longer fits the model's context "
                "window: use a history window or a model with a longer context.",
                status=status,
            )

        if 400 <= status < 500:
            return BadRequestError(
                f"{where}: {quoted}. The endpoint rejected the request: check the model's "
                "supported parameters (`hermitkit models --search`).",
                status=status,
            )
        return ProviderError(f"{where}: {quoted}.", status=status, retryable=False)

    def _provider_text(self, response: httpx.Response) -> str:
        """Return the provider's error message, or the raw body when it is not JSON."""
        try:
            body = response.json()
        except ValueError:
            return self._clean(response.text) or "(empty body)"
        if isinstance(body, dict):
            return self._error_body_text(body)
        return self._clean(json.dumps(body))

    def _error_body_text(self, body: dict[str, Any]) -> str:
        error = body.get("error")
        if isinstance(error, str):
            return self._clean(error)
        if not isinstance(error, dict):
            message = body.get("message") or body.get("detail") or json.dumps(body)
            return self._clean(str(message))

        # OpenRouter wraps upstream errors as "Provider returned error" and puts the
        # upstream text, where context-length errors are spelled out, in metadata.raw.
        parts = [str(error.get("message") or "")]
        metadata = error.get("metadata")
        if isinstance(metadata, dict) and metadata.get("raw"):
            raw = metadata["raw"]
            parts.append(raw if isinstance(raw, str) else json.dumps(raw))
        return self._clean(" ".join(part for part in parts if part)) or "(no message)"

    def _clean(self, text: str) -> str:
        """Collapse whitespace and remove the API key, should a provider echo it back."""
        text = " ".join(text.split())
        if self.__api_key:
            text = text.replace(self.__api_key, "[redacted]")
        return text
