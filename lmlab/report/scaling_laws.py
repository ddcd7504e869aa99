"""Scaling-law fits of final losses against model size N and training tokens D, after Hoffmann et al., "Training
Compute-Optimal Large Language Models" (Chinchilla), arXiv 2203.15556, section 3 and appendix D.

* Approach 1 (lower envelope): the points are put into log-spaced compute bins; the point of lowest loss in each
  bin is the envelope, and N_opt(C) = G_N C^a and D_opt(C) = G_D C^b are least-squares lines through it in
  log-log. The paper takes the envelope of whole training curves; here any points (final losses, or the
  checkpoints of trajectories) form it.
* Approach 2 (isoFLOP profiles): the points are grouped by compute (points within ``rel_tol`` of each other in
  C are one group); in each group of at least three sizes, a parabola in log N is fitted to the loss, and its
  minimum is that compute's N_opt (D_opt = C / (k N_opt), k the group's compute per parameter and token);
  power laws through the minima as in approach 1. A group whose parabola opens downwards, or whose minimum
  lies outside the sizes it ran, is left out and listed.
* Approach 3 (parametric): L(N, D) = E + A N^-alpha + B D^-beta, fitted as the paper's appendix D.2 does:
  minimise the sum of Huber losses (delta 1e-3) of log L_hat - log L with log L_hat = LSE(a - alpha log N,
  b - beta log D, e) (A = exp a, B = exp b, E = exp e), by L-BFGS from a grid of starts (the paper's grid:
  alpha, beta in {0, 0.5, .., 2}, e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}; L-BFGS runs from the
  ``starts`` best points of the grid, the paper runs it from all of them; the parameters are bounded,
  ``BOUNDS``, so that a ladder too small to pin them down ends at a bound instead of overflowing; exponents
  stay positive). E may be pinned to a known value
  (the exact optimum of a synthetic source) instead of fitted. Intervals: the percentile bootstrap over the
  points (resample the points with replacement, refit; each refit starts from the full fit and from the best
  points of the grid on the resample). The compute-optimal allocation under C = k N D is N_opt = G (C/k)^a
  with a = beta / (alpha + beta), G = (alpha A / (beta B))^(1 / (alpha + beta)), D_opt = (C/k) / N_opt.
* Compute multiplier between two recipes (each fitted by approach 3): the factor m = C_B / C_A at which
  recipe B, trained compute-optimally with C_B, reaches the loss recipe A reaches compute-optimally with C_A
  (m < 1: B needs less compute). Its interval bootstraps both recipes' points independently.
* Loss to downstream: acc(L) = floor + (ceiling - floor) / (1 + exp(k (L - L0))), the accuracy a model of loss
  L reaches, rising from ``floor`` (chance) at high loss to ``ceiling`` as L falls; the ceiling is the exact
  ceiling of the task where the source knows it (accuracy of the exact-probability rule), else fitted within
  [floor, 1]. Least squares in (k, L0) (and the ceiling where it is free).

FLOPs: C = k N D with N the non-embedding parameters and k = 6 (forward + backward, Kaplan et al. 2020) unless
the model exposes its own training FLOPs per token (``Backbone.flops_per_token``): then k = flops_per_token / N.

This module holds approaches 1 and 2 and the loss-to-downstream fit; approach 3, its bootstrap and the compute
multiplier are in ``lmlab.report.parametric``; ``lmlab.report.scaling`` fits a sweep's runs with both.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from lmlab.errors import UserError
from lmlab.stats import ols

HUBER_DELTA = 1e-3
FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward (2 N D) + backward (4 N D)
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
        "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}  # Hoffmann et al., appendix D.2


# ----- power laws (approaches 1 and 2) -----

@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent, fitted by least squares in log-log; ``half`` is the 95% t-interval half-width of the
    exponent (NaN with fewer than three points)."""

    coef: float
    exponent: float
    half: float
    n: int

    def __call__(self, x):
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent


def power_law(x, y) -> PowerLaw:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(np.log(x)) == 0:
        raise UserError(f"a power law needs points at two computes at least, got {len(x)}: run the ladder at more "
                        "budgets or sizes.")
    fit = ols(np.column_stack([np.ones(len(x)), np.log(x)]), np.log(y))
    return PowerLaw(math.exp(fit.coef[0]), fit.coef[1], fit.interval(1)[1], len(x))


@dataclass
class Allocation:
    """The compute-optimal allocation found by approach 1 or 2: the points it rests on and the power laws."""

    compute: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    n_law: PowerLaw
    d_law: PowerLaw
    left_out: list[str] = field(default_factory=list)


def _points(N, D, L, k=None):
    N, D, L = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and L must have one value per point, got {len(N)}, {len(D)}, {len(L)}")
    k = np.full(len(N), FLOPS_PER_PARAM_TOKEN) if k is None else np.broadcast_to(np.asarray(k, float), N.shape)
    if not (np.all(N > 0) and np.all(D > 0) and np.all(L > 0) and np.all(np.isfinite(L))):
        raise UserError("every point needs a positive model size, token count and finite loss: leave out the runs "
                        "that did not finish.")
    return N, D, L, np.asarray(k, dtype=np.float64)


def envelope(N, D, L, k=None, bins: int = 10) -> Allocation:
    """Approach 1: the lowest-loss point in each of ``bins`` log-spaced compute bins, and power laws through them."""
    N, D, L, k = _points(N, D, L, k)
    C = k * N * D
    edges = np.linspace(np.log(C.min()), np.log(C.max()), bins + 1)
    which = np.clip(np.searchsorted(edges, np.log(C), side="right") - 1, 0, bins - 1)
    best = [int(np.flatnonzero(which == b)[np.argmin(L[which == b])]) for b in range(bins) if np.any(which == b)]
    return Allocation(C[best], N[best], D[best], power_law(C[best], N[best]), power_law(C[best], D[best]))


def isoflop(N, D, L, k=None, rel_tol: float = 0.05) -> Allocation:
    """Approach 2: a parabola in log N per group of equal compute (within ``rel_tol``), its minimum per group,
    and power laws through the minima."""
    N, D, L, k = _points(N, D, L, k)
    C = k * N * D
    order = np.argsort(C)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if C[i] <= C[current[0]] * (1 + rel_tol):
            current.append(i)
        else:
            groups.append(current)
            current = [i]
    groups.append(current)
    compute, n_opt, d_opt, left = [], [], [], []
    for g in groups:
        g = np.asarray(g)
        c = float(np.exp(np.log(C[g]).mean()))
        x = np.log(N[g])
        if len(np.unique(x)) < 3:
            left.append(f"C={c:.3g}: {len(np.unique(x))} sizes (a parabola needs 3)")
            continue
        p2, p1, _ = np.polyfit(x, L[g], 2)
        if p2 <= 0:
            left.append(f"C={c:.3g}: the loss is not convex in log N")
            continue
        x_min = -p1 / (2 * p2)
        if not x.min() <= x_min <= x.max():
            left.append(f"C={c:.3g}: the minimum lies outside the sizes run ({math.exp(x_min):.3g})")
            continue
        kk = float(np.exp(np.log(k[g]).mean()))
        compute.append(c)
        n_opt.append(math.exp(x_min))
        d_opt.append(c / (kk * math.exp(x_min)))
    if len(compute) < 2:
        few = sum("a parabola needs 3" in r for r in left)
        raise UserError(f"approach 2 needs two isoFLOP groups with a minimum inside their sizes, found "
                        f"{len(compute)} of {len(groups)} groups of equal compute ({few} with fewer than 3 sizes): "
                        "run three sizes or more at each of two computes or more.")
    compute, n_opt, d_opt = (np.asarray(v) for v in (compute, n_opt, d_opt))
    return Allocation(compute, n_opt, d_opt, power_law(compute, n_opt), power_law(compute, d_opt), left)


# ----- loss to downstream accuracy -----

@dataclass(frozen=True)
class Downstream:
    """acc(L) = floor + (ceiling - floor) / (1 + exp(k (L - L0))); ``fixed_ceiling``: the ceiling was given."""

    floor: float
    ceiling: float
    k: float
    L0: float
    fixed_ceiling: bool

    def __call__(self, loss):
        z = np.clip(self.k * (np.asarray(loss, dtype=np.float64) - self.L0), -50, 50)
        return self.floor + (self.ceiling - self.floor) / (1 + np.exp(z))


def fit_downstream(loss, acc, floor: float, ceiling: float | None = None) -> Downstream:
    """The sigmoid from ``floor`` (chance) to ``ceiling`` (the exact ceiling, or fitted within [floor, 1] when
    None) of accuracy against loss, by least squares from a grid of starts."""
    from scipy.optimize import least_squares

    loss, acc = np.asarray(loss, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    free = ceiling is None
    if len(loss) < (3 if free else 2) or np.ptp(loss) == 0:
        raise UserError(f"the loss-to-accuracy fit needs {3 if free else 2} runs of different losses at least, got "
                        f"{len(loss)}: add runs of other sizes or budgets.")
    if not free and not floor < ceiling <= 1:
        raise UserError(f"the accuracy ceiling {ceiling} must lie in ({floor}, 1]: pass the task's exact ceiling.")

    def curve(p):
        c = p[2] if free else ceiling
        return Downstream(floor, c, p[0], p[1], not free)

    def residuals(p):
        return curve(p)(loss) - acc

    span = float(np.ptp(loss))
    best = None
    for k0, l0 in itertools.product((1 / span, 4 / span, 16 / span), np.quantile(loss, [0.25, 0.5, 0.75])):
        p0 = [k0, l0] + ([min(1.0, max(acc.max(), floor + 1e-3))] if free else [])
        bounds = ([0, -np.inf] + ([floor] if free else []), [np.inf, np.inf] + ([1.0] if free else []))
        res = least_squares(residuals, p0, bounds=bounds)
        if best is None or res.cost < best.cost:
            best = res
    return curve(best.x)


