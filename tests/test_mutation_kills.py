"""Known answers at the edges that ``make mutate`` (scripts/mutate.py) found unchecked, for each module it mutates:
the statistics (a margin of exactly 0, two values, ties, one residual degree of freedom, nested inputs, the error
sentences), the HMM and the PCFG (impossible sentences, empty rows, one-word sentences, probabilities below float64's
range), grammars (Viterbi ties and one-word trees, start children, the sampler's limits, the notices), the divergence
guard and what a resume restores, dedup's hashes, buckets and settings, and the report's verdicts. Each expected
value comes from scipy, a hand formula, an enumeration or a pure-Python reference, not from lmlab."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from lmlab.errors import UserError
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


# ----- lmlab/studies/same_loss/: the verdicts -----


def _row(**kw):
    from lmlab.studies.same_loss.statistics import Row

    return Row("claim", "data", "task", "what", "acc:x", "paper", kw.pop("sign", 1), kw.pop("extension", True), **kw)


def test_a_verdict_needs_p_below_alpha_and_a_nonzero_mean():
    from lmlab.studies.same_loss.statistics import ALPHA, decide

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
    from lmlab.studies.same_loss.render import _verdict_cell
    from lmlab.studies.same_loss.statistics import INCONCLUSIVE, REPRODUCED

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


def _hmm_with_a_word_it_never_emits():
    """A 2-state, 3-word HMM of length 3 whose word 2 has emission probability 0 in every state."""
    from lmlab.data.hmm import HMMSource

    src = HMMSource(hidden_states=2, vocab_size=3, length=3, label_position=2, hmm_seed=4, train_size=10,
                    validation_size=5, test_size=5, downstream_size=5)
    src.emission[:, 2] = 0.0
    src.emission /= src.emission.sum(axis=1, keepdims=True)
    return src


def _hmm_joint(src, x):
    """P(x, z) for every hidden path z of the sentence x (enumeration), and the paths."""
    import itertools

    paths = list(itertools.product(range(src.hidden_states), repeat=len(x)))
    joint = [src.initial[z[0]] * src.emission[z[0], x[0]]
             * np.prod([src.transition[z[t - 1], z[t]] * src.emission[z[t], x[t]] for t in range(1, len(x))])
             for z in paths]
    return np.array(joint), np.array(paths)


def test_hmm_sentences_it_cannot_emit_are_quiet_and_exact():
    """P(x) = 0: NLL inf, posteriors 0, and the single-mask conditionals where x_-t is impossible 0, all
    without numpy warnings; the other sentences and positions, an impossible word's own position included, equal
    the enumeration over hidden paths."""
    import itertools
    import warnings

    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

    src = _hmm_with_a_word_it_never_emits()
    xs = list(itertools.product(range(3), repeat=3))
    px = {x: _hmm_joint(src, x)[0].sum() for x in xs}
    assert sorted(x for x in xs if px[x] == 0) == [x for x in xs if 2 in x]
    rows = [[BOS_ID, *(w + N_SPECIAL for w in x), EOS_ID] for x in xs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nll = src.sequence_nll(rows)
        conds = src.single_mask_conditionals(rows)
        posts = [src.posterior(rows, k) for k in (1, 2, 3)]
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(nll, [-np.log(px[x]) for x in xs], rtol=1e-12)
    for i, x in enumerate(xs):
        joint, paths = _hmm_joint(src, x)
        for k in (1, 2, 3):
            want = [joint[paths[:, k - 1] == z].sum() / px[x] if px[x] else 0.0 for z in range(2)]
            np.testing.assert_allclose(posts[k - 1][i], want, rtol=1e-12, atol=1e-15)
        for t in range(3):  # at an impossible word's own position too: p(x_t | x_-t) reads the words after it
            p = np.array([px[x[:t] + (w,) + x[t + 1:]] for w in range(3)])
            want = p / p.sum() if p.sum() else p
            np.testing.assert_allclose(conds[i][t, N_SPECIAL:], want, rtol=1e-12, atol=1e-15)
            assert not conds[i][t, :N_SPECIAL].any()


def test_hmm_an_empty_row_and_a_position_outside_the_sentence():
    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

    src = _hmm_with_a_word_it_never_emits()
    rows = [[BOS_ID, EOS_ID], [BOS_ID, N_SPECIAL, N_SPECIAL + 1, N_SPECIAL, EOS_ID]]
    assert np.isinf(src.sequence_nll(rows)[0]) and np.isfinite(src.sequence_nll(rows)[1])
    conds = src.single_mask_conditionals(rows)
    assert conds[0].shape == (0, src.vocab_size) and conds[1].shape == (3, src.vocab_size)
    with pytest.raises(ValueError, match="^position 4 is outside a sentence of 3 words$"):
        src.posterior(rows[1:], 4)


# ----- lmlab/training/callbacks.py: the divergence guard and what a resumed run carries -----


class _Trainer:
    """The trainer attributes the callbacks read, and a record of the checkpoints asked for."""

    def __init__(self, step=0, max_steps=10, global_zero=True, logger=None):
        self.global_step, self.max_steps, self.is_global_zero, self.logger = step, max_steps, global_zero, logger
        self.saved = []

    def save_checkpoint(self, path):
        self.saved.append(path)


def _weights(value: float) -> torch.nn.Module:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.bias.fill_(value)
    return layer


def test_the_guard_reads_the_loss_every_few_steps_and_the_weights_at_checkpoint_steps():
    from lmlab.training.callbacks import Diverged, DivergenceGuard

    guard = DivergenceGuard(every=3, checkpoint_every=4)
    nan, one = {"loss": torch.tensor(float("nan"))}, {"loss": torch.tensor(1.0)}
    finite, broken = _weights(0.0), _weights(float("nan"))
    for step in (1, 2, 5, 7):  # neither a reading step, a checkpoint step nor the last: not read
        guard.on_train_batch_end(_Trainer(step), broken, nan, None, 0)
    for step, outputs, weights in ((3, one, broken), (6, one, broken), (9, one, broken),  # weights: not read
                                   (4, one, finite), (8, one, finite), (10, one, broken)):
        guard.on_train_batch_end(_Trainer(step), weights, outputs, None, 0)
    for step, outputs, weights, loss in ((3, nan, finite, "nan"), (6, nan, finite, "nan"), (4, nan, finite, "nan"),
                                         (4, one, broken, "1.0"), (8, {}, broken, "nan"),
                                         (10, nan, finite, "nan"), (11, nan, finite, "nan")):
        with pytest.raises(Diverged, match=rf"^training diverged at step {step} \(loss {loss}\)$") as info:
            guard.on_train_batch_end(_Trainer(step), weights, outputs, None, 0)
        assert info.value.step == step and (math.isnan(info.value.loss) if loss == "nan" else info.value.loss == 1.0)
    with pytest.raises(Diverged) as info:  # a loss handed over as a tensor, several values: their mean
        guard.on_train_batch_end(_Trainer(3), finite, torch.tensor([1.0, float("inf"), 2.0]), None, 0)
    assert info.value.loss == math.inf
    with pytest.raises(Diverged, match="loss 2.0"):
        guard.on_train_batch_end(_Trainer(4), broken, torch.tensor([1.0, 3.0]), None, 0)


def test_the_guard_without_checkpoints_or_a_step_budget_and_with_every_below_one():
    from lmlab.training.callbacks import Diverged, DivergenceGuard

    nan = {"loss": torch.tensor(float("nan"))}
    never = DivergenceGuard(every=5)  # no checkpoints: weights never read
    never.on_train_batch_end(_Trainer(4), _weights(float("nan")), {"loss": torch.tensor(1.0)}, None, 0)
    never.on_train_batch_end(_Trainer(4), _weights(0.0), nan, None, 0)
    with pytest.raises(Diverged):
        never.on_train_batch_end(_Trainer(5), _weights(0.0), nan, None, 0)
    for max_steps in (None, 0, -1):  # no step budget: every step is read
        with pytest.raises(Diverged):
            never.on_train_batch_end(_Trainer(4, max_steps=max_steps), _weights(0.0), nan, None, 0)
    with pytest.raises(Diverged):
        DivergenceGuard(every=0).on_train_batch_end(_Trainer(7, max_steps=100), _weights(0.0), nan, None, 0)
    with pytest.raises(Diverged):
        DivergenceGuard(every=-2).on_train_batch_end(_Trainer(7, max_steps=100), _weights(0.0), nan, None, 0)


def test_the_loss_window_skips_skipped_updates_and_ignores_a_state_of_another_window():
    from lmlab.training.callbacks import LOSS_WINDOW, LossWindow

    assert LOSS_WINDOW == 50 and LossWindow().window == 50 and LossWindow(window=0).window == 1
    window = LossWindow(window=3)
    for loss in (4.0, None, 2.0):
        window.on_train_batch_end(None, None, {"loss": None if loss is None else torch.tensor(loss)}, None, 0)
    window.on_train_batch_end(None, None, {}, None, 0)
    assert window.count == 2 and window.steps() == 2 and window.mean() == 3.0
    window.on_train_batch_end(None, None, torch.tensor([6.0, 8.0]), None, 0)  # a tensor: its mean
    assert window.steps() == 3 and window.mean() == pytest.approx((4.0 + 2.0 + 7.0) / 3)
    state = window.state_dict()
    assert state["count"] == 3 and state["losses"].tolist() == [4.0, 2.0, 7.0]
    other = LossWindow(window=4)
    other.load_state_dict(state)  # another window's ring: not taken
    assert other.count == 0 and math.isnan(other.mean())
    again = LossWindow(window=3)
    again.load_state_dict({"losses": torch.tensor([1.0, 2.0, 3.0])})  # no count: none seen
    assert again.count == 0 and again.steps() == 0
    again.load_state_dict(state)
    state["losses"][0] = 100.0  # the loaded ring is a copy
    again.on_train_batch_end(None, None, {"loss": torch.tensor(1.0)}, None, 0)
    assert again.count == 4 and again.mean() == pytest.approx((2.0 + 7.0 + 1.0) / 3)
    again.load_state_dict({})
    assert again.count == 4


def test_a_termination_signal_saves_the_resumable_checkpoint_and_nothing_else_does():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lmlab.training.callbacks import SaveOnTerm

    trainer, save = _Trainer(5), SaveOnTerm("runs/x/last.ckpt")
    save.on_exception(trainer, None, RuntimeError("boom"))
    assert trainer.saved == []
    save.on_exception(trainer, None, SIGTERMException())
    assert trainer.saved == ["runs/x/last.ckpt"]


def test_evaluations_along_run_once_a_step_on_rank_zero_and_their_history_survives_a_resume():
    from lmlab.training.callbacks import EvaluateEvery

    class Logger:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((metrics, step))

    module = torch.nn.Module()
    module.model = torch.nn.Linear(2, 2)
    seen = []

    def evaluate(m):
        seen.append(m.model.training)
        m.model.eval()
        return {"acc": 0.5 + len(seen)}

    along, logger = EvaluateEvery(evaluate, every=2), Logger()
    along.on_train_start(_Trainer(0, logger=logger), module)
    along.on_train_batch_end(_Trainer(1, logger=logger), module, None, None, 0)  # not a multiple of 2
    along.on_train_batch_end(_Trainer(2, logger=logger), module, None, None, 0)
    along.on_train_batch_end(_Trainer(2, logger=logger), module, None, None, 0)  # step 2 again: not rerun
    along.on_train_batch_end(_Trainer(4, global_zero=False), module, None, None, 0)  # another rank
    assert along.history == [{"step": 0, "acc": 1.5}, {"step": 2, "acc": 2.5}]
    assert logger.logged == [({"along/acc": 1.5}, 0), ({"along/acc": 2.5}, 2)]
    assert seen == [True, True] and module.model.training  # the model's mode is given back
    resumed = EvaluateEvery(evaluate, every=2)
    resumed.load_state_dict(along.state_dict())
    resumed.on_train_start(_Trainer(2), module)  # resumed at step 2: already evaluated there
    resumed.on_train_start(_Trainer(3), module)  # resumed between evaluations: nothing
    assert resumed.history == along.history and len(seen) == 2
    resumed.on_train_batch_end(_Trainer(4), module, None, None, 0)  # no logger
    assert [h["step"] for h in resumed.history] == [0, 2, 4] and along.history[-1]["step"] == 2
    assert resumed.state_dict() == {"history": resumed.history}
    empty = EvaluateEvery(evaluate, every=2)
    empty.load_state_dict({})
    assert empty.history == []
    module.model.eval()
    empty.on_train_start(_Trainer(0), module)
    assert seen[-1] is False and not module.model.training


def test_which_runs_count_at_the_edges_of_the_tolerance_and_the_plateau():
    from lmlab.studies.same_loss.runs import GAP, Settings, exclusion, read_schedule

    s = Settings(tolerance=0.5, plateau=0.25)
    assert exclusion("failed", {GAP: 0.1}, [], s) == "status failed"
    for metrics in ({}, {GAP: math.nan}, {GAP: True}, {GAP: "0.1"}):
        assert exclusion("done", metrics, [], s) == f"no {GAP}"
    assert exclusion("done", {GAP: 0.5}, [], s) == ""  # at the tolerance: counts
    assert exclusion("done", {GAP: 0.5000001}, [], s) == "gap 0.5 > tolerance 0.5"
    assert exclusion("done", {GAP: 0.75}, [], Settings(tolerance=0.625)) == "gap 0.75 > tolerance 0.625"

    def hist(*gaps):
        return [{"step": i} if g is None else {"step": i, GAP: g} for i, g in enumerate(gaps)]

    flat = read_schedule({"schedule": {"_target_": "lmlab.schedule.constant"}, "max_steps": 10})
    assert exclusion("done", {GAP: 0.25}, hist(0.5, 0.25), s, schedule=flat) == ""  # changed by exactly the plateau
    assert exclusion("done", {GAP: 0.25}, hist(0.25, 0.5), s, schedule=flat) == ""
    moved = "not converged: gap changed by 0.375 between its last two evaluations (plateau 0.25)"
    assert exclusion("done", {GAP: 0.125}, hist(0.5, 0.125), s) == moved
    assert exclusion("done", {GAP: 0.5}, hist(0.125, 0.5), s) == moved  # by its size, either way
    assert exclusion("done", {GAP: 0.125}, hist(0.5, math.nan, None, 0.125), s) == moved  # the last two finite
    assert exclusion("done", {GAP: 0.125}, hist(0.125, 0.5, 0.125), s) == moved
    assert exclusion("done", {GAP: 0.125}, hist(0.5, 0.125), s, plateau=False) == ""
    assert exclusion("done", {GAP: 0.125}, hist(None, 0.125), s) == ""  # one finite gap: nothing to compare


def _paper_run(tmp_path, claim="continue", status="done", history=2, parent=None):
    from lmlab.studies.same_loss.runs import GAP, Run

    return Run(tmp_path / "run", status, claim, "pcfg", 0, metrics={GAP: 0.1},
               history=[{"step": i, GAP: 0.1 + 0.2 * (i % 2)} for i in range(history)], parent=parent)


def _parent(tmp_path, name, results, done=False):
    parent = tmp_path / name
    parent.mkdir()
    if results is not None:
        (parent / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    if done:
        (parent / "DONE").write_text("now\n")
    return parent


def test_a_phase_2_run_counts_with_two_evaluations_and_a_parent_that_counts(tmp_path):
    from lmlab.studies.same_loss.runs import GAP, Settings, run_exclusion

    s = Settings(tolerance=0.5, plateau=0.01)
    good = {"status": "done", "metrics": {GAP: 0.1}, "history": [{"step": 1, GAP: 0.1}, {"step": 2, GAP: 0.1}],
            "config": {"schedule": {"_target_": "lmlab.schedule.constant"}, "max_steps": 10}}
    done = _parent(tmp_path, "done", good)  # status done in results.json, no DONE marker
    marked = _parent(tmp_path, "marked", {**good, "status": "interrupted"}, done=True)  # DONE marker wins
    stopped = _parent(tmp_path, "stopped", {**good, "status": "interrupted"})
    far = _parent(tmp_path, "far", {**good, "metrics": {GAP: 0.75}}, done=True)
    moving = _parent(tmp_path, "moving", {**good, "history": [{"step": 1, GAP: 0.3}, {"step": 2, GAP: 0.1}]})
    empty = _parent(tmp_path, "empty", {"status": "done", "metrics": None, "history": None})
    broken = _parent(tmp_path, "broken", "{not json")
    missing = _parent(tmp_path, "missing", None)
    assert run_exclusion(_paper_run(tmp_path, parent=done), s) == ""  # its own wobbling history: not held to it
    assert run_exclusion(_paper_run(tmp_path, parent=marked), s) == ""
    assert run_exclusion(_paper_run(tmp_path, parent=stopped), s) == "parent does not count: status interrupted"
    assert run_exclusion(_paper_run(tmp_path, parent=far), s) == "parent does not count: gap 0.75 > tolerance 0.5"
    assert run_exclusion(_paper_run(tmp_path, parent=moving), s).startswith(
        "parent does not count: not converged: gap changed by 0.2 ")
    assert run_exclusion(_paper_run(tmp_path, parent=empty), s) == f"parent does not count: no {GAP}"
    assert run_exclusion(_paper_run(tmp_path, parent=broken), s) == f"parent {broken} not readable (JSONDecodeError)"
    assert run_exclusion(_paper_run(tmp_path, parent=missing), s) == \
        f"parent {missing} not readable (FileNotFoundError)"
    assert run_exclusion(_paper_run(tmp_path), s) == "no cfg.init_from.run: not a phase-2 run"
    assert run_exclusion(_paper_run(tmp_path, history=1, parent=done), s) == "fewer than 2 evaluations in its history"
    assert run_exclusion(_paper_run(tmp_path, status="diverged", parent=done), s) == "status diverged"
    # a run of another claim is held to the plateau rule and needs no parent
    assert run_exclusion(_paper_run(tmp_path, claim="size", history=2), s).startswith("not converged")
    assert run_exclusion(_paper_run(tmp_path, claim="size", history=1), s) == ""


# ----- lmlab/selection/dedup.py: the hashes, as documented, from a pure-Python reference -----

_M64 = (1 << 64) - 1


def _splitmix64_ref(x: int) -> int:
    """SplitMix64's output for the state x (Steele, Lea & Flood 2014; Vigna's splitmix64.c)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _shingles_ref(words: list[int], ngram: int) -> list[int]:
    n = min(ngram, len(words))
    out = set()
    for i in range(len(words) - n + 1):
        h = 0
        for w in words[i:i + n]:
            h = _splitmix64_ref((h * 1_000_003 + w) & _M64)
        out.add(h & 0xFFFFFFFF)
    return sorted(out)


def test_dedup_hashes_follow_the_documented_formulas():
    from lmlab.selection.dedup import (
        MAX_HASH,
        MERSENNE,
        _splitmix64,
        band_keys,
        minhash_signatures,
        permutations,
        shingle_hashes,
    )
    from lmlab.vocab import BOS_ID, EOS_ID

    assert _splitmix64_ref(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from seed 0, as published
    xs = [0, 1, 12345, (1 << 63) + 7, _M64]
    state = np.array(xs, dtype=np.uint64)
    assert _splitmix64(state).tolist() == [_splitmix64_ref(x) for x in xs]
    assert state.tolist() == xs  # its argument is left as it was
    assert int(MERSENNE) == (1 << 61) - 1 and int(MAX_HASH) == (1 << 32) - 1
    rows = [[BOS_ID, 5, 6, 7, 6, 5, 6, 7, EOS_ID], [9, 8], [BOS_ID, EOS_ID], [5, 6, 7], [BOS_ID, 4, 3, 4, EOS_ID]]
    shingles = [shingle_hashes(r, 3) for r in rows]
    for row, got in zip(rows, shingles):
        words = [w for w in row if w >= 4]
        assert got.tolist() == (_shingles_ref(words, 3) if words else []) and got.dtype == np.uint64
    a, b = permutations(6, seed=3)
    assert (a >= 1).all() and (a < MERSENNE).all() and (b < MERSENNE).all() and len(set(a.tolist())) == 6
    assert (permutations(6, seed=3)[0] == a).all() and not (permutations(6, seed=4)[0] == a).all()
    for chunk in (1, 3, 1 << 16):  # rows grouped by their number of shingles: the same signatures
        sig = minhash_signatures(shingles, 6, seed=3, chunk=chunk)
        for i, s in enumerate(shingles):
            want = [min(((int(ai) * int(x) + int(bi)) & _M64) % ((1 << 61) - 1) & 0xFFFFFFFF for x in s.tolist())
                    if len(s) else (1 << 32) - 1 for ai, bi in zip(a.tolist(), b.tolist())]
            assert sig[i].tolist() == want
    assert minhash_signatures([np.zeros(0, dtype=np.uint64)] * 2, 4).tolist() == [[(1 << 32) - 1] * 4] * 2
    assert minhash_signatures([], 4).shape == (0, 4)
    keys = band_keys(sig, bands=2, r=3)
    assert keys.shape == (2, len(rows)) and keys.flags["C_CONTIGUOUS"]
    for band in range(2):
        for i in range(len(rows)):
            k = 0
            for v in sig[i, band * 3:band * 3 + 3].tolist():
                k = _splitmix64_ref((k * 1_000_003 + v) & _M64)
            assert int(keys[band, i]) == k


def test_lsh_buckets_give_all_pairs_of_small_buckets_and_the_first_row_pairs_of_large_ones():
    from lmlab.selection.dedup import SMALL_BUCKET, bucket_pairs

    assert SMALL_BUCKET == 32
    rows = np.array([2, 5, 7, 9, 11])
    keys = np.array([4, 1, 4, 3, 4], dtype=np.uint64)  # one bucket of three rows, two alone
    assert sorted(map(tuple, bucket_pairs(rows, keys).tolist())) == [(2, 7), (2, 11), (7, 11)]
    assert bucket_pairs(rows, np.arange(5, dtype=np.uint64)).shape == (0, 2)
    for size in (SMALL_BUCKET, SMALL_BUCKET + 1):
        rows = np.arange(10, 10 + size)
        pairs = sorted(map(tuple, bucket_pairs(rows, np.full(size, 7, dtype=np.uint64)).tolist()))
        if size == SMALL_BUCKET:
            assert len(pairs) == size * (size - 1) // 2 and pairs[-1] == (10 + size - 2, 10 + size - 1)
        else:
            assert pairs == [(10, 10 + j) for j in range(1, size)]


# ----- lmlab/data/pcfg.py: every sentence up to 5 words, possible or not, against the enumeration -----


@pytest.fixture(scope="module")
def tiny_pcfg(tmp_path_factory):
    from lmlab.data.pcfg import PCFGSource
    from tests.test_pcfg import TINY, TINY_RULES, brute_force, write_rules

    path = write_rules(tmp_path_factory.mktemp("g") / "tiny.txt", TINY_RULES)
    return PCFGSource(grammar=str(path), **TINY), brute_force(TINY_RULES)


def test_pcfg_optima_and_labels_of_impossible_sentences_too(tiny_pcfg):
    import itertools

    from lmlab.vocab import N_SPECIAL
    from tests.test_pcfg import _check_label, to_row

    src, inside = tiny_pcfg
    g, p = src.grammar, inside["S"]
    xs = [s for n in range(1, 6) for s in itertools.product(g.words, repeat=n)]
    assert 0 < sum(s in p for s in xs) < len(xs)  # possible and impossible ones
    rows = [to_row(src, s) for s in xs]
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(src.sequence_nll(rows), [-np.log(p.get(s, 0.0)) for s in xs], rtol=1e-10)
    for s, cond in zip(xs, src.single_mask_conditionals(rows)):
        assert not cond[:, :N_SPECIAL].any()
        for t in range(len(s)):
            joint = np.array([p.get(s[:t] + (w,) + s[t + 1:], 0.0) for w in g.words])
            want = joint / joint.sum() if joint.sum() else joint
            np.testing.assert_allclose(cond[t, N_SPECIAL:], want, rtol=1e-9, atol=1e-12)
    labels = src.labels([np.array([g.words.index(w) for w in s]) for s in xs])
    assert (labels["task_a"] == -1).sum() > (np.array([len(s) for s in xs]) <= 4).sum()  # impossible ones: -1
    for j, s in enumerate(xs):
        if len(s) <= 4:
            assert [labels[t][j] for t in ("task_a", "task_b", "task_c")] == [-1, -1, -1]
            continue
        _check_label(labels["task_a"][j], [inside[g.nonterminals[c]].get(s, 0.0) for c in g.start_children])
        _check_label(labels["task_b"][j], [inside[nt].get(s[:4], 0.0) for nt in g.nonterminals])
        _check_label(labels["task_c"][j], [inside[nt].get(s[:2], 0.0) for nt in g.nonterminals])


def test_pcfg_rows_without_words_and_with_a_word_outside_the_grammar(tiny_pcfg):
    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

    src, _ = tiny_pcfg
    assert np.isinf(src.sequence_nll([[BOS_ID, EOS_ID]])[0])
    (cond,) = src.single_mask_conditionals([[BOS_ID, EOS_ID]])
    assert cond.shape == (0, src.vocab_size)
    outside = N_SPECIAL + src.grammar.n_words
    with pytest.raises(ValueError, match=rf"^token id {outside} is outside the vocabulary \({src.vocab_size}\)$"):
        src.sequence_nll([[BOS_ID, N_SPECIAL, outside, EOS_ID]])
    src.sequence_nll([[BOS_ID, N_SPECIAL, outside - 1, EOS_ID]])  # the last word of the grammar


def test_a_row_from_hand_made_pairs_against_scipy():
    from lmlab.studies.same_loss.runs import Settings
    from lmlab.studies.same_loss.statistics import CONFOUNDED, INCONCLUSIVE, MISSING, Pair, make_row

    def pair(seed, a, b, ga=0.1, gb=0.1):
        return Pair(seed, [a], [ga], [b], [gb])

    s = Settings(margin=0.02)
    a, b = [0.9, 0.8, 0.85, 0.95], [0.8, 0.78, 0.7, 0.9]
    pairs = [pair(k, a[k], b[k], 0.1 + 0.001 * k, 0.1 - 0.001 * k) for k in range(4)]
    pairs.append(pair(9, math.nan, 0.5))  # a missing metric: the seed is left out
    row = make_row("algorithm", "pcfg x", "pcfg", "task_a", "task A", "what", "acc_adv:a-b", +1, pairs, s,
                   unit=" pts", scale=100.0, note="hand")
    d = 100 * (np.array(a) - np.array(b))
    gd = np.array([0.002 * k for k in range(4)])
    assert row.paper == "+6.8 pts (Table 1, task A: 89.9% vs 83.1%)" and not row.extension
    assert (row.n, row.seeds, row.unit, row.note) == (4, [0, 1, 2, 3], " pts", "hand")
    assert row.mean == pytest.approx(d.mean()) and row.sd == pytest.approx(d.std(ddof=1))
    assert row.ci == pytest.approx(sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2)
    assert row.p == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    assert row.mde == pytest.approx((sps.t.ppf(0.975, 3) + sps.t.ppf(0.8, 3)) * d.std(ddof=1) / 2)
    assert row.gap_diff == pytest.approx(gd.mean()) and row.gap_ci == pytest.approx(
        sps.t.ppf(0.975, 3) * gd.std(ddof=1) / 2)
    assert row.matched and row.verdict == "" and math.isnan(row.adjusted)
    # gap differences past the margin: loss-confounded, with the intercept of the per-seed differences on the
    # per-seed gap differences
    wide = [pair(k, a[k], b[k], 0.1 + 0.01 * k, 0.1 - 0.01 * k) for k in range(4)]
    row = make_row("size", "pcfg x", "pcfg", "task_b", "task B", "what", "acc:x", +1, wide, s)
    fit = sps.linregress([0.02 * k for k in range(4)], np.array(a) - np.array(b))
    assert not row.matched and row.verdict == CONFOUNDED and row.adjusted == pytest.approx(fit.intercept)
    assert row.adjusted_ci == pytest.approx(sps.t.ppf(0.975, 2) * fit.intercept_stderr)
    assert row.paper.startswith("+6.9 pts at equal loss") and row.unit == ""
    trace = make_row("size", "pcfg x", "pcfg", "task_b", "- (pre-training loss)", "what", "blocks:x", -1, pairs, s)
    assert trace.paper == "-7.2 (Tr(H) 19.8 -> 12.6)" and not trace.extension  # trace rows: no task in the key
    two = make_row("size", "pcfg x", "pcfg", "task_b", "task B", "what", "acc:x", +1, pairs[:2], s)
    assert two.n == 2 and two.note == "" and two.p == pytest.approx(sps.ttest_1samp(d[:2], 0).pvalue)
    # not claimed by the paper: an extension
    row = make_row("size", "pcfg x", "pcfg", "task_c", "task C", "what", "acc:x", +1, pairs[:2], s, extension=False)
    assert row.extension and row.paper == "not claimed (extension)"
    one = make_row("size", "d", "pcfg", "task_b", "B", "w", "acc:x", +1, [pair(3, 0.5, 0.25, 0.1, 0.05)], s, note="n")
    assert (one.verdict, one.note, one.n, one.gap_diff, one.mean) == (INCONCLUSIVE, "n; 1 pair, need 2", 1, 0.05, 0.25)
    assert math.isnan(one.p) and math.isnan(one.mde)
    none = make_row("size", "d", "pcfg", "task_b", "B", "w", "acc:x", +1, [], s)
    assert (none.verdict, none.note, none.n) == (INCONCLUSIVE, "no counted pair", 0)
    gone = make_row("size", "d", "pcfg", "task_b", "B", "w", "acc:x", +1, [pair(1, 0.5, math.nan)], s, note="n")
    assert (gone.verdict, gone.note, gone.seeds) == (MISSING, "n; a metric is missing", [])


def test_the_loss_window_follows_the_device_of_the_loss():
    """The meta device stands in for an accelerator: the ring moves to the loss's device (a copy across devices
    per step would fail there, as it would cost a host sync on a GPU)."""
    from lmlab.training.callbacks import LossWindow

    window = LossWindow(window=3)
    window.on_train_batch_end(None, None, {"loss": torch.tensor(2.0, device="meta")}, None, 0)
    assert window.losses.device.type == "meta" and window.count == 1
    window.on_train_batch_end(None, None, {"loss": torch.tensor(3.0, device="meta")}, None, 0)
    assert window.losses.device.type == "meta" and window.count == 2


def test_evaluations_along_resumed_at_a_later_multiple_evaluate_at_the_start():
    from lmlab.training.callbacks import EvaluateEvery

    module = torch.nn.Module()
    module.model = torch.nn.Linear(2, 2)
    along = EvaluateEvery(lambda m: {"acc": 1.0}, every=2)
    along.load_state_dict({"history": [{"step": 0, "acc": 0.5}, {"step": 2, "acc": 0.75}]})
    along.on_train_start(_Trainer(4), module)
    assert [h["step"] for h in along.history] == [0, 2, 4]


# ----- lmlab/data/grammar.py -----


def test_sampling_a_grammar_whose_derivations_never_end_is_refused(tmp_path):
    from lmlab.data.grammar import parse_grammar
    from lmlab.errors import UserError

    path = tmp_path / "cycle.txt"
    path.write_text("S A 1.0\nA S 0.5\nA B 0.5\nB A 1.0\n")  # unary rules only: no word is ever reached
    with pytest.raises(UserError, match=r"^The grammar's derivations do not terminate; give every recursion a way"):
        parse_grammar(path).sample(2, np.random.default_rng(0))
    assert parse_grammar(path).sample(0, np.random.default_rng(0)) == []


def test_holm_runs_over_the_claimed_rows_with_matched_loss_only():
    from lmlab.studies.same_loss.statistics import (
        CONFOUNDED,
        INCONCLUSIVE,
        NOT_REPRODUCED,
        REPRODUCED,
        base_verdict,
        decide,
    )

    rows = decide([_row(mean=0.1, p=0.02, extension=False), _row(mean=-0.1, p=0.024, extension=False),
                   _row(mean=0.1, p=0.03, extension=False, verdict=CONFOUNDED),  # not in the family
                   _row(mean=0.1, p=math.nan, extension=False), _row(mean=0.1, p=0.03),
                   _row(mean=0.1, p=0.03, verdict=CONFOUNDED), _row(mean=-0.1, p=0.01, sign=-1, extension=False)])
    # the family 0.01, 0.02, 0.024: Holm 0.03, 0.04, 0.04 (with the confounded 0.03 in it, 0.02 would be 0.06)
    assert [r.p_holm for r in rows[:2]] == pytest.approx([0.04, 0.04]) and rows[-1].p_holm == pytest.approx(0.03)
    assert all(math.isnan(r.p_holm) for r in rows[2:6])
    assert [r.verdict for r in rows] == [REPRODUCED, NOT_REPRODUCED, CONFOUNDED, INCONCLUSIVE,
                                         "extension: reproduced", "extension: loss-confounded", REPRODUCED]
    assert [base_verdict(r.verdict) for r in rows[4:6]] == [REPRODUCED, CONFOUNDED]
    assert base_verdict("reproduced") == REPRODUCED and base_verdict("extension:x") == "extension:x"


def _dedup_pool(rows):
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})
    return Dataset.from_dict({"input_ids": rows, "label": list(range(len(rows)))}, features=features)


def test_dedup_confirms_every_pair_of_a_batch_after_one_already_joined():
    from lmlab.selection.dedup import _confirm

    same, near = [1, *range(10, 30), 2], [1, *range(10, 29), 99, 2]  # 3-shingles: Jaccard 17 / 19 (0.89)
    pool = _dedup_pool([same, list(same), list(same), near])
    parent, rejected = np.arange(4), set()
    # (1, 2) is joined by the time it is reached (both under 0); the pair after it still counts
    _confirm(pool, np.array([[0, 1], [0, 2], [1, 2], [2, 3]]), parent, rejected, 0.85, 3)
    assert parent.tolist() == [0, 0, 0, 0] and rejected == set()
    parent = np.arange(4)
    _confirm(pool, np.array([[0, 3], [1, 3]]), parent, rejected, 0.95, 3)
    assert parent.tolist() == [0, 1, 2, 3] and rejected == {(0, 3), (1, 3)}


def test_the_dedup_selector_passes_on_each_of_its_settings():
    from lmlab.selection.dedup import Dedup, duplicates

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(30):  # 30 pairs at 3-shingle Jaccard 7 / 13, one substitution apart, and 3 exact copies
        row = rng.integers(10, 5000, 12).tolist()
        other = list(row)
        other[6] = int(rng.integers(5000, 6000))
        rows += [[1, *row, 2], [1, *other, 2]]
    rows += [list(rows[0]), list(rows[3]), list(rows[3])]
    pool = _dedup_pool(rows)
    found = {}
    for seed in (1, 2):  # with 16 permutations which pairs become candidates depends on the seed
        kw = dict(threshold=0.5, num_perm=16, recall_weight=0.5, seed=seed)
        exact, near = duplicates(pool, **kw)
        report = Dedup(**kw).select(pool, None, None).report
        assert report == {"pool_rows": 63, "kept_rows": 63 - 3 - int(near.sum()), "removed_exact": 3,
                          "removed_near": int(near.sum())} and exact.sum() == 3
        found[seed] = int(near.sum())
    assert found[1] != found[2]
    only_exact = Dedup(near=False, threshold=0.5, num_perm=16, recall_weight=0.5, seed=1).select(pool, None, None)
    assert only_exact.report == {"pool_rows": 63, "kept_rows": 60, "removed_exact": 3, "removed_near": 0}
    only_near = Dedup(exact=False, threshold=0.9).select(pool, None, None)  # the copies: Jaccard 1
    assert only_near.report == {"pool_rows": 63, "kept_rows": 60, "removed_exact": 0, "removed_near": 3}
    assert only_near.scores.dtype == np.float64 and only_near.scores.tolist() == [1.0] * 60 + [0.0] * 3


def _dedup_reference(rows, threshold, ngram=3):
    """The masks of dedup.py's docstring from sets of word tuples, every pair compared: exact copies of an earlier
    row (specials included), then each remaining row with words that is not the first of its cluster of pairs of
    Jaccard >= threshold (a row of fewer than ``ngram`` words is one shingle)."""
    from lmlab.vocab import N_SPECIAL

    exact = [row in rows[:i] for i, row in enumerate(rows)]
    sets = []
    for row in rows:
        words = [w for w in row if w >= N_SPECIAL]
        n = min(ngram, len(words))
        sets.append({tuple(words[i:i + n]) for i in range(len(words) - n + 1)} if words else set())
    root = list(range(len(rows)))

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    alive = [i for i in range(len(rows)) if not exact[i] and sets[i]]
    for k, i in enumerate(alive):
        for j in alive[k + 1:]:
            if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
                a, b = find(i), find(j)
                root[max(a, b)] = min(a, b)
    return exact, [find(i) != i for i in range(len(rows))]


def _small_dedup_pool():
    """61 rows in shuffled order: random rows of 40 words (38 3-shingles); copies with a substitution at the edge, in
    the middle, two and four apart (Jaccard 37/39, 35/41, 32/44 and 26/50 to their source); copies of copies (a
    chain); exact copies; short rows (fewer words than ngram, two again with other specials); rows without words;
    and 34 rows with one shingle set that differ only in their specials (one LSH bucket larger than SMALL_BUCKET in
    every band)."""
    from lmlab.vocab import BOS_ID, EOS_ID

    rng = np.random.default_rng(5)
    rows = [[BOS_ID, *rng.integers(10, 3000, 40).tolist(), EOS_ID] for _ in range(12)]

    def edit(row, positions):
        row = list(row)
        for p in positions:
            row[p] = int(rng.integers(3000, 4000))
        return row

    rows += [edit(rows[0], [1]), edit(rows[1], [20]), edit(rows[2], [20])]
    rows.append(edit(rows[13], [33]))  # a chain 1 <- 13 <- 15 <- 16
    rows.append(edit(rows[15], [8]))
    rows += [edit(rows[3], [10, 30]), edit(rows[4], [5, 15, 25, 35])]
    rows += [list(rows[i]) for i in (5, 13, 13)]
    rows += [[BOS_ID, 7, 8, EOS_ID], [7, 8], [BOS_ID, 7, 8], [BOS_ID, EOS_ID], [BOS_ID, EOS_ID, EOS_ID]]
    rows += [[BOS_ID, 70, 71, 72, 73, *[EOS_ID] * (k + 1)] for k in range(34)]
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 1.0])
def test_dedup_equals_a_pure_python_all_pairs_reference_in_chunks(monkeypatch, threshold):
    from lmlab.selection import base, dedup

    rows = _small_dedup_pool()
    want_exact, want_near = _dedup_reference(rows, threshold)
    assert sum(want_exact) == 3 and sum(want_near) == {0.5: 42, 0.7: 41, 0.8: 40, 1.0: 35}[threshold]
    monkeypatch.setattr(base, "CHUNK_ROWS", 9)  # 9 chunks, and pairs confirmed 5 at a time
    monkeypatch.setattr(dedup, "PAIR_BATCH", 5)
    exact, near = dedup.duplicates(_dedup_pool(rows), threshold=threshold)
    assert exact.tolist() == want_exact and near.tolist() == want_near
    # 6 permutations: LSH misses pairs (and here joins clusters whose rows end two links from their first row),
    # yet every pair it confirms is exact, so no row is removed that the all-pairs answer keeps
    _, few = dedup.duplicates(_dedup_pool(rows), threshold=threshold, num_perm=6, seed=2, recall_weight=0.9)
    assert 0 < few.sum() and set(np.flatnonzero(few)) <= set(np.flatnonzero(want_near))


def test_jaccard_of_empty_sets_and_minhash_of_one_row_with_shingles():
    from lmlab.selection.dedup import MAX_HASH, jaccard, minhash_signatures, permutations

    one, empty = np.array([5], dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    assert jaccard(empty, empty) == 1.0  # two rows without words: the same (empty) shingle set
    assert jaccard(one, empty) == 0.0 and jaccard(empty, one) == 0.0 and jaccard(one, one) == 1.0
    assert jaccard(np.array([1, 2], dtype=np.uint64), empty) == 0.0
    sig = minhash_signatures([empty, one, empty], 3, seed=2)  # exactly one row with shingles
    a, b = permutations(3, seed=2)
    want = [((int(ai) * 5 + int(bi)) & _M64) % ((1 << 61) - 1) & 0xFFFFFFFF for ai, bi in zip(a.tolist(), b.tolist())]
    assert sig.dtype == np.uint64 and sig[1].tolist() == want and (sig[[0, 2]] == MAX_HASH).all()


def test_the_hash_coefficients_are_numpys_draws_for_the_seed_as_datasketch_draws_them():
    """a_i from [1, p) and then b_i from [0, p), p = 2^61 - 1, drawn by numpy's default_rng(seed): a published
    removal set is reproduced from its seed."""
    from lmlab.selection.dedup import permutations

    p = (1 << 61) - 1
    for seed in (0, 1, 7):
        rng = np.random.default_rng(seed)
        a, b = permutations(5, seed)
        assert a.tolist() == rng.integers(1, p, size=5, dtype=np.uint64).tolist()
        assert b.tolist() == rng.integers(0, p, size=5, dtype=np.uint64).tolist()


def test_the_dedup_functions_without_settings_use_the_selectors_defaults(monkeypatch):
    """duplicates() without settings hashes and bands with the selector's defaults (what it passes down is
    recorded), and the seed of permutations and minhash_signatures defaults to the selector's too."""
    import dataclasses

    from lmlab.selection import dedup

    settings = {f.name: f.default for f in dataclasses.fields(dedup.Dedup.Settings)}
    assert settings == {"threshold": 0.8, "num_perm": 128, "ngram": 3, "seed": 1, "recall_weight": 0.99,
                        "exact": True, "near": True}
    seen = {}

    def spy(name):
        real = getattr(dedup, name)

        def record(*args, **kwargs):
            seen.setdefault(name, (args, kwargs))
            return real(*args, **kwargs)
        return record

    for name in ("lsh_params", "shingle_hashes", "minhash_signatures"):
        monkeypatch.setattr(dedup, name, spy(name))
    rows = _small_dedup_pool()
    exact, near = dedup.duplicates(_dedup_pool(rows))
    assert seen["lsh_params"] == ((0.8, 128, 0.99), {}) and seen["shingle_hashes"][0][1] == 3
    assert seen["minhash_signatures"][0][1:] == (128, 1)
    assert (exact.tolist(), near.tolist()) == _dedup_reference(rows, 0.8)  # both kinds, at threshold 0.8
    monkeypatch.undo()
    shingles = [dedup.shingle_hashes(row, 3) for row in rows[:5]]
    assert (dedup.minhash_signatures(shingles, 4) == dedup.minhash_signatures(shingles, 4, seed=1)).all()
    assert not (dedup.minhash_signatures(shingles, 4) == dedup.minhash_signatures(shingles, 4, seed=2)).all()
    assert dedup.permutations(4)[0].tolist() == dedup.permutations(4, 1)[0].tolist() != \
        dedup.permutations(4, 2)[0].tolist()


def test_lsh_params_minimise_the_weighted_areas_computed_by_quadrature():
    """(b, r) against the S-curve's areas integrated by scipy's adaptive quadrature over every b * r <= num_perm:
    one band, one row a band, every permutation used, datasketch's symmetric default (0.5), a near-certain recall
    weight (where "every pair a candidate" would be cheapest, had r = 0 been allowed) and cases where a coarser
    grid would pick another (b, r)."""
    from scipy import integrate

    from lmlab.selection.dedup import lsh_params

    def reference(threshold, num_perm, weight):
        errors = {}
        for b in range(1, num_perm + 1):
            for r in range(1, num_perm // b + 1):
                fp = integrate.quad(lambda s, b, r: 1 - (1 - s**r) ** b, 0, threshold, args=(b, r))[0]
                fn = integrate.quad(lambda s, b, r: (1 - s**r) ** b, threshold, 1, args=(b, r))[0]
                errors[b, r] = (1 - weight) * fp + weight * fn
        return min(errors, key=errors.get)

    assert lsh_params(0.8, 16) == reference(0.8, 16, 0.5) == (2, 8)
    cases = {(0.5, 24, 0.9): (10, 2), (0.1, 8, 0.5): (8, 1), (0.95, 12, 0.5): (1, 12), (0.3, 6, 0.9999): (6, 1),
             (0.6, 20, 0.2): (3, 6), (0.83, 22, 0.106): (1, 19), (0.15, 16, 0.643): (12, 1)}
    for (threshold, num_perm, weight), want in cases.items():
        assert lsh_params(threshold, num_perm, weight) == reference(threshold, num_perm, weight) == want


def test_lsh_bucket_pairs_keep_pool_order_within_interleaved_buckets():
    from lmlab.selection.dedup import SMALL_BUCKET, bucket_pairs

    rows = np.arange(100, 100 + 3 * (SMALL_BUCKET + 8))
    keys = (np.arange(len(rows)) % 3).astype(np.uint64)  # three large buckets, interleaved in pool order
    pairs = bucket_pairs(rows, keys)
    want = [(int(rows[k]), int(r)) for k in range(3) for r in rows[k + 3::3]]  # each bucket's first row first
    assert sorted(map(tuple, pairs.tolist())) == sorted(want)
    small = bucket_pairs(rows[:12], keys[:12])  # buckets of 4: every pair, the smaller row first
    assert (small[:, 0] < small[:, 1]).all() and len(small) == 3 * 6


# ----- the export weight mapping (the models' HFAdapter): every setting, both ways, and each refusal in full -----

# (model config, the transformers config's settings, the lmlab constructor arguments from_hf gives back): sizes
# unlike each other and unlike transformers' defaults, so that a setting dropped or swapped shows
_T = {"_target_": "lmlab.models.transformer.Transformer", "d_model": 12, "n_layers": 3, "d_ff": 20, "norm_eps": 3e-6}
_SPECIALS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA = {"vocab_size": 40, "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 3,
          "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 4, "max_position_embeddings": 16,
          "rms_norm_eps": 3e-6, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, **_SPECIALS}
_MIXER = {"vocab_size": 40, "hidden_size": 12, "state_size": 5, "num_hidden_layers": 3, "layer_norm_epsilon": 3e-6,
          "conv_kernel": 3, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
          "tie_word_embeddings": False, **_SPECIALS}
_BACK = {"d_model": 12, "n_layers": 3, "head_dim": None, "d_ff": 20, "max_len": 16, "norm_eps": 3e-6}
EXPORTED = {
    "GPT2LMHeadModel": (
        {**_T, "n_heads": 2, "norm": "layernorm", "positions": "learned", "max_len": 24, "tie_embeddings": False},
        {"vocab_size": 40, "n_positions": 16, "n_embd": 12, "n_layer": 3, "n_head": 2, "n_inner": 20,
         "activation_function": "gelu", "layer_norm_epsilon": 3e-6, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
         "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
         "reorder_and_upcast_attn": False, "tie_word_embeddings": False, **_SPECIALS},
        {**_BACK, "n_heads": 2, "norm": "layernorm", "positions": "learned", "mlp": "gelu", "rope_base": 10000.0,
         "tie_embeddings": False}),
    "ArceeForCausalLM": (
        {**_T, "n_heads": 3, "rope_base": 500.0},
        {**_LLAMA, "hidden_act": "gelu", "tie_word_embeddings": True},
        {**_BACK, "n_heads": 3, "norm": "rmsnorm", "positions": "rotary", "mlp": "gelu", "rope_base": 500.0,
         "tie_embeddings": True}),
    "LlamaForCausalLM": (
        {**_T, "n_heads": 3, "rope_base": 500.0, "mlp": "swiglu", "tie_embeddings": False},
        {**_LLAMA, "hidden_act": "silu", "tie_word_embeddings": False},
        {**_BACK, "n_heads": 3, "norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu", "rope_base": 500.0,
         "tie_embeddings": False}),
    "MambaForCausalLM": (
        {"_target_": "lmlab.models.mamba.Mamba", "d_model": 12, "n_layers": 3, "d_state": 5, "expand": 3,
         "d_conv": 3, "dt_rank": 2, "norm_eps": 3e-6, "tie_embeddings": True},
        {**_MIXER, "expand": 3, "intermediate_size": 36, "time_step_rank": 2, "use_mambapy": False,
         "tie_word_embeddings": True},
        {"d_model": 12, "n_layers": 3, "d_state": 5, "expand": 3, "d_conv": 3, "dt_rank": 2, "norm": "rmsnorm",
         "norm_eps": 3e-6, "tie_embeddings": True}),
    "Mamba2ForCausalLM": (
        {"_target_": "lmlab.models.mamba2.Mamba2", "d_model": 12, "n_layers": 3, "d_state": 5, "headdim": 6,
         "expand": 3, "d_conv": 3, "chunk_size": 4, "norm_eps": 3e-6, "tie_embeddings": False},
        {**_MIXER, "expand": 3, "num_heads": 6, "head_dim": 6, "n_groups": 1, "chunk_size": 4,
         "time_step_limit": (0.0, math.inf)},
        {"d_model": 12, "n_layers": 3, "d_state": 5, "headdim": 6, "expand": 3, "ngroups": 1, "d_conv": 3,
         "chunk_size": 4, "norm": "rmsnorm", "norm_eps": 3e-6, "tie_embeddings": False}),
}


def _exported(architecture):
    from lmlab.models.spec import hf_adapter
    from tests.conftest import stressed_model

    model = stressed_model(EXPORTED[architecture][0], 40)
    return model, hf_adapter(type(model))


@pytest.mark.parametrize("architecture", list(EXPORTED))
def test_export_writes_each_setting_and_import_gives_back_the_model_and_its_weights(architecture):
    from lmlab.models.transformer import rope_theta

    model, adapter = _exported(architecture)
    config, weights = adapter.to_hf(model, 16)
    assert list(config.architectures) == [architecture]
    for key, want in EXPORTED[architecture][1].items():
        got = getattr(config, key)
        assert (tuple(got) if isinstance(want, tuple) else got) == want, key
    if "rms_norm_eps" in EXPORTED[architecture][1]:
        assert rope_theta(config) == 500.0
    known = type(config)().to_dict()  # config.json holds only settings transformers knows
    assert [k for k in config.to_dict() if k not in known] == []
    if config.tie_word_embeddings:  # a tied checkpoint's file holds the embedding once, without lm_head.weight
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    kwargs, state = adapter.from_hf(config, {k: v.detach().clone() for k, v in weights.items()})
    assert kwargs == EXPORTED[architecture][2]
    ours = model.state_dict()
    if architecture == "GPT2LMHeadModel":  # the positions the checkpoint advertises, of the 24 the model has
        assert weights["transformer.wpe.weight"].shape == (16, 12)
        ours["pos_embed.weight"] = ours["pos_embed.weight"][:16]
        biases = [k for k in weights if k.endswith("bias") and ".ln_" not in k and "ln_f" not in k]
        assert len(biases) == 12 and all(not weights[k].any() for k in biases)
    assert set(state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(state[key], value), key


def _config(architecture, **changes):
    import copy

    model, adapter = _exported(architecture)
    config, weights = adapter.to_hf(model, 16)
    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    return adapter, config, dict(weights)


def test_import_refuses_each_setting_the_transformer_does_not_compute_in_one_sentence():
    def refused(architecture, state=None, **changes):
        adapter, config, weights = _config(architecture, **changes)
        with pytest.raises(UserError) as err:
            adapter.from_hf(config, weights if state is None else {**weights, **state})
        return str(err.value)

    def computes(architecture, what):
        return (f"the {architecture} checkpoint has {what}, which lmlab's Transformer does not compute: import a "
                "checkpoint without it (lmlab export writes such checkpoints).")

    gpt2, llama, arcee = "GPT2LMHeadModel", "LlamaForCausalLM", "ArceeForCausalLM"
    assert refused(gpt2, activation_function="gelu_new") == computes(
        gpt2, "activation_function=gelu_new (lmlab's GELU is the exact 'gelu')")
    scale = computes(gpt2, "an attention scale other than 1/sqrt(head_dim)")
    assert refused(gpt2, scale_attn_by_inverse_layer_idx=True) == scale
    assert refused(gpt2, scale_attn_weights=False) == scale
    bias = "transformer.h.2.mlp.c_fc.bias"
    assert refused(gpt2, {bias: torch.full((20,), 0.5)}) == computes(
        gpt2, f"non-zero linear biases ({bias}) where lmlab's layers have none")
    assert refused(llama, hidden_act="gelu") == computes(llama, "hidden_act=gelu (lmlab's SwiGLU uses silu)")
    assert refused(arcee, hidden_act="relu2") == computes(arcee, "hidden_act=relu2 (lmlab's MLP uses gelu)")
    assert refused(arcee, num_key_value_heads=1) == computes(arcee, "num_key_value_heads=1 (grouped-query attention)")
    head = computes(arcee, "head_dim=6 other than hidden_size / num_attention_heads")
    assert refused(arcee, head_dim=6) == head
    assert refused(arcee, num_attention_heads=5, num_key_value_heads=5, head_dim=None) == computes(
        arcee, "head_dim=None other than hidden_size / num_attention_heads")  # 12 / 5 heads
    for key in ("attention_bias", "mlp_bias"):
        assert refused(llama, **{key: True}) == computes(llama, "biases in its attention or MLP layers")
    rope = computes(arcee, "a scaled or non-default rotary embedding")
    assert refused(arcee, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}) == rope
    assert refused(arcee, rope_parameters={"rope_type": "default", "rope_theta": 1.0}) == rope
    adapter, config, weights = _config(arcee, rope_parameters={"rope_type": "default", "rope_theta": 1.5})
    assert adapter.from_hf(config, weights)[0]["rope_base"] == 1.5  # any base above 1 is lmlab's too
    other = ("lmlab's Transformer imports GPT2LMHeadModel, LlamaForCausalLM and ArceeForCausalLM checkpoints, not "
             "{}: choose the model that imports it.")
    assert refused(arcee, architectures=["MistralForCausalLM"]) == other.format("MistralForCausalLM")
    assert refused(arcee, architectures=None) == other.format("?")


def test_import_of_a_gpt2_without_n_inner_a_checkpoint_with_layer_norm_biases_and_a_config_without_rope():
    from types import SimpleNamespace

    from lmlab.models.transformer import rope_theta

    adapter, config, weights = _config("GPT2LMHeadModel", n_inner=None)  # GPT-2's MLP is then 4 * n_embd wide
    weights["transformer.ln_f.bias"] = torch.full((12,), 0.25)  # norms' biases are lmlab's too
    weights["transformer.h.0.ln_1.bias"] = torch.full((12,), -0.5)
    kwargs, state = adapter.from_hf(config, weights)
    assert kwargs["d_ff"] == 48 and (state["norm.bias"] == 0.25).all() and (state["blocks.0.norm1.bias"] == -0.5).all()
    # rope_theta reads transformers 5's rope_parameters and the rope_theta/rope_scaling of earlier versions
    cases = [({"rope_parameters": {"rope_type": "default", "rope_theta": 300}}, 300.0),
             ({"rope_parameters": {"rope_theta": 300.0}}, 300.0),
             ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 300.0}}, None),
             ({"rope_theta": 700}, 700.0), ({"rope_theta": 700.0, "rope_scaling": None}, 700.0),
             ({"rope_theta": 700.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),
             ({"rope_parameters": None, "rope_theta": 700.0}, 700.0), ({}, None)]
    for attributes, want in cases:
        got = rope_theta(SimpleNamespace(**attributes))
        assert got == want and type(got) is type(want), attributes


def test_export_refuses_a_transformer_mup_away_from_its_base_shape_and_unequal_layer_norm_eps():
    from hydra.utils import instantiate

    from lmlab.models.spec import Unmappable, hf_adapter

    mup = instantiate({**EXPORTED["ArceeForCausalLM"][0], "parametrization": "mup", "base_width": 6},
                      vocab_size=40, attention="causal")
    with pytest.raises(Unmappable) as err:
        hf_adapter(type(mup)).to_hf(mup, 16)
    assert err.value.reason == ("the run's model has parametrization=mup away from its base shape (attention scale, "
                                "logit or branch multipliers)")
    model, adapter = _exported("GPT2LMHeadModel")
    model.blocks[2].norm2.eps = 1e-3
    with pytest.raises(Unmappable) as err:
        adapter.to_hf(model, 16)
    assert err.value.reason == "the run's layer norms have different eps"


def test_the_mamba_adapters_refuse_what_their_mixers_do_not_compute_in_one_sentence():
    def refused(architecture, **changes):
        adapter, config, weights = _config(architecture, **changes)
        with pytest.raises(UserError) as err:
            adapter.from_hf(config, weights)
        return str(err.value)

    for architecture, name in (("MambaForCausalLM", "Mamba"), ("Mamba2ForCausalLM", "Mamba2")):
        for key, value, want in (("use_bias", True, False), ("use_conv_bias", False, True),
                                 ("hidden_act", "gelu", "silu")):
            assert refused(architecture, **{key: value}) == (
                f"the {name}Config checkpoint has {key}={value}, which lmlab's {name} does not compute: import one "
                f"with {key}={want}.")
    assert refused("MambaForCausalLM", intermediate_size=40) == (
        "the MambaConfig checkpoint has intermediate_size=40, not expand * hidden_size as lmlab's Mamba: import one "
        "where they agree.")
    assert refused("Mamba2ForCausalLM", n_groups=2) == (
        "the Mamba2Config checkpoint has n_groups=2, which lmlab's Mamba2 does not compute: import one with "
        "n_groups=1.")
    assert refused("Mamba2ForCausalLM", time_step_limit=(0.0, 5.0)) == (
        "the Mamba2Config checkpoint has time_step_limit=(0.0, 5.0), which lmlab's Mamba2 does not compute: import "
        "one with time_step_limit=(0.0, inf).")
    assert refused("Mamba2ForCausalLM", num_heads=5) == (
        "the Mamba2Config checkpoint has num_heads * head_dim = 30, not expand * hidden_size as lmlab's Mamba2: "
        "import one where they agree.")
    from lmlab.models.spec import hf_adapter
    from tests.conftest import stressed_model

    tied = stressed_model({**EXPORTED["Mamba2ForCausalLM"][0], "tie_embeddings": True}, 40)  # a tied Mamba-2 too
    config, weights = hf_adapter(type(tied)).to_hf(tied, 16)
    kwargs, state = hf_adapter(type(tied)).from_hf(config, weights)
    assert config.tie_word_embeddings is True and kwargs["tie_embeddings"] is True
    assert state["head.weight"] is state["embed.weight"]


def test_export_refuses_a_mixer_block_with_an_mlp_and_a_mamba2_gated_norm_of_another_eps():
    from lmlab.models.spec import Unmappable

    model, adapter = _exported("MambaForCausalLM")
    model.blocks[2].mlp = torch.nn.Identity()
    with pytest.raises(Unmappable) as err:
        adapter.to_hf(model, 16)
    assert err.value.reason == "the run's Mamba has an MLP in its blocks"
    model, adapter = _exported("Mamba2ForCausalLM")
    model.blocks[2].mixer.norm.eps = 1e-3
    with pytest.raises(Unmappable) as err:
        adapter.to_hf(model, 16)
    assert err.value.reason == "the run's mamba2 has a gated norm eps other than its RMSNorm eps"


def test_pcfg_one_word_sentences_and_impossible_ones_are_exact_and_quiet(tmp_path):
    import warnings

    from lmlab.data.pcfg import PCFGSource
    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
    from tests.test_pcfg import TINY, write_rules

    # S -> A (0.5) -> x | y, or S -> B C (0.5) -> "x y": P(x) = 0.3, P(y) = 0.2, P(x y) = 0.5, no unary chain
    rules = [("S", ("A",), 0.5), ("S", ("B", "C"), 0.5), ("A", ("x",), 0.6), ("A", ("y",), 0.4),
             ("B", ("x",), 1.0), ("C", ("y",), 1.0), ("C", ("z",), 0.0)]  # z: a word of probability 0
    src = PCFGSource(grammar=str(write_rules(tmp_path / "g.txt", rules)), **TINY)
    x, y = (N_SPECIAL + src.grammar.words.index(w) for w in "xy")
    z = N_SPECIAL + src.grammar.words.index("z")
    rows = [[BOS_ID, x, EOS_ID], [BOS_ID, y, EOS_ID], [BOS_ID, x, y, EOS_ID], [BOS_ID, y, x, EOS_ID],
            [BOS_ID, z, EOS_ID], [BOS_ID, x, z, EOS_ID]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nll = src.sequence_nll(rows)
        conds = src.single_mask_conditionals(rows)
    np.testing.assert_allclose(nll[:3], -np.log([0.3, 0.2, 0.5]), rtol=1e-12)
    assert (nll[3:] == np.inf).all()
    for cond in conds[:2]:  # p(x_1 = w) over the one-word sentences: 0.3 : 0.2
        np.testing.assert_allclose(cond[0, [x, y]], [0.6, 0.4], rtol=1e-12)
    np.testing.assert_allclose(conds[2][:, [x, y]], [[1.0, 0.0], [0.0, 1.0]], atol=1e-15)  # only "x y" has 2 words
    assert not conds[3].any()  # "y _" and "_ x": no sentence of the grammar
    np.testing.assert_allclose(conds[4][0, [x, y, z]], [0.6, 0.4, 0.0], rtol=1e-12)
    np.testing.assert_allclose(conds[5][:, [x, y, z]], [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], atol=1e-15)  # "_ z": none


def test_pcfg_a_sentence_whose_probability_is_below_the_smallest_float(tmp_path):
    """a^120 with P(a | A) = 0.001: P = 0.999^119 * 0.001 * 0.001^120 (about 1e-363, below float64's range),
    exact only because each position's emissions are rescaled."""
    from lmlab.data.pcfg import PCFGSource
    from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
    from tests.test_pcfg import TINY, write_rules

    rules = [("S", ("A", "S"), 0.999), ("S", ("A",), 0.001), ("A", ("a",), 0.001), ("A", ("b",), 0.999)]
    src = PCFGSource(grammar=str(write_rules(tmp_path / "g.txt", rules)), **TINY)
    a, b = (N_SPECIAL + src.grammar.words.index(w) for w in "ab")
    n = 120
    (nll,) = src.sequence_nll([[BOS_ID, *[a] * n, EOS_ID]])
    assert nll == pytest.approx(-((n - 1) * math.log(0.999) + math.log(0.001) + n * math.log(0.001)), rel=1e-12)
    (cond,) = src.single_mask_conditionals([[BOS_ID, *[a] * n, EOS_ID]])
    np.testing.assert_allclose(cond[:, [a, b]], np.tile([0.001, 0.999], (n, 1)), rtol=1e-9)


def test_the_viterbi_tree_of_a_one_word_sentence_has_no_constituent_of_two_words(tmp_path):
    from lmlab.data.grammar import parse_grammar

    path = tmp_path / "g.txt"
    path.write_text("S A 0.5\nS B C 0.5\nA x 0.6\nA y 0.4\nB x 1.0\nC y 1.0\n")
    g = parse_grammar(path)
    x, y = g.words.index("x"), g.words.index("y")
    assert g.viterbi_spans([x]) == set() and g.viterbi_spans([y]) == set()
    assert g.viterbi_spans([x, y]) == {(0, 2)} and g.viterbi_spans([y, x]) is None and g.viterbi_spans([]) is None


def test_a_viterbi_tie_between_a_binary_rule_and_a_unary_chain_goes_to_the_binary_rule_listed_first(tmp_path):
    from lmlab.data.grammar import parse_grammar

    # "x y y": S -> B D -> x (y y) and S -> X -> E C -> (x y) y, both of probability 0.5 exactly
    path = tmp_path / "g.txt"
    path.write_text("S B D 0.5\nS X 0.5\nX E C 1.0\nE B C 1.0\nD C C 1.0\nB x 1.0\nC y 1.0\n")
    g = parse_grammar(path)
    x, y = g.words.index("x"), g.words.index("y")
    assert g.viterbi_spans([x, y, y]) == {(0, 3), (1, 3)}


def test_a_rule_file_notice_and_error_in_full(tmp_path, capsys):
    from lmlab.data.grammar import parse_grammar
    from lmlab.errors import UserError

    path = tmp_path / "g.txt"
    path.write_text("S A B 0.5\nS a 0.5004\nA a 1.0\nB b 0.5\nB a 0.5\n")  # S sums to 1.0004, A and B to 1
    parse_grammar(path)
    assert capsys.readouterr().out == f"[lmlab] grammar {path}: renormalised rule probabilities of S (+4.00e-04).\n"
    path.write_text("S A B 0.5\nS a 0.4996\nA a 1.0\nB b 1.0\n")
    parse_grammar(path)
    assert capsys.readouterr().out == f"[lmlab] grammar {path}: renormalised rule probabilities of S (-4.00e-04).\n"
    path.write_text("S A B 0.5\nS a 0.5004\nA a 1.0\nB b 0.5\nB a 0.4998\n")  # two of them
    parse_grammar(path)
    assert capsys.readouterr().out == (f"[lmlab] grammar {path}: renormalised rule probabilities of S (+4.00e-04), "
                                       "B (-2.00e-04).\n")
    path.write_text("S A Q 1.0\nA a 1.0\n")
    with pytest.raises(UserError) as err:
        parse_grammar(path)
    assert str(err.value) == (f"Line 1 of grammar file {path} has binary child 'Q' that is not a nonterminal; give it "
                              "rules of its own or fix the name.")


def test_start_children_of_a_rule_file_and_of_a_generated_grammar(tmp_path):
    from lmlab.data.grammar import GrammarShape, parse_grammar

    path = tmp_path / "g.txt"
    path.write_text("S A 0.5\nS B C 0.5\nA x 0.6\nA C 0.4\nB x 1.0\nC y 1.0\n")
    g = parse_grammar(path)
    assert g.start_children == [g.nonterminals.index("A")]
    assert GrammarShape(start_symbols=3).generate(0).start_children == [1, 2, 3]


def test_sampling_stops_a_frontier_past_its_limit(tmp_path, monkeypatch):
    from lmlab.data import grammar
    from lmlab.errors import UserError

    path = tmp_path / "g.txt"
    path.write_text("S A A 1.0\nA a 1.0\n")  # every sentence "a a": a frontier of 2 symbols a sentence
    g = grammar.parse_grammar(path)
    monkeypatch.setattr(grammar, "_MAX_FRONTIER", 8)
    assert [s.tolist() for s in g.sample(4, np.random.default_rng(0))] == [[0, 0]] * 4  # 8 symbols: allowed
    with pytest.raises(UserError) as err:
        g.sample(5, np.random.default_rng(0))
    assert str(err.value) == "The grammar generates unboundedly long sentences; make its recursion subcritical."


def test_the_verdict_cell_counts_pairs_only_for_an_inconclusive_row_of_fewer_than_two():
    from lmlab.studies.same_loss.render import _verdict_cell
    from lmlab.studies.same_loss.statistics import INCONCLUSIVE, MISSING

    assert _verdict_cell(_row(verdict=MISSING, n=0)) == "**n/a**"
    assert _verdict_cell(_row(verdict=INCONCLUSIVE, n=2)) == "**inconclusive**"
    assert _verdict_cell(_row(verdict="extension: inconclusive", n=1)) == "**extension: inconclusive** (1 pair)"


# ----- lmlab/studies/same_loss/: the same-loss study's rules -----

def _flat_history(*steps):
    from lmlab.studies.same_loss.runs import GAP

    return [{"step": s, GAP: 0.1} for s in steps]


def test_the_plateau_window_is_the_last_two_evaluations_without_plateau_steps():
    from lmlab.studies.same_loss.runs import GAP, Settings, plateau_exclusion, read_schedule

    flat = read_schedule({"schedule": {"_target_": "lmlab.schedule.constant"}, "max_steps": 10})
    history = [{"step": 0, GAP: 0.9}, {"step": 1, GAP: 0.1}, {"step": 2, GAP: 0.1}]
    assert plateau_exclusion(history, Settings(plateau=0.01), flat) == ""  # the 0.9 is three evaluations back


def test_the_learning_rate_floor_over_the_window_of_a_cosine_decay_to_zero():
    from lmlab.studies.same_loss.runs import Settings, plateau_exclusion, read_schedule

    # cosine, no warmup, min_ratio 0, 10 steps: lr(s) = (1 + cos(pi s / 10)) / 2, peak lr(0) = 1;
    # lr(7) = 0.2061 >= 0.1, lr(8) = 0.0955 < 0.1. The window's steps run from its first evaluation up to (not
    # including) its last: evaluations at 7 and 8 read lr(7) only.
    cos = read_schedule({"schedule": {"_target_": "lmlab.schedule.cosine", "warmup": 0.0, "min_ratio": 0.0},
                         "max_steps": 10})
    s = Settings(plateau=0.01)
    assert plateau_exclusion(_flat_history(7, 8), s, cos) == ""
    assert plateau_exclusion(_flat_history(6, 9), s, cos) == (
        f"not on a plateau: the learning rate fell to {100 * (1 + math.cos(0.8 * math.pi)) / 2:.3g}% of its peak "
        "between its last two evaluations (below 10%: the schedule's end, not convergence)")
    # evaluations at and past the schedule's end: the window reads lr(total) = min_ratio of a cosine with
    # min_ratio 0.1, exactly 10% of its peak: counts
    floor = read_schedule({"schedule": {"_target_": "lmlab.schedule.cosine", "warmup": 0.0}, "max_steps": 10})
    assert floor.lr(10) == 0.1
    assert plateau_exclusion(_flat_history(10, 20), s, floor) == ""


def test_a_learning_rate_of_exactly_the_floor_in_a_rising_window_counts():
    from lmlab.studies.same_loss.runs import Settings, plateau_exclusion, read_schedule

    # constant with warmup 0.5 over 20 steps: lr(s) = (s + 1) / 10 for s < 10, peak 1; the window 0..1 reads
    # 0.1 and 0.2: its minimum is exactly LR_FLOOR of the peak, and it is not one constant rate
    warm = read_schedule({"schedule": {"_target_": "lmlab.schedule.constant", "warmup": 0.5}, "max_steps": 20})
    assert [warm.lr(0), warm.lr(1)] == [0.1, 0.2]
    assert plateau_exclusion(_flat_history(0, 2), Settings(plateau=0.01), warm) == ""


def test_the_plateau_rule_reads_the_schedule_relative_to_its_own_peak():
    from lmlab.studies.same_loss.runs import Schedule, Settings, plateau_exclusion

    s = Settings(plateau=0.01)

    def rates(*values):  # a schedule given in absolute rates, step by step
        return Schedule(lambda step, total: values[min(step, len(values) - 1)], len(values), {})

    # peak 0.004: a window falling from 0.0006 to 0.0005 (12.5% of it) counts, one to 0.0003 (7.5%) does not
    assert plateau_exclusion(_flat_history(1, 3), s, rates(0.004, 0.0006, 0.0005, 0.0005)) == ""
    assert plateau_exclusion(_flat_history(1, 3), s, rates(0.004, 0.0006, 0.0003, 0.0003)) == (
        "not on a plateau: the learning rate fell to 7.5% of its peak between its last two evaluations (below "
        "10%: the schedule's end, not convergence)")
    # one constant rate below the peak counts at any level: held to within 1e-12 of the peak (4e-15 here)
    assert plateau_exclusion(_flat_history(1, 3), s, rates(0.004, 0.0001, 0.0001, 0.0001)) == ""
    assert plateau_exclusion(_flat_history(1, 3), s, rates(0.004, 0.0001, 0.0001 + 3e-15, 0.0001)) == ""
    assert plateau_exclusion(_flat_history(1, 3), s, rates(0.004, 0.0001, 0.0001 + 1e-14, 0.0001)) == (
        "not on a plateau: the learning rate fell to 2.5% of its peak between its last two evaluations (below "
        "10%: the schedule's end, not convergence)")
    # the tolerance's edge: rates 0 and 1e-12 under a peak of 1 differ by exactly 1e-12 of it
    assert plateau_exclusion(_flat_history(1, 3), s, rates(1.0, 0.0, 1e-12, 0.0)) == ""


def test_a_recorded_schedule_is_read_only_from_lmlab_schedule_and_a_positive_integer_max_steps():
    from lmlab import schedule
    from lmlab.studies.same_loss.runs import read_schedule

    def node(target="lmlab.schedule.cosine", **kw):
        return {"_target_": target, "_partial_": True, **kw}

    one = read_schedule({"schedule": node(), "max_steps": 1})
    assert (one.fn, one.total, one.kwargs) == (schedule.cosine, 1, {})
    assert one.lr(0) == 1.0  # int(0.05 * 1) = 0 warmup steps: the peak at step 0
    for total in (0, -3, True, 10.0, "10", None):
        assert read_schedule({"schedule": node(), "max_steps": total}) is None
    for bad in ("lmlab.schedule.cosine", None, ["lmlab.schedule.cosine"]):
        assert read_schedule({"schedule": bad, "max_steps": 10}) is None
    for target in ("torch.optim.lr_scheduler.cosine", "cosine", "lmlab.schedule.decay_shape", "lmlab.schedule.wsd2"):
        assert read_schedule({"schedule": node(target), "max_steps": 10}) is None
    assert read_schedule({"schedule": {"warmup": 0.1}, "max_steps": 10}) is None
    for kw in ({"step": 3}, {"total": 20}, {"decay": 0.2}):  # cosine takes no decay
        assert read_schedule({"schedule": node(**kw), "max_steps": 10}) is None
    wsd = read_schedule({"schedule": node("lmlab.schedule.wsd", decay=0.5, min_ratio=0.0), "max_steps": 10})
    assert (wsd.fn, wsd.kwargs, wsd.lr(9)) == (schedule.wsd, {"decay": 0.5, "min_ratio": 0.0}, 1 - math.sqrt(0.8))


def _phase2(gaps, schedule=None):
    """A phase-2 run whose history holds ``gaps`` by step (None: an evaluation without a gap)."""
    from pathlib import Path

    from lmlab.studies.same_loss.runs import GAP, Run

    return Run(Path("run"), "done", "continue", "pcfg", 0, schedule=schedule,
               history=[{"step": s} if g is None else {"step": s, GAP: g} for s, g in gaps])


def test_the_burn_in_and_the_deviation_from_the_parent_by_hand():
    from lmlab.studies.same_loss.claims import burn_in, parent_deviation
    from lmlab.studies.same_loss.runs import read_schedule

    warm = read_schedule({"schedule": {"_target_": "lmlab.schedule.constant", "warmup": 0.1}, "max_steps": 100})
    assert burn_in(_phase2([])) == 0  # no schedule recorded: no burn-in
    assert burn_in(_phase2([], warm)) == 10  # int(0.1 * 100) warmup steps
    # the largest deviation by size, signed: -0.25 outweighs +0.125
    assert parent_deviation(_phase2([(0, 0.5), (1, 0.625), (2, 0.25)])) == -0.25
    assert parent_deviation(_phase2([(0, 0.5), (1, 0.75)])) == 0.25  # step 1 follows the parent's step 0
    assert parent_deviation(_phase2([(0, 0.5), (5, 0.0), (10, 0.625), (20, 0.5)], warm)) == 0.125  # from step 10 on
    for gaps in ([(0, 0.5)], [(1, 0.5), (2, 0.75)], [(0, None), (1, 0.5)], [(0, math.nan), (1, 0.5)],
                 [(0, 0.5), (1, math.nan)]):  # no step-0 gap, or none after it
        assert math.isnan(parent_deviation(_phase2(gaps)))


def test_continue_matched_holds_every_run_within_the_margin_of_its_parent():
    from lmlab.studies.same_loss.claims import continue_matched

    up, down = _phase2([(0, 0.5), (1, 0.75)]), _phase2([(0, 0.5), (1, 0.125)])
    assert continue_matched([up], 0.25) == (True, 0.25)  # at the margin: matched
    assert continue_matched([up], 0.125) == (False, 0.25)
    assert continue_matched([up, down], 0.5) == (True, -0.375)  # the worst by size, signed
    for runs in ([], [up, _phase2([(0, 0.5)])]):  # no run, or one without a deviation: not matched
        matched, worst = continue_matched(runs, 1.0)
        assert matched is False and math.isnan(worst)


def test_same_parameters_notes_what_it_could_not_compare():
    from pathlib import Path

    from lmlab.studies.same_loss.claims import PARAMS_ID, same_parameters
    from lmlab.studies.same_loss.runs import TRACE, Run
    from lmlab.studies.same_loss.statistics import MISSING

    def arm(pid):
        return Run(Path("r"), "done", "size", "pcfg", 0, metrics={} if pid is None else {PARAMS_ID[TRACE]: pid})

    row = same_parameters(_row(note="prior"), [(arm(7.0), arm(7.0)), (arm(7.0), arm(None))], TRACE)
    assert (row.verdict, row.note) == ("", "prior; the parameters counted are not recorded for 1 of 2 pairs")
    row = same_parameters(_row(), [(arm(7.0), arm(math.nan))], TRACE)  # one side unknown: not a mismatch
    assert (row.verdict, row.note) == ("", "the parameters counted are not recorded for 1 of 1 pairs")
    row = same_parameters(_row(note="prior"), [(arm(7.0), arm(8.0)), (arm(7.0), arm(None))], TRACE)
    assert (row.verdict, row.note) == (MISSING, "prior; the arms' traces count different parameters (names or "
                                                "shapes): not comparable")


def test_the_adversary_rows_of_one_data_set_by_its_cost_on_the_first_task():
    from lmlab.studies.same_loss.claims import adversary_rows
    from lmlab.studies.same_loss.statistics import INEFFECTIVE, Row

    def row(key, data="pcfg", task="task_a", **kw):
        return Row("algorithm", data, task, "what", key, "paper", 1, False, **kw)

    def decide(cost_row):
        rows = [row("trace:adamw-adversarial", mean=0.0, matched=True, n=2),  # first of the first task's rows
                row("acc:adamw-adversarial", task="task_b", note="prior"),
                row("acc_adv:adamw-adversarial", task="task_b", mean=50.0, matched=True, n=9),  # another task
                row("acc_adv:adamw-adversarial", data="hmm", mean=0.0),  # another data set
                row("acc_adv:adamw-sgd", mean=0.0)]  # another comparison
        rows += [cost_row] if cost_row is not None else []
        adversary_rows(rows, "pcfg", "task_a")
        return [(r.verdict, r.note) for r in rows]

    untouched = [("", ""), ("", "prior"), ("", ""), ("", ""), ("", "")]
    for cost in (row("acc_adv:adamw-adversarial", mean=5.0, matched=True, n=2),  # the cost and n at their floors
                 row("acc_adv:adamw-adversarial", mean=9.0, matched=True, n=3)):
        assert decide(cost)[:5] == untouched
    why = "adversary ineffective: it costs {} pts of task_a (matched: {}), below 5"
    for cost, text in ((row("acc_adv:adamw-adversarial", mean=4.5, matched=True, n=3), why.format("4.5", "yes")),
                       (row("acc_adv:adamw-adversarial", mean=9.0, matched=False, n=3), why.format("9", "no")),
                       (row("acc_adv:adamw-adversarial", mean=9.0, matched=True, n=1), why.format("9", "yes")),
                       (None, why.format("n/a", "no"))):
        marked = [(INEFFECTIVE, text), (INEFFECTIVE, f"prior; {text}"), (INEFFECTIVE, text), ("", ""), ("", "")]
        assert decide(cost) == marked + ([(INEFFECTIVE, text)] if cost is not None else [])
