"""``lmlab report <sweep dir> [<sweep dir> ...]``: the statistics of any sweep over seeds.

It reads every job of the sweep directories (``lmlab.report.summary.job_row``: status, overrides, metrics)
and groups them into arms: the jobs that share every swept setting except ``seed``. Per arm and metric it
computes, over the finished jobs, the mean, the sample standard deviation, the 95% Student-t interval of the
mean and the number of seeds (``lmlab.stats.mean_interval``). Against a baseline (``--baseline key=value``)
each other arm is paired with the baseline arm that has the same other swept settings, job by job on the
same seed, and the report gives the mean per-seed difference (arm minus baseline) with its 95% t-interval,
the paired t-test's p value (``lmlab.stats.paired_difference``) and the number of seeds the arm won (a
higher value, or a lower one for metrics that are losses: ``lower_is_better``).

Jobs that did not finish (failed, diverged, interrupted, running, incomplete) and jobs of the sweep not
started yet (expanded from the sweep's ``multirun.yaml``) are listed with their status and reason. It writes
``report.md`` and ``report.csv`` into the first sweep directory and, with ``--x <numeric key>``, one PNG per
metric: the metric against that key with interval bars, one line per other arm.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lmlab.errors import UserError
from lmlab.io import write_text
from lmlab.report.summary import EVAL_PREFIX, EVALUATIONS, FIXED, job_row
from lmlab.run_dir import UNNAMED_KEYS
from lmlab.stats import MeanInterval, PairedDifference, mean_interval, paired_difference

SEED = "seed"
MULTIRUN = "multirun.yaml"
SUMMARY = "summary.csv"
HIDDEN = ("model/", "train/rows", "train/steps")  # bookkeeping, not results: left out unless asked for
HIDDEN_SUFFIX = ("_std", "_stderr", "_ci95", "/chance", "/ppl", "/optimum")
LOWER = ("loss", "gap", "ppl", "perplexity", "error", "ece", "nll", "bpb", "trace", "seconds", "time")
REASONS = {"running": "a process is training it now", "incomplete": "started but not finished, and no process "
           "holds it", "not started": "listed by the sweep but has no job directory yet"}


def is_sweep_dir(path: str | Path) -> bool:
    """A sweep directory: it holds ``multirun.yaml`` or ``summary.csv``, or job directories with ``.hydra/``."""
    path = Path(path)
    return (path / MULTIRUN).is_file() or (path / SUMMARY).is_file() or any(path.glob("*/.hydra/overrides.yaml"))


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one (losses, gaps, errors, perplexities, times)."""
    name = metric.lower()
    return any(word in name for word in LOWER) and "acc" not in name.rsplit("/", 1)[-1]


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def same_value(a: str, b: str) -> bool:
    """Override values compared as numbers where both are numbers (``1e-3`` equals ``0.001``)."""
    x, y = _number(a), _number(b)
    return x == y if x is not None and y is not None else str(a) == str(b)


def _settings(overrides: list[str]) -> dict[str, str]:
    return dict(str(o).split("=", 1) for o in overrides if "=" in str(o) and not str(o).startswith(UNNAMED_KEYS))


@dataclass
class Job:
    sweep: Path
    name: str
    settings: dict[str, str]
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    evaluations: str = ""  # the `lmlab eval` records its eval: metrics come from (summary.EVALUATIONS)

    @property
    def seed(self) -> str:
        return self.settings.get(SEED, "")


def _planned(sweep: Path) -> list[dict[str, str]]:
    """The jobs the sweep's ``multirun.yaml`` asks for (the basic sweeper's grid: the command's overrides and the
    ``hydra.sweeper.params`` an experiment declares); none if it cannot be read."""
    path = sweep / MULTIRUN
    if not path.is_file():
        return []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from lmlab.run_dir import sweep_jobs

        hydra = OmegaConf.load(path).hydra
        task = [str(o) for o in hydra.overrides.task]
        given = {o.split("=", 1)[0] for o in task}  # the command line wins over the sweep a config declares
        params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items() if k not in given]
        return [_settings(job) for job in sweep_jobs(OverridesParser.create().parse_overrides([*params, *task]))]
    except Exception:  # another sweeper, or a file this version cannot read: list the jobs found only
        return []


def load_jobs(sweeps: list[Path]) -> list[Job]:
    """Every job of ``sweeps`` (done or not), then the planned jobs that have no directory yet."""
    jobs: list[Job] = []
    for sweep in sweeps:
        found = []
        for job_dir in sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")):
            row = job_row(job_dir)
            metrics = {k: float(v) for k, v in row.items()
                       if k not in FIXED and isinstance(v, (int, float)) and not isinstance(v, bool)}
            reason = row.get("reason") or REASONS.get(row["status"], "")
            found.append(Job(sweep, job_dir.name, _settings(row["overrides"].split()), row["status"], str(reason),
                             metrics, str(row.get(EVALUATIONS, ""))))
        for settings in _planned(sweep):
            if not any(j.settings.keys() == settings.keys()
                       and all(same_value(j.settings[k], v) for k, v in settings.items()) for j in found):
                found.append(Job(sweep, "-", settings, "not started", REASONS["not started"]))
        jobs += found
    return jobs


def parse_baseline(text: str) -> dict[str, str]:
    pairs = [p for p in re.split(r"[\s]+", text.strip()) if p]
    if not pairs or not all("=" in p and p.split("=", 1)[0] and p.split("=", 1)[1] for p in pairs):
        raise UserError(f"--baseline {text!r} is not key=value: write the swept setting of the baseline arm, "
                        "e.g. --baseline selection=random.")
    return dict(p.split("=", 1) for p in pairs)


# ----- the statistics -----

@dataclass
class Arm:
    key: tuple[tuple[str, str], ...]  # (axis, value) for every swept setting except seed
    jobs: list[Job]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key if v != "") or "(all jobs)"  # unset in this arm: left out

    def value(self, metric: str) -> dict[str, float]:
        """The finished jobs' finite values of ``metric``, by seed (the first job of each seed)."""
        out: dict[str, float] = {}
        for j in self.jobs:
            v = j.metrics.get(metric)
            if j.status == "done" and v is not None and math.isfinite(v) and j.seed not in out:
                out[j.seed] = v
        return out


@dataclass
class Row:
    arm: Arm
    metric: str
    stats: MeanInterval
    baseline: Arm | None = None
    paired: PairedDifference | None = None
    won: int | None = None


@dataclass
class SweepReport:
    sweeps: list[Path]
    jobs: list[Job]
    axes: list[str]
    arms: list[Arm]
    metrics: list[str]
    rows: list[Row]
    baseline: dict[str, str]
    plots: list[Path] = field(default_factory=list)
    constant: list[str] = field(default_factory=list)  # metrics left out: the same in every finished job


def _axes(jobs: list[Job]) -> list[str]:
    keys = sorted({k for j in jobs for k in j.settings})
    varying = [k for k in keys if len({j.settings.get(k, "") for j in jobs}) > 1]
    return [k for k in varying if k != SEED]


def _default_metrics(jobs: list[Job]) -> tuple[list[str], list[str]]:
    """The metrics to report when none are asked for, and those left out for being the same in every
    finished job (sizes of the data, properties of the source)."""
    done = [j for j in jobs if j.status == "done"]
    names = sorted({m for j in done for m in j.metrics})
    names = [m for m in names if not m.startswith(HIDDEN) and not m.endswith(HIDDEN_SUFFIX)]
    constant = [m for m in names if len(done) > 1 and len({j.metrics.get(m) for j in done}) == 1]
    return [m for m in names if m not in constant], constant


def _matches(arm: Arm, selector: dict[str, str]) -> bool:
    settings = dict(arm.key)
    return all(same_value(settings.get(k, ""), v) for k, v in selector.items())


def analyse(sweeps: list[str | Path], baseline: dict[str, str] | None = None, metrics: list[str] | None = None
            ) -> SweepReport:
    sweeps = [Path(s) for s in sweeps]
    for s in sweeps:
        if not s.is_dir():
            raise UserError(f"{s} is not a directory: pass the directory of a sweep (it holds multirun.yaml).")
    jobs = load_jobs(sweeps)
    if not jobs:
        raise UserError(f"no jobs under {', '.join(map(str, sweeps))}: pass a sweep directory of `lmlab train -m` "
                        "(it holds one folder per job).")
    axes = _axes(jobs)
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(tuple((k, j.settings.get(k, "")) for k in axes), []).append(j)

    def order(key: tuple) -> tuple:
        return tuple((_number(v) is None, _number(v) or 0.0, v) for _, v in key)

    arms = [Arm(k, groups[k]) for k in sorted(groups, key=order)]
    known = sorted({m for j in jobs for m in j.metrics})
    if metrics:
        missing = [m for m in metrics if m not in known]
        if missing:
            raise UserError(f"no job of the sweep reports {', '.join(missing)}: choose --metric among "
                            f"{', '.join(known) or '(none yet: no job has finished)'}.")
    chosen, constant = (list(metrics), []) if metrics else _default_metrics(jobs)
    baseline = dict(baseline or {})
    if baseline:
        unknown = [k for k in baseline if k not in axes]
        if unknown:
            raise UserError(f"--baseline names {', '.join(unknown)}, which the sweep does not vary: use one of its "
                            f"swept settings ({', '.join(axes) or 'none'}).")
        if not any(_matches(a, baseline) for a in arms):
            raise UserError(f"no arm of the sweep has {' '.join(f'{k}={v}' for k, v in baseline.items())}: use a "
                            "value that the sweep ran.")
    rows = []
    for arm in arms:
        base = None
        if baseline and not _matches(arm, baseline):
            want = {**dict(arm.key), **baseline}
            base = next((a for a in arms if _matches(a, want)), None)
        for metric in chosen:
            values = arm.value(metric)
            row = Row(arm, metric, mean_interval(list(values.values())))
            if base is not None:
                ref = base.value(metric)
                seeds = [s for s in values if s in ref]
                row.baseline = base
                row.paired = paired_difference([values[s] for s in seeds], [ref[s] for s in seeds])
                row.won = row.paired.below if lower_is_better(metric) else row.paired.above
            rows.append(row)
    return SweepReport(sweeps, jobs, axes, arms, chosen, rows, baseline, constant=constant)


# ----- writing -----

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
