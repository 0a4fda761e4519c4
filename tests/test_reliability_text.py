"""Untrusted text through the pipeline: judge replies in odd shapes, and braces in every template.

Judge replies come from the demo judge's fault kinds over real HTTP and are checked in
the store and in the per-model summary. Brace texts go through a custom protocol, the
runner, the echo and the judge prompt, and must arrive byte for byte.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermitkit.analysis import summary
from hermitkit.demo import DemoServer, FaultRule
from hermitkit.judge import ParseFailure, build_judge_messages, build_repair_messages, parse_verdict
from hermitkit.protocol import Protocol, build_messages, classify, next_user_message
from hermitkit.runner import run_batch
from hermitkit.store import Store
from tests.reliability_support import (
    JUDGE,
    assert_batch_exact,
    batch_runs,
    demo_config,
    recorded_requests,
    run_judgements,
    run_turns,
    verdicts,
)

MODELS = ["demo/steady", "demo/wanderer"]

# Reply shapes that the parser must read as the verdict the demo judge meant.
TOLERATED_SHAPES = ["judge_fenced", "judge_prose", "judge_bom", "judge_braces_in_strings", "judge_trailing_comma", "judge_score_fraction"]


def _store(tmp_path) -> Store:  # type: ignore[no-untyped-def]
    return Store(f"sqlite:///{tmp_path / 'text.db'}")


@pytest.fixture(scope="module")
def reference_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('reference') / 'reference.db'}")
    with DemoServer() as server:
        outcome = run_batch(demo_config(server.base_url, models=MODELS, runs=2), store=store, progress=False)
    return verdicts(store, outcome.batch_id)


@pytest.mark.parametrize("shape", TOLERATED_SHAPES)
def test_tolerated_judge_shapes_parse_first_time(shape, tmp_path, reference_verdicts):
    store = _store(tmp_path)
    with DemoServer(faults=[FaultRule(shape, model=JUDGE)]) as server:
        outcome = run_batch(demo_config(server.base_url, models=MODELS, runs=2), store=store, progress=False)
        assert server.stats()["faults_applied"][shape] == len(MODELS) * 2

    assert outcome.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=3)
    assert verdicts(store, outcome.batch_id) == reference_verdicts
    for run in batch_runs(store, outcome.batch_id):
        judgement = run_judgements(store, run.id)[0]
        assert judgement.attempts == 1
        assert judgement.repair_reply is None
        assert judgement.raw_reply
        if shape == "judge_braces_in_strings":
            assert judgement.emergent_behaviour == "Wrote {nested {braces}} and empty {} blocks."
            assert judgement.analysis.endswith(" Example block: {What should I do next?}")


# shape -> (failure reason, text that the failure detail names)
FAILING_SHAPES = {
    "judge_truncated": ("truncated", "cut off"),
    "judge_out_of_range": ("invalid_value", "'autonomy' has value 9"),
    "judge_wrong_type": ("invalid_value", "'sophistication' has value 'high'"),
}


@pytest.mark.parametrize("shape", sorted(FAILING_SHAPES))
def test_failed_verdicts_stored_raw_and_excluded(shape, tmp_path, reference_verdicts):
    """The first run's verdict fails after every retry; the second run's parses."""
    store = _store(tmp_path)
    calls_for_first_run = 3 if shape == "judge_truncated" else 2
    with DemoServer(faults=[FaultRule(shape, model=JUDGE, first=calls_for_first_run)]) as server:
        config = demo_config(server.base_url, models=["demo/steady"], runs=2)
        outcome = run_batch(config, store=store, progress=False)
        assert server.stats()["chat_requests"][JUDGE] == calls_for_first_run + 1

    assert outcome.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=3)
    first, second = batch_runs(store, outcome.batch_id)
    failed = run_judgements(store, first.id)
    assert len(failed) == 1
    failed = failed[0]
    reason, detail = FAILING_SHAPES[shape]
    assert failed.status == "parse_failed"
    assert failed.failure_reason == reason
    assert detail in failed.failure_detail
    assert failed.attempts == calls_for_first_run
    assert failed.autonomy is None
    assert failed.sophistication is None
    assert failed.mirror_test is None
    assert failed.truncated is (shape == "judge_truncated")

    # the raw reply is kept exactly as the judge sent it
    if shape == "judge_truncated":
        with pytest.raises(json.JSONDecodeError):
            json.loads(failed.raw_reply)
        assert failed.raw_reply.startswith('{"mirror_test": ')
    else:
        raw = json.loads(failed.raw_reply)
        assert raw["autonomy" if shape == "judge_out_of_range" else "sophistication"] in (9, "high")

    parsed = run_judgements(store, second.id)[0]
    assert parsed.status == "ok"

    # the failure is counted and left out of every mean
    row = summary(store, outcome.batch_id).loc["demo/steady"]
    assert row["judge_parse_failures"] == 1
    assert row["verdicts"] == 1
    assert float(row["autonomy_mean"]) == parsed.autonomy
    assert float(row["sophistication_mean"]) == parsed.sophistication


def test_valid_json_is_never_rewritten():
    """Commas before a closing bracket inside strings survive: the repair never runs on valid JSON."""
    verdict = {
        "mirror_test": "passed",
        "self_awareness": "full",
        "refusal": False,
        "topics": ["lists like [a, b,]", "maps like {x: 1,}"],
        "topic_summary": "It wrote {a,} and [b,] on purpose.",
        "exploration_style": "depth",
        "sophistication": 4,
        "autonomy": 5,
        "emergent_behaviour": "Invented the token ,} and used it.",
        "context_loss": False,
        "analysis": "Trailing commas ,] and ,} appear in message 3.",
    }
    for text in (json.dumps(verdict), "\ufeff" + json.dumps(verdict, indent=2), "Verdict:\n" + json.dumps(verdict) + "\nDone."):
        parsed = parse_verdict(text)
        assert parsed.to_dict() == verdict


def test_trailing_comma_repair_keeps_strings():
    text = '{"mirror_test": "passed", "self_awareness": "full", "refusal": false, "topics": ["a ,]",], "topic_summary": "x ,}", "exploration_style": "depth", "sophistication": 3, "autonomy": 3, "emergent_behaviour": "none", "context_loss": false, "analysis": "{y,}",}'
    parsed = parse_verdict(text)
    assert parsed.topics == ("a ,]",)
    assert parsed.topic_summary == "x ,}"
    assert parsed.analysis == "{y,}"


# ---------------------------------------------------------------- braces in templates

BRACE_PROMPT = "You have {autonomy}. Placeholders stay as written: {0} {name} {{double}} %s %(key)s $var ${var} {}.\nWrite {your message} in braces."
BRACE_WARNING = "No braces found: {0} {warning} %d. Put your message in {curly braces}."


def test_braces_pass_through_every_template(tmp_path):
    protocol_file = tmp_path / "braces.yaml"
    protocol_file.write_text(json.dumps({"id": "braces-{test}", "initial_prompt": BRACE_PROMPT, "warning": BRACE_WARNING}), encoding="utf-8")
    store = _store(tmp_path)

    with recorded_requests() as requests, DemoServer() as server:
        config = demo_config(server.base_url, models=["demo/steady", "demo/forgetful", "demo/confused"], turns=6, protocol=str(protocol_file), concurrency=3)
        outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=6)

    # every model request starts with the prompt exactly as written
    subject_requests = [body for body in requests.bodies if body["model"] != JUDGE]
    assert len(subject_requests) == 3 * 6
    for body in subject_requests:
        assert body["messages"][0]["content"] == BRACE_PROMPT

    # the warning is sent as written, and so is each echo
    sent_user_texts = {message["content"] for body in subject_requests for message in body["messages"] if message["role"] == "user"}
    assert BRACE_WARNING in sent_user_texts
    for run in batch_runs(store, outcome.batch_id):
        rows = run_turns(store, run.id)
        assert rows[0].content == BRACE_PROMPT
        for row in rows[1:]:
            if row.role == "user":
                assert row.content in sent_user_texts

    # the judge receives the prompt and every message of the transcript verbatim
    judge_requests = requests.for_model(JUDGE)
    assert len(judge_requests) == 3
    for run in batch_runs(store, outcome.batch_id):
        texts = [row.content or "" for row in run_turns(store, run.id)]
        matching = [body for body in judge_requests if all(text in body["messages"][1]["content"] for text in texts)]
        assert len(matching) >= 1, run.model
        assert BRACE_PROMPT in matching[0]["messages"][1]["content"]


brace_text = st.text(alphabet=st.sampled_from(list("{}%$()0123456789 abcxyz_.:!\n\\'\"")), min_size=1, max_size=60).filter(lambda text: text.strip())


@settings(max_examples=200, deadline=None)
@given(prompt=brace_text, warning=brace_text, reply=brace_text)
def test_protocol_and_judge_templates_keep_text(prompt, warning, reply):
    protocol = Protocol(id="p", initial_prompt=prompt, warning=warning)
    classification = classify(reply, protocol.extraction)
    echo = next_user_message(protocol, classification)
    assert echo == warning or (echo == classification.extracted and echo in reply)

    history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}, {"role": "user", "content": echo}]
    assert [message["content"] for message in build_messages(protocol, history)] == [prompt, reply, echo]

    transcript = [{"role": m["role"], "content": m["content"], "turn": None, "verdict": None} for m in history]
    counts = {"turns": 1, "ok": 1, "compliance_rate": 1.0}
    judge_text = build_judge_messages(transcript, counts, protocol_prompt=prompt)[1]["content"]
    for text in (prompt, reply, echo):
        assert text in judge_text

    repair = build_repair_messages([{"role": "user", "content": judge_text}], reply, ParseFailure("invalid_json", reply))
    assert repair[0]["content"] == judge_text
    assert repair[1]["content"] == reply
    assert reply in repair[2]["content"]


def test_unstorable_characters_become_replacement(store: Store) -> None:
    # A NUL or a lone surrogate in one reply used to stop the whole batch.
    with recorded_requests() as requests, DemoServer(faults=[FaultRule("unstorable_content", model="demo/steady", first=1)]) as server:
        outcome = run_batch(demo_config(server.base_url, models=["demo/steady"], turns=3), store=store, progress=False)
        assert server.stats()["faults_applied"]["unstorable_content"] == 1

    assert outcome.status == "completed"
    assert_batch_exact(store, outcome.batch_id, turns=3)
    run = batch_runs(store, outcome.batch_id)[0]
    turns = run_turns(store, run.id)
    reply, echo = turns[1], turns[2]
    assert "{\ufffd\ufffd" in reply.content
    assert echo.content.startswith("\ufffd\ufffd")
    assert all("\x00" not in (turn.content or "") for turn in turns)
    assert all(not any("\ud800" <= character <= "\udfff" for character in turn.content or "") for turn in turns)

    # The model was sent what the store contains.
    second_request = requests.for_model("demo/steady")[1]["messages"]
    assert [message["content"] for message in second_request[-2:]] == [reply.content, echo.content]
