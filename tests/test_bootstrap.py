"""Bootstrap intervals, checked against the definition written out without shortcuts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from hermitkit import bootstrap
from hermitkit.bootstrap import bootstrap_ci, bootstrap_intervals


def reference_interval(values: Sequence[float], *, resamples: int, seed: int, confidence: float) -> tuple[float, float]:
    """One fresh generator per interval, one resample per row of its index matrix, one mean per resample."""
    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    indexes = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    means = np.array([data[row].mean() for row in indexes])
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def same_interval(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return all(a == b or (np.isnan(a) and np.isnan(b)) for a, b in zip(first, second, strict=True))


def mixed_samples() -> list[np.ndarray]:
    """Scores and shares of several sizes, two of them shared, with NaN, constant and empty samples."""
    rng = np.random.default_rng(42)
    with_nan = rng.random(40)
    with_nan[::4] = np.nan
    return [
        rng.integers(1, 6, size=30).astype(float),
        rng.random(30),
        with_nan,
        rng.random(1000),
        rng.integers(1, 6, size=1000).astype(float),
        np.array([0.5, 0.25]),
        np.full(12, 0.75),
        np.array([np.nan, np.nan]),
        np.array([]),
    ]


@pytest.mark.parametrize(("resamples", "seed", "confidence"), [(300, 20261204, 0.95), (257, 7, 0.8)])
def test_intervals_match_reference(resamples, seed, confidence):
    samples = mixed_samples()
    intervals = bootstrap_intervals(samples, resamples=resamples, seed=seed, confidence=confidence)
    assert len(intervals) == len(samples)
    for position, (sample, interval) in enumerate(zip(samples, intervals, strict=True)):
        expected = reference_interval(sample, resamples=resamples, seed=seed, confidence=confidence)
        assert same_interval(interval, expected), (position, interval, expected)


def test_bootstrap_ci_matches_reference():
    values = [0.13, 0.52, 0.91, 0.37, 0.74, 0.05, 0.66, 0.29, float("nan")]
    assert bootstrap_ci(values) == reference_interval(values, resamples=2000, seed=20261204, confidence=0.95)
    assert bootstrap_ci(values, resamples=99, seed=3, confidence=0.5) == reference_interval(values, resamples=99, seed=3, confidence=0.5)


def test_sample_larger_than_a_block_matches_reference():
    # More values than one block holds, so every resample is drawn in a block of its own.
    values = np.random.default_rng(1).random(bootstrap._BLOCK_INDEXES + 5)
    assert bootstrap_ci(values, resamples=12, seed=5) == reference_interval(values, resamples=12, seed=5, confidence=0.95)


@pytest.mark.parametrize("block", [1, 7, 100, 1 << 20])
def test_intervals_do_not_depend_on_block_size(monkeypatch, block):
    samples = mixed_samples()
    expected = bootstrap_intervals(samples, resamples=211, seed=9)
    monkeypatch.setattr(bootstrap, "_BLOCK_INDEXES", block)
    intervals = bootstrap_intervals(samples, resamples=211, seed=9)
    for position, (interval, wanted) in enumerate(zip(intervals, expected, strict=True)):
        assert same_interval(interval, wanted), (position, block)


def test_interval_does_not_depend_on_other_samples():
    values = np.random.default_rng(3).random(50)
    alone = bootstrap_ci(values, resamples=500)
    together = bootstrap_intervals([np.random.default_rng(4).random(50), values, values[:20]], resamples=500)
    assert together[1] == alone


def test_intervals_reject_invalid_settings():
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals([[1.0, 2.0]], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals([[1.0, 2.0]], confidence=1.0)
    assert bootstrap_intervals([]) == []
