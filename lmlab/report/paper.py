"""``lmlab report <dir>``: the claim-by-claim report of a rerun of Liu, Xie, Li & Ma, "Same Pre-training
Loss, Better Downstream: Implicit Bias Matters for Language Models", ICML 2023, arXiv 2210.14199.

It reads every job under ``<dir>`` (sweep directories, found by their ``.hydra/overrides.yaml``, read
through ``lmlab.report.summary.gather``), sorts them by the experiment that made them (``cfg.name`` ends in
``continue``, ``size`` or ``algorithm``: the configs of ``conf/experiment/same_loss/``) and by data set, and
writes ``<dir>/report.md``, ``<dir>/report.json`` (the rows, machine-readable) and PNG plots. Each of the
paper's three ways to same-loss models with different transfer is tested on the task the paper uses for it:

* claim (a), continued pre-training after convergence (PCFG task C, HMM z_10): per seed, the mean over the
  last ``k`` evaluations of the phase-2 run minus the mean over its first ``k`` (the first is the parent's
  weights), and the per-seed least-squares slope over steps;
* claim (b), model size (PCFG task B, HMM task z): the largest minus the smallest size that each have at
  least two counted seeds, paired by seed; traces are those measured after embedding every model in the
  largest width;
* claim (c), algorithm (PCFG tasks A and B, the paper's Table 1 and Table 2): AdamW minus the adversarial
  algorithm and AdamW minus the lookup table (the probe on the source's exact conditionals), paired by seed.

"Same loss" is a checked property, not an assumption: a comparison counts as matched only when the 95%
interval of its paired gap difference lies inside +-margin (an equivalence test); otherwise it is
"loss-confounded" and shows a gap-adjusted estimate (least squares on arm and gap). The matched rows the
paper claims form one family whose p-values are Holm-adjusted; the rows it does not claim are extensions,
tested unadjusted (``RULE``). ``write_report(..., compare=<other dir>)`` adds the agreement of the verdicts
with an independent rerun (other seeds).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.io import write_json, write_text
from lmlab.report.summary import gather
from lmlab.run_dir import CONFIG, RESULTS, read_config, read_results
from lmlab.run_dir import status as run_status
from lmlab.stats import equivalence, holm, mean_interval, min_detectable_effect, ols, ols_slope, paired_t_test

DEFAULT_TOLERANCE = 0.05  # nats: the largest gap to the optimum that counts as "the same, minimal loss"
DEFAULT_MARGIN = 0.02  # nats: the equivalence margin on paired gap differences
DEFAULT_PLATEAU = 0.01  # nats: the largest change of gap between a run's last two evaluations
DEFAULT_K = 3  # continue: evaluations averaged at each end of the phase-2 run
ALPHA = 0.05
SETTINGS_FILE = "reproduce.json"  # written by scripts/reproduce_paper.py: profile, tolerance, margin, timings
REPORT_JSON = "report.json"
CLAIMS = ("continue", "size", "algorithm")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CONFOUNDED, MISSING, EXTENSION = "loss-confounded", "n/a", "extension: "
DECIDED = (REPRODUCED, NOT_REPRODUCED)

GAP = "perplexity/gap"
TRACE, TRACE_SE = "flatness/trace", "flatness/trace_se"  # the primary estimator (Fisher)
BLOCKS, BLOCKS_SE = "flatness/blocks_trace", "flatness/blocks_trace_se"  # blocks only
HUTCH, HUTCH_SE = "flatness/hutchinson/trace", "flatness/hutchinson/trace_se"  # the cross-check
TRACES = ((TRACE, TRACE_SE, "Fisher Tr"), (BLOCKS, BLOCKS_SE, "blocks Tr"), (HUTCH, HUTCH_SE, "Hutchinson Tr"))


def acc_key(task: str) -> str:
    return f"probe/{task}/acc"


def lookup_key(task: str) -> str:
    return f"probe/{task}/lookup_acc"


def proj_key(task: str) -> str:
    return f"probe/{task}/proj_acc"


# The task each claim is tested on (the paper's), per kind of data.
TASKS = {("continue", "pcfg"): ("task_c",), ("continue", "hmm"): ("task_z",),
         ("size", "pcfg"): ("task_b",), ("size", "hmm"): ("task_z",),
         ("algorithm", "pcfg"): ("task_a", "task_b"), ("algorithm", "hmm"): ("task_z",)}

# The paper's numbers (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199), keyed by (claim, kind, row key, task);
# "[paper]": read from its text, not checked line by line. A row without an entry is an extension.
PAPER = {
    ("continue", "pcfg", "acc", "task_c"): "+1.6 pts (task C, SGD constant lr)",
    ("continue", "hmm", "acc", "task_z"): "+4.0 pts (z_10)",
    ("continue", "pcfg", "trace", ""): "falls (no number)",
    ("continue", "hmm", "trace", ""): "falls (no number)",
    ("size", "pcfg", "acc", "task_b"): "+6.9 pts at equal loss (task B probe 40.4% -> 50.5%)",
    ("size", "hmm", "acc", "task_z"): "+4.5 pts (hidden-state task)",
    ("size", "pcfg", "trace", ""): "-7.2 (Tr(H) 19.8 -> 12.6)",
    ("size", "hmm", "trace", ""): "falls (no number)",
    ("algorithm", "pcfg", "acc_adv", "task_a"): "+6.8 pts (Table 1, task A: 89.9% vs 83.1%)",
    ("algorithm", "pcfg", "acc_adv", "task_b"): "+6.9 pts (Table 1, task B: 49.2% vs 42.3%)",
    ("algorithm", "pcfg", "acc_lookup", "task_a"): "+18.7 pts (Table 1, task A: 89.9% vs 71.2%)",
    ("algorithm", "pcfg", "acc_lookup", "task_b"): "+9.5 pts (Table 1, task B: 49.2% vs 39.7%)",
    ("algorithm", "pcfg", "trace_adv", ""): "-11.3 (Table 2: Tr(H) 8.01 vs 19.34)",
}

RULE = (
    "Runs enter a comparison only when they count: finished, gap to the exact optimum (KL to the true "
    "single-mask conditionals on the fixed validation rows) at most the tolerance, and, when their history holds "
    "at least two gap evaluations, a change of gap between the last two of at most the plateau (converged). A "
    "phase-2 (continue) run counts only when its parent counts by the same rule. Runs are paired by training seed "
    "(claim (a): the mean of the last k evaluations of a run minus the mean of its first k); accuracies are in "
    "percentage points.\n\n"
    "**Matched loss** is tested, not assumed: the paired per-seed gap difference (same direction as the "
    "comparison) must have its 95% t-interval inside +-margin (an equivalence test). A row that fails is "
    "**loss-confounded**: its difference may be the loss's, and it shows instead the arm coefficient of a least-"
    "squares fit of the outcome on [1, arm, gap] over every run (claim (a): every averaged evaluation) of both "
    "arms, with its 95% interval.\n\n"
    "For every matched row: n pairs, the mean difference with its 95% t-interval, the paired t-test's two-sided "
    "p, and the smallest detectable effect MDE = (t(0.975, n-1) + t(0.8, n-1)) * sd / sqrt(n) (power 0.8 at "
    "two-sided alpha 0.05). The rows the paper claims, with matched loss, form one family; their p-values are "
    "Holm-adjusted. **Reproduced**: adjusted p < 0.05 with the paper's sign. **Not reproduced**: adjusted p < "
    "0.05 with the opposite sign. **Inconclusive**: otherwise (or fewer than 2 pairs): the MDE says which "
    "effects the seeds could have seen; a null result is not a refutation. **n/a**: a metric is missing. Rows "
    "the paper does not claim (the HMM in claim (c), the blocks-only trace, the probe on a fixed random "
    "projection) are **extensions**, outside the family, with the same wording on their unadjusted p."
)


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


def read_settings(path: str | Path, tolerance: float | None = None, margin: float | None = None,
                  plateau: float | None = None, k: int | None = None) -> Settings:
    """The settings of the rerun under ``path`` (``reproduce.json``, defaults where absent), overridden by the
    arguments that are not None."""
    f = Path(path) / SETTINGS_FILE
    raw = json.loads(f.read_text()) if f.exists() else {}

    def pick(given, key, default):
        return given if given is not None else raw.get(key, default) if raw.get(key) is not None else default

    return Settings(float(pick(tolerance, "tolerance", DEFAULT_TOLERANCE)),
                    float(pick(margin, "margin", DEFAULT_MARGIN)),
                    float(pick(plateau, "plateau", DEFAULT_PLATEAU)), max(1, int(pick(k, "k", DEFAULT_K))),
                    str(raw.get("profile", f"? (no {SETTINGS_FILE})")), str(raw.get("note", "") or ""),
                    raw.get("wall_s"))


# ----- reading the runs -----

def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


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
               label_position=int(pos) if isinstance(pos, (int, float)) else None)


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

def _gaps(history: list[dict[str, Any]]) -> list[float]:
    return [g for g in (_num(h.get(GAP)) for h in history) if math.isfinite(g)]


def exclusion(status: str, metrics: dict[str, Any], history: list[dict[str, Any]], settings: Settings,
              plateau: bool = True) -> str:
    """Why a run does not count ("" when it does): not finished, gap above the tolerance, or (with ``plateau``)
    not converged (the gap changed by more than the plateau between its last two evaluations)."""
    if status != "done":
        return f"status {status}"
    gap = _num(metrics.get(GAP))
    if not math.isfinite(gap):
        return f"no {GAP}"
    if gap > settings.tolerance:
        return f"gap {_fmt(gap)} > tolerance {settings.tolerance:g}"
    gaps = _gaps(history)
    if plateau and len(gaps) >= 2 and abs(gaps[-1] - gaps[-2]) > settings.plateau:
        return (f"not converged: gap changed by {_fmt(abs(gaps[-1] - gaps[-2]))} between its last two evaluations "
                f"(plateau {settings.plateau:g})")
    return ""


def _parent_exclusion(run: Run, settings: Settings) -> str:
    if run.parent is None:
        return "no cfg.init_from.run: not a phase-2 run"
    try:
        results = json.loads((run.parent / RESULTS).read_text())
    except (OSError, ValueError) as e:
        return f"parent {run.parent} not readable ({type(e).__name__})"
    status = "done" if run_status(run.parent) == "done" or results.get("status") == "done" else run_status(run.parent)
    why = exclusion(status, results.get("metrics") or {}, results.get("history") or [], settings)
    return f"parent does not count: {why}" if why else ""


def run_exclusion(run: Run, settings: Settings) -> str:
    """Why ``run`` does not enter its claim ("" when it does). A phase-2 run needs a counted parent (converged:
    the plateau rule) and two evaluations in its history; it is not held to the plateau rule itself (at a
    constant learning rate its gap fluctuates by design: its matched loss is the equivalence test on its first
    and last evaluations)."""
    why = exclusion(run.status, run.metrics, run.history, settings, plateau=run.claim != "continue")
    if why or run.claim != "continue":
        return why
    if len(run.history) < 2:
        return "fewer than 2 evaluations in its history"
    return _parent_exclusion(run, settings)


# ----- the rows -----

@dataclass
class Pair:
    """One seed of a comparison of arm A (AdamW, the larger model, the last evaluations) against arm B: the
    outcome and gap values of each arm (one per run, or one per averaged evaluation)."""
    seed: int
    a_out: list[float]
    a_gap: list[float]
    b_out: list[float]
    b_gap: list[float]
    obs: list[tuple[float, int, float]] = field(default_factory=list)  # (outcome, 1 for arm A, gap)


@dataclass
class Row:
    claim: str
    data: str
    task: str
    what: str
    key: str
    paper: str
    sign: int
    extension: bool
    unit: str = ""
    n: int = 0
    mean: float = math.nan
    ci: float = math.nan
    sd: float = math.nan
    mde: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    gap_diff: float = math.nan
    gap_ci: float = math.nan
    matched: bool = False
    adjusted: float = math.nan
    adjusted_ci: float = math.nan
    slope: float = math.nan
    slope_ci: float = math.nan
    seeds: list[int] = field(default_factory=list)
    verdict: str = ""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


def _mean(values: list[float]) -> float:
    x = [v for v in values if math.isfinite(v)]
    return float(np.mean(x)) if x else math.nan


def make_row(claim: str, data: str, kind: str, task: str, task_name: str, what: str, key: str, sign: int,
             pairs: list[Pair], settings: Settings, unit: str = "", scale: float = 1.0, extension: bool = False,
             note: str = "") -> Row:
    """One comparison: the paired differences A - B (times ``scale``), their interval, t-test and MDE, and the
    equivalence test of the paired gap differences; the verdict is left to ``decide`` (all rows together)."""
    paper = PAPER.get((claim, kind, key.split(":")[0], task if key.startswith("acc") else ""))
    row = Row(claim, data, task_name, what, key, paper or "not claimed (extension)", sign,
              extension or paper is None, unit, note=note)
    effects, gap_diffs, obs, seeds = [], [], [], []
    for pr in pairs:
        a, b = _mean(pr.a_out), _mean(pr.b_out)
        ga, gb = _mean(pr.a_gap), _mean(pr.b_gap)
        if all(math.isfinite(v) for v in (a, b, ga, gb)):
            effects.append(scale * (a - b))
            gap_diffs.append(ga - gb)
            obs += [(scale * y, arm, g) for y, arm, g in pr.obs if math.isfinite(y) and math.isfinite(g)]
            seeds.append(pr.seed)
    row.n, row.seeds = len(effects), seeds
    if not effects:
        row.verdict = MISSING if pairs else INCONCLUSIVE
        row.note = "; ".join(filter(None, [note, "a metric is missing" if pairs else "no counted pair"]))
        return row
    iv = mean_interval(effects)
    row.mean, row.ci, row.sd = iv.mean, iv.half, iv.sd
    if len(effects) < 2:
        row.verdict = INCONCLUSIVE
        row.note = "; ".join(filter(None, [note, "1 pair, need 2"]))
        row.gap_diff = gap_diffs[0]
        return row
    row.p = paired_t_test(effects)[1]
    row.mde = min_detectable_effect(iv.sd, len(effects))
    eq = equivalence(gap_diffs, settings.margin)
    row.gap_diff, row.gap_ci, row.matched = eq.interval.mean, eq.interval.half, eq.inside
    if not row.matched:
        row.verdict = CONFOUNDED
        try:
            fit = ols([[1.0, arm, g] for _, arm, g in obs], [y for y, _, _ in obs])
            row.adjusted, row.adjusted_ci = fit.interval(1)
        except ValueError:
            pass
    return row


def _direction(mean: float, p: float, sign: int) -> str:
    if not (math.isfinite(p) and p < ALPHA) or mean == 0:
        return INCONCLUSIVE
    return REPRODUCED if np.sign(mean) == np.sign(sign) else NOT_REPRODUCED


def decide(rows: list[Row]) -> list[Row]:
    """The verdicts (``RULE``): Holm over the claimed rows with matched loss, unadjusted p for the extensions."""
    family = [r for r in rows if not r.extension and not r.verdict and math.isfinite(r.p)]
    for r, adj in zip(family, holm([r.p for r in family])):
        r.p_holm = adj
        r.verdict = _direction(r.mean, adj, r.sign)
    for r in rows:
        if not r.verdict:
            r.verdict = _direction(r.mean, r.p, r.sign) if r.extension else INCONCLUSIVE
        if r.extension and not r.verdict.startswith(EXTENSION):
            r.verdict = EXTENSION + r.verdict
    return rows


def base_verdict(verdict: str) -> str:
    return verdict[len(EXTENSION):] if verdict.startswith(EXTENSION) else verdict


# ----- the claims -----

def _run_pair(seed: int, a: Run, b: Run, key: str, scale: float = 1.0) -> Pair:
    ya, yb, ga, gb = a.get(key), b.get(key), a.get(GAP), b.get(GAP)
    return Pair(seed, [ya], [ga], [yb], [gb], [(ya, 1, ga), (yb, 0, gb)])


def _window_pair(run: Run, key: str, k: int) -> Pair:
    hist = run.history
    k = min(k, len(hist) // 2)
    first, last = hist[:k], hist[-k:]

    def vals(hs, m):
        return [_num(h.get(m)) for h in hs]

    obs = [(_num(h.get(key)), arm, _num(h.get(GAP))) for arm, hs in ((1, last), (0, first)) for h in hs]
    return Pair(run.seed, vals(last, key), vals(last, GAP), vals(first, key), vals(first, GAP), obs)


def _slope(run: Run, key: str, scale: float) -> float:
    pts = [(h["step"], _num(h.get(key))) for h in run.history if math.isfinite(_num(h.get(key)))]
    return 1000 * scale * ols_slope([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else math.nan


def _by_data(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.data].append(r)
    return dict(sorted(out.items()))


def _tname(task: str, group: list[Run]) -> str:
    return task_label(task, next((r.label_position for r in group if r.label_position is not None), None))


def claim_continue(runs: list[Run], counted: set[Path], settings: Settings) -> tuple[list[Row], list[str]]:
    rows, lines = [], []
    for data, group in _by_data(runs).items():
        kind = group[0].kind
        ok = {r.seed: r for r in sorted(group, key=lambda r: (r.seed, str(r.run_dir))) if r.run_dir in counted}
        note = f"{len(ok)} of {len(group)} runs counted; k = {settings.k}"
        specs = [(acc_key(t), f"probe acc (last {settings.k} - first {settings.k})", "acc", +1, " pts", 100.0, t)
                 for t in TASKS[("continue", kind)]]
        specs += [(TRACE, f"Fisher Tr(H) (last {settings.k} - first {settings.k})", "trace", -1, "", 1.0, ""),
                  (BLOCKS, f"blocks Tr(H) (last {settings.k} - first {settings.k})", "blocks", -1, "", 1.0, "")]
        for key, what, rkey, sign, unit, scale, task in specs:
            row = make_row("continue", data, kind, task, _tname(task, group) if task else "- (pre-training loss)", what,
                           f"{rkey}:last-first", sign, [_window_pair(r, key, settings.k) for r in ok.values()],
                           settings, unit, scale, extension=rkey == "blocks", note=note)
            slopes = [s for s in (_slope(r, key, scale) for r in ok.values()) if math.isfinite(s)]
            if slopes:
                iv = mean_interval(slopes)
                row.slope, row.slope_ci = iv.mean, iv.half
            rows.append(row)
        tasks = TASKS[("continue", kind)]
        lines += [f"### {data}", "", "| seed | parent | steps (first k; last k) | gap first -> last | "
                  + " | ".join(f"{_tname(t, group)} acc (%) first -> last" for t in tasks)
                  + " | Fisher Tr first -> last | blocks Tr first -> last | Hutchinson Tr first -> last | "
                  f"{_tname(tasks[0], group)} acc slope (pts / 1k steps) |",
                  "|---" * (8 + len(tasks)) + "|"]
        for r in ok.values():
            k = min(settings.k, len(r.history) // 2)
            first, last = r.history[:k], r.history[-k:]

            def ends(key, scale=1.0, first=first, last=last):
                return (f"{_fmt(scale * _mean([_num(h.get(key)) for h in first]))} -> "
                        f"{_fmt(scale * _mean([_num(h.get(key)) for h in last]))}")

            lines.append(f"| {r.seed} | `{r.parent.name if r.parent else '?'}` | {[h['step'] for h in first]}; "
                         f"{[h['step'] for h in last]} | {ends(GAP)} | "
                         + " | ".join(ends(acc_key(t), 100.0) for t in tasks)
                         + f" | {ends(TRACE)} | {ends(BLOCKS)} | {ends(HUTCH)} | "
                         f"{_fmt(_slope(r, acc_key(tasks[0]), 100.0))} |")
        lines.append("")
    return rows, lines


def _trace_cell(runs: list[Run], key: str, se_key: str) -> str:
    iv = mean_interval([v for v in (r.get(key) for r in runs) if math.isfinite(v)])
    se = _mean([r.get(se_key) for r in runs])
    return _pm(iv.mean, iv.half) + (f" (run SE {_fmt(se, 2)})" if math.isfinite(se) else "")


def _acc_cell(runs: list[Run], key: str) -> str:
    iv = mean_interval([v for v in (r.get(key) for r in runs) if math.isfinite(v)])
    return _pm(iv.mean, iv.half, scale=100)


def claim_size(runs: list[Run], counted: set[Path], settings: Settings) -> tuple[list[Row], list[str]]:
    rows, lines = [], []
    for data, group in _by_data(runs).items():
        kind = group[0].kind
        tasks = TASKS[("size", kind)]
        sizes = sorted({r.d_model for r in group})
        ok: dict[int, dict[int, Run]] = {d: {} for d in sizes}
        for r in sorted(group, key=lambda r: str(r.run_dir)):
            if r.run_dir in counted:
                ok[r.d_model][r.seed] = r
        has_proj = any(math.isfinite(r.get(proj_key(t))) for r in group for t in tasks)
        lines += [f"### {data}", "", "| d_model | params | counted runs | seeds counted | gap to optimum | "
                  + " | ".join(f"{_tname(t, group)} acc (%)"
                               + (f" | {_tname(t, group)} proj acc (%)" if has_proj else "") for t in tasks)
                  + " | Fisher Tr (embedded) | blocks Tr | Hutchinson Tr |",
                  "|---" * (8 + len(tasks) * (2 if has_proj else 1)) + "|"]
        for d in sizes:
            at = [r for r in group if r.d_model == d]
            sel = list(ok[d].values())
            cells = [f"{_acc_cell(sel, acc_key(t))}" + (f" | {_acc_cell(sel, proj_key(t))}" if has_proj else "")
                     for t in tasks]
            gap = mean_interval([r.get(GAP) for r in sel])
            n_counted = sum(r.run_dir in counted for r in at)
            lines.append(f"| {d} | {max((r.params for r in at), default=0)} | {n_counted} of {len(at)} | "
                         f"{sorted(ok[d]) or '-'} | {_pm(gap.mean, gap.half)} | " + " | ".join(cells) + " | "
                         + " | ".join(_trace_cell(sel, k, se) for k, se, _ in TRACES) + " |")
        enough = [d for d in sizes if len(ok[d]) >= 2]
        pairs_for = {}
        if len(enough) >= 2:
            small, large = enough[0], enough[-1]
            seeds = sorted(set(ok[small]) & set(ok[large]))
            vs = f"d_model {large} - {small}"
            note = f"sizes with >= 2 counted seeds: {', '.join(map(str, enough))}; seeds paired: {seeds}"
            pairs_for = {key: [_run_pair(s, ok[large][s], ok[small][s], key) for s in seeds]
                         for key in [*(acc_key(t) for t in tasks), *(proj_key(t) for t in tasks), TRACE, BLOCKS]}
        else:
            vs = "largest - smallest size"
            note = f"fewer than two sizes with >= 2 counted seeds ({', '.join(map(str, enough)) or 'none'})"
        lines += ["", f"Compared: {vs} ({note}).", ""]
        for t in tasks:
            rows.append(make_row("size", data, kind, t, _tname(t, group), f"probe acc, {vs}", "acc:large-small", +1,
                                 pairs_for.get(acc_key(t), []), settings, " pts", 100.0, note=note))
            if has_proj:
                rows.append(make_row("size", data, kind, t, _tname(t, group), f"probe acc on a fixed 512-dim random "
                                     f"projection, {vs}", "proj:large-small", +1, pairs_for.get(proj_key(t), []),
                                     settings, " pts", 100.0, extension=True, note=note))
        rows.append(make_row("size", data, kind, "", "- (pre-training loss)", f"Fisher Tr(H) embedded, {vs}",
                             "trace:large-small", -1, pairs_for.get(TRACE, []), settings, note=note))
        rows.append(make_row("size", data, kind, "", "- (pre-training loss)", f"blocks Tr(H) embedded, {vs}",
                             "blocks:large-small", -1, pairs_for.get(BLOCKS, []), settings, extension=True, note=note))
    return rows, lines


def claim_algorithm(runs: list[Run], counted: set[Path], settings: Settings) -> tuple[list[Row], list[str]]:
    rows, lines = [], []
    for data, group in _by_data(runs).items():
        kind = group[0].kind
        tasks = TASKS[("algorithm", kind)]
        adamw_all = [r for r in group if r.arm != "adversarial"]
        adv_all = [r for r in group if r.arm == "adversarial"]
        base = {r.seed: r for r in sorted(adamw_all, key=lambda r: str(r.run_dir)) if r.run_dir in counted}
        adv = {r.seed: r for r in sorted(adv_all, key=lambda r: str(r.run_dir)) if r.run_dir in counted}
        lines += [f"### {data}", "", "| algorithm | counted runs | gap to optimum | "
                  + " | ".join(f"{_tname(t, group)} acc (%)" for t in tasks)
                  + " | Fisher Tr | blocks Tr | Hutchinson Tr |",
                  "|---" * (6 + len(tasks)) + "|"]
        for name, arm, sel in (("AdamW (MLM)", adamw_all, list(base.values())),
                               ("adversarial", adv_all, list(adv.values()))):
            gap = mean_interval([r.get(GAP) for r in sel])
            lines.append(f"| {name} | {len(sel)} of {len(arm)} | {_pm(gap.mean, gap.half)} | "
                         + " | ".join(_acc_cell(sel, acc_key(t)) for t in tasks) + " | "
                         + " | ".join(_trace_cell(sel, k, se) for k, se, _ in TRACES) + " |")
        lines.append("| lookup table (exact conditionals) | - | 0 (by construction) | "
                     + " | ".join(_acc_cell([r for r in group if math.isfinite(r.get(lookup_key(t)))], lookup_key(t))
                                  for t in tasks) + " | - | - | - |")
        seeds = sorted(set(base) & set(adv))
        note = f"seeds paired: {seeds}"
        lines += ["", f"AdamW - adversarial: {note}; AdamW - lookup table: seeds {sorted(base)}.", ""]
        for t in tasks:
            acc, look = acc_key(t), lookup_key(t)
            rows.append(make_row("algorithm", data, kind, t, _tname(t, group), "probe acc, AdamW - adversarial",
                                 "acc_adv:adamw-adversarial", +1, [_run_pair(s, base[s], adv[s], acc) for s in seeds],
                                 settings, " pts", 100.0, extension=kind == "hmm", note=note))
            lookup_pairs = [Pair(s, [r.get(acc)], [r.get(GAP)], [_lookup(r, adv.get(s), look)], [0.0],
                                 [(r.get(acc), 1, r.get(GAP)), (_lookup(r, adv.get(s), look), 0, 0.0)])
                            for s, r in sorted(base.items())]
            rows.append(make_row("algorithm", data, kind, t, _tname(t, group), "probe acc, AdamW - lookup table",
                                 "acc_lookup:adamw-lookup", +1, lookup_pairs, settings, " pts", 100.0,
                                 extension=kind == "hmm",
                                 note=f"AdamW seeds {sorted(base)}; the lookup table's gap is 0"))
        rows.append(make_row("algorithm", data, kind, "", "- (pre-training loss)", "Fisher Tr(H), AdamW - adversarial",
                             "trace_adv:adamw-adversarial", -1, [_run_pair(s, base[s], adv[s], TRACE) for s in seeds],
                             settings, extension=kind == "hmm", note=note))
        rows.append(make_row("algorithm", data, kind, "", "- (pre-training loss)", "blocks Tr(H), AdamW - adversarial",
                             "blocks_adv:adamw-adversarial", -1, [_run_pair(s, base[s], adv[s], BLOCKS) for s in seeds],
                             settings, extension=True, note=note))
    return rows, lines


def _lookup(run: Run, other: Run | None, key: str) -> float:
    """The lookup table's accuracy (a property of the data, not of the model) from either run of a seed."""
    v = run.get(key)
    return v if math.isfinite(v) or other is None else other.get(key)


def algorithm_runs(runs: list[Run]) -> list[Run]:
    """The runs of claim (c): the algorithm sweep's, and where it has no AdamW arm for a data set (it ran the
    adversarial arm only), the size sweep's runs of that data at the adversarial runs' width: AdamW on the MLM
    loss with the same data, schedule and evaluations."""
    algo = [r for r in runs if r.claim == "algorithm"]
    out = list(algo)
    for data in sorted({r.data for r in algo}):
        if not any(r.arm != "adversarial" for r in algo if r.data == data):
            widths = {r.d_model for r in algo if r.data == data}
            out += [r for r in runs if r.claim == "size" and r.data == data and r.d_model in widths]
    return out


BUILDERS = {"continue": claim_continue, "size": claim_size, "algorithm": claim_algorithm}


@dataclass
class Analysis:
    settings: Settings
    runs: list[Run]
    excluded: list[tuple[Run, str]]
    counted: set[Path]
    rows: list[Row]
    details: dict[str, list[str]]

    def trace_precision(self) -> dict[str, dict[str, float]]:
        """Per trace (Fisher, blocks, Hutchinson): the median and the largest standard error / trace over every
        evaluation of the counted runs (final and along the way), and how many evaluations exceed 5%."""
        evaluations = [m for r in self.runs if r.run_dir in self.counted for m in (r.metrics, *r.history)]
        out = {}
        for key, se_key, name in TRACES:
            pairs = [(_num(m.get(key)), _num(m.get(se_key))) for m in evaluations]
            ratios = [se / tr for tr, se in pairs if math.isfinite(tr) and math.isfinite(se) and tr > 0]
            if ratios:
                out[name] = {"evaluations": len(ratios), "median": float(np.median(ratios)),
                             "max": float(max(ratios)), "above_5pct": sum(x > 0.05 for x in ratios)}
        return out

    def gap_summary(self) -> tuple[float, float]:
        gaps = [r.get(GAP) for r in self.runs if r.run_dir in self.counted and math.isfinite(r.get(GAP))]
        return (float(np.median(gaps)), float(max(gaps))) if gaps else (math.nan, math.nan)


def analyse(path: str | Path, settings: Settings) -> Analysis:
    """Read the runs under ``path``; decide which count; build and decide every row."""
    runs = load_runs(path)
    excluded = [(r, why) for r in runs if (why := run_exclusion(r, settings))]
    bad = {id(r) for r, _ in excluded}
    counted = {r.run_dir for r in runs if id(r) not in bad}
    rows, details = [], {}
    for c in CLAIMS:
        rs, lines = BUILDERS[c](algorithm_runs(runs) if c == "algorithm" else [r for r in runs if r.claim == c],
                                counted, settings)
        rows += rs
        details[c] = lines
    return Analysis(settings, runs, excluded, counted, decide(rows), details)


# ----- formatting -----

def _fmt(v: float, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) < 1e-12:  # rounding noise of a zero spread
        return "0"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _pm(mean: float, ci: float, scale: float = 1.0, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    ci_s = f" ± {_fmt(ci * scale, 2)}" if ci is not None and math.isfinite(ci) else ""
    return f"{_fmt(mean * scale, digits)}{ci_s}"


def _signed(v: float, ci: float, unit: str = "") -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.3g}" + (f" ± {_fmt(ci, 2)}" if math.isfinite(ci) else "") + unit


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


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


# ----- stability across two independent reruns -----

def _row_id(r: dict[str, Any]) -> tuple:
    return (r.get("claim"), r.get("data"), r.get("task"), r.get("key") or r.get("what"))


def compare_rows(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """Pair the rows of two reruns; a row decided (reproduced / not reproduced) in either is stable only when
    decided the same way in both. Returns (one entry per row, stable count, decided count)."""
    theirs = {_row_id(r): r for r in other}
    out, agree, decided = [], 0, 0
    for r in rows:
        o = theirs.pop(_row_id(r), None)
        a = base_verdict(str(r.get("verdict", "")))
        b = base_verdict(str(o.get("verdict", ""))) if o else "absent"
        if a in DECIDED or b in DECIDED:
            decided += 1
            stable = a == b
            agree += stable
            state = "stable" if stable else "unstable"
        else:
            state = "-"
        out.append({"row": r, "this": r.get("verdict"), "other": o.get("verdict") if o else "absent", "state": state})
    for o in theirs.values():
        b = base_verdict(str(o.get("verdict", "")))
        if b in DECIDED:
            decided += 1
        out.append({"row": o, "this": "absent", "other": o.get("verdict"),
                    "state": "unstable" if b in DECIDED else "-"})
    return out, agree, decided


def _other_rows(other: Path, settings: Settings) -> list[dict[str, Any]]:
    f = other / REPORT_JSON
    if f.exists():
        try:
            return list(json.loads(f.read_text()).get("rows", []))
        except ValueError:
            pass
    theirs = read_settings(other)
    return [r.to_json() for r in analyse(other, Settings(settings.tolerance, settings.margin, settings.plateau,
                                                          settings.k, theirs.profile, theirs.note)).rows]


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

TITLES = {
    "continue": "Claim (a): continuing pre-training after convergence improves transfer (and flattens)",
    "size": "Claim (b): at equal loss, larger models transfer better (and are flatter)",
    "algorithm": "Claim (c): at equal loss, the training algorithm changes transfer "
                 "(AdamW > adversarial, AdamW > lookup table)",
}


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
          + (f"; wall time {settings.wall_s:.0f} s" if isinstance(settings.wall_s, (int, float)) else "") + ". "
          f"Tolerance on the gap to the optimum: **{settings.tolerance:g} nats**; equivalence margin on paired gap "
          f"differences: **{settings.margin:g} nats**; plateau: {settings.plateau:g} nats; k = {settings.k}.", "",
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
    md += ["", f"Holm family: {len(family)} claimed row(s) with matched loss. All rows: "
           + ", ".join(f"{v}: {sum(base_verdict(r.verdict) == v for r in a.rows)}"
                       for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, CONFOUNDED, MISSING)) + ".", ""]
    md += ["## The rule", "", RULE, ""]
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
        "tolerance": settings.tolerance, "margin": settings.margin, "plateau": settings.plateau, "k": settings.k,
        "gap_median": None if not math.isfinite(gap_median) else gap_median,
        "gap_max": None if not math.isfinite(gap_max) else gap_max,
        "trace_precision": precision, "rows": [r.to_json() for r in a.rows],
        "excluded": [{"run": str(r.run_dir), "claim": r.claim, "reason": why} for r, why in a.excluded],
        "stability": stability})
    write_text(report, "\n".join(md))
    return report
