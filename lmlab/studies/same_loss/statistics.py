"""The same-loss study's statistics (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199): one row per comparison
(paired differences by seed, their interval, t-test and smallest detectable effect, the equivalence test of the
paired gap differences and, when it fails, the gap-adjusted estimate), the verdicts (Holm over the claimed rows
with matched loss, unadjusted p for the extensions), and the agreement of two reruns' verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmlab.stats import equivalence, holm, mean_interval, min_detectable_effect, ols, paired_t_test
from lmlab.studies.same_loss.paper import PAPER
from lmlab.studies.same_loss.runs import Settings

ALPHA = 0.05
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CONFOUNDED, MISSING, EXTENSION = "loss-confounded", "n/a", "extension: "
INEFFECTIVE = "adversary ineffective"  # claim (c): the adversary did not cost ADVERSARY_COST points at matched loss
ADVERSARY_COST = 5.0  # points of the first task's probe accuracy
DECIDED = (REPRODUCED, NOT_REPRODUCED)


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
    family: int = 0  # m: the size of the Holm family the row belongs to (0: outside it)
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
             note: str = "", matched: tuple[bool, float] | None = None) -> Row:
    """One comparison: the paired differences A - B (times ``scale``), their interval, t-test and MDE, and the
    equivalence test of the paired gap differences, or, given ``matched`` (whether the loss is matched, the
    largest gap deviation), that check instead; the verdict is left to ``decide`` (all rows together)."""
    paper = PAPER.get((claim, kind, key.split(":")[0], task if key.startswith("acc") else ""))
    row = Row(claim, data, task_name, what, key, paper or "not claimed (extension)", sign,
              extension or paper is None, unit, note=note)
    effects, gap_diffs, seeds = [], [], []
    for pr in pairs:
        a, b = _mean(pr.a_out), _mean(pr.b_out)
        ga, gb = _mean(pr.a_gap), _mean(pr.b_gap)
        if all(math.isfinite(v) for v in (a, b, ga, gb)):
            effects.append(scale * (a - b))
            gap_diffs.append(ga - gb)
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
    row.mde = min_detectable_effect(iv.sd, len(effects), ALPHA)
    if matched is None:
        eq = equivalence(gap_diffs, settings.margin)
        row.gap_diff, row.gap_ci, row.matched = eq.interval.mean, eq.interval.half, eq.inside
    else:
        row.matched, row.gap_diff = matched
    if not row.matched:
        row.verdict = CONFOUNDED
        row.adjusted, row.adjusted_ci = within_pair_adjustment(effects, gap_diffs)
    return row


def within_pair_adjustment(effects: list[float], gap_diffs: list[float]) -> tuple[float, float]:
    """The gap-adjusted effect: the intercept of the least-squares line of the per-seed outcome differences on
    the per-seed gap differences (the effect at a gap difference of 0), with its 95% interval; NaN where the
    line is not identified (fewer than 2 pairs, or every pair with the same gap difference)."""
    try:
        return ols([[1.0, g] for g in gap_diffs], effects).interval(0)
    except ValueError:
        return math.nan, math.nan


def _direction(mean: float, p: float, sign: int) -> str:
    if not (math.isfinite(p) and p < ALPHA) or mean == 0:
        return INCONCLUSIVE
    return REPRODUCED if np.sign(mean) == np.sign(sign) else NOT_REPRODUCED


def decide(rows: list[Row]) -> list[Row]:
    """The verdicts (``RULE``): Holm over the claimed rows with matched loss, unadjusted p for the extensions.
    A row of the family states its smallest detectable effect at Holm's strictest threshold alpha / m (m: the
    family's size), the level its p must pass when it is the smallest."""
    family = [r for r in rows if not r.extension and not r.verdict and math.isfinite(r.p)]
    for r, adj in zip(family, holm([r.p for r in family])):
        r.p_holm = adj
        r.verdict = _direction(r.mean, adj, r.sign)
        r.family = len(family)
        r.mde = min_detectable_effect(r.sd, r.n, ALPHA / len(family))
    for r in rows:
        if not r.verdict:
            r.verdict = _direction(r.mean, r.p, r.sign) if r.extension else INCONCLUSIVE
        if r.extension and not r.verdict.startswith(EXTENSION):
            r.verdict = EXTENSION + r.verdict
    return rows


def base_verdict(verdict: str) -> str:
    return verdict[len(EXTENSION):] if verdict.startswith(EXTENSION) else verdict


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


