"""Approach 3 of Hoffmann et al., "Training Compute-Optimal Large Language Models" (Chinchilla), arXiv
2203.15556, appendix D.2: the parametric fit L(N, D) = E + A N^-alpha + B D^-beta (Huber loss on log L from the
paper's grid of starts, bounded parameters, E optionally pinned), its percentile bootstrap over the points, and
the compute multiplier between two recipes (``lmlab.report.scaling_laws`` says what each assumes)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lmlab.errors import UserError
from lmlab.report.scaling_laws import FLOPS_PER_PARAM_TOKEN, GRID, HUBER_DELTA, _points

# ----- approach 3: the parametric fit -----

NAMES = ("a", "b", "e", "alpha", "beta")


@dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A N^-alpha + B D^-beta. ``pinned_e``: E was given, not fitted."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    pinned_e: bool = False

    @property
    def a(self) -> float:
        """The exponent of N_opt(C): beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta

    def optimal(self, C, k: float = FLOPS_PER_PARAM_TOKEN) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) at compute ``C`` = k N D."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (np.asarray(C, dtype=np.float64) / k) ** self.a
        return n, np.asarray(C, dtype=np.float64) / k / n

    def optimal_loss(self, C, k: float = FLOPS_PER_PARAM_TOKEN):
        return self.loss(*self.optimal(C, k))

    def compute_for(self, loss: float, k: float = FLOPS_PER_PARAM_TOKEN) -> float:
        """The compute at which the compute-optimal loss equals ``loss`` (inf at or below E)."""
        if loss <= self.E:
            return math.inf
        # L_opt(C) - E is a power law in C: (A N_opt^-alpha + B D_opt^-beta) = R C^-(alpha beta / (alpha + beta))
        c0 = 1.0
        r = float(self.optimal_loss(c0, k)) - self.E
        rate = self.alpha * self.beta / (self.alpha + self.beta)
        return c0 * (r / (loss - self.E)) ** (1 / rate)


def _objective(theta, x, y, logl, e_fixed):
    """Sum over points of Huber(log L_hat - log L) / delta and its gradient in ``theta``."""
    if e_fixed is None:
        a, b, e, alpha, beta = theta
    else:
        a, b, alpha, beta = theta
        e = e_fixed
    t = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - logl
    w = w / s
    absr = np.abs(r)
    value = np.where(absr <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA)).sum() / HUBER_DELTA
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
    grad = [(dr * w[0]).sum(), (dr * w[1]).sum()]
    if e_fixed is None:
        grad.append((dr * w[2]).sum())
    grad += [-(dr * w[0] * x).sum(), -(dr * w[1] * y).sum()]
    return value, np.asarray(grad)


def _grid(e_fixed) -> np.ndarray:
    keys = ("a", "b", "e", "alpha", "beta") if e_fixed is None else ("a", "b", "alpha", "beta")
    return np.asarray(list(itertools.product(*(GRID[k] for k in keys))))


def _grid_values(grid, x, y, logl, e_fixed) -> np.ndarray:
    if e_fixed is None:
        a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    else:
        a, b, alpha, beta = (grid[:, i:i + 1] for i in range(4))
        e = np.full_like(a, e_fixed)
    r = np.logaddexp(np.logaddexp(a - alpha * x, b - beta * y), e) - logl
    absr = np.abs(r)
    return np.where(absr <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA)).sum(axis=1)


BOUNDS = {"a": (-30.0, 60.0), "b": (-30.0, 60.0), "e": (-10.0, 5.0), "alpha": (1e-4, 4.0), "beta": (1e-4, 4.0)}


def _minimise(x, y, logl, e_fixed, starts: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    keys = ("a", "b", "e", "alpha", "beta") if e_fixed is None else ("a", "b", "alpha", "beta")
    bounds = [BOUNDS[k] for k in keys]
    best, best_value = None, math.inf
    for s in starts:
        s = np.clip(s, [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(_objective, s, args=(x, y, logl, e_fixed), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, res.fun
    return best


def _to_law(theta, e_fixed) -> Parametric:
    if e_fixed is None:
        a, b, e, alpha, beta = theta
        return Parametric(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta))
    a, b, alpha, beta = theta
    return Parametric(math.exp(e_fixed), math.exp(a), math.exp(b), float(alpha), float(beta), pinned_e=True)


def _theta(law: Parametric) -> np.ndarray:
    head = [math.log(law.A), math.log(law.B)] + ([] if law.pinned_e else [math.log(law.E)])
    return np.asarray(head + [law.alpha, law.beta])


def at_bounds(law: Parametric, tol: float = 1e-6) -> list[str]:
    """The parameters of a fit that ended at a bound of the search (``BOUNDS``): the points do not determine
    them."""
    values = {"a": math.log(law.A), "b": math.log(law.B), "alpha": law.alpha, "beta": law.beta}
    if not law.pinned_e:
        values["e"] = math.log(law.E)
    return [k for k, v in values.items() if min(abs(v - BOUNDS[k][0]), abs(v - BOUNDS[k][1])) <= tol * max(1, abs(v))]


def fit_parametric(N, D, L, E: float | None = None, starts: int = 8, init: Parametric | None = None) -> Parametric:
    """Approach 3: the Huber fit in log space of L = E + A N^-alpha + B D^-beta (E fitted, or pinned to ``E``),
    by L-BFGS from the ``starts`` best points of the grid (and from ``init`` where given)."""
    N, D, L, _ = _points(N, D, L)
    if len(L) < (4 if E is not None else 5):
        raise UserError(f"the parametric fit has {4 if E is not None else 5} parameters and {len(L)} points: run "
                        "more sizes or budgets.")
    if E is not None and not (0 < E < L.min()):
        raise UserError(f"the pinned irreducible loss {E} must lie in (0, {L.min():.4g}), below every loss: pin the "
                        "exact optimum of the data in the same units as the losses (nats per token).")
    e_fixed = None if E is None else math.log(E)
    x, y, logl = np.log(N), np.log(D), np.log(L)
    grid = _grid(e_fixed)
    chosen = grid[np.argsort(_grid_values(grid, x, y, logl, e_fixed))[:starts]]
    if init is not None:
        chosen = np.vstack([_theta(init), chosen])
    return _to_law(_minimise(x, y, logl, e_fixed, chosen), e_fixed)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def covers(self, truth: float) -> bool:
        return self.low <= truth <= self.high


@dataclass
class ParametricFit:
    """An approach-3 fit with its percentile-bootstrap intervals (``intervals``: E, A, B, alpha, beta, a)."""

    law: Parametric
    intervals: dict[str, Interval]
    resamples: list[Parametric]


QUANTITIES = {"E": lambda p: p.E, "A": lambda p: p.A, "B": lambda p: p.B, "alpha": lambda p: p.alpha,
              "beta": lambda p: p.beta, "a": lambda p: p.a}


def percentile(value: float, samples, confidence: float = 0.95) -> Interval:
    """The percentile interval of bootstrap ``samples`` around ``value``: the order statistics at (1 -
    confidence) / 2 and (1 + confidence) / 2 (no interpolation, so an infinite sample stays one). NaN samples
    (a refit that failed) are left out."""
    s = np.asarray([v for v in samples if v == v], dtype=np.float64)
    if len(s) < 2:
        return Interval(value, math.nan, math.nan)
    lo = float(np.quantile(s, (1 - confidence) / 2, method="lower"))
    hi = float(np.quantile(s, (1 + confidence) / 2, method="higher"))
    return Interval(value, lo, hi)


def bootstrap_parametric(N, D, L, E: float | None = None, resamples: int = 200, seed: int = 0,
                         starts: int = 8, resample_starts: int = 2, confidence: float = 0.95) -> ParametricFit:
    """Approach 3 with percentile-bootstrap intervals over the points."""
    N, D, L, _ = _points(N, D, L)
    law = fit_parametric(N, D, L, E, starts)
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(L), len(L))
        laws.append(fit_parametric(N[idx], D[idx], L[idx], E, resample_starts, init=law))
    intervals = {q: percentile(f(law), [f(p) for p in laws], confidence) for q, f in QUANTITIES.items()}
    return ParametricFit(law, intervals, laws)


# ----- compute multipliers between recipes -----

@dataclass
class Multiplier:
    """C_B / C_A at equal compute-optimal loss, with A at compute ``compute`` (``loss`` there), and its
    percentile-bootstrap interval."""

    compute: float
    loss: float
    interval: Interval


def multiplier_of(law_a: Parametric, law_b: Parametric, compute: float, k_a: float = FLOPS_PER_PARAM_TOKEN,
                  k_b: float = FLOPS_PER_PARAM_TOKEN) -> float:
    """The compute factor m = C_B / C_A at which recipe B's compute-optimal loss equals recipe A's at
    C_A = ``compute`` (inf where B's fitted E lies at or above that loss); ``k_a``, ``k_b``: each recipe's
    compute per parameter and token."""
    return law_b.compute_for(float(law_a.optimal_loss(compute, k_a)), k_b) / compute


def compute_multiplier(a: tuple, b: tuple, compute: float, k_a: float = FLOPS_PER_PARAM_TOKEN,
                       k_b: float = FLOPS_PER_PARAM_TOKEN, resamples: int = 200, seed: int = 0,
                       confidence: float = 0.95) -> Multiplier:
    """``a`` and ``b``: the (N, D, L) points of the two recipes, both fitted by approach 3 with E free; the
    interval bootstraps each recipe's points independently."""
    fit_a = bootstrap_parametric(*a, resamples=resamples, seed=seed)
    fit_b = bootstrap_parametric(*b, resamples=resamples, seed=seed + 1)
    return multiplier_between(fit_a, fit_b, compute, k_a, k_b, confidence)


def multiplier_between(fit_a: ParametricFit, fit_b: ParametricFit, compute: float,
                       k_a: float = FLOPS_PER_PARAM_TOKEN, k_b: float = FLOPS_PER_PARAM_TOKEN,
                       confidence: float = 0.95) -> Multiplier:
    """The multiplier of two bootstrapped fits (resample i of each paired: independent draws)."""
    value = multiplier_of(fit_a.law, fit_b.law, compute, k_a, k_b)
    samples = [multiplier_of(pa, pb, compute, k_a, k_b) for pa, pb in zip(fit_a.resamples, fit_b.resamples)]
    return Multiplier(compute, float(fit_a.law.optimal_loss(compute, k_a)), percentile(value, samples, confidence))


