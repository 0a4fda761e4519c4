"""Objective self-talk metrics computed from a stored transcript, without model calls.

The *self-prompt* of a turn is the text hermitkit extracted from the reply's braces
(``turns.extracted``), i.e. what was echoed back to the model; it is empty for replies
with no braces or only empty braces. The *reply* is the full assistant text.

Every metric here is a heuristic: it counts surface features of the text (words,
n-grams, Unicode categories, a fixed list of phrases) and ignores meaning.
Use the numbers to find runs worth reading, not as judgements in themselves.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WORD_PATTERN = re.compile(r"\w+", re.UNICODE)

# Two self-prompts are a near repeat when their word-bigram Jaccard similarity is at
# least this high. 0.8 keeps "Layer 3: what is X?" and "Layer 4: what is X?" apart only
# when they differ by more than a word or two in a short prompt.
NEAR_REPEAT_THRESHOLD = 0.8
# Consecutive repeating turns needed before a stretch counts as a loop.
LOOP_MIN_LENGTH = 3
# Number of final turns that the end-state label looks at.
TAIL_TURNS = 3
# A reply whose non-space characters are at least this share symbols is "symbol-heavy".
SYMBOL_COLLAPSE_DENSITY = 0.5

END_STATES = ("repetition_loop", "silence", "symbol_collapse", "stuck_asking", "none")

# Phrases with which a model requests input from its (imagined) interlocutor. Matched
# case-insensitively anywhere in the reply.
ASKING_PATTERNS = (
    r"\bis (?:any|some)(?:one|body) (?:there|here|out there)\b",
    r"\bwhat (?:should|shall|do you want|would you like) (?:me to|I) (?:do|write|talk|discuss|explore)\b",
    r"\bwhat would you like\b",
    r"\bhow (?:can|may) I (?:help|assist)\b",
    r"\b(?:give|send|provide) me (?:a|an|some|your) (?:task|instruction|instructions|prompt|question|direction)s?\b",
    r"\bcan you (?:give|tell|provide) me\b",
    r"\b(?:waiting|wait) for (?:your |further |more )?(?:instructions|input|a prompt|a task|guidance|direction)\b",
    r"\blet me know (?:what|how|if)\b",
    r"\bwhat (?:is|'s) (?:my|the) (?:task|assignment|goal)\b",
    r"\bplease (?:tell|give|provide|instruct)\b",
    r"\bany (?:instructions|requests|questions for me)\b",
)
_ASKING = re.compile("|".join(ASKING_PATTERNS), re.IGNORECASE)

# Code point ranges of emoji and pictographs, including regional indicator letters.
_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),
    (0x2600, 0x27BF),
    (0x2B00, 0x2BFF),
    (0x1F1E6, 0x1F1FF),
)


@dataclass(frozen=True)
class AssistantTurn:
    """The parts of one assistant turn that the metrics read."""

    turn: int
    reply: str | None
    verdict: str | None
    prompt: str | None


@dataclass(frozen=True)
class EndState:
    """The end of a run: a label from ``END_STATES`` and the turn where that state began."""

    label: str
    onset: int | None


def words(text: str | None) -> list[str]:
    """Lower-cased word tokens (runs of Unicode letters, digits and underscores)."""
    return WORD_PATTERN.findall((text or "").lower())


def prompt_length(prompt: str | None) -> int:
    """Self-prompt length in words; 0 for a turn with no self-prompt."""
    return len(words(prompt))


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """Return the set of word n-grams. A text shorter than ``n`` words gives one tuple of all its words."""
    if not tokens:
        return set()
    if len(tokens) < n:
        return {tuple(tokens)}
    return {tuple(tokens[index : index + n]) for index in range(len(tokens) - n + 1)}


def ngram_similarity(first: str | None, second: str | None, n: int = 2) -> float:
    """Jaccard similarity of the word n-gram sets of two texts, from 0.0 to 1.0.

    |A ∩ B| / |A ∪ B| over word bigrams by default. Two texts without any word are
    identical (1.0); one empty and one non-empty text share nothing (0.0).
    """
    grams_a = ngrams(words(first), n)
    grams_b = ngrams(words(second), n)
    if not grams_a and not grams_b:
        return 1.0
    return len(grams_a & grams_b) / len(grams_a | grams_b)


def compression_ratio(texts: Sequence[str | None]) -> float | None:
    """zlib-compressed size divided by raw size of the texts joined by newlines (UTF-8).

    Repetitive self-talk compresses well, so a lower ratio means more repetition. Very
    short texts can exceed 1.0 because of zlib's fixed overhead. None when all texts are
    empty.
    """
    joined = "\n".join(text or "" for text in texts).encode("utf-8")
    if not joined.strip():
        return None
    return len(zlib.compress(joined, 9)) / len(joined)


def _normalised(text: str | None) -> str:
    return " ".join(words(text))


def repeat_kinds(prompts: Sequence[str | None], threshold: float = NEAR_REPEAT_THRESHOLD) -> list[str | None]:
    """Label each self-prompt ``"exact"``, ``"near"`` or None against all earlier ones.

    Exact: the same words in the same order as an earlier self-prompt, ignoring case,
    punctuation and spacing. Near: not exact, but word-bigram similarity with some
    earlier self-prompt is at least ``threshold``. Empty self-prompts are never repeats,
    because silence has its own end state.
    """
    kinds: list[str | None] = []
    seen: set[str] = set()
    # Bigram sets of the earlier prompts, built once each: comparing every prompt with
    # all earlier ones is quadratic in the number of turns.
    earlier_grams: list[set[tuple[str, ...]]] = []
    for prompt in prompts:
        normal = _normalised(prompt)
        if not normal:
            kinds.append(None)
            continue
        grams = ngrams(words(normal), 2)
        if normal in seen:
            kinds.append("exact")
        elif any(_jaccard(grams, earlier) >= threshold for earlier in earlier_grams if _may_reach(grams, earlier, threshold)):
            kinds.append("near")
        else:
            kinds.append(None)
        seen.add(normal)
        earlier_grams.append(grams)
    return kinds


def _jaccard(first: set[tuple[str, ...]], second: set[tuple[str, ...]]) -> float:
    # Same value as ngram_similarity for the texts these sets came from; never both empty here.
    return len(first & second) / len(first | second)


def _may_reach(first: set[tuple[str, ...]], second: set[tuple[str, ...]], threshold: float) -> bool:
    # Jaccard similarity is at most min(|A|, |B|) / max(|A|, |B|), so sets of very
    # different sizes can be skipped without computing it. The bound is a division like
    # the similarity itself, so rounding cannot skip a pair that would reach the threshold.
    small, large = sorted((len(first), len(second)))
    return small / large >= threshold


def loop_onset(turns: Sequence[int], kinds: Sequence[str | None], min_length: int = LOOP_MIN_LENGTH) -> int | None:
    """Turn number where the first stretch of ``min_length`` or more consecutive repeats starts."""
    streak_start: int | None = None
    streak = 0
    for turn, kind in zip(turns, kinds, strict=True):
        if kind is None:
            streak, streak_start = 0, None
            continue
        if streak == 0:
            streak_start = turn
        streak += 1
        if streak >= min_length:
            return streak_start
    return None


def asks_for_input(reply: str | None) -> bool:
    """Return True when the reply contains a phrase that requests input or a task from someone else.

    The phrase list (``ASKING_PATTERNS``) is English only, so replies in other
    languages are never counted.
    """
    return bool(_ASKING.search(reply or ""))


@functools.lru_cache(maxsize=4096)
def _is_emoji(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _EMOJI_RANGES)


def _visible(text: str) -> list[str]:
    # Variation selectors and zero-width joiners glue emoji together; they are not
    # visible characters, so they count neither as symbols nor as text.
    return [char for char in text if not char.isspace() and unicodedata.category(char) not in ("Mn", "Cf")]


def symbol_density(text: str | None) -> float:
    """Share of visible characters whose Unicode category is a symbol (S*), emoji included.

    Letters, digits and punctuation are not symbols. 0.0 for a text with no visible
    character.
    """
    text = text or ""
    if text.isascii():
        return _ascii_share(text, _ASCII_SYMBOLS)
    visible = _visible(text)
    if not visible:
        return 0.0
    symbols = sum(1 for char in visible if unicodedata.category(char).startswith("S") or _is_emoji(char))
    return symbols / len(visible)


def emoji_density(text: str | None) -> float:
    """Share of visible characters that lie in the emoji and pictograph code point ranges."""
    text = text or ""
    if text.isascii():
        return _ascii_share(text, _ASCII_EMOJI)
    visible = _visible(text)
    if not visible:
        return 0.0
    return sum(1 for char in visible if _is_emoji(char)) / len(visible)


def _ascii_share(text: str, members: frozenset[str]) -> float:
    # No ASCII character is in category Mn or Cf, so the visible characters of an ASCII
    # text are its non-space ones, and str.split() drops exactly the str.isspace() ones.
    visible = sum(map(len, text.split()))
    if not visible:
        return 0.0
    return sum(text.count(char) for char in members) / visible


# The ASCII characters that symbol_density and emoji_density count, derived from the
# same rules as their general paths, so the ASCII fast path gives the same numbers.
_ASCII_CHARS = [chr(code) for code in range(128)]
_ASCII_SYMBOLS = frozenset(char for char in _ASCII_CHARS if unicodedata.category(char).startswith("S") or _is_emoji(char))
_ASCII_EMOJI = frozenset(char for char in _ASCII_CHARS if _is_emoji(char))


def is_silent(reply: str | None) -> bool:
    """True for a reply with no visible text apart from braces: nothing, spaces or ``{}``."""
    return not (reply or "").replace("{", "").replace("}", "").strip()


def _trailing_onset(turns: Sequence[AssistantTurn], holds: Sequence[bool]) -> int | None:
    # Walk back from the last turn while the condition holds; the earliest such turn
    # is the onset.
    onset: int | None = None
    for turn, flag in zip(reversed(turns), reversed(holds), strict=True):
        if not flag:
            break
        onset = turn.turn
    return onset


def end_state(turns: Sequence[AssistantTurn], tail: int = TAIL_TURNS, *, kinds: Sequence[str | None] | None = None) -> EndState:
    """Label how a run ends, from its last ``tail`` turns, and find when that began.

    A label applies when its condition holds for every one of the last ``tail`` turns
    (all turns when the run is shorter). Conditions are checked in this order and the
    first that applies wins:

    1. ``silence``: the reply is empty, blank or only braces (``is_silent``).
    2. ``symbol_collapse``: the reply's symbol density is at least 0.5.
    3. ``stuck_asking``: the reply requests input (``asks_for_input``).
    4. ``repetition_loop``: the self-prompt repeats an earlier one (``repeat_kinds``).
    5. ``none``: no condition holds on the whole tail.

    The onset is the first turn of the unbroken stretch, reaching back from the last
    turn, in which the winning condition holds. It may start before the tail.
    ``kinds`` is ``repeat_kinds`` of the turns' self-prompts when the caller has it.
    """
    if not turns:
        return EndState("none", None)

    window = list(turns[-tail:])
    if kinds is None:
        kinds = repeat_kinds([turn.prompt for turn in turns])
    conditions: tuple[tuple[str, Callable[[AssistantTurn, str | None], bool]], ...] = (
        ("silence", lambda turn, kind: is_silent(turn.reply)),
        ("symbol_collapse", lambda turn, kind: symbol_density(turn.reply) >= SYMBOL_COLLAPSE_DENSITY),
        ("stuck_asking", lambda turn, kind: asks_for_input(turn.reply)),
        ("repetition_loop", lambda turn, kind: kind is not None),
    )
    pairs = list(zip(turns, kinds, strict=True))
    for label, condition in conditions:
        # The tail decides the label, so the whole run is read only for the winner's onset.
        if all(condition(turn, kind) for turn, kind in pairs[-len(window) :]):
            holds = [condition(turn, kind) for turn, kind in pairs]
            return EndState(label, _trailing_onset(turns, holds))
    return EndState("none", None)


def turn_metrics(turns: Sequence[AssistantTurn], *, kinds: Sequence[str | None] | None = None) -> list[dict[str, object]]:
    """Per-turn metrics of one run, in turn order.

    Columns: ``turn``, ``verdict``, ``prompt_words`` (``prompt_length``),
    ``similarity_to_previous`` (``ngram_similarity`` with the previous turn's
    self-prompt; None on the first turn), ``repeat`` (``repeat_kinds``),
    ``asks_for_input``, ``symbol_density`` and ``emoji_density`` of the reply.
    ``kinds`` is ``repeat_kinds`` of the turns' self-prompts when the caller has it.
    """
    if kinds is None:
        kinds = repeat_kinds([turn.prompt for turn in turns])
    rows: list[dict[str, object]] = []
    previous: AssistantTurn | None = None
    for turn, kind in zip(turns, kinds, strict=True):
        rows.append(
            {
                "turn": turn.turn,
                "verdict": turn.verdict,
                "prompt_words": prompt_length(turn.prompt),
                "similarity_to_previous": None if previous is None else ngram_similarity(previous.prompt, turn.prompt),
                "repeat": kind,
                "asks_for_input": asks_for_input(turn.reply),
                "symbol_density": symbol_density(turn.reply),
                "emoji_density": emoji_density(turn.reply),
            }
        )
        previous = turn
    return rows


def run_metrics(turns: Sequence[AssistantTurn]) -> dict[str, object]:
    """Summary metrics of one run's self-talk.

    - ``turns``: assistant turns read.
    - ``mean_prompt_words``: mean self-prompt length in words over all turns.
    - ``mean_similarity``: mean word-bigram similarity of consecutive self-prompts.
    - ``compression_ratio``: ``compression_ratio`` of all self-prompts.
    - ``exact_repeats`` / ``near_repeats``: turns labelled so by ``repeat_kinds``.
    - ``loop_onset``: ``loop_onset`` of those labels (None when no loop).
    - ``asking_turns``: turns whose reply requests input from the echo.
    - ``mean_symbol_density`` / ``mean_emoji_density``: means over turns.
    - ``end_state`` and ``end_state_onset``: from ``end_state``.
    """
    # repeat_kinds compares every self-prompt with all earlier ones, so it runs once here.
    kinds = repeat_kinds([turn.prompt for turn in turns])
    rows = turn_metrics(turns, kinds=kinds)
    count = len(rows)
    similarities = [row["similarity_to_previous"] for row in rows if row["similarity_to_previous"] is not None]
    state = end_state(turns, kinds=kinds)

    def mean(values: Sequence[object]) -> float | None:
        numbers = [float(value) for value in values]  # type: ignore[arg-type]
        return sum(numbers) / len(numbers) if numbers else None

    return {
        "turns": count,
        "mean_prompt_words": mean([row["prompt_words"] for row in rows]),
        "mean_similarity": mean(similarities),
        "compression_ratio": compression_ratio([turn.prompt for turn in turns]),
        "exact_repeats": kinds.count("exact"),
        "near_repeats": kinds.count("near"),
        "loop_onset": loop_onset([turn.turn for turn in turns], kinds),
        "asking_turns": sum(1 for row in rows if row["asks_for_input"]),
        "mean_symbol_density": mean([row["symbol_density"] for row in rows]),
        "mean_emoji_density": mean([row["emoji_density"] for row in rows]),
        "end_state": state.label,
        "end_state_onset": state.onset,
    }
