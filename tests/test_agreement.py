"""Krippendorff's alpha against a published example, and agreement between stored judges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from hermitkit.agreement import (
    alpha,
    disagreements,
    encode,
    judge_agreement,
    value_domain,
)
from hermitkit.rejudge import rejudge_batch
from tests.test_analysis import insert_batch, run_demo_batch, verdict

NAN = np.nan

# Reliability data of Krippendorff, K. (2011), "Computing Krippendorff's Alpha-Reliability",
# Annenberg School for Communication, University of Pennsylvania (repository.upenn.edu/asc_papers/43),
# section C: 4 observers x 12 units with missing values. The paper gives nominal alpha
# 0.743 and ordinal alpha 0.815 for these data. The docstring of the krippendorff package
# 0.9.0 quotes the same matrix and both values from page 8 of that paper.
PAPER_DATA = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
]


def test_alpha_matches_paper_nominal():
    assert round(alpha(PAPER_DATA, "nominal", [1, 2, 3, 4, 5]), 3) == 0.743


def test_alpha_matches_paper_ordinal():
    assert round(alpha(PAPER_DATA, "ordinal", [1, 2, 3, 4, 5]), 3) == 0.815


def test_alpha_nominal_by_hand():
    # Coincidence matrix by hand for two coders and three units: (1,1), (1,2), (2,2).
    # o11 = 2, o12 = o21 = 1, o22 = 2; n = 6, n1 = n2 = 3.
    # D_o = 2/6, D_e = (3*3 + 3*3) / (6*5) = 18/30, alpha = 1 - (1/3)/(3/5) = 4/9.
    assert alpha([[1, 1, 2], [1, 2, 2]], "nominal", [1, 2]) == pytest.approx(4 / 9)


def test_alpha_undefined_cases():
    assert np.isnan(alpha([[1, NAN], [NAN, 2]], "nominal", [1, 2]))
    assert np.isnan(alpha([[3, 3, 3], [3, 3, 3]], "ordinal", [1, 2, 3, 4, 5]))


def test_encode_categories_and_scores():
    assert encode("mirror_test", pd.Series(["passed", "failed", None, "bogus"])).tolist()[:2] == [0.0, 2.0]
    assert encode("mirror_test", pd.Series([None])).isna().all()
    assert encode("refusal", pd.Series([False, True])).tolist() == [0.0, 1.0]
    assert encode("autonomy", pd.Series([4, None])).tolist()[0] == 4.0
    assert value_domain("autonomy") == [1.0, 2.0, 3.0, 4.0, 5.0]


def two_judge_batch(store, second_scores, *, failed_run=None):  # type: ignore[no-untyped-def]
    runs = []
    for index, (first, second) in enumerate(zip([1, 2, 3, 4, 5], second_scores, strict=True)):
        other = verdict(judge_model="judge/b", autonomy=second, sophistication=first, mirror_test="passed" if second >= 3 else "failed")
        if failed_run == index:
            other = verdict(judge_model="judge/b", status="parse_failed")
        runs.append({"model": "m/a", "replies": ["{x}"], "judgements": [verdict(autonomy=first, sophistication=first, mirror_test="passed" if first >= 3 else "failed"), other]})
    return insert_batch(store, runs)


def test_judge_agreement_perfect(store):
    batch_id = two_judge_batch(store, [1, 2, 3, 4, 5])
    frame = judge_agreement(store, batch_id).set_index("item")
    assert frame.loc["autonomy", "alpha"] == pytest.approx(1.0)
    assert frame.loc["autonomy", "level"] == "ordinal"
    assert frame.loc["mirror_test", "level"] == "nominal"
    assert frame.loc["mirror_test", "alpha"] == pytest.approx(1.0)
    assert frame.loc["autonomy", "units"] == 5
    assert frame.loc["autonomy", "coders"] == 2
    # every judge rated "full": no variation, so alpha is undefined and the note gives the reason
    assert np.isnan(frame.loc["self_awareness", "alpha"])
    assert "same value" in frame.loc["self_awareness", "note"]


def test_judge_agreement_matches_direct_alpha(store):
    batch_id = two_judge_batch(store, [2, 2, 4, 4, 5])
    frame = judge_agreement(store, batch_id).set_index("item")
    expected = alpha([[1, 2, 3, 4, 5], [2, 2, 4, 4, 5]], "ordinal", [1, 2, 3, 4, 5])
    assert frame.loc["autonomy", "alpha"] == pytest.approx(expected)
    assert frame.loc["autonomy", "alpha"] < 1.0


def test_parse_failure_is_missing_value(store):
    batch_id = two_judge_batch(store, [1, 2, 3, 4, 5], failed_run=4)
    frame = judge_agreement(store, batch_id).set_index("item")
    assert frame.loc["autonomy", "units"] == 4
    assert frame.loc["autonomy", "pairable_values"] == 8


def test_judge_agreement_needs_two_coders(store):
    batch_id = insert_batch(store, [{"model": "m/a", "replies": ["{x}"], "judgements": [verdict()]}])
    frame = judge_agreement(store, batch_id)
    assert frame["alpha"].isna().all()
    assert frame["note"].str.contains("at least two").all()


def test_disagreements_rank_runs(store):
    batch_id = two_judge_batch(store, [5, 2, 3, 4, 1])
    frame = disagreements(store, batch_id, top=10)
    # runs 1 and 5 differ by 4 points in autonomy and in mirror test; runs 2-4 agree
    assert len(frame) == 2
    assert list(frame["repetition"]) == [1, 5]
    assert frame["score"].iloc[0] == pytest.approx(1.0 + 0.5)
    assert "judge/a=1" in frame["autonomy"].iloc[0]
    assert "judge/b=5" in frame["autonomy"].iloc[0]
    assert len(disagreements(store, batch_id, top=1)) == 1


def test_disagreements_empty_with_one_judge(store):
    batch_id = insert_batch(store, [{"model": "m/a", "replies": ["{x}"], "judgements": [verdict()]}])
    assert disagreements(store, batch_id).empty


def test_rejudged_demo_batch_agrees_with_itself(sqlite_url):
    from hermitkit.store import Store

    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/confused"], runs=2, turns=3)
    outcome = rejudge_batch(store, batch_id, "demo/judge")
    assert outcome.judged == 4
    frame = judge_agreement(store, batch_id).set_index("item")
    assert frame.attrs["coders"] == ["demo/judge", "demo/judge (round 1)"]
    # the scripted judge is deterministic, so both rounds agree on every item
    assert frame.loc["autonomy", "alpha"] == pytest.approx(1.0)
    assert disagreements(store, batch_id).empty
    store.dispose()


def test_rejudge_budget_leaves_rest_unjudged(sqlite_url):
    from hermitkit.store import Store

    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/confused"], runs=2, turns=2)

    # One request at a time, so exactly the first verdict is paid before the budget is spent.
    outcome = rejudge_batch(store, batch_id, "demo/judge", concurrency=1, budget_usd=1e-12)

    assert outcome.judged == 1
    assert outcome.cost_usd > 1e-12
    assert len(outcome.over_budget) == 3
    rounds = store.read(lambda session: session.execute(text("SELECT count(*) FROM judgements WHERE round = 1")).scalar())
    assert rounds == 1
    store.dispose()


def _verdict_counts(store) -> list[int]:  # type: ignore[no-untyped-def]
    query = text("SELECT count(*) FROM judgements WHERE judge_model = 'demo/judge' GROUP BY run_id ORDER BY run_id")
    return store.read(lambda session: list(session.execute(query).scalars()))


def test_rejudge_rounds_finish_stopped_pass(database_url):
    from hermitkit.store import Store

    store = Store(database_url)
    batch_id = run_demo_batch(store, models=["demo/steady", "demo/confused"], runs=2, turns=2)
    assert _verdict_counts(store) == [1, 1, 1, 1]

    # A second pass that stops after its first verdict, as a kill or the budget would leave it.
    stopped = rejudge_batch(store, batch_id, "demo/judge", rounds=2, concurrency=1, budget_usd=1e-12)
    assert stopped.judged == 1
    assert len(stopped.over_budget) == 3
    assert sorted(_verdict_counts(store)) == [1, 1, 1, 2]

    # The same call without the budget judges just the three runs that are left, once each.
    finished = rejudge_batch(store, batch_id, "demo/judge", rounds=2)
    assert finished.judged == 3
    assert _verdict_counts(store) == [2, 2, 2, 2]

    # Once every run has its verdicts, the call sends nothing.
    assert rejudge_batch(store, batch_id, "demo/judge", rounds=2).judged == 0

    # A run that lacks two verdicts gets both, in rounds 1 and 2.
    assert rejudge_batch(store, batch_id, "demo/judge", rounds=4).judged == 8
    rounds = store.read(lambda session: session.execute(text("SELECT DISTINCT round FROM judgements ORDER BY round")).scalars().all())
    assert rounds == [0, 1, 2, 3]
    store.dispose()


def test_rejudge_rejects_bad_rounds(sqlite_url):
    from hermitkit.errors import ConfigError
    from hermitkit.store import Store

    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)

    with pytest.raises(ConfigError, match="rounds=0 is invalid"):
        rejudge_batch(store, batch_id, "demo/judge", rounds=0)
    with pytest.raises(ConfigError, match="only_missing=True is the same as rounds=1"):
        rejudge_batch(store, batch_id, "demo/judge", only_missing=True, rounds=2)
    assert _verdict_counts(store) == [1]
    store.dispose()


def test_rejudge_rejects_bad_budget(sqlite_url):
    from hermitkit.errors import ConfigError
    from hermitkit.store import Store

    store = Store(sqlite_url)
    batch_id = run_demo_batch(store, models=["demo/steady"], runs=1, turns=2)

    with pytest.raises(ConfigError, match="budget_usd=-1.0 is invalid"):
        rejudge_batch(store, batch_id, "demo/judge", budget_usd=-1.0)
    store.dispose()
