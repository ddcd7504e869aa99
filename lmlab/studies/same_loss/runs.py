"""The runs of the same-loss study (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199): the report's settings
(``reproduce.json``), the metric keys, every job under a directory read as a ``Run`` (sweep directories, found by
their ``.hydra/overrides.yaml``, read through ``lmlab.report.summary.gather``, sorted by the experiment that made
them: ``cfg.name`` ends in ``continue``, ``size`` or ``algorithm``), and which runs count."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab import schedule as schedules
from lmlab.report.summary import gather
from lmlab.run_dir import CONFIG, RESULTS, read_config, read_results
from lmlab.run_dir import status as run_status
from lmlab.studies.same_loss.paper import CLAIMS
from lmlab.studies.same_loss.text import _fmt

DEFAULT_TOLERANCE = 0.05  # nats: the largest gap to the optimum that counts as "the same, minimal loss"
DEFAULT_MARGIN = 0.02  # nats: the equivalence margin on paired gap differences
DEFAULT_PLATEAU = 0.01  # nats: the largest change of gap between a run's last two evaluations
DEFAULT_K = 3  # continue: evaluations averaged at each end of the phase-2 run
LR_FLOOR = 0.1  # a plateau counts only at a learning rate of at least this fraction of the schedule's peak
SETTINGS_FILE = "reproduce.json"  # written by scripts/reproduce_paper.py: profile, tolerance, margin, timings
REPORT_JSON = "report.json"

GAP = "perplexity/gap"
TRACE, TRACE_SE = "flatness/trace", "flatness/trace_se"  # the primary estimator (Fisher)
BLOCKS, BLOCKS_SE = "flatness/blocks_trace", "flatness/blocks_trace_se"  # blocks only
HUTCH, HUTCH_SE = "flatness/hutchinson/trace", "flatness/hutchinson/trace_se"  # the cross-check
HEAD_ACC = "objective/head_acc"  # the adversary's own head on the test split (claim (c); AdversarialMLM.held_out)
TRACES = ((TRACE, TRACE_SE, "Fisher Tr"), (BLOCKS, BLOCKS_SE, "blocks Tr"), (HUTCH, HUTCH_SE, "Hutchinson Tr"))


TABLE_CEILING = "probe/{}/table_acc"  # the prefix table's accuracy on a task (lmlab.evaluation.probe)


def acc_key(task: str) -> str:
    return f"probe/{task}/acc"


def lookup_key(task: str) -> str:
    return f"probe/{task}/lookup_acc"


def proj_key(task: str) -> str:
    return f"probe/{task}/proj_acc"


# ----- settings -----

@dataclass
class Settings:
    tolerance: float = DEFAULT_TOLERANCE
    margin: float = DEFAULT_MARGIN
    plateau: float = DEFAULT_PLATEAU
    k: int = DEFAULT_K
    profile: str = "?"
    note: str = ""
    wall_s: float | None = None
    plateau_steps: int | None = None  # the plateau's window in steps (None: the last two evaluations)
    resumed: bool = False  # the invocation that wrote wall_s found runs of an earlier one (their time is not in it)


def read_settings(path: str | Path, tolerance: float | None = None, margin: float | None = None,
                  plateau: float | None = None, k: int | None = None) -> Settings:
    """The settings of the rerun under ``path`` (``reproduce.json``, defaults where absent), overridden by the
    arguments that are not None."""
    f = Path(path) / SETTINGS_FILE
    raw = json.loads(f.read_text()) if f.exists() else {}

    def pick(given, key, default):
        return given if given is not None else raw.get(key, default) if raw.get(key) is not None else default

    steps = raw.get("plateau_steps")
    return Settings(float(pick(tolerance, "tolerance", DEFAULT_TOLERANCE)),
                    float(pick(margin, "margin", DEFAULT_MARGIN)),
                    float(pick(plateau, "plateau", DEFAULT_PLATEAU)), max(1, int(pick(k, "k", DEFAULT_K))),
                    str(raw.get("profile", f"? (no {SETTINGS_FILE})")), str(raw.get("note", "") or ""),
                    raw.get("wall_s"), int(steps) if steps is not None else None, raw.get("resumed") is True)


# ----- reading the runs -----

def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


SCHEDULES = ("constant", "cosine", "linear", "wsd")  # the functions of lmlab.schedule a run may record


@dataclass(frozen=True)
class Schedule:
    """A run's recorded learning-rate schedule: ``lr(step)``, the multiplier of the base rate that
    ``lmlab.schedule`` gives at ``step`` of a run of ``total`` steps."""
    fn: Callable[..., float]
    total: int
    kwargs: dict[str, Any]

    def lr(self, step: int) -> float:
        return float(self.fn(step, self.total, **self.kwargs))

    @property
    def warmup_steps(self) -> int:
        """The steps of its linear warmup (``wsd``: ``warmup_steps`` where given, else the fraction)."""
        if self.kwargs.get("warmup_steps") is not None:
            return int(self.kwargs["warmup_steps"])
        warmup = self.kwargs.get("warmup", inspect.signature(self.fn).parameters["warmup"].default)
        return int(float(warmup) * self.total)


def read_schedule(cfg: dict) -> Schedule | None:
    """The schedule a run's config records (``schedule`` and ``max_steps``), or None when it names none of
    ``lmlab.schedule``'s functions or a setting they do not take. Nothing is built: the function is looked up."""
    node, total = cfg.get("schedule"), cfg.get("max_steps")
    if not isinstance(node, dict) or isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        return None
    module, _, name = str(node.get("_target_", "")).rpartition(".")
    if module != "lmlab.schedule" or name not in SCHEDULES:
        return None
    fn = getattr(schedules, name)
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    if any(k not in params or k in ("step", "total") for k in kwargs):
        return None
    return Schedule(fn, total, kwargs)


@dataclass
class Run:
    run_dir: Path
    status: str
    claim: str
    data: str
    seed: int
    d_model: int = 0
    params: int = 0
    arm: str = "adamw"  # adamw | adversarial | sgd ... (the training algorithm)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    parent: Path | None = None  # cfg.init_from.run: the run whose weights this one started from
    label_position: int | None = None  # HMM: the word whose hidden state task_z predicts
    schedule: Schedule | None = None  # its recorded learning-rate schedule (None: not recorded)

    @property
    def kind(self) -> str:
        return "hmm" if self.data.startswith("hmm") else "pcfg"

    def get(self, key: str) -> float:
        return _num(self.metrics.get(key))


def _data_label(data_cfg: dict) -> str:
    target = str(data_cfg.get("_target_", ""))
    if target.endswith("HMMSource"):
        return "hmm"
    if target.endswith("PCFGSource"):
        grammar = data_cfg.get("grammar")
        return f"pcfg ({Path(grammar).name})" if grammar else "pcfg"
    return target.rsplit(".", 1)[-1] or "data"


def _arm(cfg: dict) -> str:
    objective = cfg.get("objective") or {}
    if "adversarial" in str(objective.get("_target_", "")).lower() and float(objective.get("lam", 1.0) or 0) > 0:
        return "adversarial"  # lam = 0 is plain MLM through the same code path (the AdamW arm)
    return str((cfg.get("optim") or {}).get("_target_", "optim")).rsplit(".", 1)[-1].lower()


def task_label(task: str, label_position: int | None = None) -> str:
    """``task_b`` -> "task B"; the HMM's ``task_z`` -> "z_<label position>"."""
    if task == "task_z":
        return f"z_{label_position}" if label_position is not None else "z"
    if task.startswith("task_"):
        return f"task {task[5:].upper()}"
    return task


def job_dirs(path: Path) -> list[Path]:
    """The sweep (or run) directories under ``path`` that hold jobs."""
    return sorted({p.parent.parent.parent for p in Path(path).rglob(".hydra/overrides.yaml")})


def _run_from(run_dir: Path, status: str, cfg: dict, metrics: dict, history: list, reason: str) -> Run | None:
    claim = str(cfg.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
    if claim not in CLAIMS:
        return None
    data_cfg = cfg.get("data") or {}
    parent = (cfg.get("init_from") or {}).get("run")
    pos = data_cfg.get("label_position")
    return Run(run_dir=run_dir, status=status, claim=claim, data=_data_label(data_cfg),
               seed=int(cfg.get("seed", 0) or 0),
               d_model=int((cfg.get("model") or {}).get("d_model", 0) or 0),
               params=int(_num(metrics.get("model/params")) if math.isfinite(_num(metrics.get("model/params"))) else 0),
               arm=_arm(cfg), metrics=metrics,
               history=sorted((h for h in history if isinstance(h, dict) and "step" in h), key=lambda h: h["step"]),
               reason=reason, parent=Path(parent) if parent else None,
               label_position=int(pos) if isinstance(pos, (int, float)) else None, schedule=read_schedule(cfg))


def load_runs(path: str | Path) -> list[Run]:
    """Every job under ``path`` that belongs to a same-loss experiment (done or not)."""
    runs = []
    for sweep in job_dirs(Path(path)):
        for row in gather(sweep):
            run_dir = sweep / row["job"]
            history: list = []
            if (run_dir / RESULTS).exists():
                try:
                    results = read_results(run_dir)
                except ValueError:  # a results.json cut short
                    results = {}
                cfg = results.get("config") or {}
                history = (results.get("history") or []) if row["status"] == "done" else []
            else:
                cfg = {}
            if not cfg and (run_dir / CONFIG).exists():
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(read_config(run_dir))
            if not cfg:
                continue
            metrics = {k: v for k, v in row.items() if "/" in k}
            run = _run_from(run_dir, row["status"], cfg, metrics, history, row.get("reason", ""))
            if run is not None:
                runs.append(run)
    return runs


# ----- which runs count -----

def _gap_points(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(h["step"]), g) for h in history if "step" in h and math.isfinite(g := _num(h.get(GAP)))]


def plateau_exclusion(history: list[dict[str, Any]], settings: Settings, schedule: Schedule | None) -> str:
    """Why a run is not on a plateau ("" when it is, or when its history holds fewer than two gap evaluations).
    The window: the last ``settings.plateau_steps`` steps (the history must reach back that far), or without
    them the last two evaluations. On a plateau: the gap moved (max - min over the window's evaluations) by at
    most ``settings.plateau``, and the learning rate (``schedule``) stayed at least ``LR_FLOOR`` of its peak over
    the window, or held one constant rate below its peak there (a constant stage after a decay): a schedule that
    has decayed to its floor stops the loss, so a flat gap there says nothing about convergence."""
    points = _gap_points(history)
    if len(points) < 2:
        return ""
    end = points[-1][0]
    if settings.plateau_steps is None:
        window, span = points[-2:], "between its last two evaluations"
    else:
        start = end - settings.plateau_steps
        before = [p for p in points if p[0] <= start]
        if not before:
            return (f"not converged: its evaluations start at step {points[0][0]}, not {settings.plateau_steps} steps "
                    f"before its last (step {end})")
        window, span = [p for p in points if p[0] >= before[-1][0]], f"over its last {settings.plateau_steps} steps"
    moved = max(g for _, g in window) - min(g for _, g in window)
    if moved > settings.plateau:
        return f"not converged: gap changed by {_fmt(moved)} {span} (plateau {settings.plateau:g})"
    if schedule is None:
        return "no learning-rate schedule recorded: a plateau cannot be told from the schedule's end"
    steps = range(window[0][0], max(window[0][0] + 1, min(end, schedule.total)))
    lrs = [schedule.lr(s) for s in steps]
    peak = max(schedule.lr(s) for s in range(schedule.total))
    if min(lrs) >= LR_FLOOR * peak or (max(lrs) - min(lrs) <= 1e-12 * peak and max(lrs) < peak):
        return ""
    return (f"not on a plateau: the learning rate fell to {100 * min(lrs) / peak:.3g}% of its peak {span} (below "
            f"{100 * LR_FLOOR:g}%: the schedule's end, not convergence)")


def exclusion(status: str, metrics: dict[str, Any], history: list[dict[str, Any]], settings: Settings,
              plateau: bool = True, schedule: Schedule | None = None) -> str:
    """Why a run does not count ("" when it does): not finished, gap above the tolerance, or (with ``plateau``)
    not on a plateau (``plateau_exclusion``, with the run's recorded ``schedule``)."""
    if status != "done":
        return f"status {status}"
    gap = _num(metrics.get(GAP))
    if not math.isfinite(gap):
        return f"no {GAP}"
    if gap > settings.tolerance:
        return f"gap {_fmt(gap)} > tolerance {settings.tolerance:g}"
    return plateau_exclusion(history, settings, schedule) if plateau else ""


def _parent_exclusion(run: Run, settings: Settings) -> str:
    if run.parent is None:
        return "no cfg.init_from.run: not a phase-2 run"
    try:
        results = json.loads((run.parent / RESULTS).read_text())
    except (OSError, ValueError) as e:
        return f"parent {run.parent} not readable ({type(e).__name__})"
    status = "done" if run_status(run.parent) == "done" or results.get("status") == "done" else run_status(run.parent)
    why = exclusion(status, results.get("metrics") or {}, results.get("history") or [], settings,
                    schedule=read_schedule(results.get("config") or {}))
    return f"parent does not count: {why}" if why else ""


def run_exclusion(run: Run, settings: Settings) -> str:
    """Why ``run`` does not enter its claim ("" when it does). A phase-2 run needs a counted parent (converged:
    the plateau rule) and two evaluations in its history; it is not held to the plateau rule itself (at a
    constant learning rate its gap fluctuates by design: its matched loss is that every evaluation after its
    burn-in stays within the margin of its parent's gap, checked by the claim)."""
    why = exclusion(run.status, run.metrics, run.history, settings, plateau=run.claim != "continue",
                    schedule=run.schedule)
    if why or run.claim != "continue":
        return why
    if len(run.history) < 2:
        return "fewer than 2 evaluations in its history"
    return _parent_exclusion(run, settings)

