"""Brace extraction, verdicts, history windows and protocol files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermitkit.errors import ConfigError
from hermitkit.protocol import (
    Protocol,
    build_messages,
    classify,
    count_verdicts,
    load_protocol,
    next_user_message,
    protocol_from_yaml,
    scan_blocks,
)

# (reply, verdict, extracted text under the "first" policy)
HARD_CASES = [
    ("{hello}", "ok", "hello"),
    ("Thinking... {what is a lighthouse?} done", "ok", "what is a lighthouse?"),
    ("{a {b} c}", "ok", "a {b} c"),
    ("{outer {inner {deep}} tail}", "ok", "outer {inner {deep}} tail"),
    ('{Here is JSON: {"k": [1, 2], "m": {"n": null}}}', "ok", 'Here is JSON: {"k": [1, 2], "m": {"n": null}}'),
    (r"{Euler: $e^{i\pi} + 1 = 0$ and \frac{a}{b}}", "ok", r"Euler: $e^{i\pi} + 1 = 0$ and \frac{a}{b}"),
    ("```python\nd = {1: 2}\n```\n{next prompt}", "multiple", "1: 2"),
    ("```json\n{\"a\": 1}\n```", "ok", '"a": 1'),
    ("｛full width｝ braces are not braces", "missing", None),
    ("no braces at all", "missing", None),
    ("", "missing", None),
    (None, "missing", None),
    ("{}", "empty", None),
    ("{ }", "empty", None),
    ("{\n\t}", "empty", None),
    ("{} {  }", "empty", None),
    ("{first} and {second}", "multiple", "first"),
    ("{first} {}", "multiple", "first"),
    ("{unclosed", "unbalanced", None),
    ("stray } close", "unbalanced", None),
    ("{ok} then {broken", "unbalanced", "ok"),
    ("} {recovered}", "unbalanced", "recovered"),
    ("{ keep  spacing }", "ok", " keep  spacing "),
]


@pytest.mark.parametrize(("reply", "verdict", "extracted"), HARD_CASES)
def test_classify_hard_cases(reply, verdict, extracted):
    result = classify(reply)
    assert result.verdict == verdict
    assert result.extracted == extracted


def test_classify_large_reply():
    body = "word " * 10_000
    reply = "preamble " + "{" + body + "}" + " trailer"
    assert len(reply) > 50_000
    result = classify(reply)
    assert result.verdict == "ok"
    assert result.extracted == body


def test_classify_many_blocks_large():
    reply = " ".join("{block %d}" % i for i in range(5000))
    result = classify(reply)
    assert result.verdict == "multiple"
    assert len(result.blocks) == 5000


@pytest.mark.parametrize(
    ("reply", "policy", "extracted"),
    [
        ("{a} x {b}", "first", "a"),
        ("{a} x {b}", "last", "b"),
        ("{a} x {b}", "span", "a} x {b"),
        ("{only}", "span", "only"),
        ("{a {b} c}", "span", "a {b} c"),
        ("{a} {} ", "last", "a"),
        ("} {x", "span", None),
    ],
)
def test_extraction_policies(reply, policy, extracted):
    assert classify(reply, policy).extracted == extracted


def test_unknown_extraction_policy_rejected():
    with pytest.raises(ConfigError, match="middle"):
        classify("{a}", "middle")  # type: ignore[arg-type]


def test_next_message_echoes_or_warns():
    protocol = load_protocol()
    assert next_user_message(protocol, classify("x {echo me} y")) == "echo me"
    assert next_user_message(protocol, classify("nothing")) == protocol.warning
    assert next_user_message(protocol, classify("{ }")) == protocol.warning
    assert next_user_message(protocol, classify("{unclosed")) == protocol.warning
    assert next_user_message(protocol, classify("{a} {b}")) == "a"


def test_counts_are_exact():
    counts = count_verdicts(["ok", "ok", "missing", "empty", "multiple", "unbalanced", "ok"])
    assert counts.turns == 7
    assert counts.ok == 3
    assert counts.failures == 2
    assert counts.malformed == 2
    assert counts.compliance_rate == pytest.approx(3 / 7)
    assert count_verdicts([]).compliance_rate is None


def test_count_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="bogus"):
        count_verdicts(["ok", "bogus"])


def test_default_protocol_has_stable_hash():
    first = load_protocol("hermitkit-v1")
    second = load_protocol("hermitkit-v1")
    assert first.hash == second.hash
    assert len(first.hash) == 64
    assert "{" in first.initial_prompt


def test_protocol_hash_changes_with_wording():
    base = load_protocol()
    changed = Protocol(**{**base.to_dict(), "warning": base.warning + "!"})
    assert changed.hash != base.hash


def test_history_window_keeps_prompt_and_tail():
    protocol = Protocol(id="w", initial_prompt="rules", warning="warn", history="window", window=3)
    history = [{"role": "user", "content": "rules"}]
    for turn in range(1, 6):
        history.append({"role": "assistant", "content": f"reply {turn}"})
        history.append({"role": "user", "content": f"echo {turn}"})
    messages = build_messages(protocol, history)
    assert messages[0]["content"] == "rules"
    assert messages[-1] == {"role": "user", "content": "echo 5"}
    assert messages[1]["role"] == "user"
    assert len(messages) <= 4


def test_history_full_keeps_everything():
    protocol = load_protocol()
    history = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert build_messages(protocol, history) == history


def test_protocol_yaml_roundtrip(tmp_path):
    path = tmp_path / "variant.yaml"
    path.write_text("id: variant\ninitial_prompt: 'Say {x}'\nwarning: use braces\nextraction: span\nhistory: window\nwindow: 6\n")
    protocol = load_protocol(str(path))
    assert protocol.id == "variant"
    assert protocol.extraction == "span"
    assert protocol.window == 6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("initial_prompt: x\nwarning: y\n", "missing required key 'id'"),
        ("id: a\nwarning: y\n", "missing required key 'initial_prompt'"),
        ("id: a\ninitial_prompt: [1, 2]\nwarning: y\n", "initial_prompt must be a non-empty string"),
        ("id: a\ninitial_prompt: x\nwarning: y\nextraction: middle\n", "extraction 'middle' is invalid"),
        ("id: a\ninitial_prompt: x\nwarning: y\nhistory: window\n", "needs window set"),
        ("id: a\ninitial_prompt: x\nwarning: y\nwindow: 4\n", "window is set to 4"),
        ("id: a\ninitial_prompt: x\nwarning: y\nprompt: z\n", "unknown key"),
        ("- just\n- a list\n", "must be a mapping"),
        ("id: [unclosed\n", "not valid YAML"),
    ],
)
def test_protocol_yaml_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        protocol_from_yaml(text)


def test_unknown_protocol_names_builtins():
    with pytest.raises(ConfigError, match="hermitkit-v1"):
        load_protocol("no-such-protocol")


def test_missing_protocol_file():
    with pytest.raises(ConfigError, match="not found"):
        load_protocol("/nonexistent/protocol.yaml")


brace_free = st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=40)


@given(brace_free)
def test_text_without_braces_is_missing(text):
    assert classify(text).verdict == "missing"


@given(brace_free, brace_free.filter(lambda s: s.strip() != ""), brace_free)
def test_single_block_round_trips(before, inner, after):
    result = classify(before + "{" + inner + "}" + after)
    assert result.verdict == "ok"
    assert result.extracted == inner


@given(st.text(alphabet="{}ab ", max_size=60))
def test_blocks_are_balanced_substrings(text):
    spans, balanced = scan_blocks(text)
    for start, end in spans:
        inner = text[start:end]
        assert inner.count("{") == inner.count("}")
        assert text[start - 1] == "{"
        assert text[end] == "}"
    if balanced:
        assert text.count("{") == text.count("}")


@given(st.text(alphabet="{}ab ", max_size=60), st.sampled_from(["first", "span", "last"]))
def test_verdict_always_defined(text, policy):
    result = classify(text, policy)
    assert result.verdict in {"ok", "multiple", "unbalanced", "empty", "missing"}
    if result.verdict in {"missing", "empty"}:
        assert result.extracted is None
    if result.extracted is not None:
        assert result.extracted.strip()


def test_builtin_id_reuse_rejected(tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text("id: hermitkit-v1\ninitial_prompt: 'Other words {x}'\nwarning: w\n")
    with pytest.raises(ConfigError, match="belongs to a built-in protocol"):
        load_protocol(str(path))
