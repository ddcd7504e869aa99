"""Kept checkpoints along a run (``callbacks=trajectory``): the planned steps, and exactly those steps on disk
after the run is killed and resumed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.errors import UserError
from lmlab.training.callbacks import KeepCheckpoints, kept_checkpoint, kept_steps, planned_steps
from tests.conftest import TINY
from tests.signals import pause_at, wait_for_pause

LMLAB = str(Path(sys.executable).with_name("lmlab"))


def test_planned_steps_log_spaced_listed_and_every():
    # 5 log-spaced steps of 12: 12^(i/4) = 1, 1.86, 3.46, 6.45, 12 -> 1, 2, 3, 6, 12
    assert [round(12 ** (i / 4), 2) for i in range(5)] == [1.0, 1.86, 3.46, 6.45, 12.0]
    assert planned_steps(12, log=5) == [1, 2, 3, 6, 12]
    assert planned_steps(1000, log=4) == [1, 10, 100, 1000]
    assert planned_steps(100, log=20) == sorted({round(100 ** (i / 19)) for i in range(20)})  # merged duplicates
    assert planned_steps(10, steps=[0, 5, 50]) == [0, 5]  # 50 lies beyond the run
    assert planned_steps(10, every=4) == [4, 8]
    assert planned_steps(12, steps=[0], log=5, every=5) == [0, 1, 2, 3, 5, 6, 10, 12]
    with pytest.raises(UserError, match="need a plan"):
        KeepCheckpoints()
    with pytest.raises(UserError, match="positive integer"):
        KeepCheckpoints(log=0)


def _files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if "step-" in p.name)


def test_log_spaced_checkpoints_are_exactly_the_planned_steps_after_a_kill_and_resume(tmp_path, cache_dir):
    ledger = tmp_path / "steps"
    args = [LMLAB, "train", f"out_dir={tmp_path / 'runs'}", *TINY, "batch_size=16", "model.d_model=32",
            "logger=none", "eval=[perplexity]", "max_steps=12", "checkpoint_every=4", "val_every=12",
            "callbacks=trajectory", "callbacks.trajectory.log=5", "callbacks.trajectory.steps=[0,5]",
            pause_at(7, ledger)]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pause(ledger, proc)  # held after step 7
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = {p.parent for p in (tmp_path / "runs").rglob("config_resolved.yaml")}
    assert kept_steps(run) == [0, 1, 2, 3, 5, 6]  # kept up to the kill; last.ckpt is at step 4
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    step_5 = kept_checkpoint(run, 5).stat().st_mtime_ns
    damaged = kept_checkpoint(run, 6)
    damaged.write_bytes(damaged.read_bytes()[:1000])  # step 6 is replayed after the resume: written again whole

    resumed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kept_steps(run) == [0, 1, 2, 3, 5, 6, 12] == planned_steps(12, steps=[0, 5], log=5)
    assert _files(run) == [f"step-{s}.ckpt" for s in (0, 1, 12, 2, 3, 5, 6)]  # nothing else (no previous-step-*)
    # step 5 is replayed after the resume from step 4: kept whole before the kill, it is not written again
    assert kept_checkpoint(run, 5).stat().st_mtime_ns == step_5
    for step in kept_steps(run):
        ckpt = torch.load(kept_checkpoint(run, step), map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == step
        assert all(math.isfinite(float(v.float().abs().sum())) for v in ckpt["state_dict"].values())
