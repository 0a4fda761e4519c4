"""Batch configuration: the validated description of what a batch will send.

A ``BatchConfig`` comes from a params YAML file, ``--set key=value`` overrides, the
widgets or plain Python, and is checked in full before any request: every error names
the key, the value and the fix. API keys are never part of a config; an endpoint names
the environment variable that contains its key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hermitkit.client import OPENROUTER_BASE_URL
from hermitkit.errors import ConfigError
from hermitkit.protocol import DEFAULT_PROTOCOL_ID, Protocol, load_protocol

DEMO_ENDPOINT = "demo"


class EndpointConfig(BaseModel):
    """The endpoint that receives chat requests. ``base_url: demo`` starts the offline demo server."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    base_url: str = OPENROUTER_BASE_URL
    api_key_env: str | None = Field(default=None, description="Environment variable that contains the key for a non-OpenRouter base URL (default HERMITKIT_API_KEY).")
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    max_connections: int | None = Field(default=None, ge=1, description="HTTP connections to the endpoint (default: twice the concurrency, at least 8). Requests beyond it wait for a free connection.")

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if value == DEMO_ENDPOINT:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url {value!r} must start with http:// or https://, or be 'demo' for the offline demo server")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _check_key_env(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.replace("_", "").isalnum()):
            raise ValueError(f"api_key_env must be the NAME of an environment variable, such as MY_ENDPOINT_KEY, not {value[:4]!r}... Put the key itself in the environment, never in a params file")
        return value

    @property
    def is_demo(self) -> bool:
        return self.base_url == DEMO_ENDPOINT


class BatchConfig(BaseModel):
    """Everything that defines a batch. Stored with the batch, so it must hold no secret."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = ""
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    models: list[str] = Field(min_length=1)
    runs: int = Field(ge=1, le=10_000)
    turns: int = Field(ge=1, le=10_000)
    protocol: str = DEFAULT_PROTOCOL_ID
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=1024, ge=1)
    seed: int | None = None
    reasoning: dict[str, Any] | None = None
    judges: list[str] = Field(min_length=1)
    judge_temperature: float = Field(default=0.0, ge=0, le=2)
    judge_seed: int | None = 0
    judge_max_tokens: int = Field(default=2000, ge=64)
    concurrency: int = Field(default=8, ge=1, le=1024)
    per_model_concurrency: int | None = Field(default=None, ge=1)
    budget_usd: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _accept_single_judge(cls, data: Any) -> Any:
        # ``judge: x`` reads naturally in a params file for the common one-judge case.
        if isinstance(data, dict) and "judge" in data:
            data = dict(data)
            judge = data.pop("judge")
            if "judges" in data:
                raise ValueError("set either judge or judges, not both")
            data["judges"] = [judge] if isinstance(judge, str) else judge
        if isinstance(data, dict) and isinstance(data.get("endpoint"), str):
            data = dict(data)
            data["endpoint"] = {"base_url": data["endpoint"]}
        return data

    @field_validator("models", "judges")
    @classmethod
    def _check_model_ids(cls, value: list[str]) -> list[str]:
        for model in value:
            if not model.strip():
                raise ValueError("model ids must be non-empty strings such as 'openai/gpt-4o-mini'")
            if model != model.strip():
                raise ValueError(f"model id {model!r} has leading or trailing spaces")
        duplicates = sorted({m for m in value if value.count(m) > 1})
        if duplicates:
            raise ValueError(f"model ids listed twice: {', '.join(duplicates)}. List each model once and raise runs instead")
        return value

    @field_validator("protocol")
    @classmethod
    def _check_protocol(cls, value: str) -> str:
        load_protocol(value)
        return value

    def load_protocol(self) -> Protocol:
        return load_protocol(self.protocol)

    @property
    def total_runs(self) -> int:
        return len(self.models) * self.runs

    def sampling(self) -> dict[str, Any]:
        """Sampling parameters sent with every model request and stored with each run."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "reasoning": self.reasoning,
        }

    def run_sampling(self, repetition: int) -> dict[str, Any]:
        """Sampling parameters of one run. Run k gets ``seed + k - 1``.

        Repetitions with one shared seed would be copies of each other on endpoints that
        honour seeds, so each run gets its own seed, derived so the batch stays reproducible.
        """
        sampling = self.sampling()
        if self.seed is not None:
            sampling["seed"] = self.seed + repetition - 1
        return sampling

    def judge_sampling(self) -> dict[str, Any]:
        return {"temperature": self.judge_temperature, "seed": self.judge_seed, "max_tokens": self.judge_max_tokens}


_FIX_HINTS = {
    "runs": "set runs to a whole number >= 1",
    "turns": "set turns to a whole number >= 1 (the number of assistant replies per run)",
    "temperature": "use a number from 0 to 2",
    "top_p": "use a number greater than 0 and at most 1",
    "models": "give a YAML list of model ids, e.g. models: [openai/gpt-4o-mini]",
    "judges": "give a YAML list of judge model ids, e.g. judges: [openai/gpt-4o-mini]",
    "concurrency": "use a whole number >= 1",
    "budget_usd": "use a positive number of US dollars",
    "max_tokens": "use a whole number >= 1",
}


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def format_validation_error(error: ValidationError, *, source: str) -> str:
    """Turn pydantic's error list into one message per problem, each naming key, value and fix."""
    lines = [f"Invalid batch config ({source}):"]
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        key = ".".join(location) or "(top level)"
        value = item.get("input")
        message = item["msg"].removeprefix("Value error, ")

        if item["type"] == "extra_forbidden":
            owner = EndpointConfig if location[:1] == ["endpoint"] else BatchConfig
            known = _field_names(owner) + (["judge"] if owner is BatchConfig else [])
            close = difflib.get_close_matches(location[-1], known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
            lines.append(f"  - unknown key {key!r}: {hint}")
            continue

        if item["type"] == "missing":
            lines.append(f"  - {key} is missing: {_FIX_HINTS.get(location[0], 'add it to the params file')}")
            continue

        hint = _FIX_HINTS.get(location[0] if location else "", "")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if location[-1:] == ["api_key_env"] and isinstance(value, str):
            # The value may be a key pasted in by mistake, so only its start is shown.
            shown = repr(value[:4]) + "..."
        line = f"  - {key} = {shown}: {message}"
        if hint:
            line += f" ({hint})"
        lines.append(line)
    return "\n".join(lines)


def build_config(data: dict[str, Any], *, source: str = "config") -> BatchConfig:
    """Validate a mapping into a BatchConfig, raising ConfigError with a readable message."""
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid batch config ({source}): expected a mapping of keys to values, got {type(data).__name__}.")
    try:
        return BatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key=value``; the value is read as YAML, so ``runs=3`` gives an int."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Invalid --set {text!r}: write it as key=value, e.g. --set runs=3.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        # A ReaderError (a control character in the value) has no ``problem`` attribute.
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"Invalid --set {text!r}: the value is not valid YAML ({problem}).") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        target = merged
        for part in path[:-1]:
            child = target.get(part)
            if isinstance(child, str) and part == "endpoint":
                child = {"base_url": child}
            child = dict(child) if isinstance(child, dict) else {}
            target[part] = child
            target = child
        target[path[-1]] = value
    return merged


def load_params(path: str | Path, overrides: list[str] | None = None) -> BatchConfig:
    """Read a params YAML file, apply ``key=value`` overrides and validate."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"Params file not found: {file}. Pass the path of a YAML file such as params/demo.yaml.")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Params file {file} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Params file {file} must contain a mapping of keys to values, got {type(data).__name__}.")
    protocol = data.get("protocol")
    if isinstance(protocol, str) and protocol.endswith((".yaml", ".yml")) and not Path(protocol).expanduser().is_absolute():
        # A protocol file named in a params file sits next to it, wherever the command runs.
        data["protocol"] = str((file.parent / protocol).resolve())

    data = apply_overrides(data, overrides or [])
    source = f"{file} with --set {' '.join(overrides)}" if overrides else str(file)
    return build_config(data, source=source)
