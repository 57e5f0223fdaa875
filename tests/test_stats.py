"""Bootstrap intervals against closed forms on toy proportions.

For a 0/1 sample with k ones out of n, the bootstrap distribution of the resampled mean is
exactly Binomial(n, k/n) / n, so the exact percentile interval is that binomial's 2.5 % and
97.5 % quantiles and the bootstrap standard error is sqrt(p(1-p)/n). The Monte Carlo error of
a bootstrap quantile with B resamples is about sqrt(q(1-q)/B) / density: at n = 400, p = 0.3,
B = 10,000 that is 0.25 of a count (0.0006), so the tolerance of one count (0.0025) holds
with a wide margin and also absorbs the quantile's interpolation between counts.
"""
import math

import numpy as np
import pytest

from reasonrag_jax.eval.stats import bootstrap_ci, paired_ci

N, K, B = 400, 120, 10_000


def binomial_quantile(n, p, q):
    """Smallest count c with P(Binomial(n, p) <= c) >= q."""
    cdf = 0.0
    for c in range(n + 1):
        cdf += math.comb(n, c) * p**c * (1 - p) ** (n - c)
        if cdf >= q:
            return c
    return n


def test_bootstrap_of_a_proportion_is_the_binomial_closed_form():
    x = np.zeros(N)
    x[:K] = 1.0
    ci = bootstrap_ci(x, resamples=B, seed=3)
    p = K / N
    assert ci.mean == p
    # exact bootstrap interval: counts 102 and 138 of 400 (by the binomial sums above)
    low, high = binomial_quantile(N, p, 0.025) / N, binomial_quantile(N, p, 0.975) / N
    assert ci.low == pytest.approx(low, abs=1 / N)
    assert ci.high == pytest.approx(high, abs=1 / N)
    # the normal approximation p ± 1.96 sqrt(p(1-p)/n) = 0.3 ± 0.0449 agrees to a count too
    half = 1.96 * math.sqrt(p * (1 - p) / N)
    assert (ci.low, ci.high) == pytest.approx((p - half, p + half), abs=1 / N)
    assert bootstrap_ci(x, resamples=B, seed=3) == ci            # seeded
    assert bootstrap_ci([]).mean != bootstrap_ci([]).mean        # NaN for no questions


def test_paired_interval_is_the_bootstrap_of_the_differences():
    # Policy a answers 110 of 400, b answers 100, and b's correct answers are a subset of a's:
    # the difference per question is 1 on 10 questions and 0 elsewhere, a proportion of 0.025,
    # so its exact bootstrap interval is Binomial(400, 0.025)'s quantiles: counts 4 and 17.
    a, b = np.zeros(N), np.zeros(N)
    a[:110], b[:100] = 1.0, 1.0
    ci = paired_ci(a, b, resamples=B, seed=1)
    assert ci.mean == pytest.approx(0.025)
    assert binomial_quantile(N, 0.025, 0.025) == 4 and binomial_quantile(N, 0.025, 0.975) == 17
    assert (ci.low, ci.high) == pytest.approx((4 / N, 17 / N), abs=1 / N)
    assert ci.excludes_zero()
    # unpaired, the two intervals (0.275 ± 0.044 and 0.25 ± 0.042) overlap: pairing resolves it
    assert bootstrap_ci(a).low < bootstrap_ci(b).high
    with pytest.raises(ValueError):
        paired_ci(a, b[:-1])
