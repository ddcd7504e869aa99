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
started yet (expanded from the sweep's ``multirun.yaml``) are listed with their status and reason.
``lmlab.report.sweep_render`` writes ``report.md`` and ``report.csv`` into the first sweep directory and, with
``--x <numeric key>``, one PNG per metric: the metric against that key with interval bars, one line per other arm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lmlab.errors import UserError
from lmlab.report.summary import EVALUATIONS, FIXED, job_row
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
