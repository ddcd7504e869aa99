"""``lmlab.stats``: the equivalence test, the paired t-test, the smallest detectable effect, Holm's adjustment and
least squares, each against scipy / numpy or a hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from lmlab.stats import equivalence, holm, min_detectable_effect, ols, ols_slope, paired_t_test


def test_equivalence_against_scipy_interval():
    d = [0.01, -0.004, 0.006, 0.002]
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=sps.sem(d))
    eq = equivalence(d, margin=0.05)
    assert eq.interval.low == pytest.approx(lo, rel=1e-6) and eq.interval.high == pytest.approx(hi, rel=1e-6)
    assert eq.inside
    assert not equivalence(d, margin=hi * 0.99).inside  # the upper end sticks out
    assert equivalence(d, margin=max(-lo, hi) * 1.001).inside


def test_equivalence_refuses_a_real_gap_difference():
    rng = np.random.default_rng(0)
    big = 0.05 + 0.002 * rng.standard_normal(5)
    small = 0.001 + 0.0005 * rng.standard_normal(5)
    assert not equivalence(big, 0.02).inside
    assert equivalence(small, 0.02).inside
    assert not equivalence([0.0], 0.02).inside  # one pair: no interval, no equivalence
    with pytest.raises(ValueError):
        equivalence(small, -1.0)


def test_paired_t_test_matches_scipy():
    a = np.array([0.81, 0.79, 0.85, 0.80, 0.83])
    b = np.array([0.78, 0.80, 0.79, 0.77, 0.80])
    t, p = paired_t_test(a - b)
    ref = sps.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-7)
    assert paired_t_test([2.0, 2.0]) == (math.inf, 0.0)
    assert paired_t_test([0.0, 0.0]) == (0.0, 1.0)
    assert all(math.isnan(v) for v in paired_t_test([1.0]))


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_min_detectable_effect_against_scipy(n):
    sd = 1.7
    ref = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert min_detectable_effect(sd, n) == pytest.approx(ref, rel=1e-8)
    assert math.isnan(min_detectable_effect(sd, 1))


def test_holm_hand_worked():
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4*0.01 = 0.04, 3*0.02 = 0.06, 2*0.03 = 0.06, 1*0.04 = 0.04 -> 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, float("nan"), 0.04])  # NaN: outside the family (m = 2)
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([]) == []


def _holm_brute(p, alpha):
    """Holm's procedure as a step-down test: reject H_(1..k) while p_(i) <= alpha / (m - i + 1)."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = set()
    for rank, i in enumerate(order):
        if p[i] <= alpha / (len(p) - rank):
            rejected.add(i)
        else:
            break
    return rejected


def test_holm_against_brute_force_step_down():
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, size=int(rng.integers(1, 7))))
        adj = holm(p)
        for alpha in (0.01, 0.025, 0.05, 0.08):
            assert {i for i, a in enumerate(adj) if a <= alpha} == _holm_brute(p, alpha)
    # every subset of a fixed family: adjusted values never below the raw ones, monotone in the raw order
    base = [0.001, 0.01, 0.02, 0.2, 0.03]
    for r in range(1, len(base) + 1):
        for sub in itertools.combinations(base, r):
            adj = holm(sub)
            assert all(a >= q for a, q in zip(adj, sub))
            pairs = sorted(zip(sub, adj))
            assert all(x[1] <= y[1] for x, y in zip(pairs, pairs[1:]))


def test_ols_against_numpy_and_textbook_covariance():
    rng = np.random.default_rng(2)
    n = 14
    arm = np.repeat([0.0, 1.0], n // 2)
    gap = rng.uniform(0.0, 0.1, n)
    y = 0.5 + 0.03 * arm - 1.2 * gap + 0.01 * rng.standard_normal(n)
    X = np.column_stack([np.ones(n), arm, gap])
    fit = ols(X, y)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    assert fit.coef == pytest.approx(list(coef), rel=1e-9, abs=1e-12)
    resid = y - X @ coef
    s2 = resid @ resid / (n - 3)
    se = np.sqrt(np.diag(s2 * np.linalg.inv(X.T @ X)))
    assert fit.se == pytest.approx(list(se), rel=1e-8)
    est, half = fit.interval(1)
    assert est == pytest.approx(coef[1]) and half == pytest.approx(sps.t.ppf(0.975, n - 3) * se[1], rel=1e-7)
    # the slope of a simple regression, as scipy's linregress
    x = rng.uniform(0, 100, 9)
    yy = 2.0 - 0.3 * x + rng.standard_normal(9)
    assert ols_slope(x, yy) == pytest.approx(sps.linregress(x, yy).slope, rel=1e-9)
    assert math.isnan(ols_slope([1.0, 1.0], [0.0, 1.0]))
    with pytest.raises(ValueError):
        ols(np.column_stack([np.ones(4), np.ones(4)]), [1.0, 2.0, 3.0, 4.0])  # rank-deficient
    exact = ols(X[[0, 1, 7]], y[[0, 1, 7]])  # no residual degrees of freedom: no interval
    assert exact.df == 0 and math.isnan(exact.interval(1)[1])
