"""Percentile bootstrap intervals of a mean, computed with numpy.

Every interval draws its resamples from a fresh ``numpy.random.default_rng(seed)``, so
it is reproducible on its own and does not depend on which intervals were computed
before it. The draw then depends only on the seed, the number of resamples and the
sample size, which lets ``bootstrap_intervals`` draw the resample indexes once per
sample size and reuse them for every sample of that size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_METHOD = "percentile bootstrap over runs"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261204
CONFIDENCE = 0.95

# Resample indexes are drawn and used in blocks of about this many, so that memory stays
# small (512 KiB of int64 indexes) however many runs a sample has.
_BLOCK_INDEXES = 1 << 16


def bootstrap_intervals(
    samples: Sequence[Sequence[float] | np.ndarray],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> list[tuple[float, float]]:
    """Compute ``bootstrap_ci`` for each sample, in the order given.

    Each result equals ``bootstrap_ci(sample, resamples=..., seed=..., confidence=...)``.
    Samples of the same size (after dropping NaN) share one draw of resample indexes.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")

    intervals: list[tuple[float, float]] = [(float("nan"), float("nan"))] * len(samples)
    cleaned: list[np.ndarray] = []
    positions_by_size: dict[int, list[int]] = {}
    for position, values in enumerate(samples):
        data = np.asarray(values, dtype=float)
        data = data[~np.isnan(data)]
        cleaned.append(data)
        if data.size == 0:
            continue
        if np.all(data == data[0]):
            intervals[position] = (float(data[0]), float(data[0]))
            continue
        positions_by_size.setdefault(data.size, []).append(position)

    tail = (1 - confidence) / 2
    for size, positions in positions_by_size.items():
        means = _resample_means([cleaned[position] for position in positions], resamples=resamples, seed=seed)
        lows, highs = np.quantile(means, [tail, 1 - tail], axis=1)
        for position, low, high in zip(positions, lows, highs, strict=True):
            intervals[position] = (float(low), float(high))
    return intervals


def _resample_means(samples: list[np.ndarray], *, resamples: int, seed: int) -> np.ndarray:
    """Return the (len(samples) x resamples) means of resamples of samples that share one size.

    The indexes are the rows of ``default_rng(seed).integers(0, size, size=(resamples,
    size))``. They are drawn a block of rows at a time from the same generator, which
    continues the same stream, so the result does not depend on the block size.
    """
    size = samples[0].size
    rng = np.random.default_rng(seed)
    means = np.empty((len(samples), resamples))
    rows = max(1, _BLOCK_INDEXES // size)
    resampled = np.empty((rows, size))
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        indexes = rng.integers(0, size, size=(stop - start, size))
        for position, data in enumerate(samples):
            # mode="clip" lets take write straight into ``out``, and changes nothing because every index is in range.
            block = np.take(data, indexes, out=resampled[: stop - start], mode="clip")
            np.mean(block, axis=1, out=means[position, start:stop])
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Draws ``resamples`` resamples of the same size with replacement from a fresh
    ``numpy.random.default_rng(seed)``, so every interval is reproducible on its own,
    and returns the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their
    means. NaN values are dropped first; no value gives (nan, nan) and one value or
    identical values give a zero-width interval at that value.
    """
    return bootstrap_intervals([values], resamples=resamples, seed=seed, confidence=confidence)[0]
