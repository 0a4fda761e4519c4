"""Replies of the scripted demo models.

Replies depend only on the turn index, the request's seed and the last user message, so
a resumed run gets the same replies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hermitkit.demo.catalogue import (
    CONFUSED_MODEL,
    FORGETFUL_MODEL,
    STEADY_MODEL,
    WANDERER_MODEL,
)


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
