"""The scripted demo models: their ids, descriptions, prices and model-list entries."""

from __future__ import annotations

from typing import Any

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
