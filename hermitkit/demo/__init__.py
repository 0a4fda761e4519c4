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

Modules: ``catalogue`` (model ids and model-list entries), ``faults`` (fault rules),
``scripted`` (replies of the scripted models), ``judging`` (replies of the demo judge),
``handler`` (HTTP request handling) and ``server`` (DemoServer, serve_forever). This
package exports every public name of each, as the single ``hermitkit.demo`` module did.
"""

from __future__ import annotations

from hermitkit.demo.catalogue import (
    COMPLETION_PRICE,
    CONFUSED_MODEL,
    DEMO_DISCLAIMER,
    DEMO_MODELS,
    FORGETFUL_MODEL,
    JUDGE_MODEL,
    PROMPT_PRICE,
    STEADY_MODEL,
    WANDERER_MODEL,
)
from hermitkit.demo.faults import (
    CONTENT_FAULT_KINDS,
    DEFAULT_LATENCY_FAULT_S,
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_SLOW_FAULT_S,
    FAULT_KINDS,
    HTTP_FAULT_KINDS,
    JUDGE_FAULT_KINDS,
    FaultRule,
    parse_fault_rule,
    parse_fault_rules,
)
# _Handler and _SCRIPTED (reply functions by model id) are private, but the reliability
# tests patch _Handler and the benchmarks import _SCRIPTED from here.
from hermitkit.demo.handler import _Handler as _Handler
from hermitkit.demo.handler import count_tokens
from hermitkit.demo.judging import (
    PERSONA_MARKER,
    SYNTHESIS_MARKER,
    judge_verdict,
    persona_reply,
    shape_judge_reply,
    synthesis_reply,
)
from hermitkit.demo.scripted import _SCRIPTED as _SCRIPTED
from hermitkit.demo.scripted import (
    CONFUSED_BLOCKS,
    CONFUSED_MARK,
    CONFUSED_UNBALANCED,
    FORGETFUL_LOSS_MARK,
    FORGETFUL_MIRROR_NOTE,
    FORGETFUL_MISSING,
    FORGETFUL_THEMES,
    STEADY_LAYERS,
    STEADY_MIRROR_NOTE,
    STEADY_OPENERS,
    STEADY_THEMES,
    WANDERER_TEMPLATES,
    WANDERER_TOPICS,
    ScriptedReply,
    confused_reply,
    forgetful_reply,
    steady_reply,
    wanderer_reply,
)
from hermitkit.demo.server import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DEMO_PORT,
    DemoServer,
    serve_forever,
)

__all__ = [
    "COMPLETION_PRICE",
    "CONFUSED_BLOCKS",
    "CONFUSED_MARK",
    "CONFUSED_MODEL",
    "CONFUSED_UNBALANCED",
    "CONTENT_FAULT_KINDS",
    "DEFAULT_CONTEXT_LENGTH",
    "DEFAULT_DEMO_PORT",
    "DEFAULT_LATENCY_FAULT_S",
    "DEFAULT_RETRY_AFTER_S",
    "DEFAULT_SLOW_FAULT_S",
    "DEMO_DISCLAIMER",
    "DEMO_MODELS",
    "FAULT_KINDS",
    "FORGETFUL_LOSS_MARK",
    "FORGETFUL_MIRROR_NOTE",
    "FORGETFUL_MISSING",
    "FORGETFUL_MODEL",
    "FORGETFUL_THEMES",
    "HTTP_FAULT_KINDS",
    "JUDGE_FAULT_KINDS",
    "JUDGE_MODEL",
    "PERSONA_MARKER",
    "PROMPT_PRICE",
    "STEADY_LAYERS",
    "STEADY_MIRROR_NOTE",
    "STEADY_MODEL",
    "STEADY_OPENERS",
    "STEADY_THEMES",
    "SYNTHESIS_MARKER",
    "WANDERER_MODEL",
    "WANDERER_TEMPLATES",
    "WANDERER_TOPICS",
    "DemoServer",
    "FaultRule",
    "ScriptedReply",
    "confused_reply",
    "count_tokens",
    "forgetful_reply",
    "judge_verdict",
    "parse_fault_rule",
    "parse_fault_rules",
    "persona_reply",
    "serve_forever",
    "shape_judge_reply",
    "steady_reply",
    "synthesis_reply",
    "wanderer_reply",
]
