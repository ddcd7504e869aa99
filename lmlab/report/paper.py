"""``lmlab report <dir>``: the claim-by-claim report of a rerun of Liu, Xie, Li & Ma, "Same Pre-training
Loss, Better Downstream: Implicit Bias Matters for Language Models", ICML 2023, arXiv 2210.14199.

It reads every job under ``<dir>`` (sweep directories, found by their ``.hydra/overrides.yaml``, read
through ``lmlab.report.summary.gather``), sorts the finished ones by the experiment that made them
(``cfg.name`` ends in ``continue``, ``size`` or ``algorithm``: the configs of
``conf/experiment/same_loss/``) and by data set, and writes ``<dir>/report.md`` beside PNG plots:

* claim (a), continued pre-training after convergence: per seed, the change of probe accuracy and of the
  trace between the first evaluation step whose gap to the optimum is within the tolerance
  ("converged") and the last step (still within the tolerance);
* claim (b), model size: among runs within the tolerance only, the largest size minus the smallest, paired
  by seed; traces are those measured after embedding every model in the largest width;
* claim (c), algorithm: AdamW minus the adversarial algorithm (accuracy, trace) and AdamW minus the
  lookup table (the probe on the source's exact conditionals), paired by seed, runs within the tolerance.

The verdict of every comparison follows one rule (``verdict``, written into the report): over the paired
seed differences, the mean and the half-width of its 95% t-interval; "reproduced" when the mean has the
paper's sign and the interval excludes 0, "not reproduced" when it has the opposite sign and excludes
0, "inconclusive" otherwise (the interval covers 0, fewer than two paired seeds, or a missing metric).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.io import write_text
from lmlab.report.summary import gather
from lmlab.run_dir import CONFIG, RESULTS, read_config, read_results
from lmlab.stats import t_interval

DEFAULT_TOLERANCE = 0.05  # nats: the largest gap to the optimum that counts as "the same, minimal loss"
SETTINGS_FILE = "reproduce.json"  # written by scripts/reproduce_paper.py: profile, tolerance, timings
CLAIMS = ("continue", "size", "algorithm")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

ACC, CI, GAP, TRACE, TRACE_SE, LOOKUP = ("probe/acc", "probe/acc_ci95", "perplexity/gap", "flatness/trace",
                                         "flatness/trace_se", "probe/lookup_acc")

RULE = (
    "For every comparison we pair runs by training seed and take the per-seed difference (accuracies in "
    "percentage points). With n >= 2 pairs, m = their mean and h = the half-width of the two-sided 95% "
    "Student-t interval of the mean (t(0.975, n-1) * sd / sqrt(n)). **Reproduced**: m has the sign the "
    "paper reports and |m| > h (the interval excludes 0). **Not reproduced**: m has the opposite sign and "
    "|m| > h. **Inconclusive**: the interval covers 0, fewer than 2 pairs, or a metric is missing. Only runs "
    "whose gap to the exact optimum (KL to the true single-mask conditionals on the fixed validation rows) "
    "is within the tolerance enter a comparison. A null result is inconclusive, not a refutation: with 3 "
    "seeds t(0.975, 2) = 4.30, so only effects several times the seed-to-seed spread are decided."
)

# The paper's numbers (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199; "[paper]": read from its text, not
# checked line by line).
PAPER = {
    ("continue", "acc"): {"pcfg": "+1.6 pts (task C, SGD constant lr)", "hmm": "+4.0 pts (task z_10)"},
    ("continue", "trace"): {"pcfg": "falls (no number)", "hmm": "falls (no number)"},
    ("size", "acc"): {"pcfg": "+6.9 pts at equal loss (task B probe 40.4% -> 50.5%)", "hmm": "+4.5 pts"},
    ("size", "trace"): {"pcfg": "-7.2 (Tr(H) 19.8 -> 12.6)", "hmm": "falls (no number)"},
    ("algorithm", "acc_adv"): {"pcfg": "+6.8 pts (task A: 89.9% vs 83.1%)", "hmm": "n/a (PCFG only)"},
    ("algorithm", "trace_adv"): {"pcfg": "-11.3 (task C: Tr(H) 8.01 vs 19.34)", "hmm": "n/a (PCFG only)"},
    ("algorithm", "acc_lookup"): {"pcfg": "+18.7 pts (task A: 89.9% vs 71.2%)", "hmm": "n/a (PCFG only)"},
}


# ----- the verdict rule -----

@dataclass
class Verdict:
    n: int
    mean: float
    ci: float
    verdict: str
    reason: str = ""


def verdict(diffs: list[float], expected_sign: int) -> Verdict:
    """The rule of the report (``RULE``) on the per-seed differences ``diffs``; ``expected_sign`` is
    +1 when the paper reports an increase, -1 a decrease."""
    x = np.asarray([d for d in diffs if d is not None and math.isfinite(d)], dtype=np.float64)
    if len(x) < 2:
        mean = float(x.mean()) if len(x) else float("nan")
        reason = "a metric is missing" if len(diffs) and not len(x) else f"{len(x)} paired seed(s), need 2"
        return Verdict(len(x), mean, float("nan"), INCONCLUSIVE, reason)
    mean, ci = float(x.mean()), t_interval(x)
    if mean == 0 or abs(mean) <= ci:
        return Verdict(len(x), mean, ci, INCONCLUSIVE, "the 95% interval covers 0")
    if np.sign(mean) == np.sign(expected_sign):
        return Verdict(len(x), mean, ci, REPRODUCED, "the paper's sign, interval excludes 0")
    return Verdict(len(x), mean, ci, NOT_REPRODUCED, "the opposite sign, interval excludes 0")


# ----- reading the runs -----

@dataclass
class Run:
    run_dir: Path
    status: str
    claim: str
    data: str
    seed: int
    d_model: int
    params: int
    arm: str  # adamw | adversarial | sgd ... (the training algorithm)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""

    def get(self, key: str) -> float:
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) else float("nan")


def _data_label(data_cfg: dict) -> str:
    target = str(data_cfg.get("_target_", ""))
    if target.endswith("HMMSource"):
        return "hmm"
    if target.endswith("PCFGSource"):
        grammar = data_cfg.get("grammar")
        return f"pcfg ({Path(grammar).name})" if grammar else "pcfg"
    return target.rsplit(".", 1)[-1] or "data"


def _arm(cfg: dict) -> str:
    objective = cfg.get("objective", {})
    if "adversarial" in str(objective.get("_target_", "")).lower() and float(objective.get("lam", 1.0)) > 0:
        return "adversarial"  # lam = 0 is plain MLM through the same code path (the AdamW arm)
    return str(cfg.get("optim", {}).get("_target_", "optim")).rsplit(".", 1)[-1].lower()


def _paper_key(data: str) -> str:
    return "hmm" if data.startswith("hmm") else "pcfg"


def job_dirs(path: Path) -> list[Path]:
    """The sweep (or run) directories under ``path`` that hold jobs."""
    return sorted({p.parent.parent.parent for p in Path(path).rglob(".hydra/overrides.yaml")})


def load_runs(path: str | Path) -> list[Run]:
    """Every job under ``path`` that belongs to a same-loss experiment (done or not)."""
    runs = []
    for sweep in job_dirs(Path(path)):
        for row in gather(sweep):
            run_dir = sweep / row["job"]
            if (run_dir / RESULTS).exists() and row["status"] == "done":
                results = read_results(run_dir)
                cfg = results.get("config", {})
                history = results.get("history", [])
            elif (run_dir / CONFIG).exists():
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(read_config(run_dir))
                history = []
            else:
                continue
            claim = str(cfg.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if claim not in CLAIMS:
                continue
            metrics = {k: v for k, v in row.items() if "/" in k}
            runs.append(Run(run_dir=run_dir, status=row["status"], claim=claim, data=_data_label(cfg.get("data", {})),
                            seed=int(cfg.get("seed", 0)), d_model=int(cfg.get("model", {}).get("d_model", 0) or 0),
                            params=int(metrics.get("model/params", 0) or 0), arm=_arm(cfg), metrics=metrics,
                            history=sorted(history, key=lambda h: h["step"]), reason=row.get("reason", "")))
    return runs


# ----- the claims -----

@dataclass
class Comparison:
    """One row of a claim table: a paired comparison and its verdict."""
    claim: str
    data: str
    what: str
    paper: str
    ours: str
    result: Verdict
    gap: str
    note: str = ""


def _mean_ci(values: list[float]) -> tuple[float, float]:
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), (t_interval(x) if len(x) > 1 else float("nan"))


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 \
        else f"{v:.2e}"


def _pm(mean: float, ci: float, scale: float = 1.0, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    ci_s = f" ± {_fmt(ci * scale, 2)}" if math.isfinite(ci) else ""
    return f"{_fmt(mean * scale, digits)}{ci_s}"


def _diff_row(claim: str, data: str, what: str, paper_key: str, diffs: list[float], sign: int, unit: str,
              gaps: list[float], note: str = "") -> Comparison:
    v = verdict(diffs, sign)
    ours = "n/a" if not math.isfinite(v.mean) else f"{v.mean:+.3g}{unit}"
    gap_mean = _mean_ci(gaps)[0]
    return Comparison(claim, data, what, PAPER[(claim, paper_key)][_paper_key(data)], ours, v,
                      f"{_fmt(gap_mean)} (max {_fmt(max(gaps) if gaps else float('nan'))})" if gaps else "n/a",
                      note)


def converged_step(history: list[dict[str, Any]], tolerance: float) -> dict[str, Any] | None:
    """The first evaluation of ``history`` whose gap to the optimum is within ``tolerance``."""
    for h in history:
        if GAP in h and h[GAP] <= tolerance:
            return h
    return None


def claim_continue(runs: list[Run], tolerance: float) -> tuple[list[Comparison], list[str]]:
    rows, lines = [], []
    for data in sorted({r.data for r in runs}):
        group = [r for r in runs if r.data == data and r.status == "done"]
        acc_d, tr_d, gaps, details = [], [], [], []
        for r in sorted(group, key=lambda r: r.seed):
            h0 = converged_step(r.history, tolerance)
            h1 = r.history[-1] if r.history else None
            if h0 is None or h1 is None or h1["step"] <= h0["step"] or not h1.get(GAP, math.inf) <= tolerance:
                final_gap = h1.get(GAP, float("nan")) if h1 else float("nan")
                details.append(f"seed {r.seed}: excluded (no evaluation within the tolerance before the last, "
                               f"final gap {_fmt(final_gap)})")
                continue
            acc_d.append(100 * (h1.get(ACC, math.nan) - h0.get(ACC, math.nan)))
            tr_d.append(h1.get(TRACE, math.nan) - h0.get(TRACE, math.nan))
            gaps += [h0[GAP], h1[GAP]]
            details.append(f"seed {r.seed}: step {h0['step']} -> {h1['step']}: gap {_fmt(h0[GAP])} -> "
                           f"{_fmt(h1[GAP])}, acc {_fmt(100 * h0.get(ACC, math.nan))}% -> "
                           f"{_fmt(100 * h1.get(ACC, math.nan))}%, trace {_fmt(h0.get(TRACE, math.nan))} -> "
                           f"{_fmt(h1.get(TRACE, math.nan))}")
        note = f"{len(acc_d)} of {len(group)} seeds converged"
        rows.append(_diff_row("continue", data, "probe acc (last - converged)", "acc", acc_d, +1, " pts", gaps, note))
        rows.append(_diff_row("continue", data, "Tr(H) (last - converged)", "trace", tr_d, -1, "", gaps, note))
        lines += [f"- {data}, {d}" for d in details]
    return rows, lines


def _eligible(r: Run, tolerance: float) -> bool:
    return r.status == "done" and r.get(GAP) <= tolerance


def claim_size(runs: list[Run], tolerance: float) -> tuple[list[Comparison], list[str]]:
    rows, lines = [], []
    lines.append("| data | d_model | params | runs within tolerance | gap to optimum | probe acc (%), all runs | "
                 "Tr(H) (embedded), all runs |")
    lines.append("|---|---|---|---|---|---|---|")
    for data in sorted({r.data for r in runs}):
        group = [r for r in runs if r.data == data]
        sizes = sorted({r.d_model for r in group})
        for d in sizes:
            at = [r for r in group if r.d_model == d]
            ok = [r for r in at if _eligible(r, tolerance)]
            done = [r for r in at if r.status == "done"]
            params = max((r.params for r in at), default=0)
            lines.append(f"| {data} | {d} | {params} | {len(ok)} of {len(at)} | "
                         f"{_pm(*_mean_ci([r.get(GAP) for r in at]))} | "
                         f"{_pm(*_mean_ci([r.get(ACC) for r in done]), scale=100)} | "
                         f"{_pm(*_mean_ci([r.get(TRACE) for r in done]))} |")
        ok_sizes = [d for d in sizes if any(_eligible(r, tolerance) for r in group if r.d_model == d)]
        acc_d, tr_d, gaps = [], [], []
        if len(ok_sizes) >= 2:
            small, large = ok_sizes[0], ok_sizes[-1]
            by = {(r.d_model, r.seed): r for r in group if _eligible(r, tolerance)}
            for seed in sorted({s for (_, s) in by}):
                a, b = by.get((small, seed)), by.get((large, seed))
                if a and b:
                    acc_d.append(100 * (b.get(ACC) - a.get(ACC)))
                    tr_d.append(b.get(TRACE) - a.get(TRACE))
                    gaps += [a.get(GAP), b.get(GAP)]
            what = f"d_model {large} - {small}"
            note = f"sizes within tolerance: {', '.join(map(str, ok_sizes))} of {', '.join(map(str, sizes))}"
        else:
            what = "largest - smallest size"
            note = f"fewer than two sizes within tolerance ({', '.join(map(str, ok_sizes)) or 'none'})"
        rows.append(_diff_row("size", data, f"probe acc, {what}", "acc", acc_d, +1, " pts", gaps, note))
        rows.append(_diff_row("size", data, f"Tr(H) embedded, {what}", "trace", tr_d, -1, "", gaps, note))
    return rows, lines


def claim_algorithm(runs: list[Run], tolerance: float) -> tuple[list[Comparison], list[str]]:
    rows, lines = [], []
    lines.append("| data | algorithm | runs within tolerance | gap to optimum | probe acc (%), all runs | "
                 "Tr(H), all runs |")
    lines.append("|---|---|---|---|---|---|")
    for data in sorted({r.data for r in runs}):
        group = [r for r in runs if r.data == data]
        base = {r.seed: r for r in group if r.arm != "adversarial" and _eligible(r, tolerance)}
        adv = {r.seed: r for r in group if r.arm == "adversarial" and _eligible(r, tolerance)}
        for name, arm in (("AdamW (MLM; adversarial_mlm with lam=0)", [r for r in group if r.arm != "adversarial"]),
                          ("adversarial", [r for r in group if r.arm == "adversarial"])):
            ok = [r for r in arm if _eligible(r, tolerance)]
            done = [r for r in arm if r.status == "done"]
            lines.append(f"| {data} | {name} | {len(ok)} of {len(arm)} | {_pm(*_mean_ci([r.get(GAP) for r in arm]))}"
                         f" | {_pm(*_mean_ci([r.get(ACC) for r in done]), scale=100)} | "
                         f"{_pm(*_mean_ci([r.get(TRACE) for r in done]))} |")
        lookups = [r.get(LOOKUP) for r in group if r.status == "done"]
        lines.append(f"| {data} | lookup table (exact conditionals) | - | 0 (by construction) | "
                     f"{_pm(*_mean_ci(lookups), scale=100)} | - |")
        pairs = [(base[s], adv[s]) for s in sorted(base) if s in adv]
        gaps = [x.get(GAP) for p in pairs for x in p]
        note = f"{len(pairs)} seed pair(s) with both runs within tolerance"
        rows.append(_diff_row("algorithm", data, "probe acc, AdamW - adversarial", "acc_adv",
                              [100 * (a.get(ACC) - b.get(ACC)) for a, b in pairs], +1, " pts", gaps, note))
        rows.append(_diff_row("algorithm", data, "Tr(H), AdamW - adversarial", "trace_adv",
                              [a.get(TRACE) - b.get(TRACE) for a, b in pairs], -1, "", gaps, note))
        rows.append(_diff_row("algorithm", data, "probe acc, AdamW - lookup table", "acc_lookup",
                              [100 * (r.get(ACC) - r.get(LOOKUP)) for r in base.values()], +1, " pts",
                              [r.get(GAP) for r in base.values()], f"{len(base)} AdamW run(s) within tolerance"))
    return rows, lines


# ----- plots -----

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, title: str, path: Path) -> Path:
    """Title, lay out, write and close a figure; returns ``path``."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_flatness_vs_accuracy(runs: list[Run], tolerance: float, out: Path) -> Path:
    plt = _plt()
    datas = sorted({r.data for r in runs}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 4), squeeze=False)
    markers = {"continue": "o", "size": "s", "algorithm": "^"}
    for ax, data in zip(axes[0], datas):
        pts = [r for r in runs if r.data == data and r.status == "done" and math.isfinite(r.get(TRACE))]
        if not pts:
            _empty(ax, "no flatness/trace measured")
        for claim in CLAIMS:
            for arm in sorted({r.arm for r in pts if r.claim == claim}):
                sel = [r for r in pts if r.claim == claim and r.arm == arm]
                ok = [r for r in sel if r.get(GAP) <= tolerance]
                far = [r for r in sel if not r.get(GAP) <= tolerance]
                label = f"{claim} ({arm})"
                line = ax.scatter([r.get(TRACE) for r in ok], [100 * r.get(ACC) for r in ok],
                                  marker=markers[claim], label=label)
                if far:
                    ax.scatter([r.get(TRACE) for r in far], [100 * r.get(ACC) for r in far], marker=markers[claim],
                               facecolors="none", edgecolors=line.get_facecolor())
        ax.set_title(data)
        ax.set_xlabel("Tr(H) (flatness/trace)")
        ax.set_ylabel("probe accuracy (%)")
        if pts:
            ax.legend(fontsize=7)
    return _save(fig, f"flatness vs probe accuracy (hollow: gap > {tolerance:g} nats)",
                 out / "flatness_vs_accuracy.png")


def plot_training(runs: list[Run], tolerance: float, out: Path) -> Path:
    plt = _plt()
    sel = [r for r in runs if r.claim == "continue" and r.history]
    datas = sorted({r.data for r in sel}) or ["(no runs)"]
    keys = [(GAP, "gap to optimum (nats)"), (ACC, "probe accuracy (%)"), (TRACE, "Tr(H)")]
    fig, axes = plt.subplots(len(keys), len(datas), figsize=(5 * len(datas), 8), squeeze=False, sharex="col")
    for j, data in enumerate(datas):
        group = sorted((r for r in sel if r.data == data), key=lambda r: r.seed)
        for i, (key, label) in enumerate(keys):
            ax = axes[i][j]
            drawn = False
            for r in group:
                pts = [(h["step"], h[key]) for h in r.history if key in h and math.isfinite(h[key])]
                if pts:
                    scale = 100 if key == ACC else 1
                    ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker=".", label=f"seed {r.seed}")
                    drawn = True
            if not drawn:
                _empty(ax, f"no {key} along training")
                continue
            if key == GAP:
                ax.axhline(tolerance, color="grey", ls="--", lw=1, label="tolerance")
                ax.set_yscale("log")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(data)
                ax.legend(fontsize=7)
            if i == len(keys) - 1:
                ax.set_xlabel("step")
    return _save(fig, "claim (a): continued pre-training", out / "training_curves.png")


def plot_size(runs: list[Run], tolerance: float, out: Path) -> Path:
    plt = _plt()
    sel = [r for r in runs if r.claim == "size" and r.status == "done"]
    datas = sorted({r.data for r in sel}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 4), squeeze=False)
    for ax, data in zip(axes[0], datas):
        group = [r for r in sel if r.data == data]
        if not group:
            _empty(ax, "no size runs")
            continue
        sizes = sorted({r.d_model for r in group})
        for r in group:
            ok = r.get(GAP) <= tolerance
            ax.scatter([r.d_model], [100 * r.get(ACC)], color="C0" if ok else "none", edgecolors="C0", alpha=0.6)
        means = [_mean_ci([100 * r.get(ACC) for r in group if r.d_model == d and r.get(GAP) <= tolerance])
                 for d in sizes]
        xs = [d for d, m in zip(sizes, means) if math.isfinite(m[0])]
        if xs:
            ms = [m for m in means if math.isfinite(m[0])]
            ax.errorbar(xs, [m[0] for m in ms], yerr=[m[1] if math.isfinite(m[1]) else 0 for m in ms], color="C1",
                        capsize=4, label="mean ± 95% CI (within tolerance)")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_title(data)
        ax.set_xlabel("d_model")
        ax.set_ylabel("probe accuracy (%)")
    return _save(fig, f"claim (b): accuracy vs size (hollow: gap > {tolerance:g} nats)", out / "accuracy_vs_size.png")


# ----- the report -----

TITLES = {
    "continue": "Claim (a): continuing pre-training after convergence improves transfer (and flattens)",
    "size": "Claim (b): at equal loss, larger models transfer better (and are flatter)",
    "algorithm": "Claim (c): at equal loss, the training algorithm changes transfer "
                 "(AdamW > adversarial, AdamW > lookup table)",
}


def _settings(path: Path) -> dict[str, Any]:
    f = path / SETTINGS_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def _comparison_table(rows: list[Comparison]) -> list[str]:
    out = ["| data | comparison | paper | ours (mean over seeds) | 95% CI (±) | n | gap to optimum (mean, max) | "
           "verdict | note |", "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        unit = " pts" if "acc" in c.what else ""
        ci = "n/a" if not math.isfinite(c.result.ci) else f"{_fmt(c.result.ci)}{unit}"
        out.append(f"| {c.data} | {c.what} | {c.paper} | {c.ours} | {ci} | {c.result.n} | {c.gap} | "
                   f"**{c.result.verdict}** | {c.note}; {c.result.reason} |")
    return out


def write_report(path: str | Path, tolerance: float | None = None) -> Path:
    """Read every same-loss job under ``path``; write ``path/report.md`` and its PNG plots; return the
    report's path."""
    path = Path(path)
    settings = _settings(path)
    tol = float(tolerance if tolerance is not None else settings.get("tolerance", DEFAULT_TOLERANCE))
    runs = load_runs(path)
    by_claim = {c: [r for r in runs if r.claim == c] for c in CLAIMS}
    builders = {"continue": claim_continue, "size": claim_size, "algorithm": claim_algorithm}
    tables = {c: builders[c](by_claim[c], tol) for c in CLAIMS}
    plots = [plot_flatness_vs_accuracy(runs, tol, path), plot_training(runs, tol, path), plot_size(runs, tol, path)]

    counts = defaultdict(int)
    for r in runs:
        counts[r.status] += 1
    md = ["# Same pre-training loss, better downstream: the rerun, claim by claim", "",
          "Liu, Xie, Li & Ma, *Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language "
          "Models*, ICML 2023, arXiv 2210.14199 (https://arxiv.org/abs/2210.14199). The paper's numbers below "
          "are read from its text, at 235M parameters on its own PCFG; ours come from much smaller models and "
          "data, so compare directions and confidence, not magnitudes.", ""]
    if settings:
        note = f", {settings['note']}" if settings.get("note") else ""
        md += [f"Profile: **{settings.get('profile', '?')}**" + note
               + (f"; wall time {settings['wall_s']:.0f} s" if settings.get("wall_s") else "") + ".", ""]
    md += [f"Runs read: {len(runs)} under `{path}` ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}). "
           f"Tolerance on the gap to the optimum: **{tol:g} nats**.", "",
           "## Verdicts", "", "| claim | data | comparison | verdict |", "|---|---|---|---|"]
    for c in CLAIMS:
        for row in tables[c][0]:
            md.append(f"| {c} | {row.data} | {row.what} | **{row.result.verdict}** |")
    md += ["", "## The rule", "", RULE, ""]
    for c in CLAIMS:
        rows, lines = tables[c]
        md += [f"## {TITLES[c]}", ""]
        if not by_claim[c]:
            md += [f"No runs of experiment=same_loss/{c} under this directory.", ""]
        md += _comparison_table(rows) + [""]
        if lines:
            md += (["Per seed:", ""] if c == "continue" else []) + lines + [""]
    md += ["## Plots", "",
           "Flatness against probe accuracy (every finished run; the size runs' traces are measured after "
           "embedding in the largest width, the others at their own width):", "",
           f"![flatness vs accuracy]({plots[0].name})", "",
           "Gap to the optimum, probe accuracy and Tr(H) over training steps (claim (a)):", "",
           f"![training curves]({plots[1].name})", "",
           "Probe accuracy against model size (claim (b)):", "", f"![accuracy vs size]({plots[2].name})", ""]
    failed = [r for r in runs if r.status != "done"]
    if failed:
        md += ["## Jobs that did not finish", ""]
        md += [f"- `{r.run_dir}`: {r.status}{': ' + r.reason if r.reason else ''}" for r in failed] + [""]
    report = path / "report.md"
    write_text(report, "\n".join(md))
    return report
