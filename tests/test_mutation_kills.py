"""Known answers at the edges that ``make mutate`` (scripts/mutate.py) found unchecked: a margin of exactly 0,
two values, ties, a fit with one residual degree of freedom, nested inputs, the error sentences. Each expected
value comes from scipy or a hand formula, not from lmlab."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from lmlab.stats import (
    equivalence,
    expected_calibration_error,
    holm,
    mean_interval,
    ols,
    ols_slope,
    paired_difference,
    paired_t_test,
    t_interval,
)

# ----- lmlab/stats.py -----


def test_equivalence_at_a_margin_of_zero_and_at_its_edges():
    # no spread and a zero mean: the interval is the point 0, inside a margin of exactly 0
    exact = equivalence([0.0, 0.0, 0.0], 0.0)
    assert exact.inside and exact.margin == 0.0
    # a margin just wider than the interval: inside; just narrower: outside
    d = [-1.0, 1.0]
    half = sps.t.ppf(0.975, 1) * 1.4142135623730951 / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert equivalence(d, half + 1e-9).inside and not equivalence(d, half - 1e-9).inside
    assert equivalence([0.25, 0.5], 0.5).margin == 0.5
    with pytest.raises(ValueError, match=r"the equivalence margin must be >= 0, got -0.1"):
        equivalence([0.0, 0.0], -0.1)


def test_equivalence_uses_the_confidence_it_is_given():
    d = [0.1, -0.05, 0.02, 0.08]
    for confidence in (0.5, 0.9):
        iv = equivalence(d, 1.0, confidence).interval
        lo, hi = sps.t.interval(confidence, len(d) - 1, loc=np.mean(d), scale=sps.sem(d))
        assert iv.half == pytest.approx((hi - lo) / 2, rel=1e-9)


def test_two_values_make_an_interval_a_test_and_an_equivalence():
    a, b = [1.0, 2.5], [0.0, 1.0]
    ref = sps.ttest_rel(a, b)
    p = paired_difference(a, b)
    assert p.t == pytest.approx(ref.statistic, rel=1e-12) and p.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert equivalence([0.001, -0.001], 1.0).inside


def test_paired_difference_counts_ties_as_neither_above_nor_below():
    p = paired_difference([1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 4.0, 5.0])  # differences 0, 1, -1, 0
    assert (p.above, p.below) == (1, 1)
    assert p.differences == (0.0, 1.0, -1.0, 0.0)


def test_paired_difference_uses_the_confidence_it_is_given():
    a, b = [3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 7.0, 1.0, 8.0, 2.0]
    d = np.subtract(a, b)
    lo, hi = sps.t.interval(0.5, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert paired_difference(a, b, 0.5).diff.half == pytest.approx((hi - lo) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="3 values against 2: a paired difference needs one value of each per pair"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_nested_inputs_are_flattened():
    nested = [[1.0, 2.0], [4.0, 8.0]]
    flat = [1.0, 2.0, 4.0, 8.0]
    assert mean_interval(nested).n == 4 and mean_interval(nested).mean == 3.75
    assert mean_interval(nested).sd == pytest.approx(np.std(flat, ddof=1), rel=1e-12)
    p = paired_difference(nested, [[0.0, 0.0], [0.0, 0.0]])
    assert p.diff.n == 4 and p.above == 4
    t, pv = paired_t_test(nested)
    assert t == pytest.approx(sps.ttest_1samp(flat, 0).statistic, rel=1e-12)
    assert expected_calibration_error([[0.9, 0.9]], [[1, 0]], n_bins=2) == pytest.approx(0.4, abs=1e-12)
    assert ols_slope([[0.0, 1.0], [2.0, 3.0]], [[1.0, 3.0], [5.0, 7.0]]) == pytest.approx(2.0, rel=1e-12)


def test_calibration_error_of_one_prediction_and_its_errors():
    assert expected_calibration_error([0.8], [1]) == pytest.approx(0.2, abs=1e-12)  # |1 - 0.8|
    with pytest.raises(ValueError, match="n_bins must be at least 1, got 0"):
        expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(ValueError, match="2 confidences but 1 correctness values"):
        expected_calibration_error([0.5, 0.5], [1])


def test_holm_caps_adjusted_p_values_at_one():
    # m = 2: 2 * 0.6 = 1.2 -> 1; max(1, min(1, 0.7)) = 1 (Holm 1979)
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([0.01, 0.7]) == [0.02, 0.7]


def test_ols_with_one_residual_degree_of_freedom():
    x = np.array([0.0, 1.0, 2.0])
    y = np.array([0.0, 2.0, 1.0])
    fit = ols(np.column_stack([np.ones(3), x]), y)
    ref = sps.linregress(x, y)
    assert fit.df == 1
    assert fit.coef[1] == pytest.approx(ref.slope, rel=1e-12)
    assert fit.se[1] == pytest.approx(ref.stderr, rel=1e-9)
    coef, half = fit.interval(1)
    assert half == pytest.approx(sps.t.ppf(0.975, 1) * ref.stderr, rel=1e-9)
    assert math.isnan(ols(np.column_stack([np.ones(2), x[:2]]), y[:2]).interval(1)[1])  # df = 0: no interval


def test_ols_refuses_a_rank_deficient_design_and_a_mismatch():
    X = np.column_stack([np.ones(4), [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]])  # third column = 2 * second
    with pytest.raises(ValueError, match=r"the design \(4 rows, 3 columns\) is rank-deficient"):
        ols(X, np.arange(4.0))
    with pytest.raises(ValueError, match=r"X must be n x p with n = len\(y\) = 3, got shape \(4, 3\)"):
        ols(X, np.arange(3.0))


def test_slope_of_two_points_one_apart():
    assert ols_slope([0.0, 1.0], [0.0, 2.0]) == 2.0
    assert ols_slope([3.0, 4.0, 5.0], [1.0, 1.0, 1.0]) == 0.0
    assert math.isnan(ols_slope([1.0, 1.0], [0.0, 2.0]))


def test_t_interval_of_two_values():
    assert t_interval([0.0, 2.0]) == pytest.approx(sps.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2), rel=1e-9)


def test_calibration_error_has_15_bins_by_default():
    # 0.93 and 0.935 fall on either side of 14/15 = 0.9333 (apart with 15 bins, together with 16):
    # (|1 - 0.93| + |0 - 0.935|) / 2 = 0.5025 (Guo et al. 2017 use M = 15)
    assert expected_calibration_error([0.93, 0.935], [1, 0]) == pytest.approx(0.5025, abs=1e-12)


def test_ols_flattens_y_and_slope_of_nothing_is_nan():
    X = np.column_stack([np.ones(3), [0.0, 1.0, 2.0]])
    assert ols(X, [[0.0, 2.0, 1.0]]).coef == pytest.approx(ols(X, [0.0, 2.0, 1.0]).coef, rel=1e-12)
    assert ols(X, [[0.0, 2.0, 1.0]]).coef[1] == pytest.approx(0.5, rel=1e-12)  # sum(xc * y) / sum(xc^2) = 1 / 2
    assert math.isnan(ols_slope([], []))


def test_mean_interval_of_none_one_and_two_keeps_its_confidence_and_nans():
    none, one, two = mean_interval([], 0.9), mean_interval([2.5], 0.9), mean_interval([1.0, 3.0], 0.9)
    assert none.n == 0 and all(math.isnan(v) for v in (none.mean, none.sd, none.half))
    assert one.n == 1 and one.mean == 2.5 and math.isnan(one.sd) and math.isnan(one.half)
    assert (none.confidence, one.confidence, two.confidence) == (0.9, 0.9, 0.9)
    assert two.half == pytest.approx(sps.t.ppf(0.95, 1) * math.sqrt(2) / math.sqrt(2), rel=1e-9)


# ----- lmlab/report/paper.py: the verdicts -----


def _row(**kw):
    from lmlab.report.paper import Row

    return Row("claim", "data", "task", "what", "acc:x", "paper", kw.pop("sign", 1), kw.pop("extension", True), **kw)


def test_a_verdict_needs_p_below_alpha_and_a_nonzero_mean():
    from lmlab.report.paper import ALPHA, decide

    assert ALPHA == 0.05
    cases = [(dict(mean=0.1, p=0.05), "extension: inconclusive"),  # p = alpha is not below it
             (dict(mean=0.1, p=0.0499), "extension: reproduced"),
             (dict(mean=1.0, p=0.01), "extension: reproduced"),
             (dict(mean=0.0, p=0.01), "extension: inconclusive"),
             (dict(mean=-0.1, p=0.01), "extension: not reproduced"),
             (dict(mean=-0.1, p=0.01, sign=-1), "extension: reproduced"),
             (dict(mean=0.1, p=math.nan), "extension: inconclusive")]
    rows = decide([_row(**kw) for kw, _ in cases])
    assert [r.verdict for r in rows] == [want for _, want in cases]


def test_the_verdict_cell_gives_the_mde_of_an_inconclusive_row_only():
    from lmlab.report.paper import INCONCLUSIVE, REPRODUCED, _verdict_cell

    assert _verdict_cell(_row(verdict=INCONCLUSIVE, mde=0.01234, unit=" nats", n=5)) == \
        "**inconclusive** (MDE 0.012 nats)"
    assert _verdict_cell(_row(verdict="extension: inconclusive", mde=0.5, n=5)) == \
        "**extension: inconclusive** (MDE 0.5)"
    assert _verdict_cell(_row(verdict=REPRODUCED, mde=0.01, n=5)) == "**reproduced**"
    assert _verdict_cell(_row(verdict=INCONCLUSIVE, n=1)) == "**inconclusive** (1 pair)"
    assert _verdict_cell(_row(verdict=INCONCLUSIVE, n=0)) == "**inconclusive** (0 pairs)"


# ----- lmlab/data/hmm.py: the exact sequence probability -----


def test_hmm_nll_of_a_batch_that_starts_with_a_sentence_of_another_length():
    import itertools

    from lmlab.data.hmm import HMMSource
    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

    src = HMMSource(hidden_states=2, vocab_size=3, length=3, label_position=2, hmm_seed=1, train_size=10,
                    validation_size=5, test_size=5, downstream_size=5)
    x = (2, 0, 1)
    # P(x) by enumerating the hidden paths (independent of the forward pass)
    px = sum(src.initial[z[0]] * src.emission[z[0], x[0]]
             * np.prod([src.transition[z[t - 1], z[t]] * src.emission[z[t], x[t]] for t in range(1, 3)])
             for z in itertools.product(range(2), repeat=3))
    rows = [[BOS_ID, N_SPECIAL, EOS_ID], [BOS_ID, *(w + N_SPECIAL for w in x), EOS_ID]]
    nll = src.sequence_nll(rows)  # the short row's length group comes first
    assert np.isinf(nll[0]) and nll[1] == pytest.approx(-math.log(px), rel=1e-12)
    with pytest.raises(ValueError, match=f"token id {3 + N_SPECIAL} is outside this HMM's vocabulary"):
        src.sequence_nll([[BOS_ID, 3 + N_SPECIAL, EOS_ID]])  # the first id past the vocabulary
