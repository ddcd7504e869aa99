"""Quiet runs and whole words: a CPU run prints no notice the user cannot act on, a single seed reports no
interval, and the result tables never break a word or a header."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
from rich.console import Console

from lmlab.evaluation.common import summarize
from lmlab.report.summary import NOT_DEFINED, header, metrics_table, rich_table
from lmlab.stats import t_interval
from tests.conftest import FAST


def test_one_seed_reports_no_interval_and_the_table_says_so():
    out = summarize("finetune", [0.75], np.array([0, 1, 1, 1]))
    assert out["finetune/acc"] == 0.75 and out["finetune/chance"] == 0.75
    assert math.isnan(out["finetune/acc_ci95"]) and math.isnan(out["finetune/acc_std"])
    two = summarize("finetune", [0.7, 0.8], np.array([0, 1]))
    assert two["finetune/acc_ci95"] == t_interval([0.7, 0.8]) > 0
    console = Console(width=100, record=True)
    console.print(metrics_table(out, title="results: runs/x"))
    text = console.export_text()
    assert f"finetune/acc_ci95 │ {NOT_DEFINED:>5}" in text and "nan" not in text
    assert "n/a: not defined (a spread or a 95% interval over a single seed)" in text


def test_tables_break_no_word():
    """A sweep's table at 80 columns: every header is whole or broken after a / or a . only, every value whole,
    the metrics that do not fit are counted; a long title is not broken at the table's width."""
    metrics = {"perplexity/loss": 2.0, "perplexity/loss_per_byte": 1.25, "perplexity/bpb": 1.8, "probe/acc": 0.77,
               "lm_eval/lmlab_tiny/acc_norm": 0.4, "finetune/acc": 0.5, "val/loss": 2.1, "train/loss": 2.2}
    rows = [{"job": f"j{i}", "overrides": "", "status": "done", "reason": "", "axes": ["model.d_model", "seed"],
             "model.d_model": str(32 * (i + 1)), "seed": str(i), **metrics} for i in range(3)]
    title = "sweep runs/default/sweep-model.d_model=32,64,96,seed=0,1,2"
    console = Console(width=80, record=True)
    console.print(rich_table(rows, title, width=80))
    lines = console.export_text().splitlines()
    assert lines[0] == title
    assert all(len(line) <= 80 for line in lines)
    heads = [line for line in lines if line.startswith("┃")]
    cells = [[c.strip() for c in line.strip("┃").split("┃")] for line in heads]
    shown = ["".join(col) for col in zip(*cells)]  # each column's header lines, joined
    assert shown[:3] == ["model.d_model", "seed", "status"]
    assert all(name in metrics for name in shown[3:]) and 0 < len(shown) - 3 < len(metrics)
    assert f"{len(metrics) - (len(shown) - 3)} more metric(s) in summary.md" in lines[-1]
    assert header("lm_eval/lmlab_tiny/acc_norm") == "lm_eval/\nlmlab_tiny/\nacc_norm"
    assert header("perplexity/loss_per_byte") == "perplexity/\nloss_per_byte"


def test_a_cpu_run_prints_no_notice_it_cannot_act_on(tmp_path):
    """``lmlab train`` on the CPU outside a git repository, with lm_eval and the wandb logger: no MFU warning,
    no ``fatal: not a git repository`` from lm-eval, no wandb notice of its ``anonymous`` setting."""
    env = {**os.environ, "WANDB_MODE": "offline", "LMLAB_CACHE": str(tmp_path / "cache"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    proc = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", f"out_dir={tmp_path / 'runs'}", "data=text",
                           "eval=[lm_eval]", "eval.lm_eval.limit=4", "logger=wandb", "model.d_model=16",
                           "model.n_layers=1", *FAST[:-1]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "lm_eval lmlab_tiny: acc" in out and "wandb" in out  # lm-eval and wandb did run
    for notice in ("MFU is not logged", "not a git repository", "anonymous setting"):
        assert notice not in out, notice
