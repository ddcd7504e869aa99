"""Statistics shared by the evaluators and the reports: Student's t quantiles and t-intervals over seeds; the
mean of a metric over seeds with its t-interval (``mean_interval``); the paired per-seed difference of two arms
with its t-interval and paired t-test (``paired_difference``); and the expected calibration error of a
classifier's confidences (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017,
arXiv 1706.04599: equal-width bins)."""

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
    """Half-width of the two-sided ``confidence`` t-interval for the mean of ``values`` (0 for one)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    return t_quantile((1 + confidence) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


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
