"""HTTP request handling of the demo server: routing, chat replies and fault injection."""

from __future__ import annotations

import email.utils
import json
import logging
import math
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from hermitkit.demo.catalogue import (
    COMPLETION_PRICE,
    DEMO_MODELS,
    JUDGE_MODEL,
    PROMPT_PRICE,
    _model_entry,
)
from hermitkit.demo.faults import (
    DEFAULT_LATENCY_FAULT_S,
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_SLOW_FAULT_S,
    HTTP_FAULT_KINDS,
    FaultRule,
)
from hermitkit.demo.judging import (
    PERSONA_MARKER,
    SYNTHESIS_MARKER,
    judge_verdict,
    persona_reply,
    shape_judge_reply,
    synthesis_reply,
)
from hermitkit.demo.scripted import _SCRIPTED
from hermitkit.errors import ConfigError

if TYPE_CHECKING:
    from hermitkit.demo.server import _DemoHTTPServer

logger = logging.getLogger("hermitkit.demo")


def count_tokens(text: str) -> int:
    """Estimate tokens as characters / 4, rounded up."""
    return math.ceil(len(text) / 4)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _DemoState:
    """Counters, fault rules and the fault queue, shared by all handler threads."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self.lock = threading.Lock()
        self.rules = [[rule, 0] for rule in rules]
        self.queue: list[FaultRule] = []
        self.chat_requests: Counter[str] = Counter()
        self.faults_applied: Counter[str] = Counter()
        self.model_list_requests = 0
        self.generations = 0
        self.authorization: list[str] = []

    def next_fault(self, model: str | None) -> FaultRule | None:
        """Pop the first queued fault for ``model``, else the first rule that fires.

        Every matching rule advances its own counter, so ``every=N`` stays exact even
        when another fault wins.
        """
        with self.lock:
            chosen: FaultRule | None = None
            for index, queued in enumerate(self.queue):
                if queued.matches(model):
                    chosen = self.queue.pop(index)
                    break

            for entry in self.rules:
                rule = entry[0]
                if not rule.matches(model):
                    continue
                entry[1] += 1
                if chosen is None and rule.fires(entry[1]):
                    chosen = rule
            return chosen

    def record_fault(self, kind: str) -> None:
        with self.lock:
            self.faults_applied[kind] += 1

    def next_generation_id(self) -> str:
        with self.lock:
            self.generations += 1
            return f"gen-demo-{self.generations}"

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "chat_requests": dict(self.chat_requests),
                "chat_requests_total": sum(self.chat_requests.values()),
                "faults_applied": dict(self.faults_applied),
                "model_list_requests": self.model_list_requests,
                "queued_faults": len(self.queue),
            }


class _Handler(BaseHTTPRequestHandler):
    """HTTP handler. Every body it sends is built with json.dumps."""

    protocol_version = "HTTP/1.1"
    server_version = "hermitkit-demo"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 300
    # A buffered wfile lets _send_bytes send the status line, headers and body with one
    # send() call. Unbuffered, the headers and the body left as two TCP segments.
    wbufsize = 64 * 1024
    # With Nagle's algorithm on, a small write that follows another waits for the client's
    # delayed ACK: 44 ms per request on Linux, measured when headers and body were separate writes.
    disable_nagle_algorithm = True
    server: _DemoHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet by default: notebooks and tests would fill with access lines.
        logger.debug("demo server: " + format, *args)

    # -- routing

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._handle_models()
        elif path == "/demo/stats":
            self._send_json(200, self.server.demo.stats())
        elif path == "/demo/faults":
            with self.server.state.lock:
                pending = [{"kind": rule.kind, "model": rule.model} for rule in self.server.state.queue]
            self._send_json(200, {"pending": pending})
        else:
            self._send_json(404, _error_body(404, f"No route for GET {path}."))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_json()
        if body is None:
            return
        if path == "/v1/chat/completions":
            self._handle_chat(body)
        elif path == "/demo/faults":
            self._handle_queue_faults(body)
        else:
            self._send_json(404, _error_body(404, f"No route for POST {path}."))

    def do_DELETE(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/demo/faults":
            cleared = self.server.demo.clear_faults()
            self._send_json(200, {"cleared": cleared})
        else:
            self._send_json(404, _error_body(404, f"No route for DELETE {path}."))

    # -- endpoints

    def _handle_models(self) -> None:
        state = self.server.state
        with state.lock:
            state.model_list_requests += 1
        if not self._authorized():
            return

        fault = self._forced_fault(None)
        if fault is None:
            fault = state.next_fault(None)
        if fault is not None and self._apply_http_fault(fault, None):
            return

        context_length = self.server.demo.context_length
        data = [_model_entry(model, context_length) for model in DEMO_MODELS]
        self._send_json(200, {"data": data})

    def _handle_queue_faults(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("kinds"), list):
            self._send_json(400, _error_body(400, 'Expected {"model": str | null, "kinds": [kind, ...]}.'))
            return
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            self._send_json(400, _error_body(400, "Field 'model' must be a model id or null."))
            return

        rules: list[FaultRule] = []
        try:
            for item in body["kinds"]:
                if isinstance(item, str):
                    rules.append(FaultRule(kind=item, model=model))
                elif isinstance(item, dict):
                    rules.append(
                        FaultRule(
                            kind=str(item.get("kind")),
                            model=model,
                            retry_after=item.get("retry_after"),
                            delay_s=item.get("delay_s"),
                        )
                    )
                else:
                    raise ConfigError(f"Invalid fault entry {item!r}: use a kind name or an object.")
        except (ConfigError, TypeError) as exc:
            self._send_json(400, _error_body(400, str(exc)))
            return

        pending = self.server.demo.queue_faults(rules)
        self._send_json(200, {"queued": len(rules), "pending": pending})

    def _handle_chat(self, body: Any) -> None:
        state = self.server.state
        demo = self.server.demo
        model = body.get("model") if isinstance(body, dict) else None
        with state.lock:
            state.chat_requests[str(model)] += 1

        if not self._authorized():
            return
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            self._send_json(400, _error_body(400, "The request needs a 'model' string and a non-empty 'messages' list."))
            return
        if model not in DEMO_MODELS:
            self._send_json(
                404,
                _error_body(404, f"Model {model!r} not found. Demo models: {', '.join(DEMO_MODELS)}."),
            )
            return

        fault = self._forced_fault(model)
        if fault is None:
            fault = state.next_fault(model)

        delay = demo.latency_s + demo.model_latency_s.get(model, 0.0)
        if delay > 0:
            self._sleep(delay)
        if fault is not None and self._apply_http_fault(fault, model):
            return

        prompt_tokens = sum(count_tokens(_message_text(message)) for message in messages)
        if prompt_tokens > demo.context_length or (fault is not None and fault.kind == "context_length"):
            if fault is not None and fault.kind == "context_length":
                state.record_fault(fault.kind)
            self._send_json(
                400,
                _error_body(
                    400,
                    f"This endpoint's maximum context length is {demo.context_length} tokens. "
                    f"However, you requested about {prompt_tokens} tokens. Please reduce the "
                    "length of the messages.",
                ),
            )
            return

        self._send_completion(body, model, messages, prompt_tokens, fault)

    def _send_completion(
        self,
        body: dict[str, Any],
        model: str,
        messages: list[Any],
        prompt_tokens: int,
        fault: FaultRule | None,
    ) -> None:
        turn = sum(1 for message in messages if isinstance(message, dict) and message.get("role") == "assistant")
        seed = body.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        user_texts = [_message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last_user = user_texts[-1] if user_texts else ""

        kind = fault.kind if fault is not None else None
        if model == JUDGE_MODEL:
            text = "\n".join(_message_text(message) for message in messages)
            if SYNTHESIS_MARKER in text:
                content, finish_reason = json.dumps(synthesis_reply(text)), "stop"
            elif PERSONA_MARKER in text:
                content, finish_reason = json.dumps(persona_reply(text)), "stop"
            else:
                content, finish_reason = shape_judge_reply(judge_verdict(text), kind)
            reasoning = None
        else:
            scripted = _SCRIPTED[model](turn, seed, last_user)
            content, reasoning, finish_reason = scripted.content, scripted.reasoning, "stop"

        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0 and count_tokens(content) > max_tokens:
            content = content[: max_tokens * 4]
            finish_reason = "length"

        message: dict[str, Any] = {"role": "assistant", "content": content}
        if kind == "null_content":
            message["content"] = None
        elif kind == "empty_content":
            message["content"] = ""
        elif kind == "absent_content":
            del message["content"]
            reasoning = content
        elif kind == "unstorable_content":
            # A NUL character and a lone surrogate inside the first braces, so that they reach the echo too.
            message["content"] = content.replace("{", "{\x00\ud800", 1) if "{" in content else content + "\x00\ud800"
        if reasoning is not None:
            message["reasoning"] = reasoning
        if kind is not None and kind not in ("latency", "slow"):
            # latency and slow were counted when their delay was applied.
            self.server.state.record_fault(kind)

        reasoning_tokens = count_tokens(reasoning or "")
        completion_tokens = count_tokens(message.get("content") or "") + reasoning_tokens
        cost = prompt_tokens * float(PROMPT_PRICE) + completion_tokens * float(COMPLETION_PRICE)
        reply = {
            "id": self.server.state.next_generation_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "provider": "hermitkit-demo",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "cost": round(cost, 12),
            },
        }

        if kind == "malformed_json":
            encoded = json.dumps(reply).encode("utf-8")
            self._send_bytes(200, encoded[: len(encoded) // 2])
            return
        self._send_json(200, reply)

    # -- faults

    def _forced_fault(self, model: str | None) -> FaultRule | None:
        kind = self.headers.get("X-Demo-Fault")
        if not kind:
            return None
        try:
            rule = FaultRule(kind=kind.strip())
        except ConfigError:
            return None
        return rule if rule.matches(model) else None

    def _apply_http_fault(self, fault: FaultRule, model: str | None) -> bool:
        """Apply an HTTP-level fault. Returns False when the fault shapes the reply instead."""
        kind = fault.kind
        if kind not in HTTP_FAULT_KINDS or (kind == "malformed_json" and model is not None):
            return False
        state = self.server.state
        state.record_fault(kind)
        label = model or "the model list"

        if kind in ("latency", "slow"):
            default = DEFAULT_LATENCY_FAULT_S if kind == "latency" else DEFAULT_SLOW_FAULT_S
            self._sleep(fault.delay_s if fault.delay_s is not None else default)
            return False

        if kind == "reset":
            # SO_LINGER 0 makes close() send RST: the client sees a reset with no response.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return True

        if kind in ("429", "429-date"):
            seconds = fault.retry_after if fault.retry_after is not None else DEFAULT_RETRY_AFTER_S
            if kind == "429":
                retry_after = f"{seconds:g}"
            else:
                retry_after = email.utils.formatdate(time.time() + seconds, usegmt=True)
            self._send_json(
                429,
                _error_body(429, f"Rate limit exceeded for {label} (demo fault {kind})."),
                headers={"Retry-After": retry_after},
            )
            return True

        if kind == "malformed_json":
            self._send_bytes(200, b'{"data": [{"id": "demo/ste')
            return True

        messages = {
            "500": "Internal server error",
            "502": "Bad gateway: the upstream provider did not answer",
            "503": "Service unavailable: no provider is available",
            "400": "Invalid request",
            "401": "No auth credentials found",
            "402": "Insufficient credits: this request needs more credits than the account has",
            "403": "This model is not available to this key (moderation or region)",
            "error200": "Upstream provider returned an error",
        }
        text = f"{messages[kind]} (demo fault {kind} for {label})."
        if kind == "error200":
            self._send_json(200, _error_body(502, text))
        else:
            self._send_json(int(kind), _error_body(int(kind), text))
        return True

    # -- plumbing

    def _authorized(self) -> bool:
        value = self.headers.get("Authorization")
        state = self.server.state
        if value is not None:
            with state.lock:
                state.authorization.append(value)

        required = self.server.demo.require_key
        if required is None or value == f"Bearer {required}":
            return True
        self._send_json(401, _error_body(401, "Missing or invalid API key for the demo server."))
        return False

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(raw.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._send_json(400, _error_body(400, "The request body is not valid JSON."))
            return None

    def _sleep(self, seconds: float) -> None:
        # Wakes early when the server stops, so a handler in a fault delay ends promptly.
        self.server.stopping.wait(seconds)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if status >= 400 or (isinstance(payload, dict) and "error" in payload):
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            logger.info("Demo server replied %d to %s %s: %s", status, self.command, self.path, error.get("message"))
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), headers)

    def _send_bytes(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (for example after its own timeout).
            self.close_connection = True
