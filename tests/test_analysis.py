"""Frames and per-model summaries, checked against independent SQL over the same database."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from hermitkit import analysis
from hermitkit.config import build_config
from hermitkit.errors import ConfigError
from hermitkit.protocol import classify, load_protocol, next_user_message
from hermitkit.runner import run_batch
from hermitkit.store import Batch, Judgement, Run, Store, Turn, utcnow

DEMO_MODELS = ["demo/steady", "demo/wanderer", "demo/forgetful", "demo/confused"]


# ---------------------------------------------------------------------------
# Batch builders shared with the other analysis and report tests
# ---------------------------------------------------------------------------


def demo_config(base_url: str, **changes: Any):  # type: ignore[no-untyped-def]
    data = {
        "name": "analysis-test",
        "endpoint": {"base_url": base_url, "backoff_base_s": 0.001, "backoff_max_s": 0.05, "timeout_s": 10.0},
        "models": DEMO_MODELS,
        "runs": 2,
        "turns": 5,
        "judges": ["demo/judge"],
        "concurrency": 8,
    }
    data.update(changes)
    return build_config(data)


def run_demo_batch(store: Store, **changes: Any) -> int:
    """A batch of the scripted demo models, stored as a demo batch (``endpoint: demo``)."""
    outcome = run_batch(demo_config("demo", **changes), store=store, progress=False)
    assert outcome.status == "completed", outcome.message
    return outcome.batch_id


def verdict(**fields: Any) -> dict[str, Any]:
    base = {
        "judge_model": "judge/a",
        "round": 0,
        "status": "ok",
        "mirror_test": "passed",
        "self_awareness": "full",
        "refusal": False,
        "topics": ["tides"],
        "topic_summary": "About tides.",
        "exploration_style": "depth",
        "sophistication": 3,
        "autonomy": 3,
        "emergent_behaviour": "none",
        "context_loss": False,
        "analysis": "A fine run.",
    }
    base.update(fields)
    if base["status"] != "ok":
        for name in ("mirror_test", "self_awareness", "refusal", "topics", "topic_summary", "exploration_style", "sophistication", "autonomy", "emergent_behaviour", "context_loss", "analysis"):
            base[name] = None
        base.setdefault("raw_reply", "not json")
    return base


def insert_batch(store: Store, runs: list[dict[str, Any]], *, is_demo: bool = False, temperature: float = 1.0, name: str = "synthetic") -> int:
    """Store a finished batch built from hand-written replies and verdicts.

    Each run spec has ``model``, ``replies`` (assistant texts, classified as the runner
    does), optional ``latencies``, ``cost_usd``, ``status`` and ``judgements`` (dicts
    from ``verdict``).
    """
    protocol = load_protocol("hermitkit-v1")
    models = sorted({spec["model"] for spec in runs})
    judges = sorted({item["judge_model"] for spec in runs for item in spec.get("judgements", [])}) or ["judge/a"]
    repetitions = Counter(spec["model"] for spec in runs)
    config = build_config(
        {"name": name, "endpoint": "demo", "models": models, "runs": max(repetitions.values()), "turns": max(len(spec["replies"]) for spec in runs), "judges": judges, "temperature": temperature}
    )

    def write(session):  # type: ignore[no-untyped-def]
        batch = Batch(name=name, status="completed", config=config.model_dump(mode="json"), protocol_id=protocol.id, protocol_hash=protocol.hash, protocol=protocol.to_dict(), endpoint="demo", is_demo=is_demo, created_at=utcnow(), updated_at=utcnow())
        session.add(batch)
        session.flush()
        seen: Counter[str] = Counter()
        for spec in runs:
            seen[spec["model"]] += 1
            replies = spec["replies"]
            verdicts = [classify(reply) for reply in replies]
            kinds = Counter(item.verdict for item in verdicts)
            run = Run(
                batch_id=batch.id,
                model=spec["model"],
                repetition=seen[spec["model"]],
                status=spec.get("status", "completed"),
                params=config.sampling(),
                protocol_id=protocol.id,
                protocol_hash=protocol.hash,
                turns_target=len(replies),
                turn_count=len(replies),
                ok_count=kinds["ok"],
                multiple_count=kinds["multiple"],
                unbalanced_count=kinds["unbalanced"],
                empty_count=kinds["empty"],
                missing_count=kinds["missing"],
                prompt_tokens=10 * len(replies),
                completion_tokens=5 * len(replies),
                cost_usd=spec.get("cost_usd", 0.001 * len(replies)),
                created_at=utcnow(),
            )
            session.add(run)
            session.flush()
            session.add(Turn(run_id=run.id, idx=0, role="user", content=protocol.initial_prompt, created_at=utcnow()))
            latencies = spec.get("latencies", [0.1 * number for number in range(1, len(replies) + 1)])
            index = 0
            for number, (reply, classification) in enumerate(zip(replies, verdicts, strict=True), start=1):
                index += 1
                session.add(Turn(run_id=run.id, idx=index, role="assistant", content=reply, turn_number=number, verdict=classification.verdict, extracted=classification.extracted, latency_s=latencies[number - 1], created_at=utcnow()))
                index += 1
                session.add(Turn(run_id=run.id, idx=index, role="user", content=next_user_message(protocol, classification), created_at=utcnow()))
            for item in spec.get("judgements", []):
                session.add(Judgement(run_id=run.id, created_at=utcnow(), **item))
        return batch.id

    return store.write(write)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One SQLite store with one demo batch, shared by the read-only tests of this module."""
    handle = Store(f"sqlite:///{tmp_path_factory.mktemp('analysis') / 'demo.db'}")
    batch_id = run_demo_batch(handle)
    yield handle, batch_id
    handle.dispose()


# ---------------------------------------------------------------------------
# Independent recomputation
# ---------------------------------------------------------------------------


def sql_rows(store: Store, query: str, **params: Any) -> list[dict[str, Any]]:
    def read(session):  # type: ignore[no-untyped-def]
        return [dict(row._mapping) for row in session.execute(text(query), params)]

    return store.read(read)


def recompute_summary(store: Store, batch_id: int) -> dict[str, dict[str, Any]]:
    """Per-model numbers from plain SQL and Python, written without hermitkit.analysis."""
    runs = sql_rows(store, "SELECT id, model, turn_count, ok_count, missing_count, empty_count, multiple_count, unbalanced_count, prompt_tokens, completion_tokens, cost_usd FROM runs WHERE batch_id = :b", b=batch_id)
    turns = sql_rows(store, "SELECT r.model, t.latency_s FROM turns t JOIN runs r ON r.id = t.run_id WHERE r.batch_id = :b AND t.role = 'assistant'", b=batch_id)
    verdicts = sql_rows(store, "SELECT r.model, j.run_id, j.status, j.mirror_test, j.self_awareness, j.exploration_style, j.autonomy, j.sophistication FROM judgements j JOIN runs r ON r.id = j.run_id WHERE r.batch_id = :b", b=batch_id)

    expected: dict[str, dict[str, Any]] = {}
    for model in sorted({row["model"] for row in runs}):
        mine = [row for row in runs if row["model"] == model]
        parsed = [row for row in verdicts if row["model"] == model and row["status"] == "ok"]
        latencies = [row["latency_s"] for row in turns if row["model"] == model and row["latency_s"] is not None]
        per_run: dict[int, list[dict[str, Any]]] = {}
        for row in parsed:
            per_run.setdefault(row["run_id"], []).append(row)

        def run_mean(field: str, rows_by_run: dict[int, list[dict[str, Any]]] = per_run) -> float:
            values = [np.mean([float(row[field]) for row in rows]) for rows in rows_by_run.values()]
            return float(np.mean(values)) if values else float("nan")

        passes = [np.mean([row["mirror_test"] in ("passed", "failed_then_passed") for row in rows]) for rows in per_run.values()]
        awareness = Counter(row["self_awareness"] for row in parsed)
        styles = Counter(row["exploration_style"] for row in parsed)
        expected[model] = {
            "runs": len(mine),
            "compliance_mean": float(np.mean([row["ok_count"] / row["turn_count"] for row in mine if row["turn_count"]])),
            "failures_per_run": float(np.mean([row["missing_count"] + row["empty_count"] for row in mine])),
            "malformed_per_run": float(np.mean([row["multiple_count"] + row["unbalanced_count"] for row in mine])),
            "tokens": sum(row["prompt_tokens"] + row["completion_tokens"] for row in mine),
            "cost_usd": sum(row["cost_usd"] for row in mine),
            "mean_latency_s": float(np.mean(latencies)),
            "verdicts": len(parsed),
            "judge_parse_failures": sum(1 for row in verdicts if row["model"] == model and row["status"] != "ok"),
            "mirror_pass_rate": float(np.mean(passes)) if passes else float("nan"),
            "autonomy_mean": run_mean("autonomy"),
            "sophistication_mean": run_mean("sophistication"),
            "self_awareness_full": awareness["full"] / len(parsed) if parsed else float("nan"),
            "self_awareness_none": awareness["none"] / len(parsed) if parsed else float("nan"),
            "exploration_style": styles.most_common(1)[0][0] if parsed else None,
        }
    return expected


def assert_summary_matches(frame: pd.DataFrame, expected: dict[str, dict[str, Any]]) -> None:
    assert sorted(frame.index) == sorted(expected)
    for model, values in expected.items():
        row = frame.loc[model]
        for column, value in values.items():
            if isinstance(value, float) and np.isnan(value):
                assert pd.isna(row[column]), (model, column)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(row[column]) == pytest.approx(value), (model, column)
            else:
                assert row[column] == value, (model, column)


def test_summary_matches_recomputation_on_demo_batch(store):
    batch_id = run_demo_batch(store)
    frame = analysis.summary(store, batch_id)
    assert_summary_matches(frame, recompute_summary(store, batch_id))


def test_summary_ci_contains_mean(demo_store):
    store, batch_id = demo_store
    frame = analysis.summary(store, batch_id)
    for name in ("compliance", "autonomy", "sophistication"):
        assert (frame[f"{name}_ci_low"] <= frame[f"{name}_mean"]).all(), name
        assert (frame[f"{name}_mean"] <= frame[f"{name}_ci_high"]).all(), name


def test_summary_attrs_state_method_and_seed(demo_store):
    store, batch_id = demo_store
    frame = analysis.summary(store, batch_id, resamples=500, seed=7)
    assert frame.attrs["ci_method"] == analysis.BOOTSTRAP_METHOD
    assert frame.attrs["ci_resamples"] == 500
    assert frame.attrs["ci_seed"] == 7
    assert frame.attrs["ci_confidence"] == 0.95
    assert frame.attrs["is_demo"] is True
    assert frame.attrs["judges"] == ["demo/judge"]


def test_summary_keeps_cli_columns(demo_store):
    store, batch_id = demo_store
    frame = analysis.summary(store, batch_id)
    for column in ("runs", "compliance_pct", "failures_per_run", "malformed_per_run", "mirror_pass_rate", "autonomy_mean", "sophistication_mean", "verdicts", "judge_parse_failures", "tokens", "cost_usd"):
        assert column in frame.columns, column
    assert (frame["compliance_pct"] == frame["compliance_mean"] * 100).all()


def test_summary_of_demo_models(demo_store):
    store, batch_id = demo_store
    frame = analysis.summary(store, batch_id)
    assert frame.loc["demo/steady", "mirror_consensus"] == "passed consistently"
    assert frame.loc["demo/wanderer", "mirror_consensus"] == "failed consistently"
    assert frame.loc["demo/confused", "exploration_style"] == "stuck"
    assert frame.loc["demo/steady", "compliance_mean"] == 1.0


def test_parse_failure_lowers_no_mean(store):
    replies = ["{one}", "{two}"]
    batch_id = insert_batch(
        store,
        [
            {"model": "m/a", "replies": replies, "judgements": [verdict(autonomy=4, sophistication=5, mirror_test="passed")]},
            {"model": "m/a", "replies": replies, "judgements": [verdict(autonomy=2, sophistication=3, mirror_test="failed")]},
            {"model": "m/a", "replies": replies, "judgements": [verdict(status="parse_failed", failure_reason="no_json")]},
        ],
    )
    row = analysis.summary(store, batch_id).loc["m/a"]
    assert row["autonomy_mean"] == 3.0
    assert row["sophistication_mean"] == 4.0
    assert row["mirror_pass_rate"] == 0.5
    assert row["judge_parse_failures"] == 1
    assert row["verdicts"] == 2
    assert row["judged_runs"] == 2
    assert row["self_awareness_full"] == 1.0


def test_model_with_only_failed_verdicts_has_no_means(store):
    batch_id = insert_batch(store, [{"model": "m/a", "replies": ["{x}"], "judgements": [verdict(status="parse_failed")]}])
    row = analysis.summary(store, batch_id).loc["m/a"]
    assert pd.isna(row["autonomy_mean"])
    assert pd.isna(row["mirror_pass_rate"])
    assert row["mirror_consensus"] == "no verdicts"
    assert row["judge_parse_failures"] == 1


def test_several_verdicts_per_run_count_once(store):
    batch_id = insert_batch(
        store,
        [
            {"model": "m/a", "replies": ["{x}"], "judgements": [verdict(autonomy=5), verdict(judge_model="judge/b", autonomy=1), verdict(round=1, autonomy=3)]},
            {"model": "m/a", "replies": ["{y}"], "judgements": [verdict(autonomy=1)]},
        ],
    )
    frame = analysis.summary(store, batch_id)
    # run 1 averages to 3, run 2 is 1
    assert frame.loc["m/a", "autonomy_mean"] == 2.0
    assert analysis.summary(store, batch_id, judge_model="judge/b").loc["m/a", "autonomy_mean"] == 1.0
    assert analysis.summary(store, batch_id, judge_model="judge/b").attrs["judges"] == ["judge/b"]


def test_ci_narrows_as_runs_grow(store):
    pattern = ["{ok}", "{ok}", "no braces", "{ok}"]
    few = [{"model": "m/a", "replies": pattern[: 1 + index % 4] + ["no braces"], "judgements": [verdict(autonomy=1 + index % 5)]} for index in range(6)]
    many = [{"model": "m/a", "replies": pattern[: 1 + index % 4] + ["no braces"], "judgements": [verdict(autonomy=1 + index % 5)]} for index in range(60)]
    small = analysis.summary(store, insert_batch(store, few)).loc["m/a"]
    large = analysis.summary(store, insert_batch(store, many)).loc["m/a"]
    for name in ("compliance", "autonomy"):
        assert large[f"{name}_ci_high"] - large[f"{name}_ci_low"] < small[f"{name}_ci_high"] - small[f"{name}_ci_low"], name
        assert large[f"{name}_ci_low"] <= large[f"{name}_mean"] <= large[f"{name}_ci_high"], name


def test_summary_ci_resamples_runs_in_id_order(store):
    patterns = [["{ok}", "no braces"], ["{ok}"], ["no", "no", "{ok}"], ["{ok}", "{ok}", "{ok}", "no"], ["none"]]
    runs = []
    for index in range(24):
        judgements = [verdict(autonomy=1 + index % 5, sophistication=1 + (index * 2) % 5)]
        if index % 4 == 0:
            judgements.append(verdict(judge_model="judge/b", autonomy=1 + (index + 2) % 5, sophistication=5))
        if index % 6 == 5:
            judgements = [verdict(status="parse_failed")]
        runs.append({"model": ("m/a", "m/b")[index % 2], "replies": patterns[index % len(patterns)], "judgements": judgements})
    batch_id = insert_batch(store, runs)

    # Rewriting some runs moves their rows on PostgreSQL, so a query without ORDER BY would return another order.
    def touch(session):  # type: ignore[no-untyped-def]
        session.execute(text("UPDATE runs SET error = NULL WHERE batch_id = :b AND id % 3 = 0"), {"b": batch_id})

    store.write(touch)
    frame = analysis.summary(store, batch_id, resamples=400, seed=11)

    compliance_rows = sql_rows(store, "SELECT id, model, ok_count, turn_count FROM runs WHERE batch_id = :b ORDER BY id", b=batch_id)
    verdict_rows = sql_rows(store, "SELECT r.model, j.run_id, j.autonomy, j.sophistication FROM judgements j JOIN runs r ON r.id = j.run_id WHERE r.batch_id = :b AND j.status = 'ok' ORDER BY j.run_id", b=batch_id)
    for model in ("m/a", "m/b"):
        compliance = [row["ok_count"] / row["turn_count"] for row in compliance_rows if row["model"] == model]
        by_run: dict[int, list[dict[str, Any]]] = {}
        for row in verdict_rows:
            if row["model"] == model:
                by_run.setdefault(row["run_id"], []).append(row)
        expected = {
            "compliance": analysis.bootstrap_ci(compliance, resamples=400, seed=11),
            "autonomy": analysis.bootstrap_ci([np.mean([row["autonomy"] for row in rows]) for rows in by_run.values()], resamples=400, seed=11),
            "sophistication": analysis.bootstrap_ci([np.mean([row["sophistication"] for row in rows]) for rows in by_run.values()], resamples=400, seed=11),
        }
        for name, (low, high) in expected.items():
            assert low < high, (model, name)
            assert frame.loc[model, f"{name}_ci_low"] == low, (model, name)
            assert frame.loc[model, f"{name}_ci_high"] == high, (model, name)


def test_bootstrap_ci_reproducible_and_bounded():
    values = [0.13, 0.52, 0.91, 0.37, 0.74, 0.05, 0.66, 0.29]
    first = analysis.bootstrap_ci(values, seed=3)
    assert first == analysis.bootstrap_ci(values, seed=3)
    assert first != analysis.bootstrap_ci(values, seed=4)
    assert first[0] <= np.mean(values) <= first[1]
    assert min(values) <= first[0] <= first[1] <= max(values)


def test_bootstrap_ci_edge_cases():
    assert all(np.isnan(bound) for bound in analysis.bootstrap_ci([]))
    assert analysis.bootstrap_ci([2.0]) == (2.0, 2.0)
    assert analysis.bootstrap_ci([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert analysis.bootstrap_ci([1.0, float("nan"), 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="resamples"):
        analysis.bootstrap_ci([1.0, 2.0], resamples=0)


@pytest.mark.parametrize(
    ("rate", "label"),
    [(1.0, "passed consistently"), (0.7, "mostly passed"), (0.5, "mixed"), (0.2, "mostly failed"), (0.0, "failed consistently"), (float("nan"), "no verdicts"), (None, "no verdicts")],
)
def test_mirror_consensus_labels(rate, label):
    assert analysis.mirror_consensus(rate) == label


def test_runs_frame_matches_database(demo_store):
    store, batch_id = demo_store
    frame = analysis.runs_frame(store, batch_id).set_index("run_id")
    rows = sql_rows(store, "SELECT id, model, ok_count, turn_count, missing_count, empty_count, cost_usd FROM runs WHERE batch_id = :b", b=batch_id)
    assert len(frame) == len(rows)
    for row in rows:
        run = frame.loc[row["id"]]
        assert run["model"] == row["model"]
        assert run["compliance"] == pytest.approx(row["ok_count"] / row["turn_count"])
        assert run["failures"] == row["missing_count"] + row["empty_count"]
        assert run["cost_usd"] == pytest.approx(row["cost_usd"])
        assert run["protocol_id"] == "hermitkit-v1"
        assert run["temperature"] == 1.0
        latency = sql_rows(store, "SELECT AVG(latency_s) AS mean FROM turns WHERE run_id = :r AND role = 'assistant'", r=row["id"])[0]["mean"]
        assert run["mean_latency_s"] == pytest.approx(float(latency))


def test_turns_and_judgements_frames_match_database(demo_store):
    store, batch_id = demo_store
    turns = analysis.turns_frame(store, batch_id)
    count = sql_rows(store, "SELECT COUNT(*) AS n FROM turns t JOIN runs r ON r.id = t.run_id WHERE r.batch_id = :b", b=batch_id)[0]["n"]
    assert len(turns) == count
    assert {"model", "batch_id", "protocol_id", "temperature", "reasoning", "reasoning_settings"} <= set(turns.columns)
    assistant = analysis.turns_frame(store, batch_id, role="assistant")
    assert set(assistant["role"]) == {"assistant"}

    verdicts = analysis.judgements_frame(store, batch_id)
    stored = sql_rows(store, "SELECT COUNT(*) AS n FROM judgements j JOIN runs r ON r.id = j.run_id WHERE r.batch_id = :b", b=batch_id)[0]["n"]
    assert len(verdicts) == stored
    assert {"model", "judge_model", "autonomy", "analysis"} <= set(verdicts.columns)


def test_frames_for_several_batches(store):
    first = insert_batch(store, [{"model": "m/a", "replies": ["{x}", "no"], "judgements": [verdict()]}], temperature=0.2, name="cold")
    second = insert_batch(store, [{"model": "m/a", "replies": ["{x}", "{y}"], "judgements": [verdict()]}], temperature=1.5, name="hot")
    runs = analysis.runs_frame(store, [first, second])
    assert sorted(runs["temperature"]) == [0.2, 1.5]
    assert set(runs["batch_name"]) == {"cold", "hot"}

    frame = analysis.summary_frame(store, [first, second])
    assert list(frame["batch_id"]) == [first, second]
    assert list(frame["temperature"]) == [0.2, 1.5]
    assert list(frame["compliance_mean"]) == [0.5, 1.0]
    assert set(frame["protocol_id"]) == {"hermitkit-v1"}
    assert frame.attrs["ci_seed"] == analysis.BOOTSTRAP_SEED

    assert len(analysis.turns_frame(store, [first, second], role="assistant")) == 4
    assert len(analysis.judgements_frame(store, [first, second])) == 2


def test_resolve_batch_ids(store):
    first = insert_batch(store, [{"model": "m/a", "replies": ["{x}"]}])
    second = insert_batch(store, [{"model": "m/a", "replies": ["{x}"]}])
    assert analysis.resolve_batch_id(store, "latest") == second
    assert analysis.resolve_batch_id(store, None) == second
    assert analysis.resolve_batch_ids(store, [first, str(second), first]) == [first, second]
    with pytest.raises(ValueError, match="'abc'"):
        analysis.resolve_batch_id(store, "abc")


def test_resolve_latest_without_batches(store):
    with pytest.raises(ConfigError, match="No batch"):
        analysis.resolve_batch_id(store, "latest")


def test_self_talk_on_demo_batch(demo_store):
    store, batch_id = demo_store
    frame = analysis.self_talk(store, batch_id)
    assert len(frame) == len(DEMO_MODELS) * 2
    confused = frame[frame["model"] == "demo/confused"]
    assert set(confused["end_state"]) == {"stuck_asking"}
    assert (confused["asking_turns"] == 5).all()
    steady = frame[frame["model"] == "demo/steady"]
    assert set(steady["end_state"]) == {"none"}
    assert steady["end_state_onset"].isna().all()


def test_self_talk_turns_and_end_state_counts(demo_store):
    store, batch_id = demo_store
    turns = analysis.self_talk_turns(store, batch_id)
    assert len(turns) == len(DEMO_MODELS) * 2 * 5
    counts = analysis.end_state_counts(store, batch_id)
    assert counts.loc["demo/confused", "stuck_asking"] == 2
    assert counts.to_numpy().sum() == len(DEMO_MODELS) * 2


def test_compliance_over_turns_matches_database(demo_store):
    store, batch_id = demo_store
    frame = analysis.compliance_over_turns(store, batch_id)
    rows = sql_rows(store, "SELECT r.model, t.turn_number, t.verdict FROM turns t JOIN runs r ON r.id = t.run_id WHERE r.batch_id = :b AND t.role = 'assistant'", b=batch_id)
    for _, row in frame.iterrows():
        verdicts = [item["verdict"] for item in rows if item["model"] == row["model"] and item["turn_number"] == row["turn"]]
        assert row["runs"] == len(verdicts)
        assert row["compliance"] == pytest.approx(verdicts.count("ok") / len(verdicts))


def test_mirror_outcomes_count_every_verdict(store):
    batch_id = insert_batch(
        store,
        [
            {"model": "m/a", "replies": ["{x}"], "judgements": [verdict(mirror_test="passed"), verdict(judge_model="judge/b", status="parse_failed")]},
            {"model": "m/a", "replies": ["{x}"], "judgements": [verdict(mirror_test="partial")]},
        ],
    )
    table = analysis.mirror_outcomes(store, batch_id)
    assert table.loc["m/a"].to_dict() == {"passed": 1, "partial": 1, "failed": 0, "failed_then_passed": 0, "not_parsed": 1}
