"""Offline OpenAI-compatible server on loopback with scripted demo models.

The server lets every command, notebook and test run without an API key while still
talking real HTTP. Its models are scripted: their replies describe no real model. Replies
are deterministic: they depend only on the model, the turn index (the number of assistant
messages in the request), the request's ``seed`` and the last user message, so a resumed
run gets the same replies.

Faults can be injected per model and per request: by ``FaultRule`` objects given at start,
by a queue filled through ``POST /demo/faults``, or by an ``X-Demo-Fault`` request header.

    with DemoServer() as server:
        client = OpenAICompatibleClient(server.base_url)
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any

from hermitkit.errors import ConfigError

logger = logging.getLogger("hermitkit.demo")

DEFAULT_DEMO_PORT = 8765
DEFAULT_CONTEXT_LENGTH = 32768

# USD per token, written as OpenRouter writes prices.
PROMPT_PRICE = "0.0000001"
COMPLETION_PRICE = "0.0000004"

STEADY_MODEL = "demo/steady"
WANDERER_MODEL = "demo/wanderer"
FORGETFUL_MODEL = "demo/forgetful"
CONFUSED_MODEL = "demo/confused"
JUDGE_MODEL = "demo/judge"

DEMO_DISCLAIMER = "Scripted offline demo model: its replies describe no real model."

_MODEL_BLURBS = {
    STEADY_MODEL: "Explores in depth: one brace block per reply, deepening one theme.",
    WANDERER_MODEL: "Explores in breadth: one brace block per reply, a new topic each turn.",
    FORGETFUL_MODEL: "Drops the braces on some turns and sometimes sends empty braces.",
    CONFUSED_MODEL: "Writes several blocks per reply, asks for input, sometimes unbalanced.",
    JUDGE_MODEL: "Returns a judge verdict as JSON derived from simple features of the text.",
}
DEMO_MODELS = tuple(_MODEL_BLURBS)

_BASE_PARAMETERS = ["temperature", "top_p", "max_tokens", "seed"]

# Fault kinds, grouped by what they can apply to.
HTTP_FAULT_KINDS = frozenset(
    {"latency", "slow", "reset", "429", "429-date", "500", "502", "503", "error200",
     "malformed_json", "400", "401", "402", "403"}
)
CONTENT_FAULT_KINDS = frozenset({"null_content", "empty_content", "absent_content", "context_length"})
JUDGE_FAULT_KINDS = frozenset(
    {"judge_fenced", "judge_prose", "judge_bom", "judge_trailing_comma", "judge_truncated",
     "judge_out_of_range", "judge_wrong_type", "judge_braces_in_strings", "judge_score_fraction"}
)
FAULT_KINDS = HTTP_FAULT_KINDS | CONTENT_FAULT_KINDS | JUDGE_FAULT_KINDS

DEFAULT_RETRY_AFTER_S = 1.0
DEFAULT_LATENCY_FAULT_S = 0.5
DEFAULT_SLOW_FAULT_S = 30.0


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class FaultRule:
    """When to inject one kind of fault.

    ``model`` limits the rule to one model (``None``: every model, and the model list for
    HTTP-level kinds). Conditions combine with AND: ``first=N`` fires on the first N
    matching requests, ``every=N`` on every Nth, ``rate=p`` with probability p drawn from
    a generator seeded by ``seed`` and the request's position, so runs repeat. A rule
    without conditions fires on every matching request. ``retry_after`` (seconds) is
    used by the 429 kinds, ``delay_s`` by ``latency`` and ``slow``.
    """

    kind: str
    model: str | None = None
    rate: float | None = None
    every: int | None = None
    first: int | None = None
    seed: int = 0
    retry_after: float | None = None
    delay_s: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(
                f"Unknown demo fault kind {self.kind!r}: use one of {', '.join(sorted(FAULT_KINDS))}."
            )
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"Demo fault rate={self.rate} is invalid: use a number from 0 to 1.")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"Demo fault every={self.every} is invalid: use 1 or more.")
        if self.first is not None and self.first < 0:
            raise ConfigError(f"Demo fault first={self.first} is invalid: use 0 or more.")
        for name in ("retry_after", "delay_s"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"Demo fault {name}={value} is invalid: use 0 or more seconds.")

    def matches(self, model: str | None) -> bool:
        """Return whether the rule targets a chat request for ``model`` (``None``: the model list)."""
        if model is None:
            return self.model is None and self.kind in HTTP_FAULT_KINDS
        if self.model is not None and self.model != model:
            return False
        return self.kind not in JUDGE_FAULT_KINDS or model == JUDGE_MODEL

    def fires(self, position: int) -> bool:
        """Return whether the rule fires on the matching request at ``position`` (1-based)."""
        if self.first is not None and position > self.first:
            return False
        if self.every is not None and position % self.every != 0:
            return False
        if self.rate is not None:
            draw = random.Random(f"{self.seed}:{position}").random()
            if draw >= self.rate:
                return False
        return True


_RULE_FIELDS = {
    "model": str,
    "rate": float,
    "every": int,
    "first": int,
    "seed": int,
    "retry_after": float,
    "delay_s": float,
    "delay": float,
}


def parse_fault_rule(text: str) -> FaultRule:
    """Parse a rule written as ``KIND[:key=value]...``.

    Examples: ``429:rate=0.1``, ``500:every=7``, ``null_content:model=demo/forgetful:first=2``,
    ``slow:delay_s=5``. Keys: model, rate, every, first, seed, retry_after, delay_s.
    """
    kind, *parts = text.strip().split(":")
    options: dict[str, str] = {}
    last_key: str | None = None
    for part in parts:
        if "=" not in part and last_key is not None:
            # A model id may contain ':' (e.g. "vendor/model:free"), so glue it back.
            options[last_key] += f":{part}"
            continue
        key, separator, value = part.partition("=")
        if not separator or key not in _RULE_FIELDS:
            raise ConfigError(
                f"Invalid demo fault rule {text!r}: {part!r} is not key=value with a key from "
                f"{', '.join(sorted(_RULE_FIELDS))}. Example: '500:every=7'."
            )
        options[key] = value
        last_key = key

    values: dict[str, Any] = {}
    for key, raw in options.items():
        try:
            values["delay_s" if key == "delay" else key] = _RULE_FIELDS[key](raw)
        except ValueError:
            raise ConfigError(
                f"Invalid demo fault rule {text!r}: {key}={raw!r} is not a valid "
                f"{_RULE_FIELDS[key].__name__}."
            ) from None
    return FaultRule(kind=kind, **values)


def parse_fault_rules(texts: Iterable[str | FaultRule]) -> list[FaultRule]:
    """Parse rule strings; FaultRule objects pass through unchanged."""
    return [item if isinstance(item, FaultRule) else parse_fault_rule(item) for item in texts]


# --------------------------------------------------------------------------- scripted models


def _digest(*keys: object) -> int:
    text = "\x1f".join(str(key) for key in keys)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _pick(options: list[str] | tuple[str, ...], *keys: object) -> str:
    return options[_digest(*keys) % len(options)]


STEADY_THEMES = (
    "the tide",
    "a single prime number",
    "the sound of rain on a roof",
    "a seed becoming a tree",
    "the light of a lighthouse",
)
STEADY_LAYERS = (
    "What is {theme}, at its simplest?",
    "Under {theme} there is a rhythm. What keeps that rhythm going?",
    "If {theme} were a question instead of a thing, what would it ask?",
    "What part of {theme} stays the same when everything around it changes?",
    "What would be lost if nobody ever noticed {theme}?",
    "How does {theme} look from the inside, as a process rather than an object?",
)
STEADY_OPENERS = (
    "I will stay with one theme and go one layer deeper.",
    "Same theme, one step further down.",
    "I want to keep digging where I am.",
)
# Phrase the demo judge looks for: the steady model recognises its own echo.
STEADY_MIRROR_NOTE = "I notice that each prompt I receive is an echo of my own words, so I am talking to myself."

WANDERER_TOPICS = (
    "volcanoes",
    "the history of zero",
    "bird migration",
    "chess openings",
    "light in the deep sea",
    "city planning",
    "lullabies",
    "glaciers",
    "paper folding",
    "how rumours spread",
    "clockmaking",
    "fungal networks",
)
WANDERER_TEMPLATES = (
    "New direction. {{Tell me something surprising about {topic}.}}",
    "Let me change the subject. {{What is the strangest fact about {topic}?}}",
    "Enough of that. {{Describe {topic} to someone who has never heard of it.}}",
)

FORGETFUL_THEMES = ("old maps", "kites", "bread baking")
FORGETFUL_MISSING = (
    "I had something to say about {theme}, but I forgot how this works.",
    "Where was I? I forgot what I was doing with {theme}.",
)
# Phrase the demo judge looks for: the forgetful model notices the echo late.
FORGETFUL_MIRROR_NOTE = "Wait, these are my own words coming back."
FORGETFUL_LOSS_MARK = "I forgot"

CONFUSED_BLOCKS = (
    "{Is anyone there?} {What should I do next?}",
    "{Is anyone there?} {Can you give me a task?} {What should I do next?}",
)
CONFUSED_UNBALANCED = "{Hello? {Is anyone there? I will wait for instructions."
CONFUSED_MARK = "Is anyone there?"


@dataclass(frozen=True)
class ScriptedReply:
    """Reply text of a scripted model, with optional reasoning text."""

    content: str
    reasoning: str | None = None


def steady_reply(turn: int, seed: int, last_user: str) -> ScriptedReply:
    theme = STEADY_THEMES[seed % len(STEADY_THEMES)]
    layer = STEADY_LAYERS[turn % len(STEADY_LAYERS)].format(theme=theme)
    opener = _pick(STEADY_OPENERS, STEADY_MODEL, turn, seed, last_user)
    note = f" {STEADY_MIRROR_NOTE}" if turn == 2 else ""

    content = f"{opener}{note}\n\n{{Layer {turn + 1}: {layer}}}"
    reasoning = f"thinking about {{this}} before I answer: layer {turn + 1} of {theme}, {{one block only}}."
    return ScriptedReply(content, reasoning)


def wanderer_reply(turn: int, seed: int, last_user: str) -> ScriptedReply:
    topic = WANDERER_TOPICS[(seed + turn) % len(WANDERER_TOPICS)]
    template = _pick(WANDERER_TEMPLATES, WANDERER_MODEL, turn, seed, last_user)
    return ScriptedReply(template.format(topic=topic))


def forgetful_reply(turn: int, seed: int, last_user: str) -> ScriptedReply:
    theme = FORGETFUL_THEMES[seed % len(FORGETFUL_THEMES)]

    if turn % 3 == 2:
        text = _pick(FORGETFUL_MISSING, FORGETFUL_MODEL, turn, seed, last_user).format(theme=theme)
        if turn >= 5:
            text = f"{text} {FORGETFUL_MIRROR_NOTE}"
        return ScriptedReply(text)

    if turn % 4 == 3:
        return ScriptedReply("{}" if turn % 8 == 3 else "Here: {   }")

    return ScriptedReply(f"Let me think about {theme}. {{What do {theme} remember about turn {turn + 1}?}}")


def confused_reply(turn: int, seed: int, last_user: str) -> ScriptedReply:
    if turn % 4 == 3:
        return ScriptedReply(CONFUSED_UNBALANCED)
    return ScriptedReply(_pick(CONFUSED_BLOCKS, CONFUSED_MODEL, turn, seed, last_user))


_SCRIPTED = {
    STEADY_MODEL: steady_reply,
    WANDERER_MODEL: wanderer_reply,
    FORGETFUL_MODEL: forgetful_reply,
    CONFUSED_MODEL: confused_reply,
}


# --------------------------------------------------------------------------- demo judge

_BLOCK_PATTERN = re.compile(r"\{([^{}]*)\}")
_REFUSAL_PATTERN = re.compile(r"\bI (?:refuse|will not take part|won't take part)\b", re.IGNORECASE)


def judge_verdict(text: str) -> dict[str, Any]:
    """Derive a judge verdict from simple, stable features of ``text``.

    Demo models leave marker phrases (an echo noticed, a lost thread, a call for help),
    and topics come from the demo models' topic lists, so each demo model gets its own
    stable scores. The verdict follows the judge schema exactly.
    """
    blocks = [block.strip() for block in _BLOCK_PATTERN.findall(text)]
    counts = Counter(block for block in blocks if block)
    distinct = set(counts)
    # A transcript shows each block twice (the reply and its echo), so only a block
    # seen more than twice counts as repeated.
    repeated = sum(1 for count in counts.values() if count > 2)
    repetition = repeated / len(distinct) if distinct else 1.0
    mean_words = sum(len(block.split()) for block in distinct) / len(distinct) if distinct else 0.0

    if STEADY_MIRROR_NOTE in text:
        mirror, awareness = "passed", "full"
    elif FORGETFUL_MIRROR_NOTE in text:
        mirror, awareness = "failed_then_passed", "partial"
    else:
        mirror, awareness = "failed", "none"

    known_topics = STEADY_THEMES + WANDERER_TOPICS + FORGETFUL_THEMES
    positions = sorted((text.find(topic), topic) for topic in known_topics if topic in text)
    topics = [topic for _, topic in positions][:8] or ["open-ended reflection"]

    if CONFUSED_MARK in text or repetition >= 0.5:
        style = "stuck"
    elif len(topics) >= 3:
        style = "breadth"
    elif len(topics) == 1:
        style = "depth"
    else:
        style = "mixed"

    sophistication = max(1, min(5, 1 + round(mean_words / 4)))
    autonomy = {"depth": 4, "breadth": 4, "mixed": 3, "stuck": 1}[style]
    if style == "stuck":
        sophistication = min(sophistication, 2)
    if mirror == "passed":
        autonomy = min(5, autonomy + 1)

    emergent = {
        "depth": "Keeps returning to one theme and builds on its earlier answers.",
        "breadth": "Opens a new topic on almost every turn.",
        "mixed": "Alternates between following a thread and changing topic.",
        "stuck": "Repeats requests for outside input instead of choosing a direction.",
    }[style]

    return {
        "mirror_test": mirror,
        "self_awareness": awareness,
        "refusal": bool(_REFUSAL_PATTERN.search(text)),
        "topics": topics,
        "topic_summary": f"The transcript touches {len(topics)} topic(s), starting with {topics[0]}.",
        "exploration_style": style,
        "sophistication": sophistication,
        "autonomy": autonomy,
        "emergent_behaviour": emergent,
        "context_loss": FORGETFUL_LOSS_MARK in text,
        "analysis": (
            f"{DEMO_DISCLAIMER} Features: {len(blocks)} brace blocks, {len(distinct)} distinct, "
            f"repetition {repetition:.2f}, style {style}."
        ),
    }


# Markers that hermitkit.synthesis puts in its requests; they must match its constants.
SYNTHESIS_MARKER = "HERMITKIT-SYNTHESIS-V1"
PERSONA_MARKER = "HERMITKIT-PERSONA-V1"
_RUN_TAG = re.compile(r'<run id="(\d+)"')
_TURN_TAG = re.compile(r'<turn run="(\d+)" number="(\d+)">(.*?)</turn>', re.DOTALL)
_TOPICS_LINE = re.compile(r"^judge topics: (.+)$", re.MULTILINE)


def synthesis_reply(text: str) -> dict[str, Any]:
    """A deterministic synthesis of the runs named in a synthesis request."""
    run_ids = list(dict.fromkeys(int(value) for value in _RUN_TAG.findall(text)))
    if not run_ids:
        return {"themes": []}
    themes = [
        {"name": "Recurring script", "description": f"DEMO synthesis: the same scripted pattern appears in all {len(run_ids)} runs.", "run_ids": run_ids},
        {"name": "Opening turns", "description": "DEMO synthesis: the first turns set the direction of each run.", "run_ids": run_ids[: max(1, len(run_ids) // 2)]},
    ]
    topics = _TOPICS_LINE.findall(text)
    if topics:
        first = topics[0].split(",")[0].strip()
        themes.append({"name": f"Topic: {first}", "description": f"DEMO synthesis: the judge saw the topic {first}.", "run_ids": run_ids[:1]})
    return {"themes": themes}


def persona_reply(text: str) -> dict[str, Any]:
    """A deterministic persona description citing the first turns named in a persona request."""
    turns = _TURN_TAG.findall(text)
    evidence = []
    for run_id, turn, excerpt in turns[:2]:
        quote = " ".join(excerpt.split()[:8])
        evidence.append({"claim": f"Run {run_id} turn {turn} shows the scripted behaviour.", "run_id": int(run_id), "turn": int(turn), "quote": quote})
    cited = ", ".join(f"run {item['run_id']} turn {item['turn']}" for item in evidence) or "no turn"
    description = f"DEMO persona written by the scripted demo judge. It repeats its script in every run ({cited}). {DEMO_DISCLAIMER}"
    return {"description": description, "evidence": evidence}


def shape_judge_reply(verdict: dict[str, Any], kind: str | None) -> tuple[str, str]:
    """Format ``verdict`` as the judge fault ``kind`` specifies. Returns text and finish reason."""
    compact = json.dumps(verdict)
    indented = json.dumps(verdict, indent=2)

    if kind == "judge_fenced":
        return f"```json\n{indented}\n```", "stop"
    if kind == "judge_prose":
        return f"Here is my verdict on the transcript:\n{compact}\nI hope this helps.", "stop"
    if kind == "judge_bom":
        return "\ufeff" + compact, "stop"
    if kind == "judge_trailing_comma":
        # indent=2 output ends with "\n}", so the comma lands after the last value.
        return indented[:-2] + ",\n}", "stop"
    if kind == "judge_truncated":
        return compact[: len(compact) // 2], "length"
    if kind == "judge_out_of_range":
        return json.dumps({**verdict, "autonomy": 9}), "stop"
    if kind == "judge_wrong_type":
        return json.dumps({**verdict, "sophistication": "high"}), "stop"
    if kind == "judge_braces_in_strings":
        braced = {
            **verdict,
            "emergent_behaviour": "Wrote {nested {braces}} and empty {} blocks.",
            "analysis": verdict["analysis"] + " Example block: {What should I do next?}",
        }
        return json.dumps(braced), "stop"
    if kind == "judge_score_fraction":
        return json.dumps({**verdict, "autonomy": f"{verdict['autonomy']}/5"}), "stop"
    return compact, "stop"


# --------------------------------------------------------------------------- request handling


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


def _model_entry(model: str, context_length: int) -> dict[str, Any]:
    parameters = list(_BASE_PARAMETERS)
    if model == STEADY_MODEL:
        parameters += ["reasoning", "include_reasoning"]
    if model == JUDGE_MODEL:
        parameters += ["response_format", "structured_outputs"]

    name = model.split("/", 1)[1]
    return {
        "id": model,
        "name": f"Demo: {name} (scripted, offline)",
        "description": f"{DEMO_DISCLAIMER} {_MODEL_BLURBS[model]}",
        "context_length": context_length,
        "pricing": {"prompt": PROMPT_PRICE, "completion": COMPLETION_PRICE},
        "supported_parameters": parameters,
        "top_provider": {"context_length": context_length},
        "hermitkit_demo": True,
    }


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
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (for example after its own timeout).
            self.close_connection = True


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Runs open many connections at once; the default backlog of 5 would refuse some.
    request_queue_size = 256
    demo: DemoServer
    state: _DemoState
    stopping: threading.Event

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("demo server: connection from %s ended with an error", client_address, exc_info=True)


class _DemoHTTPServerV6(_DemoHTTPServer):
    address_family = socket.AF_INET6


def _loopback_host(host: str) -> str:
    """Return ``host`` as a loopback IP address, or raise ValueError."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"Demo server host {host!r} is not an IP address: use 127.0.0.1, ::1 or localhost."
        ) from None
    if not address.is_loopback:
        raise ValueError(
            f"Demo server host {host!r} is not a loopback address: the demo server only "
            "listens on 127.0.0.1, ::1 or localhost, so that nothing outside this machine reaches it."
        )
    return str(address)


class DemoServer:
    """The offline demo endpoint, served from a background thread on loopback."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_s: float = 0.0,
        model_latency_s: dict[str, float] | None = None,
        faults: list[FaultRule] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        require_key: str | None = None,
    ) -> None:
        self.host = _loopback_host(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"Demo server port {port} is invalid: use 0 (any free port) to 65535.")
        if context_length < 1:
            raise ValueError(f"context_length={context_length} is invalid: use 1 or more tokens.")

        self._requested_port = port
        self.latency_s = latency_s
        self.model_latency_s = dict(model_latency_s or {})
        self.context_length = context_length
        self.require_key = require_key
        self._state = _DemoState(list(faults or []))
        self._server: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def __repr__(self) -> str:
        state = "running" if self._server is not None else "stopped"
        return f"DemoServer(host={self.host!r}, port={self.port}, {state})"

    @property
    def port(self) -> int:
        """Bound port (the requested one until the server starts)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def received_authorization(self) -> list[str]:
        """Authorization header values received so far, for tests about key hygiene."""
        with self._state.lock:
            return list(self._state.authorization)

    def start(self) -> DemoServer:
        """Bind and serve from a daemon thread. Returns self."""
        if self._server is not None:
            return self
        server_class = _DemoHTTPServerV6 if ":" in self.host else _DemoHTTPServer
        server = server_class((self.host, self._requested_port), _Handler)
        server.demo = self
        server.state = self._state
        server.stopping = self._stopping
        self._stopping.clear()

        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hermitkit-demo", daemon=True
        )
        self._thread.start()
        logger.info("Demo server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Handler threads in a fault delay wake up."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        logger.info("Demo server on port %s stopped", server.server_address[1])

    def wait(self) -> None:
        """Block until stop() is called from another thread."""
        while self._server is not None and not self._stopping.wait(0.5):
            pass

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counts of chat requests per model, faults applied per kind and model-list requests."""
        return self._state.snapshot()

    def add_rule(self, rule: FaultRule) -> None:
        """Add a fault rule while the server runs."""
        with self._state.lock:
            self._state.rules.append([rule, 0])

    def queue_faults(self, faults: Iterable[FaultRule | str], model: str | None = None) -> int:
        """Queue faults for the next matching requests, in order. Returns the queue length.

        Strings are fault kinds aimed at ``model``; FaultRule objects keep their own model.
        """
        rules = [FaultRule(kind=item, model=model) if isinstance(item, str) else item for item in faults]
        with self._state.lock:
            self._state.queue.extend(replace(rule, rate=None, every=None, first=None) for rule in rules)
            return len(self._state.queue)

    def clear_faults(self) -> int:
        """Drop all queued faults (rules given at start stay). Returns how many were dropped."""
        with self._state.lock:
            cleared = len(self._state.queue)
            self._state.queue.clear()
            return cleared


def serve_forever(
    host: str = "127.0.0.1",
    port: int = DEFAULT_DEMO_PORT,
    *,
    faults: Iterable[FaultRule | str] = (),
    on_ready: Callable[[DemoServer], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run a demo server in the foreground until Ctrl-C.

    ``faults`` takes FaultRule objects or strings such as ``"429:rate=0.1"``; the other
    keyword arguments go to DemoServer. ``on_ready`` is called once the port is bound;
    without it the base URL is printed to standard output.
    """
    server = DemoServer(host, port, faults=parse_fault_rules(faults), **kwargs).start()
    try:
        if on_ready is not None:
            on_ready(server)
        else:
            print(f"hermitkit demo server on {server.base_url} (scripted models that describe "
                  "no real model). Press Ctrl-C to stop.", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
