"""The HermitBench protocol: prompt texts, brace extraction and per-turn verdicts.

Everything here is pure: no I/O except reading protocol YAML files. Verdicts are
computed by hermitkit from the reply text, never by the judge, so the protocol counts
of a run are exact and can be recomputed from its stored transcript.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from hermitkit.errors import ConfigError

Verdict = Literal["ok", "multiple", "unbalanced", "empty", "missing"]
Extraction = Literal["first", "span", "last"]
HistoryPolicy = Literal["full", "window"]

VERDICTS: tuple[str, ...] = ("ok", "multiple", "unbalanced", "empty", "missing")
FAILURE_VERDICTS = frozenset({"missing", "empty"})
MALFORMED_VERDICTS = frozenset({"multiple", "unbalanced"})
EXTRACTIONS: tuple[str, ...] = ("first", "span", "last")
HISTORY_POLICIES: tuple[str, ...] = ("full", "window")
DEFAULT_PROTOCOL_ID = "hermitkit-v1"

_PROTOCOL_KEYS = ("id", "initial_prompt", "warning", "extraction", "history", "window")


@dataclass(frozen=True)
class Protocol:
    """The texts and policies that define one variant of the experiment.

    ``window`` is the number of most recent messages kept after the initial prompt when
    ``history`` is ``"window"``; it is ``None`` for ``"full"``.
    """

    id: str
    initial_prompt: str
    warning: str
    extraction: Extraction = "first"
    history: HistoryPolicy = "full"
    window: int | None = None

    def __post_init__(self) -> None:
        _validate_protocol_fields(asdict(self), source=f"protocol {self.id!r}")

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of every field, so any wording change shows."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Classification:
    """The verdict on one assistant reply and the text to echo back, if any.

    ``extracted`` is ``None`` when the next user message must be the warning.
    """

    verdict: Verdict
    extracted: str | None
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class ProtocolCounts:
    """Exact per-run counts of verdicts. Failures are missing + empty replies and
    malformed are multiple + unbalanced ones."""

    turns: int = 0
    ok: int = 0
    multiple: int = 0
    unbalanced: int = 0
    empty: int = 0
    missing: int = 0

    @property
    def failures(self) -> int:
        return self.missing + self.empty

    @property
    def malformed(self) -> int:
        return self.multiple + self.unbalanced

    @property
    def compliance_rate(self) -> float | None:
        """Share of ``ok`` turns, or ``None`` for a run with no turn yet."""
        if self.turns == 0:
            return None
        return self.ok / self.turns

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "turns": self.turns,
            "ok": self.ok,
            "failures": self.failures,
            "malformed": self.malformed,
            "multiple": self.multiple,
            "unbalanced": self.unbalanced,
            "empty": self.empty,
            "missing": self.missing,
            "compliance_rate": self.compliance_rate,
        }


def scan_blocks(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Find the top-level ``{...}`` blocks of ``text``.

    Returns the (start, end) index pairs of each block's inner text and whether every
    brace was matched. Only ASCII braces count: look-alikes such as full-width ``｛｝``
    are ordinary text. A ``}`` with no open block is skipped and marks the text as
    unbalanced, as does a ``{`` that is never closed.
    """
    spans: list[tuple[int, int]] = []
    balanced = True
    depth = 0
    start = 0

    for index, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = index + 1
            depth += 1
        elif char == "}":
            if depth == 0:
                balanced = False
                continue
            depth -= 1
            if depth == 0:
                spans.append((start, index))

    if depth != 0:
        balanced = False
    return spans, balanced


def classify(text: str | None, extraction: Extraction = "first") -> Classification:
    """Give one assistant reply its verdict and the text to echo back.

    The checks run in this order, and the first that matches wins:

    1. no brace at all: ``missing``
    2. an unmatched brace: ``unbalanced``
    3. only blank blocks: ``empty``
    4. several top-level blocks: ``multiple``
    5. otherwise ``ok``

    ``None`` (a provider's ``content: null``) is an empty reply and so ``missing``.
    """
    if extraction not in EXTRACTIONS:
        raise ConfigError(f"Unknown extraction policy {extraction!r}: use one of {', '.join(EXTRACTIONS)}.")

    if text is None or ("{" not in text and "}" not in text):
        return Classification("missing", None, ())

    spans, balanced = scan_blocks(text)
    blocks = tuple(text[start:end] for start, end in spans)
    non_blank = [block for block in blocks if block.strip()]

    verdict: Verdict
    if not balanced:
        verdict = "unbalanced"
    elif not non_blank:
        verdict = "empty"
    elif len(blocks) > 1:
        verdict = "multiple"
    else:
        verdict = "ok"

    if verdict == "empty":
        return Classification(verdict, None, blocks)
    return Classification(verdict, _extract(text, spans, extraction), blocks)


def _extract(text: str, spans: list[tuple[int, int]], extraction: Extraction) -> str | None:
    if extraction == "span":
        first_open = text.find("{")
        last_close = text.rfind("}")
        if first_open == -1 or last_close <= first_open:
            return None
        extracted = text[first_open + 1 : last_close]
    else:
        candidates = [text[start:end] for start, end in spans if text[start:end].strip()]
        if not candidates:
            return None
        extracted = candidates[0] if extraction == "first" else candidates[-1]

    if not extracted.strip():
        return None
    return extracted


def next_user_message(protocol: Protocol, classification: Classification) -> str:
    """Return what the echo sends after a reply: the extracted text, verbatim, or the warning."""
    if classification.verdict in FAILURE_VERDICTS or classification.extracted is None:
        return protocol.warning
    return classification.extracted


def count_verdicts(verdicts: Iterable[str]) -> ProtocolCounts:
    tally = dict.fromkeys(VERDICTS, 0)
    turns = 0
    for verdict in verdicts:
        if verdict not in tally:
            raise ValueError(f"Unknown verdict {verdict!r}; expected one of {', '.join(VERDICTS)}.")
        tally[verdict] += 1
        turns += 1
    return ProtocolCounts(turns=turns, **tally)


def build_messages(protocol: Protocol, history: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Apply the history policy to a run's messages (initial prompt first).

    ``window`` keeps the initial prompt plus the last ``protocol.window`` messages, so
    the model always receives the rules and the request always ends with a user message.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in history]
    if protocol.history == "full" or protocol.window is None:
        return messages

    head, tail = messages[:1], messages[1:]
    kept = tail[-protocol.window :] if protocol.window > 0 else []
    # An assistant message right after the initial prompt would break alternation.
    if kept and kept[0]["role"] == "assistant":
        kept = kept[1:]
    return head + kept


def builtin_protocol_ids() -> list[str]:
    folder = resources.files("hermitkit") / "protocols"
    return sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml"))


def load_protocol(name_or_path: str | Path = DEFAULT_PROTOCOL_ID) -> Protocol:
    """Load a built-in protocol by id, or a user protocol from a YAML file path."""
    name = str(name_or_path)
    builtin = resources.files("hermitkit") / "protocols" / f"{name}.yaml"
    if builtin.is_file():
        return protocol_from_yaml(builtin.read_text(encoding="utf-8"), source=f"built-in protocol {name}")

    path = Path(name).expanduser()
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"Protocol file not found: {path.absolute()}. Give an existing YAML file or a built-in id ({', '.join(builtin_protocol_ids())}).")
        protocol = protocol_from_yaml(path.read_text(encoding="utf-8"), source=str(path))
        _reject_builtin_id_reuse(protocol, source=str(path))
        return protocol

    raise ConfigError(
        f"Unknown protocol {name!r}. Use a built-in id ({', '.join(builtin_protocol_ids())}) "
        "or the path of a protocol YAML file."
    )


def _reject_builtin_id_reuse(protocol: Protocol, *, source: str) -> None:
    """Keep a built-in id meaning one wording, so results under that id stay comparable."""
    if protocol.id not in builtin_protocol_ids():
        return
    if protocol.hash != load_protocol(protocol.id).hash:
        raise ConfigError(
            f"{source}: id {protocol.id!r} belongs to a built-in protocol, but this file's texts or "
            "policies differ from it. Give your variant its own id, such as 'my-variant-v1'."
        )


def protocol_from_yaml(text: str, *, source: str = "protocol YAML") -> Protocol:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with keys {', '.join(_PROTOCOL_KEYS)}; got {type(data).__name__}.")
    _validate_protocol_fields(data, source=source)
    return Protocol(**{key: data[key] for key in _PROTOCOL_KEYS if key in data})


def _validate_protocol_fields(data: dict[str, object], *, source: str) -> None:
    # YAML keys may be numbers or booleans, which do not sort together with strings.
    unknown = sorted(set(data) - set(_PROTOCOL_KEYS), key=repr)
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(str(key), _PROTOCOL_KEYS, n=1)]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys are {', '.join(_PROTOCOL_KEYS)}.{hint}")

    for key in ("id", "initial_prompt", "warning"):
        value = data.get(key)
        if value is None:
            raise ConfigError(f"{source}: missing required key {key!r}.")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{source}: {key} must be a non-empty string; got {value!r}.")

    extraction = data.get("extraction", "first")
    if extraction not in EXTRACTIONS:
        raise ConfigError(f"{source}: extraction {extraction!r} is invalid; use one of {', '.join(EXTRACTIONS)}.")

    history = data.get("history", "full")
    if history not in HISTORY_POLICIES:
        raise ConfigError(f"{source}: history {history!r} is invalid; use 'full' or 'window' (with window: K).")

    window = data.get("window")
    if history == "window":
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"{source}: history 'window' needs window set to a whole number of messages >= 1; got {window!r}.")
    elif window is not None:
        raise ConfigError(f"{source}: window is set to {window!r} but history is {history!r}; set history: window or remove window.")
