"""Dry-run cost estimates from the model list's prices, before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass

from hermitkit.client import ModelInfo
from hermitkit.config import BatchConfig
from hermitkit.protocol import Protocol

# A rough size of English text in tokens; prices are per token, texts are characters.
CHARS_PER_TOKEN = 4
# The judge's instructions around the transcript, in tokens (an estimate).
JUDGE_PROMPT_TOKENS = 1500


@dataclass(frozen=True)
class CostLine:
    """The maximum cost of one model's runs, or of one judge's verdicts."""

    model: str
    role: str
    requests: int
    max_prompt_tokens: int
    max_completion_tokens: int
    max_cost_usd: float | None


def _tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def max_run_tokens(config: BatchConfig, protocol: Protocol, reply_tokens: int) -> tuple[int, int]:
    """Upper bounds on prompt and completion tokens of one run.

    Every reply is assumed to use all ``reply_tokens`` and to be echoed back whole,
    so each turn's prompt grows by two full-length messages (capped by a history window).
    """
    initial = _tokens(protocol.initial_prompt)
    prompt_total = 0
    for turn in range(config.turns):
        kept_messages = 2 * turn
        if protocol.history == "window" and protocol.window is not None:
            kept_messages = min(kept_messages, protocol.window)
        prompt_total += initial + kept_messages * reply_tokens
    return prompt_total, config.turns * reply_tokens


def estimate_batch(config: BatchConfig, protocol: Protocol, catalogue: dict[str, ModelInfo]) -> list[CostLine]:
    """Estimate the maximum cost of a batch, per model and per judge.

    ``max_cost_usd`` is ``None`` where the endpoint lists no price for a model.
    """
    reply_tokens = config.max_tokens or 4096
    lines: list[CostLine] = []

    prompt_per_run, completion_per_run = max_run_tokens(config, protocol, reply_tokens)
    for model in config.models:
        info = catalogue.get(model)
        prompt = prompt_per_run * config.runs
        completion = completion_per_run * config.runs
        lines.append(CostLine(model, "model", config.runs * config.turns, prompt, completion, _price(info, prompt, completion)))

    transcript_tokens = _tokens(protocol.initial_prompt) + 2 * config.turns * reply_tokens
    judged_runs = config.total_runs
    for judge in config.judges:
        info = catalogue.get(judge)
        # Up to two requests per verdict: the first and one repair.
        prompt = 2 * judged_runs * (JUDGE_PROMPT_TOKENS + transcript_tokens)
        completion = 2 * judged_runs * config.judge_max_tokens
        lines.append(CostLine(judge, "judge", 2 * judged_runs, prompt, completion, _price(info, prompt, completion)))
    return lines


def _price(info: ModelInfo | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    if info is None or info.prompt_price is None or info.completion_price is None:
        return None
    return prompt_tokens * info.prompt_price + completion_tokens * info.completion_price
