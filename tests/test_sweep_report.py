"""``lmlab report <sweep dir>``: the mean with its t-interval and the paired difference against scipy on fixed
numbers, and the report of a real tiny sweep with a diverging arm, an unfinished job and a job not started."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats as sps

from lmlab.errors import UserError
from lmlab.report.sweep import lower_is_better, parse_baseline, same_value
from lmlab.stats import mean_interval, paired_difference, t_interval
from tests.conftest import FAST, TINY

X = [3.21, 3.05, 3.40, 2.98, 3.17]
A = [0.712, 0.694, 0.731, 0.705, 0.688, 0.720]
B = [0.701, 0.690, 0.709, 0.711, 0.671, 0.702]


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_interval_matches_scipy(confidence):
    m = mean_interval(X, confidence)
    low, high = sps.t.interval(confidence, len(X) - 1, loc=np.mean(X), scale=sps.sem(X))
    assert m.n == 5 and m.mean == pytest.approx(np.mean(X), abs=1e-12)
    assert m.sd == pytest.approx(np.std(X, ddof=1), rel=1e-12)
    assert m.low == pytest.approx(low, rel=1e-9) and m.high == pytest.approx(high, rel=1e-9)
    assert m.half == pytest.approx(t_interval(X, confidence), rel=1e-12)  # the existing half-width, unchanged


def test_mean_interval_of_one_and_none():
    one = mean_interval([2.5])
    assert one.n == 1 and one.mean == 2.5 and math.isnan(one.sd) and math.isnan(one.low)
    none = mean_interval([])
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_difference_matches_ttest_rel():
    p = paired_difference(A, B)
    ref = sps.ttest_rel(A, B)
    ci = ref.confidence_interval(0.95)
    assert p.diff.n == 6 and p.diff.mean == pytest.approx(np.mean(np.subtract(A, B)), abs=1e-12)
    assert p.t == pytest.approx(ref.statistic, rel=1e-9)
    assert p.p == pytest.approx(ref.pvalue, rel=1e-6)
    assert p.diff.low == pytest.approx(ci.low, rel=1e-9) and p.diff.high == pytest.approx(ci.high, rel=1e-9)
    assert (p.above, p.below) == (5, 1)  # differences .011 .004 .022 -.006 .017 .018
    flipped = paired_difference(B, A)
    assert flipped.t == pytest.approx(-ref.statistic, rel=1e-9) and flipped.p == pytest.approx(p.p)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_helpers():
    assert same_value("1e-3", "0.001") and not same_value("random", "0.001") and same_value("random", "random")
    assert lower_is_better("val/loss") and lower_is_better("perplexity/gap") and not lower_is_better("probe/acc")
    assert parse_baseline("selection=random") == {"selection": "random"}
    with pytest.raises(UserError):
        parse_baseline("random")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_of_a_tiny_sweep(lmlab):
    code, output = lmlab("train", "-m", "seed=0,1", "optim.lr=1e-3,3e-3,1e5", *TINY, *FAST)
    assert code != 0 and "2 of 6 jobs did not finish" in output  # the lr=1e5 arm diverges
    (sweep,) = (lmlab.runs / "default").glob("sweep-*")
    jobs = {}
    for job in sweep.glob("*/results.json"):
        results = json.loads(job.read_text())
        cfg = results.get("config", {})
        jobs[(float(cfg["optim"]["lr"]), int(cfg["seed"]))] = job.parent
    val = {k: json.loads((d / "results.json").read_text()).get("metrics", {}).get("val/loss") for k, d in jobs.items()}

    code, output = lmlab("report", str(sweep), "--baseline", "optim.lr=0.001", "--metric", "val/loss",
                         "--x", "optim.lr")
    assert code == 0, output
    text = (sweep / "report.md").read_text()
    diverged = [line for line in text.splitlines() if "| diverged |" in line]
    assert len(diverged) == 2 and all("optim.lr=100000.0" in line and "training diverged" in line for line in diverged)
    rows = {r["arm"]: r for r in _rows(sweep / "report.csv")}
    base, arm = [val[(1e-3, s)] for s in (0, 1)], [val[(3e-3, s)] for s in (0, 1)]
    ref = sps.ttest_rel(arm, base)
    row = rows["optim.lr=0.003"]
    assert row["baseline"] == "optim.lr=0.001" and int(row["pairs"]) == 2
    assert float(row["diff_mean"]) == pytest.approx(np.mean(np.subtract(arm, base)), rel=1e-9)
    assert float(row["diff_ci95_low"]) == pytest.approx(ref.confidence_interval().low, rel=1e-9)
    assert float(row["diff_ci95_high"]) == pytest.approx(ref.confidence_interval().high, rel=1e-9)
    assert float(row["p_value"]) == pytest.approx(ref.pvalue, rel=1e-6)
    assert int(row["seeds_won"]) == sum(a < b for a, b in zip(arm, base)) and row["better"] == "lower"
    low, high = sps.t.interval(0.95, 1, loc=np.mean(base), scale=sps.sem(base))
    assert float(rows["optim.lr=0.001"]["ci95_low"]) == pytest.approx(low, rel=1e-9)
    assert float(rows["optim.lr=0.001"]["ci95_high"]) == pytest.approx(high, rel=1e-9)
    assert int(rows["optim.lr=100000.0"]["n"]) == 0  # diverged jobs are listed, not averaged
    png = sweep / "report_val_loss_vs_optim.lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in text

    # a sweep still running: one job unfinished, one not started yet (its directory absent)
    unfinished = jobs[(3e-3, 1)]
    (unfinished / "DONE").unlink()
    (unfinished / "results.json").unlink()
    shutil.rmtree(jobs[(1e-3, 1)])
    code, output = lmlab("report", str(sweep), "--baseline", "optim.lr=1e-3", "--metric", "val/loss")
    assert code == 0, output
    text = (sweep / "report.md").read_text()
    assert any("| incomplete |" in line and "optim.lr=0.003 | 1 |" in line for line in text.splitlines()), text
    assert any("| not started |" in line and "optim.lr=0.001 | 1 |" in line for line in text.splitlines()), text
    assert "Jobs: 6 (2 diverged, 2 done, 1 incomplete, 1 not started)" in text
    rows = {r["arm"]: r for r in _rows(sweep / "report.csv")}
    assert int(rows["optim.lr=0.003"]["pairs"]) == 1 and int(rows["optim.lr=0.001"]["n"]) == 1
    assert float(rows["optim.lr=0.003"]["diff_mean"]) == pytest.approx(arm[0] - base[0], rel=1e-9)

    # mistakes name their fix
    code, output = lmlab("report", str(sweep), "--baseline", "optim.lr=0.5")
    assert code == 2 and "no arm of the sweep has optim.lr=0.5" in output
    code, output = lmlab("report", str(sweep), "--x", "seed")
    assert code == 2 and "is not a swept setting" in output
    code, output = lmlab("report", str(sweep), "--paper", "--baseline", "optim.lr=0.001")
    assert code == 2 and "paper report" in output
    code, output = lmlab("report", str(lmlab.runs))
    assert code == 2 and "is not a sweep directory" in output
    # one run's directory: its chain of init_from parents, as before
    code, output = lmlab("report", str(jobs[(3e-3, 0)]))
    assert code == 0 and "[done]" in output


def test_planned_jobs_include_the_sweep_an_experiment_declares(tmp_path):
    from omegaconf import OmegaConf

    from lmlab.report.sweep import _planned

    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": {"selection": "none,random", "seed": "7"}},
                                               "overrides": {"task": ["experiment=selection", "seed=0,1"]}}}),
                   tmp_path / "multirun.yaml")
    planned = _planned(tmp_path)
    assert len(planned) == 4  # 2 selections x 2 seeds; the command's seed=0,1 replaces the declared seed=7
    assert {(p["selection"], p["seed"]) for p in planned} == {(s, k) for s in ("none", "random") for k in ("0", "1")}
