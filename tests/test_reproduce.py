"""``make reproduce-paper`` and ``lmlab report``: the gpu profile composes (dry run), and the micro reproduction
end to end. The report's statistics on hand-made runs are tested in tests/test_paper_report.py and
tests/test_stats.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lmlab.studies.same_loss.statistics import (
    CONFOUNDED,
    INCONCLUSIVE,
    INEFFECTIVE,
    MISSING,
    NOT_REPRODUCED,
    REPRODUCED,
)
from tests.conftest import reproduce_driver

# ----- the profiles -----

def test_gpu_profile_composes(tmp_path, capsys):
    grammar = Path(os.environ.get("LMLAB_PAPER_GRAMMAR", "") or tmp_path / "rules.txt")  # the paper's, where named
    if not grammar.is_file():
        grammar = tmp_path / "rules.txt"
        grammar.write_text("S S1 1.0\nS1 A B 1.0\nA a 1.0\nB b 1.0\n")
    driver = reproduce_driver()
    assert driver.main(["--profile", "gpu", "--grammar", str(grammar), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 10 seeds: size 3 widths, the adversarial arm (AdamW is the size sweep's run), continue from the width-256 runs
    assert "dry run: 50 jobs in 3 sweeps compose" in out
    assert out.count("1,000,000 training sentences") == 3 and "equivalence margin ±0.01 nats" in out
    assert "d_model 128: 4 heads of 32, d_model 256: 8 heads of 32, d_model 512: 16 heads of 32" in out
    assert "meant to reach a gap of 0.02 nats" in out
    assert "init_from.run='" in out and "/parents/pcfg/seed_${seed}'" in out
    assert "trainer=gpu" in out and str(grammar.resolve()) in out
    assert driver.main(["--profile", "gpu", "--out", str(tmp_path), "--dry-run"]) == 2  # no grammar given


def test_micro_reproduction_writes_every_section(tmp_path, cache_dir, lmlab):
    out = tmp_path / "micro"
    assert reproduce_driver().main(["--micro", "--out", str(out)]) == 0
    report = out / "report.md"
    text = report.read_text()
    for section in ("## Verdicts", "## The rule", "## Claim (a)", "## Claim (b)", "## Claim (c)", "## Plots",
                    "Reproduced", "Not reproduced", "Inconclusive"):
        assert section in text, section
    verdict_lines = [line for line in text.split("## The rule")[0].splitlines() if line.startswith("| continue")
                     or line.startswith("| size") or line.startswith("| algorithm")]
    for data in ("hmm", "pcfg"):
        for claim, what in (("continue", "probe acc (last"), ("continue", "Fisher Tr(H) (last"),
                            ("size", "Fisher Tr(H) embedded"), ("algorithm", "AdamW - adversarial"),
                            ("algorithm", "AdamW - lookup table")):
            assert any(line.startswith(f"| {claim} | {data}") and what in line for line in verdict_lines), (data, what)
    # per data set: continue 3 rows, size 3 (+1 with the projection probe), algorithm 6 (PCFG, tasks A and B) or 4
    assert len(verdict_lines) == 22 + sum("random projection" in line for line in verdict_lines)
    names = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, CONFOUNDED, INEFFECTIVE, MISSING)
    assert all(any(f"**{v}**" in line or f"**extension: {v}**" in line for v in names) for line in verdict_lines)
    assert not any(line.startswith("| continue") and "Fisher Tr(H)" in line and f"**{MISSING}**" in line
                   for line in verdict_lines)  # traces were measured along training
    runs_read = re.search(r"Runs read: (\d+) under", text)
    assert runs_read and f"{runs_read.group(1)} done" in text
    # every micro run counts (tolerance, margin and plateau of 100 nats; a learning rate never below 10% of its
    # peak), so that every comparison above was computed rather than skipped
    assert f"{runs_read.group(1)} counted, 0 excluded" in text
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(rows) == len(verdict_lines)
    for png in ("flatness_vs_accuracy.png", "training_curves.png", "accuracy_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in text
    # `lmlab report <dir>` rewrites it from the runs alone
    report.unlink()
    code, output = lmlab("report", str(out / "runs" / "same_loss"), "--tolerance", "100")
    assert code == 0, output
    assert "## Claim (c)" in (out / "runs" / "same_loss" / "report.md").read_text()
    assert (out / "runs" / "same_loss" / "report.json").exists()
    code, output = lmlab("report", str(tmp_path / "nowhere"))
    assert code != 0 and "is not a directory" in output
