"""Agreement between judges that rated the same runs: Krippendorff's alpha and disagreements.

A *coder* is one judge model in one judging round, so a batch re-judged by the same
model (``hermitkit judge``) also shows how consistent that judge is with itself. A unit
is a run. Only verdicts that parsed count; a verdict that failed to parse is a missing
value, never a rating.

Alpha comes from the ``krippendorff`` package: ordinal distances for the 1-5 scores,
nominal distances for categories and booleans.
"""

from __future__ import annotations

import warnings
from typing import Any

import krippendorff
import numpy as np
import pandas as pd

from hermitkit.analysis import judgements_frame, resolve_batch_id
from hermitkit.judge import (
    EXPLORATION_STYLE_VALUES,
    MIRROR_TEST_VALUES,
    SCORE_MAX,
    SCORE_MIN,
    SELF_AWARENESS_VALUES,
)
from hermitkit.store import Store

ORDINAL_ITEMS = ("autonomy", "sophistication")
NOMINAL_ITEMS: dict[str, tuple[Any, ...]] = {
    "mirror_test": MIRROR_TEST_VALUES,
    "self_awareness": SELF_AWARENESS_VALUES,
    "exploration_style": EXPLORATION_STYLE_VALUES,
    "refusal": (False, True),
    "context_loss": (False, True),
}
RUBRIC_ITEMS = (*ORDINAL_ITEMS, *NOMINAL_ITEMS)
SCORE_DOMAIN = tuple(range(SCORE_MIN, SCORE_MAX + 1))


def coder_label(judge_model: str, round_: int) -> str:
    """Name of a coder: the judge model, with the round when it is a repeat."""
    return judge_model if round_ == 0 else f"{judge_model} (round {round_})"


def level_of(item: str) -> str:
    """``"ordinal"`` for the 1-5 scores, ``"nominal"`` for every other rubric item."""
    if item in ORDINAL_ITEMS:
        return "ordinal"
    if item in NOMINAL_ITEMS:
        return "nominal"
    raise ValueError(f"Unknown rubric item {item!r}; use one of {', '.join(RUBRIC_ITEMS)}.")


def encode(item: str, values: pd.Series) -> pd.Series:
    """Numeric codes of an item's values: scores as they are, categories by their list position."""
    if item in ORDINAL_ITEMS:
        return pd.to_numeric(values, errors="coerce").astype(float)
    codes = {value: float(position) for position, value in enumerate(NOMINAL_ITEMS[item])}
    return values.map(lambda value: codes.get(value, np.nan) if value is not None else np.nan).astype(float)


def value_domain(item: str) -> list[float]:
    if item in ORDINAL_ITEMS:
        return [float(value) for value in SCORE_DOMAIN]
    return [float(position) for position in range(len(NOMINAL_ITEMS[item]))]


def alpha(matrix: np.ndarray | list[list[float]], level: str, domain: list[float] | None = None) -> float:
    """Krippendorff's alpha of a coders x units matrix, NaN where a value is missing.

    Returns NaN, instead of raising, when alpha is undefined: no unit has two values,
    or every pairable value is the same (no expected disagreement).
    """
    data = np.asarray(matrix, dtype=float)
    pairable = (~np.isnan(data)).sum(axis=0) >= 2
    if not pairable.any():
        return float("nan")
    values = data[:, pairable]
    if np.unique(values[~np.isnan(values)]).size < 2:
        return float("nan")
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        result = krippendorff.alpha(reliability_data=data, value_domain=domain, level_of_measurement=level)  # type: ignore[arg-type]
    return float(result)


def _parsed_verdicts(store: Store, batch_id: int) -> pd.DataFrame:
    frame = judgements_frame(store, batch_id)
    frame = frame[frame["status"] == "ok"].copy()
    frame["coder"] = [coder_label(judge, int(round_)) for judge, round_ in zip(frame["judge_model"], frame["round"], strict=True)]
    return frame


def reliability_matrix(verdicts: pd.DataFrame, item: str) -> pd.DataFrame:
    """Coders (rows) x runs (columns) of an item's numeric codes, NaN where missing."""
    coded = verdicts.assign(code=encode(item, verdicts[item]))
    return coded.pivot_table(index="coder", columns="run_id", values="code", aggfunc="first")


def judge_agreement(store: Store, batch_id: int | str | None = None) -> pd.DataFrame:
    """Krippendorff's alpha per rubric item for the judges of a batch.

    Columns: ``item``, ``level`` (ordinal or nominal), ``alpha``, ``coders``,
    ``units`` (runs with values from at least two coders), ``pairable_values`` (values
    in those runs) and ``note`` (why alpha is NaN, when it is).
    """
    batch_id = resolve_batch_id(store, batch_id)
    verdicts = _parsed_verdicts(store, batch_id)
    coders = sorted(verdicts["coder"].unique()) if not verdicts.empty else []

    rows = []
    for item in RUBRIC_ITEMS:
        level = level_of(item)
        if len(coders) < 2:
            rows.append({"item": item, "level": level, "alpha": np.nan, "coders": len(coders), "units": 0, "pairable_values": 0, "note": "needs verdicts from at least two judges or rounds"})
            continue

        matrix = reliability_matrix(verdicts, item)
        counts = matrix.notna().sum(axis=0)
        paired = counts[counts >= 2]
        value = alpha(matrix.to_numpy(), level, value_domain(item))
        note = ""
        if paired.empty:
            note = "no run has parsed verdicts from two coders"
        elif np.isnan(value):
            note = "every coder gave the same value, so alpha is undefined"
        rows.append({"item": item, "level": level, "alpha": value, "coders": len(coders), "units": int(paired.size), "pairable_values": int(paired.sum()), "note": note})

    frame = pd.DataFrame(rows)
    frame.attrs.update({"batch_id": batch_id, "coders": coders, "method": "Krippendorff's alpha (krippendorff package)"})
    return frame


def _item_disagreement(verdicts: pd.DataFrame, item: str) -> pd.Series:
    """Per run: score range / 4 for ordinal items, 1 - share of the modal value for nominal ones."""
    grouped = verdicts.groupby("run_id")[item]
    if item in ORDINAL_ITEMS:
        scores = verdicts.assign(value=pd.to_numeric(verdicts[item], errors="coerce")).groupby("run_id")["value"]
        return (scores.max() - scores.min()) / (SCORE_MAX - SCORE_MIN)
    return 1.0 - grouped.agg(lambda values: values.astype(str).value_counts(normalize=True).max())


def disagreements(store: Store, batch_id: int | str | None = None, top: int = 10) -> pd.DataFrame:
    """List the runs on which the judges disagree most, most disagreement first.

    A run's ``score`` sums, over rubric items, (max - min) / 4 for the two scores and
    1 - (share of the most frequent value) for each category, so 0 means full
    agreement. Only runs with parsed verdicts from at least two coders and a score
    above 0 are listed. Each item column shows every coder's value.
    """
    batch_id = resolve_batch_id(store, batch_id)
    verdicts = _parsed_verdicts(store, batch_id)
    columns = ["run_id", "model", "repetition", "coders", "score", *RUBRIC_ITEMS]
    if verdicts.empty:
        return pd.DataFrame(columns=columns)

    coders = verdicts.groupby("run_id")["coder"].nunique()
    verdicts = verdicts[verdicts["run_id"].isin(coders[coders >= 2].index)]
    if verdicts.empty:
        return pd.DataFrame(columns=columns)

    scores = sum(_item_disagreement(verdicts, item).fillna(0.0) for item in RUBRIC_ITEMS)
    keys = verdicts.drop_duplicates("run_id").set_index("run_id")[["model", "repetition"]]
    frame = keys.assign(coders=coders.reindex(keys.index), score=scores.reindex(keys.index))
    for item in RUBRIC_ITEMS:
        shown = verdicts.assign(shown=verdicts["coder"] + "=" + verdicts[item].astype(str))
        frame[item] = shown.groupby("run_id")["shown"].agg("; ".join).reindex(keys.index)

    frame = frame[frame["score"] > 0].reset_index()
    frame = frame.sort_values(["score", "model", "run_id"], ascending=[False, True, True]).head(top)[columns].reset_index(drop=True)
    frame.attrs["batch_id"] = batch_id
    return frame
