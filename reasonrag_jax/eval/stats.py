"""95 % bootstrap confidence intervals over questions: one policy's mean, and the paired
difference of two policies evaluated on the same questions.

Why the bootstrap: per-question EM and accuracy are 0/1, F1 lies in [0, 1] and retrievals are
small counts, so no single closed form fits all; the percentile bootstrap over questions needs
none. Why paired: two policies answer the same questions, and resampling the per-question
differences keeps that correlation (an easy question is easy for both), which makes the
interval of a difference much narrower than two separate intervals would suggest.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> Interval:
    """Mean of `values` and the percentile bootstrap interval of the mean (questions resampled
    with replacement; seeded, so a table is reproducible). NaNs for no values."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    low, high = np.quantile(x[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(low), float(high))


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95,
              resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of a − b over the same questions (in the same order) and its paired bootstrap
    interval: each resample draws questions, and both policies' scores come along."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same questions: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, level, resamples, seed)
