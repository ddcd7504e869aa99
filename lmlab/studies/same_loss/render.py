"""The same-loss study's report (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199): ``write_report`` writes
``<dir>/report.md``, ``<dir>/report.json`` (the rows, machine-readable) and PNG plots, with, given another rerun's
directory (``compare``), the agreement of the verdicts of the two."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmlab.io import write_json, write_text
from lmlab.stats import mean_interval
from lmlab.studies.same_loss.claims import analyse
from lmlab.studies.same_loss.paper import CLAIMS, RULE, TASKS, TITLES
from lmlab.studies.same_loss.runs import (
    GAP,
    LR_FLOOR,
    REPORT_JSON,
    TABLE_CEILING,
    TRACE,
    Run,
    Settings,
    _num,
    acc_key,
    lookup_key,
    read_settings,
    task_label,
)
from lmlab.studies.same_loss.statistics import (
    CONFOUNDED,
    INCONCLUSIVE,
    INEFFECTIVE,
    MISSING,
    NOT_REPRODUCED,
    REPRODUCED,
    Row,
    base_verdict,
    compare_rows,
)
from lmlab.studies.same_loss.text import _fmt, _p, _signed


def _verdict_cell(r: Row) -> str:
    base = base_verdict(r.verdict)
    text = f"**{r.verdict}**"
    if base == INCONCLUSIVE and math.isfinite(r.mde):
        text += f" (MDE {_fmt(r.mde, 2)}{r.unit})"
    elif base == INCONCLUSIVE and r.n < 2:
        text += f" ({r.n} pair{'s' if r.n != 1 else ''})"
    return text


def verdict_table(rows: list[Row]) -> list[str]:
    out = ["| claim | data | task | comparison | paper | ours ± 95% CI | MDE | gap diff ± 95% CI (nats) | matched? | "
           "p | Holm p | verdict |", "|---" * 12 + "|"]
    for r in rows:
        ours = _signed(r.mean, r.ci, r.unit) + (f" (n={r.n})" if r.n else "")
        if base_verdict(r.verdict) == CONFOUNDED:
            ours += f"; gap-adjusted {_signed(r.adjusted, r.adjusted_ci, r.unit)}"
        matched = "yes" if r.matched else "no" if r.n >= 2 else "n/a"
        out.append(f"| {r.claim} | {r.data} | {r.task} | {r.what} | {r.paper} | {ours} | "
                   f"{_fmt(r.mde, 2) + r.unit if math.isfinite(r.mde) else 'n/a'} | {_signed(r.gap_diff, r.gap_ci)} | "
                   f"{matched} | {_p(r.p)} | {_p(r.p_holm)} | {_verdict_cell(r)} |")
    return out


def _other_rows(other: Path, settings: Settings) -> list[dict[str, Any]]:
    f = other / REPORT_JSON
    if f.exists():
        try:
            return list(json.loads(f.read_text()).get("rows", []))
        except ValueError:
            pass
    theirs = read_settings(other)
    return [r.to_json() for r in analyse(other, replace(settings, profile=theirs.profile, note=theirs.note,
                                                         wall_s=None)).rows]


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


def _claim_acc(r: Run) -> str:
    return acc_key(TASKS[(r.claim, r.kind)][0])


def plot_flatness_vs_accuracy(runs: list[Run], counted: set[Path], out: Path) -> Path:
    plt = _plt()
    datas = sorted({r.data for r in runs}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 4), squeeze=False)
    markers = {"continue": "o", "size": "s", "algorithm": "^"}
    for ax, data in zip(axes[0], datas):
        pts = [r for r in runs if r.data == data and r.status == "done" and math.isfinite(r.get(TRACE))
               and math.isfinite(r.get(_claim_acc(r)))]
        if not pts:
            _empty(ax, "no flatness/trace and probe accuracy measured")
        for claim in CLAIMS:
            for arm in sorted({r.arm for r in pts if r.claim == claim}):
                sel = [r for r in pts if r.claim == claim and r.arm == arm]
                ok = [r for r in sel if r.run_dir in counted]
                far = [r for r in sel if r.run_dir not in counted]
                task = task_label(TASKS[(claim, sel[0].kind)][0], sel[0].label_position)
                line = ax.scatter([r.get(TRACE) for r in ok], [100 * r.get(_claim_acc(r)) for r in ok],
                                  marker=markers[claim], label=f"{claim} ({arm}; {task})")
                if far:
                    ax.scatter([r.get(TRACE) for r in far], [100 * r.get(_claim_acc(r)) for r in far],
                               marker=markers[claim], facecolors="none", edgecolors=line.get_facecolor())
        ax.set_title(data)
        ax.set_xlabel("Fisher Tr(H) (flatness/trace)")
        ax.set_ylabel("probe accuracy on the claim's task (%)")
        if pts:
            ax.legend(fontsize=7)
    return _save(fig, "flatness vs probe accuracy (hollow: the run does not count)", out / "flatness_vs_accuracy.png")


def plot_training(runs: list[Run], settings: Settings, out: Path) -> Path:
    plt = _plt()
    sel = [r for r in runs if r.claim == "continue" and r.history]
    datas = sorted({r.data for r in sel}) or ["(no runs)"]
    fig, axes = plt.subplots(3, len(datas), figsize=(5 * len(datas), 8), squeeze=False, sharex="col")
    for j, data in enumerate(datas):
        group = sorted((r for r in sel if r.data == data), key=lambda r: r.seed)
        acc = _claim_acc(group[0]) if group else acc_key("task_c")
        task = task_label(TASKS[("continue", group[0].kind)][0], group[0].label_position) if group else ""
        keys = [(GAP, "gap to optimum (nats)", 1), (acc, f"probe accuracy, {task} (%)", 100),
                (TRACE, "Fisher Tr(H)", 1)]
        for i, (key, label, scale) in enumerate(keys):
            ax = axes[i][j]
            drawn = False
            for r in group:
                pts = [(h["step"], _num(h.get(key))) for h in r.history if math.isfinite(_num(h.get(key)))]
                if pts:
                    ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker=".", label=f"seed {r.seed}")
                    drawn = True
            if not drawn:
                _empty(ax, f"no {key} along training")
                continue
            if key == GAP:
                ax.axhline(settings.tolerance, color="grey", ls="--", lw=1, label="tolerance")
                ax.set_yscale("log")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(data)
                ax.legend(fontsize=7)
            if i == len(keys) - 1:
                ax.set_xlabel("step (phase 2; step 0 = the parent's weights)")
    return _save(fig, f"claim (a): continued pre-training (first/last {settings.k} evaluations averaged)",
                 out / "training_curves.png")


def plot_size(runs: list[Run], counted: set[Path], out: Path) -> Path:
    plt = _plt()
    sel = [r for r in runs if r.claim == "size" and r.status == "done"]
    datas = sorted({r.data for r in sel}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(datas), figsize=(5 * len(datas), 4), squeeze=False)
    for ax, data in zip(axes[0], datas):
        group = [r for r in sel if r.data == data and math.isfinite(r.get(_claim_acc(r)))]
        if not group:
            _empty(ax, "no size runs with a probe accuracy")
            continue
        acc = _claim_acc(group[0])
        sizes = sorted({r.d_model for r in group})
        for r in group:
            ok = r.run_dir in counted
            ax.scatter([r.d_model], [100 * r.get(acc)], color="C0" if ok else "none", edgecolors="C0", alpha=0.6)
        means = [mean_interval([100 * r.get(acc) for r in group if r.d_model == d and r.run_dir in counted])
                 for d in sizes]
        xs = [(d, m) for d, m in zip(sizes, means) if math.isfinite(m.mean)]
        if xs:
            ax.errorbar([d for d, _ in xs], [m.mean for _, m in xs],
                        yerr=[m.half if math.isfinite(m.half) else 0 for _, m in xs], color="C1", capsize=4,
                        label="mean ± 95% CI (counted runs)")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_title(data)
        ax.set_xlabel("d_model")
        ax.set_ylabel(f"probe accuracy, {task_label(TASKS[('size', group[0].kind)][0], group[0].label_position)} (%)")
    return _save(fig, "claim (b): accuracy vs size (hollow: the run does not count)", out / "accuracy_vs_size.png")


# ----- the report -----


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def task_ceilings(runs: list[Run]) -> list[dict[str, Any]]:
    """Per claim, data set and task of the claim (``TASKS``): the median over the finished runs of the probe's
    accuracy, the prefix table's (``probe/<task>/table_acc``) and the exact-conditionals probe's (``lookup_acc``);
    None where no run measured it."""
    out = []
    for claim in CLAIMS:
        done = [r for r in runs if r.claim == claim and r.status == "done"]
        for data in sorted({r.data for r in done}):
            group = [r for r in done if r.data == data]
            for task in TASKS.get((claim, group[0].kind), ()):
                out.append({"claim": claim, "data": data, "task": task, "runs": len(group),
                            **{name: _median([r.get(key(task)) for r in group]) for name, key in
                               (("probe", acc_key), ("table", TABLE_CEILING.format), ("lookup", lookup_key))}})
    return out


def write_report(path: str | Path, tolerance: float | None = None, compare: str | Path | None = None,
                 margin: float | None = None, plateau: float | None = None, k: int | None = None) -> Path:
    """Read every same-loss job under ``path``; write ``path/report.md``, ``path/report.json`` and the PNG plots;
    return the report's path. ``tolerance``, ``margin``, ``plateau`` and ``k`` override ``reproduce.json``;
    ``compare`` (another rerun's directory) adds the stability of the verdicts across the two."""
    path = Path(path)
    settings = read_settings(path, tolerance, margin, plateau, k)
    a = analyse(path, settings)
    runs = a.runs
    plots = [plot_flatness_vs_accuracy(runs, a.counted, path), plot_training(runs, settings, path),
             plot_size(runs, a.counted, path)]
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        counts[r.status] += 1
    gap_median, gap_max = a.gap_summary()
    md = ["# Same pre-training loss, better downstream: the rerun, claim by claim", "",
          "Liu, Xie, Li & Ma, *Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language "
          "Models*, ICML 2023, arXiv 2210.14199 (https://arxiv.org/abs/2210.14199). The paper's numbers below "
          "are read from its text, at 235M parameters on its own PCFG; ours come from much smaller models and "
          "data, so compare directions and confidence, not magnitudes.", "",
          f"Profile: **{settings.profile}**" + (f", {settings.note}" if settings.note else "")
          + (f"; wall time {settings.wall_s:.0f} s" if isinstance(settings.wall_s, (int, float)) else "")
          + (RESUMED if settings.resumed else "") + ". "
          f"Tolerance on the gap to the optimum: **{settings.tolerance:g} nats**; equivalence margin on paired gap "
          f"differences: **{settings.margin:g} nats**; plateau: {settings.plateau:g} nats over "
          + (f"{settings.plateau_steps} steps" if settings.plateau_steps is not None else "the last two evaluations")
          + f" at a learning rate >= {100 * LR_FLOOR:g}% of its peak; k = {settings.k}.", "",
          f"Runs read: {len(runs)} under `{path}` ({', '.join(f'{v} {s}' for s, v in sorted(counts.items()))}); "
          f"{len(a.counted)} counted, {len(a.excluded)} excluded. The verdicts hold at a gap of "
          f"**{_fmt(gap_median)} nats** (median of the counted runs; max {_fmt(gap_max)}).", ""]
    precision = a.trace_precision()
    if precision:
        md += ["Trace precision (standard error / trace over every evaluation of the counted runs): "
               + "; ".join(f"{name} median {100 * v['median']:.1f}%, max {100 * v['max']:.1f}%, "
                           f"{v['above_5pct']} of {v['evaluations']} above 5%" for name, v in precision.items())
               + ".", ""]
    md += ["## Verdicts", ""]
    md += verdict_table(a.rows)
    family = [r for r in a.rows if math.isfinite(r.p_holm)]
    md += ["", f"Holm family: m = {len(family)} claimed row(s) with matched loss (their MDE at alpha 0.05 / "
           f"{max(1, len(family))}). All rows: "
           + ", ".join(f"{v}: {sum(base_verdict(r.verdict) == v for r in a.rows)}"
                       for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, CONFOUNDED, INEFFECTIVE, MISSING)) + ".", ""]
    md += ["## The rule", "", RULE, ""]
    ceilings = task_ceilings(runs)
    stability = None
    if compare is not None:
        other = Path(compare)
        entries, agree, decided = compare_rows([r.to_json() for r in a.rows], _other_rows(other, settings))
        stability = {"compare": str(other), "agree": agree, "decided": decided}
        md += ["## Stability across two reruns", "",
               f"This rerun against `{other}` (independent seeds): **{agree} of {decided} decided rows agree**. A row "
               "decided (reproduced / not reproduced) in either rerun is stable only when decided the same way in "
               "both; otherwise it is unstable.", "",
               "| claim | data | task | comparison | this rerun | other rerun | stability |", "|---" * 7 + "|"]
        for e in entries:
            r = e["row"]
            md.append(f"| {r.get('claim')} | {r.get('data')} | {r.get('task')} | {r.get('what')} | {e['this']} | "
                      f"{e['other']} | {'**unstable**' if e['state'] == 'unstable' else e['state']} |")
        md.append("")
    for c in CLAIMS:
        md += [f"## {TITLES[c]}", ""]
        if not any(r.claim == c for r in runs):
            md += [f"No runs of experiment=same_loss/{c} under this directory.", ""]
        rows = [r for r in a.rows if r.claim == c]
        if c == "continue" and rows:
            md += ["| data | task | comparison | ours ± 95% CI | per-seed slope ± 95% CI (per 1k steps) | verdict |",
                   "|---" * 6 + "|"]
            md += [f"| {r.data} | {r.task} | {r.what} | {_signed(r.mean, r.ci, r.unit)} | "
                   f"{_signed(r.slope, r.slope_ci, r.unit)} | {_verdict_cell(r)} |" for r in rows] + [""]
        md += a.details[c]
        notes = sorted({f"- {r.data}: {r.note}" for r in rows if r.note})
        md += notes + ([""] if notes else [])
    md += ["## Task ceilings", "",
           "How much room each task leaves: the probe's accuracy on the models' features, a lookup table from the "
           "task's prefix words to the majority label of the probe's training rows (what memorising prefixes "
           "reaches), and the probe on the exact conditionals (measured where the experiment runs it). Medians "
           "over every finished run of the claim.", "",
           *ceilings_table(ceilings), ""]
    md += ["## Excluded runs", ""]
    md += ([f"- `{r.run_dir}` ({r.claim}, {r.data}, seed {r.seed}): {why}"
            + (f" ({r.reason})" if r.reason else "") for r, why in a.excluded] or ["None."]) + [""]
    md += ["## Plots", "",
           "Flatness against probe accuracy on the claim's task (every finished run; the size runs' traces are "
           "measured after embedding in the largest width, the others at their own width):", "",
           f"![flatness vs accuracy]({plots[0].name})", "",
           "Gap to the optimum, probe accuracy and Tr(H) over the phase-2 steps (claim (a)):", "",
           f"![training curves]({plots[1].name})", "",
           "Probe accuracy against model size (claim (b)):", "", f"![accuracy vs size]({plots[2].name})", ""]
    report = path / "report.md"
    write_json(path / REPORT_JSON, {
        "paper": "Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199", "profile": settings.profile,
        "wall_s": settings.wall_s if isinstance(settings.wall_s, (int, float)) else None, "resumed": settings.resumed,
        "tolerance": settings.tolerance, "margin": settings.margin, "plateau": settings.plateau,
        "plateau_steps": settings.plateau_steps, "lr_floor": LR_FLOOR, "k": settings.k,
        "gap_median": None if not math.isfinite(gap_median) else gap_median,
        "gap_max": None if not math.isfinite(gap_max) else gap_max,
        "trace_precision": precision, "ceilings": ceilings, "rows": [r.to_json() for r in a.rows],
        "excluded": [{"run": str(r.run_dir), "claim": r.claim, "reason": why} for r, why in a.excluded],
        "stability": stability})
    write_text(report, "\n".join(md))
    return report


# ----- docs/results.md: the tables of committed reports -----

def row_from_json(d: dict[str, Any]) -> Row:
    """A row of ``report.json`` back as a ``Row`` (null numbers are NaN)."""
    fields = Row.__dataclass_fields__
    return Row(**{k: (math.nan if v is None and fields[k].type in ("float", float) else v)
                  for k, v in d.items() if k in fields})


def ceilings_table(ceilings: list[dict[str, Any]]) -> list[str]:
    """The task ceilings (``task_ceilings``) as a markdown table."""
    return ["| claim | data | task | runs | probe | prefix table | exact conditionals |", "|---" * 7 + "|",
            *(f"| {c['claim']} | {c['data']} | {c['task']} | {c['runs']} | {_pct(c['probe'])} | {_pct(c['table'])} "
              f"| {_pct(c['lookup'])} |" for c in ceilings)]


RESUMED = " in the invocation that finished the rerun (it resumed an earlier one, whose time is not counted)"


def results_section(report: dict[str, Any] | None, source: str, command: str) -> list[str]:
    """The lines that docs/results.md shows for the committed ``report.json`` at ``source`` (None: not committed
    yet): its settings, the gap its verdicts hold at, the verdict table and the Holm family, exactly as the
    report rendered them, and its task ceilings; without a report, how to make one."""
    if report is None:
        return [f"No committed report: the rerun under the current rules is pending. Run `{command}`, copy its "
                f"`report.json` to `{source}` and run `python scripts/render_results.py`."]
    rows = [row_from_json(r) for r in report.get("rows", [])]
    family = [r for r in rows if math.isfinite(r.p_holm)]
    gap_median, gap_max = (math.nan if report.get(k) is None else report[k] for k in ("gap_median", "gap_max"))
    wall = report.get("wall_s")
    return [f"From `{source}` (`{command}`"
            + (f", {wall / 60:.0f} min of wall time" if isinstance(wall, (int, float)) else "")
            + (RESUMED if report.get("resumed") is True else "")
            + f"): profile **{report.get('profile')}**, tolerance {report.get('tolerance')} "
            f"nats, margin {report.get('margin')} nats, plateau {report.get('plateau')} nats; the verdicts hold at a "
            f"gap of {_fmt(gap_median)} nats (median of the counted runs; max {_fmt(gap_max)}); "
            f"{len(report.get('excluded', []))} runs excluded.", "", *verdict_table(rows), "",
            f"Holm family: m = {len(family)} claimed row(s) with matched loss.",
            *(["", "Task ceilings (medians over the finished runs: the probe, a table from each task's prefix words, "
               "the probe on the exact conditionals):", "", *ceilings_table(report["ceilings"])]
              if report.get("ceilings") else [])]
