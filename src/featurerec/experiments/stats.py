"""The statistics of an A/B report, as small pure functions on numpy arrays.

Users, not recommendations, are randomised, so every interval and test treats the user as
the unit: per-user proportions (did the user adopt?) use Wilson intervals and two-proportion
z-tests; rec-level ratios (CTR = clicks / recommendations) use the delta method on per-user
sums (a ratio of means, clustered by user); per-user means (diversity) use Welch's t; a
request-level quantile (p99 latency) uses the percentile bootstrap. Many comparisons against
control are corrected with Holm's step-down method.

Example::

    >>> lo, hi = wilson_interval(12, 100)
    >>> round(lo, 3), round(hi, 3)
    (0.07, 0.198)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a 95% interval."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    method: str
    #: Standard error (None where the interval is not normal-based).
    se: float | None = None


@dataclass(frozen=True)
class Comparison:
    """Treatment vs control on one metric."""

    metric: str
    variant: str
    control: str
    diff: float | None
    #: Relative lift (treatment / control - 1) with a 95% interval.
    lift: float | None
    lift_ci_low: float | None
    lift_ci_high: float | None
    p_value: float | None
    p_adjusted: float | None = None
    significant: bool = False
    test: str = ""


def _none() -> Estimate:
    return Estimate(None, None, None, 0, "no data")


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (scipy's implementation)."""
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def proportion(x: np.ndarray) -> Estimate:
    """Share of users with ``x == 1``, Wilson interval."""
    n = int(x.size)
    if n == 0:
        return _none()
    k = int(np.sum(x))
    lo, hi = wilson_interval(k, n)
    p = k / n
    return Estimate(p, lo, hi, n, "wilson", math.sqrt(p * (1 - p) / n))


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> Estimate:
    """``sum(num) / sum(den)`` over users with a delta-method (user-clustered) interval.

    Var(R) ~ (s_y^2 - 2 R s_xy + R^2 s_x^2) / (n * xbar^2), with per-user sums y (num) and
    x (den), sample (co)variances over users.
    """
    n = int(num.size)
    if n == 0 or float(np.sum(den)) == 0:
        return _none()
    r = float(np.sum(num) / np.sum(den))
    if n < 2:
        return Estimate(r, None, None, n, "delta")
    xbar = float(np.mean(den))
    cov = np.cov(np.vstack([num, den]).astype(np.float64), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * xbar * xbar)
    se = math.sqrt(max(var, 0.0))
    return Estimate(r, r - Z95 * se, r + Z95 * se, n, "delta (user-clustered)", se)


def mean(x: np.ndarray) -> Estimate:
    """Mean of per-user values with a t interval."""
    n = int(x.size)
    if n == 0:
        return _none()
    m = float(np.mean(x))
    if n < 2:
        return Estimate(m, None, None, n, "t")
    se = float(np.std(x, ddof=1) / math.sqrt(n))
    t = float(stats.t.ppf(0.975, n - 1))
    return Estimate(m, m - t * se, m + t * se, n, "t", se)


def quantile_bootstrap(
    x: np.ndarray, q: float, *, n_boot: int = 1000, seed: int = 0
) -> tuple[Estimate, np.ndarray]:
    """``q``-quantile with a percentile-bootstrap interval; also returns the replicates.

    A resample's ``q``-quantile is its ``r``-th order statistic (``r = ceil(q n)``), and the
    ``r``-th order statistic of ``n`` draws from the empirical distribution is
    ``sorted(x)[ceil(n U) - 1]`` with ``U ~ Beta(r, n - r + 1)``: drawing ``U`` gives the
    exact bootstrap distribution in O(n_boot) instead of resampling n values each time
    (latency logs have hundreds of thousands of requests).
    """
    n = int(x.size)
    if n == 0:
        return _none(), np.empty(0)
    value = float(np.quantile(x, q))
    rng = np.random.default_rng(seed)
    xs = np.sort(np.asarray(x, dtype=np.float64))
    r = min(max(1, math.ceil(q * n)), n)
    u = rng.beta(r, n - r + 1, size=n_boot)
    reps = xs[np.clip(np.ceil(n * u).astype(np.int64) - 1, 0, n - 1)]
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return Estimate(value, float(lo), float(hi), n, "bootstrap"), reps


def compare_normal(
    metric: str, variant: str, control: str, t: Estimate, c: Estimate, test: str
) -> Comparison:
    """Difference and relative lift from two independent normal-ish estimates.

    z = (t - c) / sqrt(se_t^2 + se_c^2); the lift interval comes from the delta method on
    log(t / c) (Var ~ se_t^2/t^2 + se_c^2/c^2), so it stays asymmetric like a ratio should.
    """
    if t.value is None or c.value is None or t.se is None or c.se is None:
        return Comparison(metric, variant, control, None, None, None, None, None, test=test)
    diff = t.value - c.value
    se = math.sqrt(t.se**2 + c.se**2)
    p = float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    lift = lo = hi = None
    if c.value > 0 and t.value > 0:
        lift = t.value / c.value - 1
        se_log = math.sqrt((t.se / t.value) ** 2 + (c.se / c.value) ** 2)
        log_r = math.log(t.value / c.value)
        lo, hi = math.exp(log_r - Z95 * se_log) - 1, math.exp(log_r + Z95 * se_log) - 1
    elif c.value > 0:
        lift = t.value / c.value - 1
    return Comparison(metric, variant, control, diff, lift, lo, hi, p, test=test)


def two_proportion_test(kt: int, nt: int, kc: int, nc: int) -> float:
    """Two-sided pooled z-test p-value (same as chi-square without continuity correction)."""
    if nt == 0 or nc == 0:
        return math.nan
    pool = (kt + kc) / (nt + nc)
    se = math.sqrt(pool * (1 - pool) * (1 / nt + 1 / nc))
    if se == 0:
        return 1.0
    z = (kt / nt - kc / nc) / se
    return float(2 * stats.norm.sf(abs(z)))


def welch_test(t: np.ndarray, c: np.ndarray) -> float:
    if t.size < 2 or c.size < 2:
        return math.nan
    if np.ptp(t) == 0 and np.ptp(c) == 0:  # no variance at all: equal means or undefined
        return 1.0 if t[0] == c[0] else math.nan
    with warnings.catch_warnings():  # near-constant samples: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(t, c, equal_var=False).pvalue)


def bootstrap_lift(
    t: np.ndarray, c: np.ndarray, q: float, *, n_boot: int = 1000, seed: int = 0
) -> tuple[float | None, float | None, float | None, float | None]:
    """Relative lift of the ``q``-quantile with a percentile-bootstrap interval and a
    two-sided bootstrap p-value (twice the smaller tail of the replicates around 0)."""
    if t.size == 0 or c.size == 0:
        return None, None, None, None
    _, rt = quantile_bootstrap(t, q, n_boot=n_boot, seed=seed)
    _, rc = quantile_bootstrap(c, q, n_boot=n_boot, seed=seed + 1)
    qc = float(np.quantile(c, q))
    if qc <= 0:
        return None, None, None, None
    lift = float(np.quantile(t, q)) / qc - 1
    reps = rt / np.where(rc > 0, rc, np.nan) - 1
    reps = reps[~np.isnan(reps)]
    lo, hi = np.quantile(reps, [0.025, 0.975])
    tail = min(float(np.mean(reps <= 0)), float(np.mean(reps >= 0)))
    p = min(1.0, 2 * tail)
    return lift, float(lo), float(hi), p


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN and is not counted)."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(idx)
    order = sorted(idx, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio mismatch: do observed users per variant match the allocations?"""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float | None
    p_value: float | None
    mismatch: bool
    threshold: float = 0.001


def srm_check(
    observed: dict[str, int], allocations: dict[str, float], *, threshold: float = 0.001
) -> SRMResult:
    """Chi-square goodness of fit of users per variant against the allocations."""
    names = list(allocations)
    obs = np.array([observed.get(v, 0) for v in names], dtype=np.float64)
    total = float(obs.sum())
    expected = {v: allocations[v] * total for v in names}
    if total == 0:
        return SRMResult(dict(observed), expected, None, None, False, threshold)
    res = stats.chisquare(obs, f_exp=np.array([expected[v] for v in names]))
    p = float(res.pvalue)
    return SRMResult(
        {v: int(observed.get(v, 0)) for v in names},
        expected,
        float(res.statistic),
        p,
        p < threshold,
        threshold,
    )
