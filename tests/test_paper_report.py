"""``lmlab.studies.same_loss`` on hand-made run directories (results.json + .hydra files): matched loss as an
equivalence test, the gap-adjusted estimate, Holm over the claimed rows, which runs count (tolerance, plateau, the
parent of a phase-2 run), the continue effect over the first and last k evaluations, the size pairing, missing
metrics, the report.json rows, the stability of the verdicts across two reruns (also through ``lmlab report
--compare``), and the study that ``lmlab report`` builds from what the runs declare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmlab.stats import holm, mean_interval
from lmlab.studies.same_loss.claims import analyse
from lmlab.studies.same_loss.render import write_report
from lmlab.studies.same_loss.runs import BLOCKS, GAP, HEAD_ACC, TRACE, Settings, acc_key, lookup_key, proj_key
from lmlab.studies.same_loss.statistics import (
    CONFOUNDED,
    INCONCLUSIVE,
    MISSING,
    NOT_REPRODUCED,
    REPRODUCED,
    compare_rows,
)

PCFG = {"_target_": "lmlab.data.pcfg.PCFGSource", "grammar": "/g/rules.txt"}
HMM = {"_target_": "lmlab.data.hmm.HMMSource", "label_position": 10}
ADV = {"_target_": "lmlab.objectives.adversarial.AdversarialMLM", "lam": 0.5}
MLM = {"_target_": "lmlab.objectives.adversarial.AdversarialMLM", "lam": 0.0}


CONSTANT = {"_target_": "lmlab.schedule.constant", "_partial_": True, "warmup": 0.0}


def write_job(sweep: Path, job: str, claim: str, seed: int, metrics: dict, history=(), data=PCFG, d_model=64,
              objective=MLM, parent: Path | None = None, done: bool = True, schedule=CONSTANT,
              max_steps: int = 1000) -> Path:
    run = sweep / job
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- model.d_model={d_model}\n")
    (run / ".hydra" / "config.yaml").write_text(f"name: same_loss/{claim}\n")
    cfg = {"name": f"same_loss/{claim}", "seed": seed, "data": data, "model": {"d_model": d_model},
           "objective": objective, "optim": {"_target_": "torch.optim.AdamW"},
           "init_from": {"run": str(parent) if parent else None}, "schedule": schedule, "max_steps": max_steps}
    (run / "results.json").write_text(json.dumps({"config": cfg, "metrics": metrics, "history": list(history),
                                                   "status": "done" if done else "interrupted"}))
    if done:
        (run / "DONE").write_text("now\n")
    return run


def _algorithm(root: Path, adv_gap_shift: float, seeds=range(4), acc_gain=0.08, task_b_gain=0.05):
    """AdamW vs adversarial on the PCFG: AdamW better by ``acc_gain`` on task A and flatter by 5."""
    sweep = root / "algorithm"
    rng = np.random.default_rng(0)
    for s in seeds:
        e = 0.004 * rng.standard_normal(3)
        base = {GAP: 0.02 + 0.0005 * s, acc_key("task_a"): 0.80 + e[0], acc_key("task_b"): 0.45 + e[1],
                lookup_key("task_a"): 0.70, lookup_key("task_b"): 0.40, TRACE: 5.0 + 0.1 * s, BLOCKS: 3.0}
        write_job(sweep, f"adamw-{s}", "algorithm", s, base)
        adv = {GAP: base[GAP] + adv_gap_shift + 0.0002 * s, acc_key("task_a"): 0.80 - acc_gain + e[2],
               acc_key("task_b"): 0.45 - task_b_gain + e[1] / 2, TRACE: 10.0 + 0.2 * s, BLOCKS: 6.0,
               HEAD_ACC: 0.30 + 0.02 * s}
        write_job(sweep, f"adv-{s}", "algorithm", s, adv, objective=ADV)
    return sweep


def _rows(root: Path, **settings):
    a = analyse(root, Settings(**{"tolerance": 0.1, "margin": 0.02, **settings}))
    return a, {(r.claim, r.data.split(" ")[0], r.task, r.key): r for r in a.rows}


def test_matched_loss_is_an_equivalence_test(tmp_path):
    _algorithm(tmp_path / "far", adv_gap_shift=0.05)  # paired gap difference 0.05 > margin 0.02
    _, rows = _rows(tmp_path / "far")
    r = rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")]
    assert r.n == 4 and not r.matched and r.verdict == CONFOUNDED
    assert r.gap_diff == pytest.approx(-0.05 - 0.0002 * 1.5, abs=1e-9)  # AdamW - adversarial
    assert math.isfinite(r.adjusted) and math.isfinite(r.adjusted_ci)
    assert math.isnan(r.p_holm)  # outside the Holm family

    _algorithm(tmp_path / "near", adv_gap_shift=0.001)  # differences ~0.001: matched
    a, rows = _rows(tmp_path / "near")
    r = rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")]
    assert r.matched and abs(r.gap_diff) + r.gap_ci <= 0.02
    assert r.mean == pytest.approx(8.0, abs=1.0) and r.verdict == REPRODUCED
    trace = rows[("algorithm", "pcfg", "- (pre-training loss)", "trace_adv:adamw-adversarial")]
    assert trace.verdict == REPRODUCED and trace.mean == pytest.approx(-5.0 - 0.1 * 1.5)
    task_b = rows[("algorithm", "pcfg", "task B", "acc_adv:adamw-adversarial")]
    assert task_b.paper.startswith("+6.9 pts (Table 1, task B")
    blocks = rows[("algorithm", "pcfg", "- (pre-training loss)", "blocks_adv:adamw-adversarial")]
    assert blocks.extension and blocks.verdict == "extension: " + REPRODUCED and math.isnan(blocks.p_holm)
    # AdamW - lookup table: the lookup table sits at gap 0, AdamW at 0.02: not within the margin
    lookup = rows[("algorithm", "pcfg", "task A", "acc_lookup:adamw-lookup")]
    assert lookup.gap_diff == pytest.approx(0.02075) and lookup.verdict == CONFOUNDED
    # Holm over exactly the claimed rows with matched loss
    family = [r for r in a.rows if not r.extension and r.matched]
    assert family and [r.p_holm for r in family] == pytest.approx(holm([r.p for r in family]))


def test_the_adversarys_own_head_stands_beside_the_probes(tmp_path):
    """Claim (c)'s table gives the adversary's head accuracy on the test split (objective/head_acc) in the
    adversarial row, as mean +- 95% interval over the counted runs, and '-' for AdamW, which has no head."""
    _algorithm(tmp_path, adv_gap_shift=0.001)
    a, _ = _rows(tmp_path)
    table = [line for line in a.details["algorithm"] if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    col = header.index("adversary's head on task A (%)")
    assert header[col - 1] == "task B acc (%)"
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in table[2:]}
    assert all(len(c) == len(header) for c in cells.values())
    heads = [0.30 + 0.02 * s for s in range(4)]
    want = mean_interval(heads)
    assert cells["adversarial"][col] == f"{100 * want.mean:.3g} ± {100 * want.half:.2g}"  # 33 ± 4.1
    assert cells["AdamW (MLM)"][col] == "-" and cells["lookup table (exact conditionals)"][col] == "-"


def test_gap_adjusted_estimate_is_the_within_pair_intercept(tmp_path):
    """Loss-confounded: the per-seed accuracy differences regressed on the per-seed gap differences; the intercept
    (the difference at equal gap) and its 95% interval equal scipy's linregress."""
    from scipy import stats as sps

    _algorithm(tmp_path, adv_gap_shift=0.05)
    _, rows = _rows(tmp_path)
    r = rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")]
    runs = {}
    for p in sorted(tmp_path.glob("algorithm/*")):
        res = json.loads((p / "results.json").read_text())
        runs[(res["config"]["seed"], res["config"]["objective"]["lam"] > 0)] = res["metrics"]
    seeds = sorted({s for s, _ in runs})
    dy = [100 * (runs[(s, False)][acc_key("task_a")] - runs[(s, True)][acc_key("task_a")]) for s in seeds]
    dg = [runs[(s, False)][GAP] - runs[(s, True)][GAP] for s in seeds]
    fit = sps.linregress(dg, dy)
    assert r.verdict == CONFOUNDED and r.adjusted == pytest.approx(fit.intercept, rel=1e-9)
    assert r.adjusted_ci == pytest.approx(sps.t.ppf(0.975, len(seeds) - 2) * fit.intercept_stderr, rel=1e-9)


def test_opposite_sign_and_inconclusive_and_missing(tmp_path):
    _algorithm(tmp_path / "opposite", adv_gap_shift=0.0005, task_b_gain=-0.05)
    _, rows = _rows(tmp_path / "opposite")
    assert rows[("algorithm", "pcfg", "task B", "acc_adv:adamw-adversarial")].verdict == NOT_REPRODUCED
    _algorithm(tmp_path / "null", adv_gap_shift=0.0005, task_b_gain=0.0)
    _, rows = _rows(tmp_path / "null")
    b = rows[("algorithm", "pcfg", "task B", "acc_adv:adamw-adversarial")]
    assert b.verdict == INCONCLUSIVE and math.isfinite(b.mde)
    # no Hutchinson / size / continue runs: rows are n/a or inconclusive, never a crash
    sweep = tmp_path / "bare"
    for s in range(2):
        write_job(sweep, f"a{s}", "algorithm", s, {GAP: 0.01})
        write_job(sweep, f"b{s}", "algorithm", s, {GAP: 0.01}, objective=ADV)
    _, rows = _rows(tmp_path / "bare")
    assert rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")].verdict == MISSING
    report = write_report(tmp_path / "bare")
    assert "n/a" in report.read_text()


def _size(root: Path, seeds_per_size: dict[int, list[int]], proj: bool = False):
    sweep = root / "size"
    for d, seeds in seeds_per_size.items():
        for s in seeds:
            m = {GAP: 0.03, acc_key("task_b"): 0.40 + d / 1000 + 0.003 * s, TRACE: 20.0 - d / 20,
                 "model/params": d * 100}
            if proj:
                m[proj_key("task_b")] = 0.35 + d / 2000
            write_job(sweep, f"d{d}-s{s}", "size", s, m, d_model=d)
        write_job(sweep, f"d{d}-far", "size", 99, {GAP: 0.5, acc_key("task_b"): 0.9}, d_model=d)


def test_size_uses_the_extreme_sizes_with_two_counted_seeds(tmp_path):
    _size(tmp_path, {32: [0], 64: [0, 1, 2], 128: [0, 1, 2], 256: [1, 2, 3]}, proj=True)
    a, rows = _rows(tmp_path)
    r = rows[("size", "pcfg", "task B", "acc:large-small")]
    assert "d_model 256 - 64" in r.what and r.seeds == [1, 2]  # 32 has one seed; 256 lacks seed 0
    assert r.mean == pytest.approx(100 * (256 - 64) / 1000)
    assert r.paper.startswith("+6.9 pts") and not r.extension
    p = rows[("size", "pcfg", "task B", "proj:large-small")]
    assert p.extension and p.mean == pytest.approx(100 * (256 - 64) / 2000)
    assert any("gap 0.5 > tolerance" in why for _, why in a.excluded)
    text = write_report(tmp_path, tolerance=0.1).read_text()
    assert "| 32 | 3200 | 1 of 2 | [0] |" in text and "proj acc" in text


def _continue(root: Path, parent_gap=0.02, seeds=range(3), plateau_jump=0.0, wobble=0.0):
    sweep = root / "continue"
    parents = {}
    for s in seeds:
        parents[s] = write_job(root / "parents", f"p{s}", "size", s, {GAP: parent_gap},
                               history=[{"step": 100, GAP: parent_gap + plateau_jump}, {"step": 200, GAP: parent_gap}])
        hist = [{"step": 100 * i, GAP: 0.02 - 0.0001 * i + wobble * (i % 2), acc_key("task_c"): 0.50 + 0.01 * i
                 + 0.002 * s, TRACE: 10.0 - 0.5 * i, BLOCKS: 4.0} for i in range(8)]
        write_job(sweep, f"c{s}", "continue", s, {GAP: hist[-1][GAP]}, history=hist, parent=parents[s])
    return parents


def test_continue_averages_the_first_and_last_k_evaluations(tmp_path):
    _continue(tmp_path)
    _, rows = _rows(tmp_path, k=3)
    acc = rows[("continue", "pcfg", "task C", "acc:last-first")]
    # last 3 (i = 5, 6, 7) minus first 3 (i = 0, 1, 2): 5 steps of 1 point
    assert acc.n == 3 and acc.mean == pytest.approx(5.0) and acc.matched
    assert acc.slope == pytest.approx(10.0)  # 1 point per 100 steps
    assert acc.verdict == REPRODUCED and acc.paper.startswith("+1.6 pts (task C")
    tr = rows[("continue", "pcfg", "- (pre-training loss)", "trace:last-first")]
    assert tr.mean == pytest.approx(-2.5) and tr.verdict == REPRODUCED
    assert rows[("continue", "pcfg", "- (pre-training loss)", "blocks:last-first")].extension


def test_a_phase_2_run_is_not_held_to_the_plateau_rule(tmp_path):
    """At a constant learning rate the gap of a phase-2 run wobbles (here by 0.03 between evaluations, above the
    plateau 0.01); it still counts, and its matched loss is the equivalence test of its first and last k."""
    _continue(tmp_path, wobble=0.03)
    a, rows = _rows(tmp_path, k=3)
    assert not [why for r, why in a.excluded if r.claim == "continue"]
    assert rows[("continue", "pcfg", "task C", "acc:last-first")].n == 3


def test_continue_needs_a_counted_readable_parent(tmp_path):
    parents = _continue(tmp_path, plateau_jump=0.05)  # the parents had not converged
    a, rows = _rows(tmp_path)
    assert rows[("continue", "pcfg", "task C", "acc:last-first")].n == 0
    assert all("parent does not count: not converged" in why for r, why in a.excluded if r.claim == "continue")
    for p in parents.values():
        (p / "results.json").unlink()
    a, _ = _rows(tmp_path)
    reasons = [why for r, why in a.excluded if r.claim == "continue"]
    assert len(reasons) == 3 and all("not readable" in why for why in reasons)


def test_hmm_task_is_named_by_its_position(tmp_path):
    sweep = tmp_path / "algorithm"
    for s in range(3):
        write_job(sweep, f"a{s}", "algorithm", s, {GAP: 0.01, acc_key("task_z"): 0.9 + 0.001 * s}, data=HMM)
        write_job(sweep, f"b{s}", "algorithm", s, {GAP: 0.0105, acc_key("task_z"): 0.8}, data=HMM, objective=ADV)
    a, rows = _rows(tmp_path)
    r = rows[("algorithm", "hmm", "z_10", "acc_adv:adamw-adversarial")]
    assert r.extension and r.verdict == "extension: " + REPRODUCED and math.isnan(r.p_holm)


def test_report_json_and_stability(tmp_path, lmlab):
    one, two = tmp_path / "one", tmp_path / "two"
    _algorithm(one, adv_gap_shift=0.001)
    _algorithm(two, adv_gap_shift=0.001, seeds=range(10, 14), task_b_gain=-0.05)  # task B flips
    (one / "reproduce.json").write_text(json.dumps({"profile": "cpu", "tolerance": 0.1, "margin": 0.02}))
    report = write_report(one, compare=two)
    data = json.loads((one / "report.json").read_text())
    fields = {"claim", "data", "task", "what", "n", "mean", "ci", "mde", "gap_diff", "gap_ci", "matched", "p",
              "p_holm", "verdict", "extension"}
    assert data["rows"] and all(fields <= set(r) for r in data["rows"])
    assert data["profile"] == "cpu" and data["margin"] == 0.02
    st = data["stability"]
    assert st["decided"] >= 2 and st["agree"] == st["decided"] - 1  # only task B's AdamW - adversarial flipped
    text = report.read_text()
    assert f"**{st['agree']} of {st['decided']} decided rows agree**" in text and "**unstable**" in text
    assert "Profile: **cpu**" in text and "The verdicts hold at a gap of" in text
    # the other rerun's report.json is read when present
    (two / "report.json").write_text(json.dumps({"rows": [{**r, "verdict": INCONCLUSIVE} for r in data["rows"]]}))
    entries, agree, decided = compare_rows(data["rows"], json.loads((two / "report.json").read_text())["rows"])
    assert agree == 0 and decided == sum(r["verdict"].endswith(("reproduced",)) for r in data["rows"])
    # the command line
    code, out = lmlab("report", str(one), "--compare", str(two))
    assert code == 0, out
    assert "decided rows agree" in out


def test_a_run_still_moving_does_not_count(tmp_path):
    sweep = tmp_path / "algorithm"
    for s in range(3):
        write_job(sweep, f"a{s}", "algorithm", s, {GAP: 0.02, acc_key("task_a"): 0.8},
                  history=[{"step": 100, GAP: 0.05 if s == 0 else 0.025}, {"step": 200, GAP: 0.02}])
        write_job(sweep, f"b{s}", "algorithm", s, {GAP: 0.02, acc_key("task_a"): 0.7}, objective=ADV)
    a, rows = _rows(tmp_path)  # plateau 0.01 by default
    assert [(r.seed, why) for r, why in a.excluded] == [
        (0, "not converged: gap changed by 0.03 between its last two evaluations (plateau 0.01)")]
    assert rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")].seeds == [1, 2]
    _, rows = _rows(tmp_path, plateau=0.05)
    assert rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")].seeds == [0, 1, 2]


def test_trace_precision_counts_every_evaluation_of_the_counted_runs(tmp_path):
    sweep = tmp_path / "algorithm"
    se_key = TRACE + "_se"
    # counted: final 5% and two evaluations along the way (2%, 8%); excluded (gap above tolerance): 50%
    write_job(sweep, "a", "algorithm", 0, {GAP: 0.02, TRACE: 10.0, se_key: 0.5},
              history=[{"step": 0, GAP: 0.02, TRACE: 10.0, se_key: 0.2}, {"step": 100, GAP: 0.02, TRACE: 10.0,
                                                                          se_key: 0.8}])
    write_job(sweep, "b", "algorithm", 1, {GAP: 0.5, TRACE: 10.0, se_key: 5.0})
    a = analyse(tmp_path, Settings(tolerance=0.1, margin=0.02))
    fisher = a.trace_precision()["Fisher Tr"]
    assert fisher["evaluations"] == 3 and fisher["max"] == pytest.approx(0.08)
    assert fisher["median"] == pytest.approx(0.05) and fisher["above_5pct"] == 1
    report = write_report(tmp_path, tolerance=0.1, margin=0.02).read_text()
    assert "Fisher Tr median 5.0%, max 8.0%, 1 of 3 above 5%" in report


def _declare(sweep: Path, study) -> None:
    """Record ``study`` in every job's .hydra/config.yaml, as `lmlab train` does for an experiment that names it."""
    for config in sweep.rglob(".hydra/config.yaml"):
        name = config.read_text().splitlines()[0]
        config.write_text(f"{name}\nstudy: {json.dumps(study)}\n")


def test_report_builds_the_study_the_runs_declare(tmp_path, lmlab):
    """`lmlab report <dir>` builds the study the recorded configs name (no name is matched: the experiment is
    renamed here), and refuses a target outside lmlab.studies, studies that disagree, and runs that declare none."""
    from lmlab import studies

    _algorithm(tmp_path, adv_gap_shift=0.001)
    for config in tmp_path.rglob(".hydra/config.yaml"):
        config.write_text("name: renamed/algorithm\n")  # not an experiment of conf/: the key alone names the study
    assert studies.declared(tmp_path) is None
    code, out = lmlab("report", str(tmp_path), "analysis=paper")
    assert code == 2 and "declare no study" in out and not (tmp_path / "report.md").exists()
    _declare(tmp_path, {"_target_": "lmlab.studies.same_loss.SameLoss", "tolerance": 0.1})
    assert studies.declared(tmp_path) == {"_target_": "lmlab.studies.same_loss.SameLoss", "tolerance": 0.1}
    code, out = lmlab("report", str(tmp_path))  # analysis=null: the runs declare a study
    assert code == 0, out
    assert "Tolerance on the gap to the optimum: **0.1 nats**" in (tmp_path / "report.md").read_text()
    code, out = lmlab("report", str(tmp_path), "tolerance=0.07")  # the user's setting goes to the study
    assert code == 0 and "**0.07 nats**" in (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").unlink()
    _declare(tmp_path, {"_target_": "os.system", "command": "touch owned"})
    code, out = lmlab("report", str(tmp_path), "analysis=paper")
    assert code == 2 and "not one of lmlab's studies" in out
    assert not (tmp_path / "report.md").exists() and not Path("owned").exists()
    first = sorted(tmp_path.rglob(".hydra/config.yaml"))[0]
    _declare(tmp_path, {"_target_": "lmlab.studies.same_loss.SameLoss"})
    first.write_text("name: renamed/algorithm\nstudy: null\n")
    code, out = lmlab("report", str(tmp_path), "analysis=paper")
    assert code == 2 and "declare different studies" in out and not (tmp_path / "report.md").exists()


def test_runs_recorded_before_the_study_key_read_their_experiments_config(tmp_path):
    """A config without ``study`` (recorded before experiments declared one) reads the key of lmlab's experiment
    config of the same name; a name outside conf/experiment/ declares nothing."""
    from lmlab import studies
    from lmlab.run_dir import CONF

    for claim in ("size", "algorithm", "continue"):
        want = OmegaConf.load(CONF / "experiment" / "same_loss" / f"{claim}.yaml").study
        assert studies._recorded_study({"name": f"same_loss/{claim}"}, tmp_path) == OmegaConf.to_container(want)
    assert studies._recorded_study({"name": "../train"}, tmp_path) is None
    assert studies._recorded_study({"name": "same_loss/nosuch"}, tmp_path) is None
    assert studies._recorded_study({"name": "same_loss/size", "study": None}, tmp_path) is None


def test_continue_matched_at_every_evaluation_after_the_burn_in(tmp_path):
    """A phase-2 gap that jumps by 0.05 after step 0 and then recovers is loss-confounded (its first and last k
    evaluations alone would look matched); the same jump inside the warmup (the burn-in) is not held against it."""
    def build(root: Path, warmup: float):
        for s in range(3):
            parent = write_job(root / "parents", f"p{s}", "size", s, {GAP: 0.02},
                               history=[{"step": 100, GAP: 0.02}, {"step": 200, GAP: 0.02}])
            hist = [{"step": 100 * i, GAP: 0.02 + (0.0 if i == 0 else 0.05 if i == 1 else 0.0001 * s),
                     acc_key("task_c"): 0.5 + 0.01 * i
                     + 0.001 * s, TRACE: 10.0 - 0.5 * i} for i in range(8)]
            write_job(root / "continue", f"c{s}", "continue", s, {GAP: hist[-1][GAP]}, history=hist, parent=parent,
                      schedule={**CONSTANT, "warmup": warmup}, max_steps=800)

    build(tmp_path / "jump", warmup=0.0)
    _, rows = _rows(tmp_path / "jump", k=3)
    acc = rows[("continue", "pcfg", "task C", "acc:last-first")]
    assert acc.n == 3 and not acc.matched and acc.verdict == CONFOUNDED
    assert acc.gap_diff == pytest.approx(0.05)  # the largest deviation from the parent's gap
    build(tmp_path / "warm", warmup=0.25)  # 200 warmup steps: the jump at step 100 is in the burn-in
    _, rows = _rows(tmp_path / "warm", k=3)
    acc = rows[("continue", "pcfg", "task C", "acc:last-first")]
    assert acc.matched and acc.gap_diff == pytest.approx(0.0002) and acc.verdict == REPRODUCED
    assert "burn-in (steps [200])" in acc.note


def _schedule(name: str, total: int = 1000, **kw):
    from lmlab.studies.same_loss.runs import read_schedule

    return read_schedule({"schedule": {"_target_": f"lmlab.schedule.{name}", "_partial_": True, **kw},
                          "max_steps": total})


def test_a_plateau_needs_a_learning_rate_of_at_least_a_tenth_of_its_peak():
    from lmlab import schedule as lr
    from lmlab.studies.same_loss.runs import LR_FLOOR, Schedule, plateau_exclusion

    s = Settings(plateau=0.01)
    flat = [{"step": 900, GAP: 0.02}, {"step": 1000, GAP: 0.02}]
    assert LR_FLOOR == 0.1
    assert plateau_exclusion(flat, s, _schedule("constant")) == ""
    # cosine to min_ratio x peak: the window [900, 1000) ends at min_ratio + a little; 0.1 is at the floor
    assert min(lr.cosine(t, 1000, 0.05, 0.1) for t in range(900, 1000)) >= 0.1
    assert plateau_exclusion(flat, s, _schedule("cosine", min_ratio=0.1)) == ""
    why = plateau_exclusion(flat, s, _schedule("cosine", min_ratio=0.099))
    assert why.startswith("not on a plateau: the learning rate fell to 9.9") and "below 10%" in why
    assert plateau_exclusion(flat, s, _schedule("cosine", min_ratio=0.01)).startswith("not on a plateau")
    assert plateau_exclusion(flat, s, _schedule("wsd", decay=0.05, min_ratio=0.1)) == ""  # decays to 10%
    assert plateau_exclusion(flat, s, _schedule("wsd", decay=0.2)).startswith("not on a plateau")
    assert plateau_exclusion(flat, s, None).startswith("no learning-rate schedule recorded")
    assert plateau_exclusion(flat[1:], s, None) == ""  # one evaluation: nothing to compare
    assert _schedule("constant", nosuch=1) is None and _schedule("os.system") is None
    # a constant rate below the peak after a decay (a step decay to 5%) is a plateau
    def step_decay(step, total):
        return 1.0 if step < total // 2 else 0.05
    assert plateau_exclusion(flat, s, Schedule(step_decay, 1000, {})) == ""
    assert plateau_exclusion([{"step": 400, GAP: 0.02}, {"step": 600, GAP: 0.02}], s,
                             Schedule(step_decay, 1000, {})).startswith("not on a plateau")  # mid-decay


def test_the_plateau_window_in_steps():
    from lmlab.studies.same_loss.runs import plateau_exclusion

    s = Settings(plateau=0.003, plateau_steps=1000)
    const = _schedule("constant", total=5000)
    hist = [{"step": 250 * i, GAP: 0.05} for i in range(12)]  # steps 0 .. 2750
    hist += [{"step": 3000, GAP: 0.023}, {"step": 3500, GAP: 0.021}, {"step": 4000, GAP: 0.02}]
    assert plateau_exclusion(hist, s, const) == ""  # 3000 .. 4000: moved by exactly 0.003
    hist[-3][GAP] = 0.0231
    assert plateau_exclusion(hist, s, const) == \
        "not converged: gap changed by 0.0031 over its last 1000 steps (plateau 0.003)"
    assert plateau_exclusion(hist[-2:], s, const) == \
        "not converged: its evaluations start at step 3500, not 1000 steps before its last (step 4000)"
    # the window starts at the last evaluation at or before step 3000 (here 2750, gap 0.05)
    del hist[-3]
    assert plateau_exclusion(hist, s, const).startswith("not converged: gap changed by 0.03 ")


def test_the_smallest_detectable_effect_of_a_claimed_row_is_at_holms_threshold(tmp_path):
    """m claimed rows with matched loss: each one's MDE is (t(1 - alpha / (2 m), n - 1) + t(0.8, n - 1)) sd /
    sqrt(n) (scipy); an extension's stays at alpha."""
    from scipy import stats as sps

    _algorithm(tmp_path, adv_gap_shift=0.001)
    a, rows = _rows(tmp_path)
    family = [r for r in a.rows if math.isfinite(r.p_holm)]
    m = len(family)
    assert m >= 3 and all(r.family == m for r in family)
    for r in family:
        want = (sps.t.ppf(1 - 0.05 / (2 * m), r.n - 1) + sps.t.ppf(0.8, r.n - 1)) * r.sd / math.sqrt(r.n)
        assert r.mde == pytest.approx(want, rel=1e-9)
    ext = rows[("algorithm", "pcfg", "- (pre-training loss)", "blocks_adv:adamw-adversarial")]
    assert ext.family == 0 and ext.mde == pytest.approx(
        (sps.t.ppf(0.975, ext.n - 1) + sps.t.ppf(0.8, ext.n - 1)) * ext.sd / math.sqrt(ext.n), rel=1e-9)


def test_a_trace_row_needs_both_arms_to_count_the_same_parameters(tmp_path):
    """eval=flatness records the counted parameters' names and shapes (``parameterisation_id``); a trace row
    whose arms differ there is n/a, outside the Holm family. Claim (b)'s primary trace is blocks-only."""
    import hashlib

    import torch

    from lmlab.evaluation.flatness import parameterisation_id

    params = {"blocks.0.w": torch.zeros(2, 3), "head.weight": torch.zeros(4)}
    want = float(int(hashlib.sha1(b"blocks.0.w:(2, 3);head.weight:(4,)").hexdigest()[:12], 16))
    assert parameterisation_id(params) == want == parameterisation_id(dict(reversed(params.items())))
    assert parameterisation_id({**params, "head.weight": torch.zeros(5)}) != want  # a shape differs
    assert parameterisation_id({"blocks.1.w": torch.zeros(2, 3), "head.weight": torch.zeros(4)}) != want

    _size(tmp_path, {64: [0, 1, 2], 128: [0, 1, 2]})
    _, rows = _rows(tmp_path)
    blocks = rows[("size", "pcfg", "- (pre-training loss)", "blocks:large-small")]
    trace = rows[("size", "pcfg", "- (pre-training loss)", "trace:large-small")]
    assert not blocks.extension and blocks.paper.startswith("-7.2") and trace.extension
    assert "not recorded for 3 of 3 pairs" in blocks.note
    for run in (tmp_path / "size").iterdir():  # record: the blocks agree, the all-parameter traces do not
        res = json.loads((run / "results.json").read_text())
        d = res["config"]["model"]["d_model"]
        res["metrics"].update({"flatness/blocks_params_id": 7.0, "flatness/params_id": float(d),
                               BLOCKS: 10.0 - d / 100 + 0.01 * res["config"]["seed"]})
        (run / "results.json").write_text(json.dumps(res))
    a, rows = _rows(tmp_path)
    blocks = rows[("size", "pcfg", "- (pre-training loss)", "blocks:large-small")]
    trace = rows[("size", "pcfg", "- (pre-training loss)", "trace:large-small")]
    assert blocks.verdict == REPRODUCED and "not recorded" not in blocks.note and math.isfinite(blocks.p_holm)
    assert trace.verdict == "extension: " + MISSING and "count different parameters" in trace.note
    assert math.isnan(trace.p_holm)


def test_an_adversary_that_costs_less_than_5_points_of_task_a_is_ineffective(tmp_path):
    """Claim (c): AdamW - adversarial is decided only where the adversary costs >= 5 points of task A at matched
    loss; otherwise its rows (task A, task B, the traces) say "adversary ineffective", outside the family."""
    from lmlab.studies.same_loss.statistics import INEFFECTIVE

    _algorithm(tmp_path / "weak", adv_gap_shift=0.001, acc_gain=0.045)  # costs ~4.5 points
    a, rows = _rows(tmp_path / "weak")
    adv = [r for r in a.rows if r.key.endswith(":adamw-adversarial")]
    assert len(adv) == 4 and {r.verdict for r in adv} == {INEFFECTIVE, "extension: " + INEFFECTIVE}
    assert all("adversary ineffective: it costs 4." in r.note and math.isnan(r.p_holm) for r in adv)
    assert rows[("algorithm", "pcfg", "task A", "acc_lookup:adamw-lookup")].verdict == CONFOUNDED  # untouched
    _algorithm(tmp_path / "strong", adv_gap_shift=0.001, acc_gain=0.055)  # ~5.5 points: decided
    _, rows = _rows(tmp_path / "strong")
    assert rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")].verdict == REPRODUCED
    _algorithm(tmp_path / "far", adv_gap_shift=0.05)  # 8 points, but not at matched loss
    _, rows = _rows(tmp_path / "far")
    r = rows[("algorithm", "pcfg", "task A", "acc_adv:adamw-adversarial")]
    assert r.verdict == CONFOUNDED and "(matched: no)" in r.note


def _render_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROOT = Path(__file__).resolve().parents[1]


def test_docs_results_equal_their_rendering_from_the_committed_reports():
    """Every paper-reproduction table of docs/results.md is rendered from a committed report.json (or says its
    rerun is pending): the file equals `python scripts/render_results.py`'s rendering of it."""
    render = _render_results()
    text = (ROOT / "docs" / "results.md").read_text()
    blocks = [m for m in (render.BEGIN.match(line) for line in text.split("\n")) if m]
    assert len(blocks) >= 2 and render.render(text) == text, "run `python scripts/render_results.py`"


def test_a_committed_report_renders_the_reports_own_verdict_table(tmp_path):
    """The rendering of a report.json holds the verdict table of the report.md written with it, line for line,
    and a hand edit inside a rendered block is undone."""
    render = _render_results()
    _algorithm(tmp_path / "run", adv_gap_shift=0.001)
    (tmp_path / "run" / "reproduce.json").write_text(json.dumps({"profile": "cpu", "tolerance": 0.1,
                                                                 "wall_s": 600.0}))
    md = write_report(tmp_path / "run").read_text().split("\n")
    table = md[md.index("## Verdicts") + 2:]
    table = table[:table.index("")]
    (tmp_path / "docs" / "r").mkdir(parents=True)
    (tmp_path / "docs" / "r" / "report.json").write_bytes((tmp_path / "run" / "report.json").read_bytes())
    doc = ("x\n<!-- rendered by scripts/render_results.py from docs/r/report.json: make it -->\n| hand | typed |\n"
           "<!-- end of rendered section -->\ny")
    out = render.render(doc, root=tmp_path).split("\n")
    assert out[0] == "x" and out[-1] == "y" and "| hand | typed |" not in out
    assert out[out.index(table[0]):out.index(table[0]) + len(table)] == table
    ceilings = md[md.index("## Task ceilings") + 4:]  # the report's own ceilings table, rendered below the verdicts
    ceilings = ceilings[:ceilings.index("")]
    assert len(ceilings) >= 3 and out[out.index(ceilings[0]):out.index(ceilings[0]) + len(ceilings)] == ceilings
    assert any(line.startswith("From `docs/r/report.json` (`make it`, 10 min of wall time): profile **cpu**")
               for line in out)
    # a rerun finished by a second invocation says that its wall time is that invocation's alone
    (tmp_path / "run" / "reproduce.json").write_text(json.dumps({"profile": "cpu", "tolerance": 0.1,
                                                                 "wall_s": 600.0, "resumed": True}))
    md = write_report(tmp_path / "run").read_text()
    assert "wall time 600 s in the invocation that finished the rerun (it resumed an earlier one" in md
    (tmp_path / "docs" / "r" / "report.json").write_bytes((tmp_path / "run" / "report.json").read_bytes())
    out = render.render(doc, root=tmp_path)
    assert ("(`make it`, 10 min of wall time in the invocation that finished the rerun (it resumed an earlier one, "
            "whose time is not counted)): profile **cpu**") in out


def test_task_ceilings_are_the_medians_of_the_finished_runs():
    """The report's task ceilings: per claim, data set and task, the median over the finished runs (an even count
    averages the middle two), None where no run measured it; a failed run is left out."""
    from lmlab.studies.same_loss.render import task_ceilings
    from lmlab.studies.same_loss.runs import Run

    def run(seed, status="done", **metrics):
        return Run(Path(f"/r/{seed}"), status, "size", "pcfg", seed, metrics=metrics)

    runs = [run(0, **{"probe/task_b/acc": 0.5, "probe/task_b/table_acc": 0.4}),
            run(1, **{"probe/task_b/acc": 0.7, "probe/task_b/table_acc": 0.4}),
            run(2, **{"probe/task_b/acc": 0.6, "probe/task_b/table_acc": 0.5}),
            run(3, **{"probe/task_b/acc": 0.9}),
            run(4, status="failed", **{"probe/task_b/acc": 0.0, "probe/task_b/table_acc": 0.0})]
    (row,) = task_ceilings(runs)
    assert (row["claim"], row["data"], row["task"], row["runs"]) == ("size", "pcfg", "task_b", 4)
    assert row["probe"] == pytest.approx((0.6 + 0.7) / 2)
    assert row["table"] == pytest.approx(0.4)
    assert row["lookup"] is None
