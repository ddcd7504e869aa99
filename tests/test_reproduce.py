"""``make reproduce-paper`` and ``lmlab report``: the verdict rule on hand-made numbers, the claim tables on
hand-made runs, the gpu profile composes (dry run), and the micro reproduction end to end."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lmlab.report.paper import (
    ACC,
    GAP,
    INCONCLUSIVE,
    LOOKUP,
    NOT_REPRODUCED,
    REPRODUCED,
    TRACE,
    Run,
    claim_algorithm,
    claim_continue,
    claim_size,
    converged_step,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom


def _driver():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "scripts" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----- the verdict rule, on hand-made numbers -----

def test_verdict_known_interval():
    v = verdict([1.0, 2.0, 3.0], +1)  # mean 2, sd 1: h = t * 1 / sqrt(3) = 2.484 > 2
    assert v.n == 3 and v.mean == pytest.approx(2.0)
    assert v.ci == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-6)
    assert v.verdict == INCONCLUSIVE


@pytest.mark.parametrize("diffs,sign,expected", [
    ([3.0, 4.0, 5.0], +1, REPRODUCED),        # mean 4 > h 2.48, the paper's sign
    ([-3.0, -4.0, -5.0], +1, NOT_REPRODUCED),  # the opposite sign, interval excludes 0
    ([-3.0, -4.0, -5.0], -1, REPRODUCED),     # the paper reports a decrease (trace)
    ([3.0, 4.0, 5.0], -1, NOT_REPRODUCED),
    ([-1.0, 2.0, 0.5], +1, INCONCLUSIVE),     # the interval covers 0
    ([2.0, 2.0], +1, REPRODUCED),             # no spread: h = 0
    ([0.0, 0.0, 0.0], +1, INCONCLUSIVE),      # no effect at all
    ([5.0], +1, INCONCLUSIVE),                # one pair: no interval
    ([], +1, INCONCLUSIVE),
    ([float("nan"), float("nan")], +1, INCONCLUSIVE),  # a missing metric
])
def test_verdict_rule(diffs, sign, expected):
    assert verdict(diffs, sign).verdict == expected


# ----- the claims, on hand-made runs -----

def _run(claim, seed, gap, acc, trace, d_model=64, arm="adamw", history=(), lookup=0.5):
    metrics = {GAP: gap, ACC: acc, TRACE: trace, LOOKUP: lookup, "model/params": d_model * 100}
    return Run(Path(f"/x/{claim}/{seed}/{d_model}/{arm}"), "done", claim, "hmm", seed, d_model, d_model * 100, arm,
               metrics, list(history))


def test_size_compares_only_runs_within_tolerance():
    runs = []
    for seed in range(3):
        runs.append(_run("size", seed, gap=0.5, acc=0.9, trace=1.0, d_model=32))   # too far: excluded
        runs.append(_run("size", seed, gap=0.04, acc=0.60 + 0.01 * seed, trace=10.0, d_model=64))
        runs.append(_run("size", seed, gap=0.03, acc=0.70 + 0.01 * seed, trace=6.0, d_model=128))
    rows, lines = claim_size(runs, tolerance=0.05)
    acc_row, trace_row = rows
    assert "128 - 64" in acc_row.what  # d_model 32 is not within the tolerance
    assert acc_row.result.n == 3 and acc_row.result.mean == pytest.approx(10.0)
    assert acc_row.result.verdict == REPRODUCED
    assert trace_row.result.mean == pytest.approx(-4.0) and trace_row.result.verdict == REPRODUCED
    assert any("| 32 |" in line and "0 of 3" in line for line in lines)
    # with only one size within the tolerance, nothing is compared
    rows, _ = claim_size(runs, tolerance=0.035)
    assert all(r.result.verdict == INCONCLUSIVE and r.result.n == 0 for r in rows)


def test_continue_measures_from_the_first_converged_step():
    def history(accs, gaps, traces):
        return [{"step": 100 * (i + 1), ACC: a, GAP: g, TRACE: t}
                for i, (a, g, t) in enumerate(zip(accs, gaps, traces))]

    runs = [_run("continue", s, 0.02, 0.8, 5.0, history=history([0.5, 0.7, 0.72 + 0.01 * s, 0.80 + 0.01 * s],
                                                                 [0.3, 0.05, 0.04, 0.03], [9, 8, 7, 5]))
            for s in range(3)]
    runs.append(_run("continue", 3, 0.2, 0.8, 5.0, history=history([0.5, 0.6], [0.3, 0.2], [9, 8])))  # never converged
    assert converged_step(runs[0].history, 0.05)["step"] == 200
    rows, lines = claim_continue(runs, tolerance=0.05)
    acc_row, trace_row = rows
    assert acc_row.result.n == 3
    assert acc_row.result.mean == pytest.approx(100 * (0.81 - 0.70))  # last (0.80 + 0.01 s) - converged (0.70)
    assert acc_row.result.verdict == REPRODUCED and trace_row.result.verdict == REPRODUCED
    assert "3 of 4 seeds" in acc_row.note and any("seed 3: excluded" in line for line in lines)


def test_algorithm_pairs_seeds_and_uses_the_lookup_table():
    runs = []
    for seed in range(3):
        runs.append(_run("algorithm", seed, 0.04, 0.80 + 0.01 * seed, 5.0, arm="adamw", lookup=0.7))
        runs.append(_run("algorithm", seed, 0.045, 0.70, 9.0 + seed, arm="adversarial", lookup=0.7))
    rows, lines = claim_algorithm(runs, tolerance=0.05)
    by = {r.what: r.result for r in rows}
    assert by["probe acc, AdamW - adversarial"].mean == pytest.approx(11.0)
    assert by["probe acc, AdamW - adversarial"].verdict == REPRODUCED
    assert by["Tr(H), AdamW - adversarial"].mean == pytest.approx(-5.0)
    assert by["probe acc, AdamW - lookup table"].mean == pytest.approx(11.0)
    assert any("lookup table" in line and "70" in line for line in lines)


# ----- the profiles -----

def test_gpu_profile_composes(tmp_path, capsys):
    grammar = ROOT.parent / "shared" / "data" / "paper_pcfg" / "rule_deep_mlm.txt"
    if not grammar.exists():
        grammar = tmp_path / "rules.txt"
        grammar.write_text("S S1 1.0\nS1 A B 1.0\nA a 1.0\nB b 1.0\n")
    driver = _driver()
    assert driver.main(["--profile", "gpu", "--grammar", str(grammar), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 18 jobs in 3 sweeps compose" in out
    assert "trainer=gpu" in out and str(grammar.resolve()) in out
    assert driver.main(["--profile", "gpu", "--out", str(tmp_path), "--dry-run"]) == 2  # no grammar given


def test_micro_reproduction_writes_every_section(tmp_path, cache_dir, lmlab):
    out = tmp_path / "micro"
    assert _driver().main(["--micro", "--out", str(out)]) == 0
    report = out / "report.md"
    text = report.read_text()
    for section in ("## Verdicts", "## The rule", "## Claim (a)", "## Claim (b)", "## Claim (c)", "## Plots",
                    "Reproduced", "Not reproduced", "Inconclusive"):
        assert section in text, section
    for data in ("hmm", "pcfg"):
        for what in ("probe acc (last - converged)", "Tr(H) embedded", "AdamW - adversarial", "AdamW - lookup table"):
            assert any(line.startswith(f"| {data} |") and what in line for line in text.splitlines()), (data, what)
    verdict_lines = [line for line in text.split("## The rule")[0].splitlines() if line.startswith("| continue")
                     or line.startswith("| size") or line.startswith("| algorithm")]
    assert len(verdict_lines) == 14
    assert all(any(f"**{v}**" in line for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)) for line in verdict_lines)
    assert "Runs read: 20" in text and "20 done" in text
    assert "n/a | n/a | 0 |" not in text.split("## Claim (a)")[1].split("## Claim (b)")[0]  # traces were measured
    for png in ("flatness_vs_accuracy.png", "training_curves.png", "accuracy_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in text
    # `lmlab report <dir>` rewrites it from the runs alone
    report.unlink()
    code, output = lmlab("report", str(out / "runs" / "same_loss"), "--tolerance", "100")
    assert code == 0, output
    assert "## Claim (c)" in (out / "runs" / "same_loss" / "report.md").read_text()
    code, output = lmlab("report", str(tmp_path / "nowhere"))
    assert code != 0 and "is not a directory" in output
