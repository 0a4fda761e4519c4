"""Fault injection rules of the demo server: fault kinds, FaultRule and its text form."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hermitkit.demo.catalogue import JUDGE_MODEL
from hermitkit.errors import ConfigError

# Fault kinds, grouped by what they can apply to.
HTTP_FAULT_KINDS = frozenset(
    {"latency", "slow", "reset", "429", "429-date", "500", "502", "503", "error200",
     "malformed_json", "400", "401", "402", "403"}
)
CONTENT_FAULT_KINDS = frozenset({"null_content", "empty_content", "absent_content", "unstorable_content", "context_length"})
JUDGE_FAULT_KINDS = frozenset(
    {"judge_fenced", "judge_prose", "judge_bom", "judge_trailing_comma", "judge_truncated",
     "judge_out_of_range", "judge_wrong_type", "judge_braces_in_strings", "judge_score_fraction"}
)
FAULT_KINDS = HTTP_FAULT_KINDS | CONTENT_FAULT_KINDS | JUDGE_FAULT_KINDS

DEFAULT_RETRY_AFTER_S = 1.0
DEFAULT_LATENCY_FAULT_S = 0.5
DEFAULT_SLOW_FAULT_S = 30.0


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
