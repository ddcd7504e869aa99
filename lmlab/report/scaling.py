"""``lmlab report <sweep> analysis=scaling``: the scaling-law fits of a sweep's runs (model sizes x budgets), after
Hoffmann et al., "Training Compute-Optimal Large Language Models" (Chinchilla), arXiv 2203.15556: approaches 1
and 2 and the loss-to-downstream fit (``lmlab.report.scaling_laws``), approach 3 with its bootstrap and, with
``compare``, the compute multiplier between two recipes (``lmlab.report.parametric``), written as ``report.md``
and ``scaling.png`` into the first sweep directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.report.parametric import (
    Interval,
    Multiplier,
    ParametricFit,
    at_bounds,
    bootstrap_parametric,
    fit_parametric,
    multiplier_between,
)
from lmlab.report.scaling_laws import (
    FLOPS_PER_PARAM_TOKEN,
    HUBER_DELTA,
    Allocation,
    Downstream,
    envelope,
    fit_downstream,
    isoflop,
)

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
    found = load_jobs([Path(s) for s in sweeps])
    if not found:
        raise UserError(f"no run under {', '.join(map(str, sweeps))}: pass the sweep directories that `lmlab train -m` "
                        "printed.")
    jobs = [j for j in found if j.status == "done"]
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
