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
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

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


# ----- the `lmlab report --scaling` analysis of a sweep's runs -----

LOSS_METRICS = ("perplexity/loss", "val/loss")  # the loss fitted, the first a run reports (or --metric)
OPTIMUM = "perplexity/optimum"  # the exact irreducible loss, where the source knows it: E is also fitted pinned
RESAMPLES = 200


@dataclass
class Point:
    """One finished run: its recipe (the ``--compare`` key's value, or ``""``), non-embedding parameters ``N``,
    training tokens ``D``, compute per parameter and token ``k``, loss, and its other metrics."""

    recipe: str
    job: str
    N: float
    D: float
    k: float
    loss: float
    metrics: dict[str, float]

    @property
    def C(self) -> float:
        return self.k * self.N * self.D


def row_tokens(data) -> int:
    """The tokens of one training row: ``block_size`` (packed text), ``length`` + 2 (an HMM's ``[BOS] x_1..x_n
    [EOS]``), or 2^levels + 2 (a PCFG's longest sentence with BOS and EOS: batches are padded to their longest
    row, and a batch of many sentences nearly always holds one of the longest length)."""
    for key, extra in (("block_size", 0), ("length", 2)):
        if data.get(key) is not None:
            return int(data[key]) + extra
    if data.get("levels") is not None:
        return 2 ** int(data.levels) + 2
    raise UserError(f"the data {data.get('_target_', '?')} records no row length (block_size, length or levels), so "
                    "the tokens a run trained on are unknown: fit runs on text, HMM or PCFG data.")


def model_size(run) -> tuple[float, float, int]:
    """``(N, k, rows' tokens)`` of a finished run: its model built from the recorded config on the meta device
    (no weights, no data), N = ``non_embedding_parameters()``, k = ``flops_per_token(row tokens)`` / N (6 where
    the model does not count its own FLOPs)."""
    import torch
    from hydra.utils import instantiate

    from lmlab.run_dir import model_args, read_config

    cfg = read_config(run)
    args = model_args(run)
    with torch.device("meta"):
        model = instantiate(cfg.model, vocab_size=args["vocab_size"], attention=args["attention"])
    n = float(model.non_embedding_parameters())
    tokens = row_tokens(cfg.data)
    flops = getattr(model, "flops_per_token", None)
    k = float(flops(tokens)) / n if flops is not None else FLOPS_PER_PARAM_TOKEN
    return n, k, tokens


def parse_compare(text: str | None) -> tuple[str, list[str]] | None:
    if text is None:
        return None
    key, _, values = text.partition("=")
    arms = [v for v in values.split(",") if v]
    if not key or len(arms) != 2:
        raise UserError(f"--compare {text!r} is not key=a,b: name the swept setting and its two recipes, e.g. "
                        "--compare objective=clm,mlm.")
    return key, arms


def load_points(sweeps, compare: tuple[str, list[str]] | None = None, metric: str | None = None) -> list[Point]:
    """The finished runs of ``sweeps`` as points; with ``compare``, only the two recipes' runs."""
    from lmlab.report.sweep import load_jobs, same_value
    from lmlab.run_dir import read_config

    points = []
    jobs = [j for j in load_jobs([Path(s) for s in sweeps]) if j.status == "done"]
    for job in jobs:
        recipe = ""
        if compare is not None:
            key, arms = compare
            recipe = next((a for a in arms if same_value(job.settings.get(key, ""), a)), None)
            if recipe is None:
                continue
        name = metric or next((m for m in LOSS_METRICS if m in job.metrics), None)
        loss = job.metrics.get(name) if name else None
        if loss is None or not math.isfinite(loss):
            raise UserError(f"the run {job.sweep / job.name} reports no {metric or ' or '.join(LOSS_METRICS)}: run "
                            "eval=perplexity on it, or choose the loss with --metric.")
        run = job.sweep / job.name
        n, k, tokens = model_size(run)
        cfg = read_config(run)
        d = float(job.metrics["train/steps"]) * int(cfg.batch_size) * tokens
        points.append(Point(recipe, job.name, n, d, k, float(loss), job.metrics))
    if compare is not None:
        for arm in compare[1]:
            if not any(p.recipe == arm for p in points):
                raise UserError(f"no finished run has {compare[0]}={arm}: compare two values the sweep ran.")
    if not points:
        raise UserError("no finished run to fit: wait for the sweep's jobs to finish.")
    return points


@dataclass
class RecipeFits:
    recipe: str
    points: list[Point]
    optimum: float | None
    fits: dict[str, ParametricFit] = field(default_factory=dict)  # "E free", "E pinned"
    envelope: Allocation | None = None
    isoflop: Allocation | None = None
    downstream: dict[str, Downstream] = field(default_factory=dict)
    holdout: list[tuple[Point, float]] = field(default_factory=list)  # (run of the largest model, its prediction)
    notes: list[str] = field(default_factory=list)


def _optimum(points: list[Point]) -> float | None:
    values = {round(p.metrics[OPTIMUM], 9) for p in points if math.isfinite(p.metrics.get(OPTIMUM, math.nan))}
    return values.pop() if len(values) == 1 else None


def _downstream_metrics(points: list[Point]) -> dict[str, tuple[float, float | None]]:
    """``{accuracy metric: (floor, ceiling or None)}``: the ``<prefix>/acc`` metrics with a ``<prefix>/chance``,
    and their exact ``<prefix>/ceiling`` where every run records one."""
    out = {}
    for m in sorted(points[0].metrics):
        if not m.endswith("/acc"):
            continue
        prefix = m[: -len("/acc")]
        chance = [p.metrics.get(f"{prefix}/chance") for p in points]
        if any(v is None for v in chance) or any(m not in p.metrics for p in points):
            continue
        ceilings = [p.metrics.get(f"{prefix}/ceiling") for p in points]
        ceiling = float(np.mean(ceilings)) if all(c is not None for c in ceilings) else None
        out[m] = (float(np.mean(chance)), ceiling)
    return out


def extrapolation(points: list[Point]) -> list[tuple[Point, float]]:
    """The extrapolation check: approach 3 (E free) fitted without the runs of the largest model, and its
    prediction of each of those runs' loss, ``[(run, predicted loss)]``."""
    largest = max(p.N for p in points)
    rest = [p for p in points if p.N < largest]
    if len({p.N for p in rest}) < 2:
        raise UserError("it needs runs of three model sizes or more")
    law = fit_parametric(*(np.array([getattr(p, a) for p in rest]) for a in ("N", "D", "loss")))
    return [(p, float(law.loss(p.N, p.D))) for p in points if p.N == largest]


def fit_recipe(recipe: str, points: list[Point], resamples: int, seed: int = 0) -> RecipeFits:
    """Every approach on one recipe's points; an approach the points cannot support is noted, not fitted."""
    N, D, L, k = (np.array([getattr(p, a) for p in points]) for a in ("N", "D", "loss", "k"))
    out = RecipeFits(recipe, points, _optimum(points))
    for label, pinned in (("E free", None), ("E pinned", out.optimum)):
        if label == "E pinned" and pinned is None:
            continue
        try:
            out.fits[label] = bootstrap_parametric(N, D, L, E=pinned, resamples=resamples, seed=seed)
            bounded = at_bounds(out.fits[label].law)
            if bounded:
                out.notes.append(f"approach 3 ({label}) ended at the bound of the search in {', '.join(bounded)}: "
                                 "these runs do not determine the law; add sizes and budgets.")
        except UserError as e:
            out.notes.append(f"approach 3 ({label}) not fitted: {e}")
    try:
        out.holdout = extrapolation(points)
    except UserError as e:
        out.notes.append(f"extrapolation check not made: {e}")
    for name, fit in (("envelope", envelope), ("isoflop", isoflop)):
        try:
            setattr(out, name, fit(N, D, L, k))
        except UserError as e:
            out.notes.append(f"approach {1 if name == 'envelope' else 2} not fitted: {e}")
    for metric, (floor, ceiling) in _downstream_metrics(points).items():
        try:
            out.downstream[metric] = fit_downstream(L, [p.metrics[metric] for p in points], floor, ceiling)
        except UserError as e:
            out.notes.append(f"{metric} against loss not fitted: {e}")
    return out


def _g(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _iv(iv: Interval) -> str:
    return f"{_g(iv.value)} [{_g(iv.low)}, {_g(iv.high)}]"


def to_markdown(sweeps, recipes: list[RecipeFits], compare, multiplier: Multiplier | None, plot: Path | None) -> str:
    md = ["# Scaling report", "", "Sweep directories: " + ", ".join(f"`{s}`" for s in sweeps) + ".", "",
          "N: non-embedding parameters; D: training tokens (steps x batch size x row tokens); C = k N D, k the "
          "model's own training FLOPs per token over N (`lmlab.report.scaling`). Approach 3: L = E + A N^-alpha + "
          f"B D^-beta, Huber (delta {HUBER_DELTA}) in log space, 95% percentile-bootstrap intervals over the runs "
          f"({RESAMPLES} resamples); a = beta / (alpha + beta) is the exponent of N_opt(C).", ""]
    for r in recipes:
        title = f"{compare[0]}={r.recipe}" if compare else "all runs"
        md += [f"## {title}", "", "| job | N | D | C | loss |", "|---|---|---|---|---|"]
        for p in sorted(r.points, key=lambda p: (p.N, p.D)):
            md.append(f"| {p.job} | {_g(p.N)} | {_g(p.D)} | {_g(p.C)} | {_g(p.loss, 5)} |")
        md.append("")
        if r.optimum is not None:
            md += [f"Exact optimum (`{OPTIMUM}`): {_g(r.optimum, 5)}.", ""]
        if r.fits:
            md += ["| approach 3 | E | A | B | alpha | beta | a |", "|---|---|---|---|---|---|---|"]
            for label, f in r.fits.items():
                iv = f.intervals
                e = f"{_g(f.law.E)} (pinned)" if f.law.pinned_e else _iv(iv["E"])
                md.append(f"| {label} | {e} | " + " | ".join(_iv(iv[q]) for q in ("A", "B", "alpha", "beta", "a"))
                          + " |")
            md.append("")
        if r.optimum is not None and "E free" in r.fits:
            md += [f"E free minus the exact optimum: {_g(r.fits['E free'].law.E - r.optimum, 3)} nats.", ""]
        if r.holdout:
            md += [f"Extrapolation check: approach 3 (E free) fitted without the largest model (N = "
                   f"{_g(r.holdout[0][0].N)}) predicts its runs:", "", "| job | D | loss | predicted | error |",
                   "|---|---|---|---|---|"]
            md += [f"| {p.job} | {_g(p.D)} | {_g(p.loss, 5)} | {_g(pred, 5)} | {_g(pred - p.loss, 3)} |"
                   for p, pred in sorted(r.holdout, key=lambda h: h[0].D)]
            md += ["", f"Largest error: {_g(max(abs(pred - p.loss) for p, pred in r.holdout), 3)} nats.", ""]
        for label, alloc in (("approach 1 (envelope)", r.envelope), ("approach 2 (isoFLOP)", r.isoflop)):
            if alloc is not None:
                md.append(f"- {label}: N_opt ~ C^{_g(alloc.n_law.exponent, 3)} (± {_g(alloc.n_law.half, 2)}), "
                          f"D_opt ~ C^{_g(alloc.d_law.exponent, 3)} (± {_g(alloc.d_law.half, 2)}) from "
                          f"{alloc.n_law.n} points" + (f"; left out: {'; '.join(alloc.left_out)}"
                                                        if alloc.left_out else ""))
        for metric, d in r.downstream.items():
            md.append(f"- {metric} against loss: floor {_g(d.floor, 3)}, ceiling {_g(d.ceiling, 3)} "
                      f"({'exact' if d.fixed_ceiling else 'fitted'}), k {_g(d.k, 3)}, L0 {_g(d.L0, 4)}")
        md += [f"- {n}" for n in r.notes]
        md.append("")
    if multiplier is not None:
        b, a = compare[1][1], compare[1][0]
        md += ["## Compute multiplier", "",
               f"{compare[0]}={b} reaches the compute-optimal loss that {compare[0]}={a} reaches at C = "
               f"{_g(multiplier.compute)} ({_g(multiplier.loss, 5)}) with {_iv(multiplier.interval)} times that "
               "compute (approach 3 with E free; 95% bootstrap interval over both recipes' runs; below 1: "
               f"{compare[0]}={b} needs less compute).", ""]
    if plot is not None:
        md += [f"![scaling]({plot.name})", ""]
    return "\n".join(md)


def plot_fits(recipes: list[RecipeFits], out: Path) -> Path:
    """Loss against compute: the runs, and each recipe's fitted compute-optimal frontier (approach 3, E free)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(recipes):
        color = f"C{i}"
        C = np.array([p.C for p in r.points])
        ax.scatter(C, [p.loss for p in r.points], color=color, s=14, label=r.recipe or "runs")
        fit = r.fits.get("E free")
        if fit is not None:
            grid = np.logspace(np.log10(C.min()) - 0.5, np.log10(C.max()) + 0.5, 100)
            k = float(np.exp(np.mean(np.log([p.k for p in r.points]))))
            ax.plot(grid, fit.law.optimal_loss(grid, k), color=color, lw=1,
                    label=f"{r.recipe + ': ' if r.recipe else ''}L_opt(C), E={fit.law.E:.3g}")
            ax.axhline(fit.law.E, color=color, ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(sweeps, compare: str | None = None, metric: str | None = None) -> Path:
    """``lmlab report --scaling``: fit the finished runs of ``sweeps`` (per recipe with ``compare`` = "key=a,b")
    and write ``report.md`` and ``scaling.png`` into the first sweep directory."""
    from lmlab.io import write_text

    sweeps = [Path(s) for s in sweeps]
    pair = parse_compare(compare)
    points = load_points(sweeps, pair, metric)
    names = pair[1] if pair else [""]
    recipes = [fit_recipe(n, [p for p in points if p.recipe == n], RESAMPLES, seed=i) for i, n in enumerate(names)]
    multiplier = None
    if pair is not None and all("E free" in r.fits for r in recipes):
        ks = [float(np.exp(np.mean(np.log([p.k for p in r.points])))) for r in recipes]
        both = min(max(p.C for p in r.points) for r in recipes)  # within the computes both recipes ran
        multiplier = multiplier_between(recipes[0].fits["E free"], recipes[1].fits["E free"], both, *ks)
    out = sweeps[0]
    plot = plot_fits(recipes, out)
    write_text(out / "report.md", to_markdown(sweeps, recipes, pair, multiplier, plot))
    return out / "report.md"
