"""Known answers of the scaling-law fits (``lmlab.report.scaling``): synthetic points drawn from
L = E + A N^-alpha + B D^-beta (Chinchilla's fitted values, Hoffmann et al. 2022) with and without noise."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.errors import UserError
from lmlab.report import parametric, scaling

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TRUE_A = BETA / (ALPHA + BETA)


def law(N, D, data_factor: float = 1.0):
    return E + A * N ** -ALPHA + B * (data_factor * D) ** -BETA


def ladder():
    """30 points: 6 sizes x 5 budgets, log-spaced."""
    N, D = np.meshgrid(np.logspace(5, 13, 6), np.logspace(7, 15, 5))
    return N.ravel(), D.ravel()


def noisy(rng, N, D, noise=0.01, data_factor=1.0):
    return law(N, D, data_factor) * np.exp(noise * rng.standard_normal(len(N)))


def errors(p: parametric.Parametric) -> tuple[float, float, float, float]:
    return abs(p.alpha / ALPHA - 1), abs(p.beta / BETA - 1), abs(p.E / E - 1), abs(p.a - TRUE_A)


def within(errs) -> bool:
    a, b, e, alloc = errs
    return a < 0.05 and b < 0.05 and e < 0.01 and alloc < 0.03


def test_parametric_fit_recovers_the_law_and_its_intervals_cover_the_truth():
    N, D = ladder()
    covered = {"E": 0, "alpha": 0, "beta": 0, "a": 0}
    truth = {"E": E, "alpha": ALPHA, "beta": BETA, "a": TRUE_A}
    errs = []
    repeats = 50
    for seed in range(repeats):
        fit = scaling.bootstrap_parametric(N, D, noisy(np.random.default_rng(seed), N, D), resamples=40, seed=seed,
                                           resample_starts=0)
        errs.append(errors(fit.law))
        for q in covered:
            covered[q] += fit.intervals[q].covers(truth[q])
    assert within(errs[0]), errs[0]  # the first draw: alpha, beta within 5%, E within 1%, a within 0.03
    assert within(np.mean(errs, axis=0)), np.mean(errs, axis=0)  # and on average over the draws
    assert all(c >= 0.9 * repeats for c in covered.values()), covered


def test_parametric_fit_is_exact_on_noise_free_points_with_e_free_or_pinned():
    N, D = ladder()
    L = law(N, D)
    for pinned in (None, E):
        p = scaling.fit_parametric(N, D, L, E=pinned)
        assert p.pinned_e == (pinned is not None)
        assert (p.E, p.alpha, p.beta) == pytest.approx((E, ALPHA, BETA), rel=1e-3)
        assert (p.A, p.B) == pytest.approx((A, B), rel=2e-2)
        assert scaling.at_bounds(p) == []
    # two sizes and three budgets cannot determine five parameters on points that are not from the law's form
    N, D = (v.ravel() for v in np.meshgrid([1e6, 1e7], [1e8, 1e9, 1e10]))
    assert scaling.at_bounds(scaling.fit_parametric(N, D, [3.3, 3.2, 3.15, 3.0, 2.98, 2.76])) != []


def test_pinned_e_is_refused_above_a_loss():
    N, D = ladder()
    with pytest.raises(UserError, match="pinned irreducible loss"):
        scaling.fit_parametric(N, D, law(N, D), E=5.0)


def brute_optimal_loss(C: float, data_factor: float = 1.0) -> float:
    """min over N of L(N, C / 6N) on a fine grid (an independent allocation)."""
    n = np.logspace(3, 16, 200001)
    return float(law(n, C / (6 * n), data_factor).min())


def test_compute_optimal_allocation_matches_brute_force():
    p = parametric.Parametric(E, A, B, ALPHA, BETA)
    for C in (1e18, 1e21, 1e24):
        assert float(p.optimal_loss(C)) == pytest.approx(brute_optimal_loss(C), rel=1e-7)
        n, d = p.optimal(C)
        assert 6 * n * d == pytest.approx(C)
        target = brute_optimal_loss(C)
        assert p.compute_for(target) == pytest.approx(C, rel=1e-3)


def test_envelope_finds_the_optimal_allocation_exponent_on_noise_free_points():
    # a dense grid of sizes and budgets: the lowest loss at each compute is near the compute-optimal point
    N, D = (v.ravel() for v in np.meshgrid(np.logspace(6, 12, 61), np.logspace(8, 14, 61)))
    env = scaling.envelope(N, D, law(N, D), bins=12)
    assert env.n_law.exponent == pytest.approx(TRUE_A, abs=0.02)
    assert env.d_law.exponent == pytest.approx(1 - TRUE_A, abs=0.02)


def test_isoflop_parabolas_find_the_optimal_allocation_exponent_on_noise_free_points():
    p = parametric.Parametric(E, A, B, ALPHA, BETA)
    N, D = [], []
    for C in np.logspace(18, 24, 7):
        n_opt, _ = p.optimal(C)
        sizes = n_opt * np.logspace(-0.5, 0.5, 9)  # sizes around the optimum, as an isoFLOP ladder would run
        N += list(sizes)
        D += list(C / (6 * sizes))
    N, D = np.array(N), np.array(D)
    iso = scaling.isoflop(N, D, law(N, D))
    assert len(iso.compute) == 7 and not iso.left_out
    assert iso.n_law.exponent == pytest.approx(TRUE_A, abs=0.01)
    assert iso.d_law.exponent == pytest.approx(1 - TRUE_A, abs=0.01)
    assert iso.n_opt == pytest.approx(p.optimal(iso.compute)[0], rel=0.05)


def test_compute_multiplier_of_a_recipe_that_uses_data_twice_as_well_is_one_half():
    # L_B(N, D) = L_A(N, 2D): at compute C recipe B reaches what A reaches at 2C, so m = C_B / C_A = 1/2
    N, D = ladder()
    m = parametric.compute_multiplier((N, D, law(N, D)), (N, D, law(N, D, 2.0)), 1e21, resamples=5)
    assert m.interval.value == pytest.approx(0.5, rel=1e-2)
    # with 1% noise: the 95% interval covers 1/2 and excludes 1 (B needs less compute) on most draws
    covered = resolved = 0
    repeats = 10
    for seed in range(repeats):
        rng = np.random.default_rng(seed)
        m = parametric.compute_multiplier((N, D, noisy(rng, N, D)), (N, D, noisy(rng, N, D, data_factor=2.0)), 1e21,
                                       resamples=40, seed=seed)
        covered += m.interval.covers(0.5)
        resolved += m.interval.high < 1.0
    assert covered >= 8 and resolved >= 8, (covered, resolved)


def test_downstream_sigmoid_is_recovered_with_a_given_or_a_fitted_ceiling():
    loss = np.linspace(1.5, 3.5, 12)
    truth = scaling.Downstream(floor=1 / 3, ceiling=0.9, k=4.0, L0=2.4, fixed_ceiling=True)
    acc = truth(loss)
    fixed = scaling.fit_downstream(loss, acc, floor=1 / 3, ceiling=0.9)
    assert (fixed.k, fixed.L0) == pytest.approx((4.0, 2.4), rel=1e-4)
    free = scaling.fit_downstream(loss, acc, floor=1 / 3)
    assert (free.k, free.L0, free.ceiling) == pytest.approx((4.0, 2.4, 0.9), rel=1e-4)
    assert not free.fixed_ceiling
    assert np.all(free(np.linspace(0, 10, 50)) <= 0.9 + 1e-9)  # bounded by its ceiling


def test_the_extrapolation_check_predicts_the_held_out_largest_model_from_the_law():
    """Fitted without the largest size, the law of noise-free points predicts that size's losses (the truth);
    with fewer than three sizes there is nothing to extrapolate from, and it says so."""
    N, D = ladder()
    points = [scaling.Point("", f"{n:g},{d:g}", n, d, 6.0, float(law(n, d)), {}) for n, d in zip(N, D)]
    held = scaling.extrapolation(points)
    assert sorted(p.D for p, _ in held) == sorted(D[N == N.max()])
    for p, predicted in held:
        assert predicted == pytest.approx(law(p.N, p.D), rel=1e-4)
    two = [p for p in points if p.N in sorted(set(N))[:3]]
    with pytest.raises(UserError, match="three model sizes"):
        scaling.extrapolation([p for p in two if p.N != sorted(set(N))[1]])
