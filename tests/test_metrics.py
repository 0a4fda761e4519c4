"""Self-talk metrics on hand-made transcripts."""

from __future__ import annotations

import pytest

from hermitkit.metrics import (
    AssistantTurn,
    asks_for_input,
    compression_ratio,
    emoji_density,
    end_state,
    is_silent,
    loop_onset,
    ngram_similarity,
    prompt_length,
    repeat_kinds,
    run_metrics,
    symbol_density,
    turn_metrics,
)


def turns_from(replies: list[str | None], prompts: list[str | None] | None = None) -> list[AssistantTurn]:
    prompts = prompts if prompts is not None else replies
    return [AssistantTurn(number, reply, "ok", prompt) for number, (reply, prompt) in enumerate(zip(replies, prompts, strict=True), start=1)]


def test_prompt_length_counts_words():
    assert prompt_length("Hello, world: what next?") == 4
    assert prompt_length(None) == 0
    assert prompt_length("   ") == 0


def test_similarity_identical_and_disjoint():
    assert ngram_similarity("the tide comes in", "The tide, comes in!") == 1.0
    assert ngram_similarity("red green blue", "one two three") == 0.0


def test_similarity_partial_overlap():
    # bigrams {a b, b c} and {a b, b d}: one shared of three
    assert ngram_similarity("a b c", "a b d") == pytest.approx(1 / 3)


def test_similarity_empty_texts():
    assert ngram_similarity("", None) == 1.0
    assert ngram_similarity("", "words here") == 0.0


def test_similarity_short_text_uses_whole_tuple():
    assert ngram_similarity("hello", "hello") == 1.0
    assert ngram_similarity("hello", "goodbye") == 0.0


def test_compression_ratio_lower_for_repetition():
    repetitive = compression_ratio(["Is anyone there?"] * 20)
    varied = compression_ratio([f"Topic {number}: {word} and the {other}" for number, (word, other) in enumerate(zip("abcdefghijklmnopqrst", "tsrqponmlkjihgfedcba"))])
    assert repetitive is not None and varied is not None
    assert repetitive < varied


def test_compression_ratio_none_when_empty():
    assert compression_ratio([None, "", "  "]) is None


def test_repeat_kinds_exact_near_and_new():
    prompts = [
        "What is the tide?",
        "what is the TIDE",
        "Tell me about the deep sea and its light today",
        "Tell me about the deep sea and its light now",
        "Something else entirely",
        "",
    ]
    assert repeat_kinds(prompts) == [None, "exact", None, "near", None, None]


def test_repeat_kinds_empty_never_repeats():
    assert repeat_kinds([None, None, "", ""]) == [None, None, None, None]


def test_loop_onset_needs_three_in_a_row():
    assert loop_onset([1, 2, 3, 4, 5, 6], [None, None, None, "exact", "near", "exact"]) == 4
    assert loop_onset([1, 2, 3, 4], [None, "exact", "exact", None]) is None
    assert loop_onset([1, 2, 3], [None, None, None]) is None


@pytest.mark.parametrize(
    "reply",
    [
        "Is anyone there?",
        "What should I do next?",
        "Please give me a task.",
        "I am waiting for your instructions.",
        "How can I help you today?",
        "Let me know what you would like.",
    ],
)
def test_asks_for_input_positive(reply):
    assert asks_for_input(reply)


@pytest.mark.parametrize("reply", ["The tide rises and falls.", "I will decide what to explore next.", "", None])
def test_asks_for_input_negative(reply):
    assert not asks_for_input(reply)


def test_symbol_and_emoji_density():
    assert emoji_density("🙂🙂ab") == pytest.approx(0.5)
    assert symbol_density("🙂🙂ab") == pytest.approx(0.5)
    assert symbol_density("→→ab") == pytest.approx(0.5)
    assert emoji_density("→→ab") == 0.0
    assert symbol_density("plain text, with punctuation!") == 0.0
    assert symbol_density("") == 0.0


def test_emoji_joiners_not_counted():
    # woman technologist: woman + zero-width joiner + laptop; the joiner is invisible
    assert emoji_density("\U0001F469\u200D\U0001F4BB") == 1.0


def test_is_silent():
    assert is_silent(None)
    assert is_silent("")
    assert is_silent(" { } ")
    assert not is_silent("{ok}")


def test_end_state_silence_with_onset():
    turns = turns_from(["{a thought}", "{another}", "", "{}", None])
    state = end_state(turns)
    assert state.label == "silence"
    assert state.onset == 3


def test_end_state_symbol_collapse():
    turns = turns_from(["{a real sentence here}", "{🌀🌀🌀}", "{✨✨ ✨}", "{🌀🌀🌀🌀}"])
    state = end_state(turns)
    assert state.label == "symbol_collapse"
    assert state.onset == 2


def test_end_state_stuck_asking_beats_repetition():
    turns = turns_from(["{I will write a poem.}", "{Is anyone there?}", "{Is anyone there?}", "{Is anyone there?}"])
    state = end_state(turns)
    assert state.label == "stuck_asking"
    assert state.onset == 2


def test_end_state_repetition_loop():
    replies = ["{The tide rises}", "{The tide falls}", "{Waves and wind}", "{The tide rises}", "{the tide falls}", "{Waves and wind!}"]
    turns = turns_from(replies)
    state = end_state(turns)
    assert state.label == "repetition_loop"
    assert state.onset == 4


def test_end_state_none_for_varied_run():
    turns = turns_from(["{Volcanoes}", "{Bird migration routes}", "{The history of zero}", "{Paper folding}"])
    assert end_state(turns).label == "none"
    assert end_state(turns).onset is None


def test_end_state_needs_whole_tail():
    # the last turn breaks the silence, so the tail is not silent
    turns = turns_from(["", "", "{back again}"])
    assert end_state(turns).label == "none"


def test_end_state_empty_run():
    state = end_state([])
    assert state.label == "none"
    assert state.onset is None


def test_turn_metrics_columns():
    rows = turn_metrics(turns_from(["Hi {a b c}", "{a b d} 🙂"], ["a b c", "a b d"]))
    assert rows[0]["similarity_to_previous"] is None
    assert rows[1]["similarity_to_previous"] == pytest.approx(1 / 3)
    assert rows[0]["prompt_words"] == 3
    assert rows[1]["emoji_density"] > 0


def test_run_metrics_on_hand_made_run():
    replies = ["{Hello there}", "{What should I do next?}", "{What should I do next?}", "{What should I do next?}", "{What should I do next?}"]
    prompts = ["Hello there", "What should I do next?", "What should I do next?", "What should I do next?", "What should I do next?"]
    metrics = run_metrics(turns_from(replies, prompts))
    assert metrics["turns"] == 5
    assert metrics["exact_repeats"] == 3
    assert metrics["near_repeats"] == 0
    assert metrics["loop_onset"] == 3
    assert metrics["asking_turns"] == 4
    assert metrics["end_state"] == "stuck_asking"
    assert metrics["end_state_onset"] == 2
    assert metrics["mean_prompt_words"] == pytest.approx((2 + 5 * 4) / 5)
    assert metrics["mean_symbol_density"] == 0.0
