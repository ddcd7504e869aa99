"""Statistics shared by the evaluators and the reports: Student's t quantiles and t-intervals over seeds; the
mean of a metric over seeds with its t-interval (``mean_interval``); the paired per-seed difference of two arms
with its t-interval and paired t-test (``paired_difference``, ``paired_t_test``); the equivalence test of paired
differences within a margin (``equivalence``); the smallest effect a paired t-test detects (``min_detectable_effect``);
Holm's step-down adjustment of a family of p-values (``holm``); least squares with coefficient intervals (``ols``,
``ols_slope``); and the expected calibration error of a classifier's confidences (Guo, Pleiss, Sun & Weinberger, "On
Calibration of Modern Neural Networks", ICML 2017, arXiv 1706.04599: equal-width bins)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3, exact series)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for j in range(3, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0
    for j in range(2, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return s * total


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t with integer ``df`` >= 1, by bisection."""
    target = 2 * q - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_abs_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_interval(values, confidence: float = 0.95) -> float:
    """Half-width of the two-sided ``confidence`` t-interval for the mean of ``values``; NaN for fewer than two
    (one value gives no interval, and 0 would read as certainty)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    return t_quantile((1 + confidence) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def sample_std(values) -> float:
    """The sample standard deviation (``ddof=1``) of ``values``; NaN for fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def expected_calibration_error(confidences, correct, n_bins: int = 15) -> float:
    """The expected calibration error (Guo et al. 2017, arXiv 1706.04599, eq. 3) of predictions whose
    confidence (the probability given to the predicted class) is ``confidences`` and whose correctness is
    ``correct`` (1/0, or a fraction, e.g. 1/2 for a prediction tied between two classes).

    The predictions are put into ``n_bins`` equal-width bins B_m = ((m-1)/M, m/M] of [0, 1] (a confidence of
    0 goes into the first); ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|, with acc and conf the bin's mean
    correctness and mean confidence. NaN for no predictions."""
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"{len(conf)} confidences but {len(hit)} correctness values")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if len(conf) == 0:
        return float("nan")
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    # bin m (0-based) holds edges[m] < c <= edges[m+1]
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.abs(np.bincount(bins, weights=hit, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins))
    return float(gap.sum() / len(conf))


@dataclass(frozen=True)
class MeanInterval:
    """The mean of ``n`` values with its two-sided t-interval: ``low``/``high`` = mean -/+ ``half``, where
    ``half`` = t((1 + confidence) / 2, n - 1) * ``sd`` / sqrt(n) and ``sd`` is the sample standard deviation
    (ddof 1). ``sd``, ``half``, ``low`` and ``high`` are NaN for fewer than two values; everything is NaN for
    none."""

    n: int
    mean: float
    sd: float
    half: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def mean_interval(values, confidence: float = 0.95) -> MeanInterval:
    """The mean of ``values`` with its ``confidence`` Student-t interval (``MeanInterval``)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        return MeanInterval(0, math.nan, math.nan, math.nan, confidence)
    if len(x) == 1:
        return MeanInterval(1, float(x[0]), math.nan, math.nan, confidence)
    return MeanInterval(len(x), float(x.mean()), float(x.std(ddof=1)), t_interval(x, confidence), confidence)


@dataclass(frozen=True)
class PairedDifference:
    """Paired differences ``a_i - b_i``: their mean with its t-interval (``diff``), the paired t-test's
    statistic ``t`` = mean / (sd / sqrt(n)) and two-sided ``p`` value (n - 1 degrees of freedom; NaN for
    fewer than two pairs or no spread), and how many pairs have ``a`` above (``above``) and below
    (``below``) ``b``."""

    diff: MeanInterval
    t: float
    p: float
    above: int
    below: int
    differences: tuple[float, ...] = ()


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
    """The paired comparison of ``a`` against ``b`` (equal lengths, pair ``i`` = ``a[i]``, ``b[i]``): the same
    mean, interval, ``t`` and ``p`` as ``scipy.stats.ttest_rel(a, b)``."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{len(x)} values against {len(y)}: a paired difference needs one value of each per pair")
    d = x - y
    diff = mean_interval(d, confidence)
    t, p = math.nan, math.nan
    if diff.n >= 2 and diff.sd > 0:
        t = diff.mean / (diff.sd / math.sqrt(diff.n))
        p = max(0.0, 1.0 - _t_abs_cdf(abs(t), diff.n - 1))
    return PairedDifference(diff, t, p, int((d > 0).sum()), int((d < 0).sum()), tuple(float(v) for v in d))


# ----- equivalence, power, multiplicity, regression -----

@dataclass(frozen=True)
class Equivalence:
    """Whether the mean of ``interval`` (a ``MeanInterval`` of paired differences) is equivalent to 0 within
    ``margin``: ``inside`` when the whole interval lies within [-margin, +margin] (the two one-sided tests of
    equivalence at level (1 - confidence) / 2 each). False for fewer than two values."""

    interval: MeanInterval
    margin: float
    inside: bool


def equivalence(differences, margin: float, confidence: float = 0.95) -> Equivalence:
    """The equivalence test of ``differences`` (paired, one per seed) against 0 with ``margin`` (``Equivalence``):
    the ``confidence`` t-interval of their mean must lie inside +-``margin``."""
    if not margin >= 0:
        raise ValueError(f"the equivalence margin must be >= 0, got {margin}")
    iv = mean_interval(differences, confidence)
    inside = iv.n >= 2 and math.isfinite(iv.half) and -margin <= iv.low and iv.high <= margin
    return Equivalence(iv, float(margin), bool(inside))


def paired_t_test(differences) -> tuple[float, float]:
    """The one-sample t-test of the mean of ``differences`` against 0 (= the paired t-test of the two arms):
    ``(t, two-sided p)``, as ``scipy.stats.ttest_1samp(differences, 0)``. With no spread, p is 0 for a non-zero
    mean and 1 for a zero mean; NaN for fewer than two values."""
    x = np.asarray(differences, dtype=np.float64).reshape(-1)
    if len(x) < 2:
        return math.nan, math.nan
    test = paired_difference(x, np.zeros_like(x))
    if test.diff.sd == 0:
        return (math.copysign(math.inf, test.diff.mean), 0.0) if test.diff.mean != 0 else (0.0, 1.0)
    return test.t, test.p


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean difference a two-sided paired t-test at level ``alpha`` detects with probability
    ``power`` from ``n`` pairs whose differences spread with standard deviation ``sd``:
    (t(1 - alpha/2, n-1) + t(power, n-1)) * sd / sqrt(n). NaN for fewer than two pairs."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979) of a family of tests, in the order given: sort the m
    p-values ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting where the adjusted value is
    below alpha controls the family-wise error rate at alpha. NaN entries are not part of the family and stay
    NaN."""
    p = [float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if math.isfinite(v)]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class OLSFit:
    """Ordinary least squares y = X b + e: the coefficients ``coef``, their standard errors ``se`` (square roots
    of the diagonal of s^2 (X'X)^-1, s^2 = residual sum of squares / ``df``) and the residual degrees of freedom
    ``df`` = n - p (``se`` NaN where df is 0)."""

    coef: tuple[float, ...]
    se: tuple[float, ...]
    df: int

    def interval(self, j: int, confidence: float = 0.95) -> tuple[float, float]:
        """Coefficient ``j`` and the half-width of its two-sided ``confidence`` t-interval (NaN without df)."""
        if self.df < 1 or not math.isfinite(self.se[j]):
            return self.coef[j], math.nan
        return self.coef[j], t_quantile((1 + confidence) / 2, self.df) * self.se[j]


def ols(X, y) -> OLSFit:
    """Least squares of ``y`` (n) on the columns of ``X`` (n x p, include a column of ones for an intercept).
    Raises ValueError when X has fewer rows than columns or is rank-deficient."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"X must be n x p with n = len(y) = {len(y)}, got shape {X.shape}")
    n, k = X.shape
    if n < k or np.linalg.matrix_rank(X) < k:
        raise ValueError(f"the design ({n} rows, {k} columns) is rank-deficient: the coefficients are not identified")
    xtx_inv = np.linalg.inv(X.T @ X)
    coef = xtx_inv @ X.T @ y
    df = n - k
    if df > 0:
        s2 = float(((y - X @ coef) ** 2).sum()) / df
        se = np.sqrt(np.maximum(np.diag(xtx_inv) * s2, 0.0))
    else:
        se = np.full(k, math.nan)
    return OLSFit(tuple(float(c) for c in coef), tuple(float(s) for s in se), df)


def ols_slope(x, y) -> float:
    """The least-squares slope of ``y`` on ``x`` (with an intercept); NaN for fewer than two distinct x."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
