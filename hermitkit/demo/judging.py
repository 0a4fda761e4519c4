"""Replies of the demo judge: verdicts, syntheses, persona descriptions and malformed variants."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from hermitkit.demo.catalogue import DEMO_DISCLAIMER
from hermitkit.demo.scripted import (
    CONFUSED_MARK,
    FORGETFUL_LOSS_MARK,
    FORGETFUL_MIRROR_NOTE,
    FORGETFUL_THEMES,
    STEADY_MIRROR_NOTE,
    STEADY_THEMES,
    WANDERER_TOPICS,
)

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
    """Build a deterministic synthesis of the runs named in a synthesis request."""
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
    """Build a deterministic persona description that cites the first turns named in a persona request."""
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
