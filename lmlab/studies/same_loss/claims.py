"""The same-loss study's three claims (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199), each tested on the task
the paper uses for it: (a) continued pre-training after convergence (per seed, the mean over the last ``k``
evaluations of the phase-2 run minus the mean over its first ``k``, and the per-seed slope over steps); (b) model
size (the largest minus the smallest size that each have at least two counted seeds, paired by seed; traces
measured after embedding every model in the largest width); (c) the training algorithm (AdamW minus the
adversarial algorithm and AdamW minus the lookup table, paired by seed). ``analyse`` reads the runs, decides which
count and builds every row."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.stats import mean_interval, ols_slope
from lmlab.studies.same_loss.paper import CLAIMS, TASKS
from lmlab.studies.same_loss.runs import (
    BLOCKS,
    GAP,
    HEAD_ACC,
    HUTCH,
    TRACE,
    TRACES,
    Run,
    Settings,
    _num,
    acc_key,
    load_runs,
    lookup_key,
    proj_key,
    run_exclusion,
    task_label,
)
from lmlab.studies.same_loss.statistics import (
    ADVERSARY_COST,
    INEFFECTIVE,
    MISSING,
    Pair,
    Row,
    _mean,
    decide,
    make_row,
)
from lmlab.studies.same_loss.text import _fmt, _pm


def _run_pair(seed: int, a: Run, b: Run, key: str, scale: float = 1.0) -> Pair:
    ya, yb, ga, gb = a.get(key), b.get(key), a.get(GAP), b.get(GAP)
    return Pair(seed, [ya], [ga], [yb], [gb])


def _window_pair(run: Run, key: str, k: int) -> Pair:
    hist = run.history
    k = min(k, len(hist) // 2)
    first, last = hist[:k], hist[-k:]

    def vals(hs, m):
        return [_num(h.get(m)) for h in hs]

    return Pair(run.seed, vals(last, key), vals(last, GAP), vals(first, key), vals(first, GAP))


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


def burn_in(run: Run) -> int:
    """The steps of a phase-2 run before its loss is held to its parent's: its schedule's warmup (0 when it
    records no schedule)."""
    return run.schedule.warmup_steps if run.schedule is not None else 0


def parent_deviation(run: Run) -> float:
    """The largest deviation (signed) of a phase-2 run's gap from its parent's (its evaluation at step 0: the
    parent's weights) over every evaluation after its burn-in; NaN without a step-0 gap or a later one."""
    start = [_num(h.get(GAP)) for h in run.history if h["step"] == 0]
    after = [_num(h.get(GAP)) for h in run.history if h["step"] > 0 and h["step"] >= burn_in(run)]
    devs = [g - start[0] for g in after if math.isfinite(g)] if start and math.isfinite(start[0]) else []
    return max(devs, key=abs) if devs else math.nan


def continue_matched(runs: list[Run], margin: float) -> tuple[bool, float]:
    """Claim (a)'s matched loss: whether every evaluation of every run after its burn-in sits within +-``margin``
    of its parent's gap, and the largest deviation over the runs (signed; NaN where a run has none)."""
    devs = [parent_deviation(r) for r in runs]
    if not devs or not all(math.isfinite(d) for d in devs):
        return False, math.nan
    worst = max(devs, key=abs)
    return abs(worst) <= margin, worst


def claim_continue(runs: list[Run], counted: set[Path], settings: Settings) -> tuple[list[Row], list[str]]:
    rows, lines = [], []
    for data, group in _by_data(runs).items():
        kind = group[0].kind
        ok = {r.seed: r for r in sorted(group, key=lambda r: (r.seed, str(r.run_dir))) if r.run_dir in counted}
        matched = continue_matched(list(ok.values()), settings.margin)
        note = (f"{len(ok)} of {len(group)} runs counted; k = {settings.k}; matched loss: every evaluation after the "
                f"burn-in (steps {sorted({burn_in(r) for r in ok.values()})}) within ±{settings.margin:g} of the "
                f"parent's gap (largest deviation {_fmt(matched[1])})")
        specs = [(acc_key(t), f"probe acc (last {settings.k} - first {settings.k})", "acc", +1, " pts", 100.0, t)
                 for t in TASKS[("continue", kind)]]
        specs += [(TRACE, f"Fisher Tr(H) (last {settings.k} - first {settings.k})", "trace", -1, "", 1.0, ""),
                  (BLOCKS, f"blocks Tr(H) (last {settings.k} - first {settings.k})", "blocks", -1, "", 1.0, "")]
        for key, what, rkey, sign, unit, scale, task in specs:
            row = make_row("continue", data, kind, task, _tname(task, group) if task else "- (pre-training loss)", what,
                           f"{rkey}:last-first", sign, [_window_pair(r, key, settings.k) for r in ok.values()],
                           settings, unit, scale, extension=rkey == "blocks", note=note, matched=matched)
            slopes = [s for s in (_slope(r, key, scale) for r in ok.values()) if math.isfinite(s)]
            if slopes:
                iv = mean_interval(slopes)
                row.slope, row.slope_ci = iv.mean, iv.half
            rows.append(row)
        tasks = TASKS[("continue", kind)]
        lines += [f"### {data}", "", "| seed | parent | steps (first k; last k) | gap first -> last | "
                  "largest gap - parent after the burn-in | "
                  + " | ".join(f"{_tname(t, group)} acc (%) first -> last" for t in tasks)
                  + " | Fisher Tr first -> last | blocks Tr first -> last | Hutchinson Tr first -> last | "
                  f"{_tname(tasks[0], group)} acc slope (pts / 1k steps) |",
                  "|---" * (9 + len(tasks)) + "|"]
        for r in ok.values():
            k = min(settings.k, len(r.history) // 2)
            first, last = r.history[:k], r.history[-k:]

            def ends(key, scale=1.0, first=first, last=last):
                return (f"{_fmt(scale * _mean([_num(h.get(key)) for h in first]))} -> "
                        f"{_fmt(scale * _mean([_num(h.get(key)) for h in last]))}")

            lines.append(f"| {r.seed} | `{r.parent.name if r.parent else '?'}` | {[h['step'] for h in first]}; "
                         f"{[h['step'] for h in last]} | {ends(GAP)} | {_fmt(parent_deviation(r))} "
                         f"(after step {burn_in(r)}) | "
                         + " | ".join(ends(acc_key(t), 100.0) for t in tasks)
                         + f" | {ends(TRACE)} | {ends(BLOCKS)} | {ends(HUTCH)} | "
                         f"{_fmt(_slope(r, acc_key(tasks[0]), 100.0))} |")
        lines.append("")
    return rows, lines


PARAMS_ID = {TRACE: "flatness/params_id", BLOCKS: "flatness/blocks_params_id"}  # recorded by eval=flatness


def same_parameters(row: Row, arms: list[tuple[Run, Run]], key: str) -> Row:
    """A trace row compares like with like only when both arms of every pair counted the same parameters (names
    and shapes: ``PARAMS_ID``); where they did not, the row is n/a (outside the Holm family) and says so; where
    an arm did not record them, the note says that the check could not be made."""
    ids = [(a.get(PARAMS_ID[key]), b.get(PARAMS_ID[key])) for a, b in arms]
    known = [(x, y) for x, y in ids if math.isfinite(x) and math.isfinite(y)]
    if any(x != y for x, y in known):
        row.verdict = MISSING
        row.note = "; ".join(filter(None, [row.note, "the arms' traces count different parameters (names or "
                                           "shapes): not comparable"]))
    elif len(known) < len(ids):
        row.note = "; ".join(filter(None, [row.note, f"the parameters counted are not recorded for "
                                           f"{len(ids) - len(known)} of {len(ids)} pairs"]))
    return row


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
        arms = [(ok[large][s], ok[small][s]) for s in seeds] if pairs_for else []
        rows.append(same_parameters(make_row("size", data, kind, "", "- (pre-training loss)",
                                             f"blocks Tr(H) embedded, {vs}", "blocks:large-small", -1,
                                             pairs_for.get(BLOCKS, []), settings, note=note), arms, BLOCKS))
        rows.append(same_parameters(make_row("size", data, kind, "", "- (pre-training loss)",
                                             f"Fisher Tr(H) embedded, {vs}", "trace:large-small", -1,
                                             pairs_for.get(TRACE, []), settings, extension=True, note=note),
                                    arms, TRACE))
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
                  + f" | adversary's head on {_tname(tasks[0], group)} (%) | Fisher Tr | blocks Tr | Hutchinson Tr |",
                  "|---" * (7 + len(tasks)) + "|"]
        for name, arm, sel in (("AdamW (MLM)", adamw_all, list(base.values())),
                               ("adversarial", adv_all, list(adv.values()))):
            gap = mean_interval([r.get(GAP) for r in sel])
            lines.append(f"| {name} | {len(sel)} of {len(arm)} | {_pm(gap.mean, gap.half)} | "
                         + " | ".join(_acc_cell(sel, acc_key(t)) for t in tasks) + " | "
                         + (_acc_cell(sel, HEAD_ACC) if name == "adversarial" else "-") + " | "
                         + " | ".join(_trace_cell(sel, k, se) for k, se, _ in TRACES) + " |")
        lines.append("| lookup table (exact conditionals) | - | 0 (by construction) | "
                     + " | ".join(_acc_cell([r for r in group if math.isfinite(r.get(lookup_key(t)))], lookup_key(t))
                                  for t in tasks) + " | - | - | - | - |")
        seeds = sorted(set(base) & set(adv))
        note = f"seeds paired: {seeds}"
        lines += ["", f"AdamW - adversarial: {note}; AdamW - lookup table: seeds {sorted(base)}.", ""]
        for t in tasks:
            acc, look = acc_key(t), lookup_key(t)
            rows.append(make_row("algorithm", data, kind, t, _tname(t, group), "probe acc, AdamW - adversarial",
                                 "acc_adv:adamw-adversarial", +1, [_run_pair(s, base[s], adv[s], acc) for s in seeds],
                                 settings, " pts", 100.0, extension=kind == "hmm", note=note))
            lookup_pairs = [Pair(s, [r.get(acc)], [r.get(GAP)], [_lookup(r, adv.get(s), look)], [0.0])
                            for s, r in sorted(base.items())]
            rows.append(make_row("algorithm", data, kind, t, _tname(t, group), "probe acc, AdamW - lookup table",
                                 "acc_lookup:adamw-lookup", +1, lookup_pairs, settings, " pts", 100.0,
                                 extension=kind == "hmm",
                                 note=f"AdamW seeds {sorted(base)}; the lookup table's gap is 0"))
        arms = [(base[s], adv[s]) for s in seeds]
        rows.append(same_parameters(make_row(
            "algorithm", data, kind, "", "- (pre-training loss)", "Fisher Tr(H), AdamW - adversarial",
            "trace_adv:adamw-adversarial", -1, [_run_pair(s, base[s], adv[s], TRACE) for s in seeds], settings,
            extension=kind == "hmm", note=note), arms, TRACE))
        rows.append(same_parameters(make_row(
            "algorithm", data, kind, "", "- (pre-training loss)", "blocks Tr(H), AdamW - adversarial",
            "blocks_adv:adamw-adversarial", -1, [_run_pair(s, base[s], adv[s], BLOCKS) for s in seeds], settings,
            extension=True, note=note), arms, BLOCKS))
        adversary_rows(rows, data, _tname(tasks[0], group))
    return rows, lines


def adversary_rows(rows: list[Row], data: str, first_task: str) -> None:
    """Claim (c) tests AdamW against the adversary only where the adversary works: unless the adversarial arm
    costs at least ``ADVERSARY_COST`` points of the first task's probe accuracy (AdamW - adversarial, matched
    loss), every AdamW - adversarial row of ``data`` that would be decided says "adversary ineffective"."""
    mine = [r for r in rows if r.data == data and r.key.endswith(":adamw-adversarial")]
    cost = next((r for r in mine if r.key.startswith("acc_adv") and r.task == first_task), None)
    if cost is not None and cost.matched and cost.n >= 2 and cost.mean >= ADVERSARY_COST:
        return
    why = (f"adversary ineffective: it costs {_fmt(cost.mean) if cost is not None else 'n/a'} pts of {first_task} "
           f"(matched: {'yes' if cost is not None and cost.matched else 'no'}), below {ADVERSARY_COST:g}")
    for r in mine:
        if not r.verdict:
            r.verdict = INEFFECTIVE
        if why not in r.note:
            r.note = "; ".join(filter(None, [r.note, why]))


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


