"""The sweep report's files (``lmlab.report.sweep`` computes it): ``report.md`` (per arm and metric the mean, sd
and 95% t-interval over seeds, the paired difference to the baseline arm, the jobs not finished), ``report.csv``
(the same, one row per arm and metric) and, with ``x``, one PNG per metric against that numeric setting."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from lmlab.errors import UserError
from lmlab.io import write_text
from lmlab.report.summary import EVAL_PREFIX
from lmlab.report.sweep import SEED, Row, SweepReport, _matches, _number, analyse, lower_is_better


def _f(v: float | None, digits: int = 4) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _p(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3g}"


CSV_COLUMNS = ["arm", "metric", "n", "mean", "sd", "ci95_low", "ci95_high", "baseline", "pairs", "diff_mean",
               "diff_ci95_low", "diff_ci95_high", "p_value", "seeds_won", "better"]


def to_csv(report: SweepReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*report.axes, *CSV_COLUMNS])
    for r in report.rows:
        s, d = r.stats, r.paired.diff if r.paired else None
        settings = dict(r.arm.key)
        writer.writerow([*[settings.get(a, "") for a in report.axes], r.arm.label, r.metric, s.n, s.mean, s.sd, s.low,
                         s.high, r.baseline.label if r.baseline else "", d.n if d else "", d.mean if d else "",
                         d.low if d else "", d.high if d else "", r.paired.p if r.paired else "",
                         r.won if r.won is not None else "", "lower" if lower_is_better(r.metric) else "higher"])
    return buf.getvalue()


def to_markdown(report: SweepReport) -> str:
    counts: dict[str, int] = {}
    for j in report.jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    md = ["# Sweep report", "",
          "Sweep directories: " + ", ".join(f"`{s}`" for s in report.sweeps) + ".", "",
          f"Jobs: {len(report.jobs)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}). "
          f"Arms: the jobs that share every swept setting except `{SEED}` "
          f"(swept: {', '.join(f'`{a}`' for a in report.axes) or 'nothing but the seed'}).", "",
          "Per arm and metric, over its finished jobs: the mean, the sample standard deviation (sd), the 95% "
          "Student-t interval of the mean (mean ± t(0.975, n-1)·sd/√n) and n, the number of seeds.", ""]
    if report.baseline:
        md += [f"Baseline: `{' '.join(f'{k}={v}' for k, v in report.baseline.items())}`. Each other arm is paired "
               "with the baseline arm of the same other settings, seed by seed (finished jobs of both only): Δ is the "
               "mean per-seed difference (arm - baseline) with its 95% t-interval, p the paired t-test's two-sided p "
               "value, and won the seeds on which the arm is better (lower for losses, gaps and errors; higher "
               "otherwise).", ""]
    for metric in report.metrics:
        better = "lower is better" if lower_is_better(metric) else "higher is better"
        md += [f"## {metric} ({better})", ""]
        head = ["arm", "n", "mean", "sd", "95% CI"]
        if report.baseline:
            head += ["Δ vs baseline", "Δ 95% CI", "p", "won"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in report.rows if r.metric == metric):
            s = r.stats
            cells = [r.arm.label, str(s.n), _f(s.mean), _f(s.sd), f"[{_f(s.low)}, {_f(s.high)}]" if s.n > 1 else "n/a"]
            if report.baseline:
                if r.paired is None:
                    cells += ["(baseline)" if _matches(r.arm, report.baseline) else "no baseline arm", "", "", ""]
                else:
                    d = r.paired.diff
                    cells += [f"{d.mean:+.4g}" if d.n else "n/a", f"[{_f(d.low)}, {_f(d.high)}]" if d.n > 1 else "n/a",
                              _p(r.paired.p), f"{r.won} of {d.n}" if d.n else "n/a"]
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        md.append("")
    if not report.metrics:
        md += ["No job has finished yet: no metrics to summarise.", ""]
    if report.constant:
        md += ["Left out, the same in every finished job (ask with `--metric`): "
               + ", ".join(f"`{m}`" for m in report.constant) + ".", ""]
    evaluated = [j for j in report.jobs if j.evaluations]
    if evaluated:
        md += ["## Evaluation records", "",
               f"A metric `{EVAL_PREFIX}<metric>` comes from a job's `lmlab eval` records (`evals/<n>.json`): the "
               "latest record that has it; the training-time `<metric>` is the run's own. The records each job's "
               "numbers come from (`#n` is `evals/<n>.json`, with the evaluations it ran):", "",
               "| arm | seed | records | job |", "|---|---|---|---|"]
        for j in evaluated:
            arm = " ".join(f"{a}={j.settings[a]}" for a in report.axes if j.settings.get(a, "") != "") or "(all jobs)"
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in (arm, j.seed or "-", j.evaluations, j.name))
                      + " |")
        md.append("")
    unfinished = [j for j in report.jobs if j.status != "done"]
    md += ["## Jobs that did not finish", ""]
    if unfinished:
        md += ["| arm | seed | status | reason | job |", "|---|---|---|---|---|"]
        for j in unfinished:
            arm = " ".join(f"{a}={j.settings[a]}" for a in report.axes if j.settings.get(a, "") != "") or "(all jobs)"
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in (arm, j.seed or "-", j.status,
                                                                          j.reason or "-", j.name)) + " |")
    else:
        md.append("None: every job finished.")
    md.append("")
    if report.plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots] + [""]
    return "\n".join(md)


def plot(report: SweepReport, x: str, out: Path) -> list[Path]:
    """One PNG per metric: the metric's mean against the swept ``x`` with its 95% interval as bars, one line
    per arm of the other swept settings."""
    if x not in report.axes:
        raise UserError(f"--x {x} is not a swept setting of this sweep: use one of "
                        f"{', '.join(report.axes) or '(none: the sweep varies only the seed)'}.")
    values = {dict(a.key)[x] for a in report.arms}
    if any(_number(v) is None for v in values):
        raise UserError(f"--x {x} takes values that are not numbers ({', '.join(sorted(values))}): use a numeric "
                        "swept setting.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = sorted(_number(v) for v in values)
    log = len(numbers) > 2 and numbers[0] > 0 and numbers[-1] / numbers[0] >= 100
    paths = []
    for metric in report.metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list[Row]] = {}
        for r in report.rows:
            if r.metric == metric:
                other = " ".join(f"{k}={v}" for k, v in r.arm.key if k != x) or metric
                lines.setdefault(other, []).append(r)
        for label, rows in lines.items():
            rows = sorted((r for r in rows if r.stats.n), key=lambda r: _number(dict(r.arm.key)[x]))
            if not rows:
                continue
            xs = [_number(dict(r.arm.key)[x]) for r in rows]
            ys = [r.stats.mean for r in rows]
            err = [r.stats.half if math.isfinite(r.stats.half) else 0.0 for r in rows]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {x} (mean, 95% t-interval)", fontsize=9)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"report_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', x)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(sweeps: list[str | Path], baseline: dict[str, str] | None = None,
                 metrics: list[str] | None = None, x: str | None = None) -> SweepReport:
    """Analyse ``sweeps``; write ``report.md``, ``report.csv`` (and with ``x`` the plots) into the first."""
    report = analyse(sweeps, baseline, metrics)
    out = report.sweeps[0]
    if x:
        report.plots = plot(report, x, out)
    write_text(out / "report.csv", to_csv(report))
    write_text(out / "report.md", to_markdown(report))
    return report
