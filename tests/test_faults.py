"""Faults injected from outside, and what lmlab does with them: a diverging run ends with status
``diverged`` (no DONE) and is not resumed into the same NaN; two processes on one job leave one trained job
and one clear refusal; SIGTERM saves a checkpoint and the rerun ends identical to an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.errors import UserError
from lmlab.run_dir import RunHeld, hold, is_held, status
from tests.conftest import TINY
from tests.signals import pause_at, wait_for_pause

LMLAB = str(Path(sys.executable).with_name("lmlab"))
SMALL = [*TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]"]


def _runs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("config_resolved.yaml")})


def test_divergence_is_a_status_not_a_success(lmlab):
    args = [*SMALL, "optim.lr=1e5", "max_steps=40", "checkpoint_every=5", "val_every=20"]
    code, out = lmlab("train", *args)
    assert code == 2
    assert "training diverged at step" in out and "optim.lr" in out
    (run,) = _runs(lmlab.runs)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "diverged" and 0 < results["step"] <= 40
    assert not (run / "DONE").exists() and status(run) == "diverged"
    last = run / "checkpoints" / "last.ckpt"
    if last.exists():  # the last checkpoint on disk holds finite weights only
        state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert state and torch.load(last, map_location="cpu", weights_only=False)["global_step"] < results["step"]
    # a rerun reports the stored status instead of resuming into the same NaN; retry=true trains again
    code, out = lmlab("train", *args)
    assert code == 2 and "retry=true" in out and "resuming" not in out
    code, out = lmlab("train", *args, "retry=true")
    assert code == 2 and "training diverged at step" in out and "resuming" not in out
    assert _runs(lmlab.runs) == [run]  # retry does not name a new run


def test_a_diverged_job_in_a_sweep_is_marked_and_the_others_finish(lmlab):
    code, out = lmlab("train", "-m", *SMALL, "max_steps=20", "checkpoint_every=10", "val_every=10",
                      "optim.lr=1e5,3e-3")
    assert code == 2 and "1 of 2 jobs did not finish" in out
    (summary,) = lmlab.runs.rglob("summary.csv")
    rows = summary.read_text().splitlines()
    assert any(",diverged," in r and "optim.lr=100000.0" in r for r in rows), rows
    assert any(",done," in r and "optim.lr=0.003" in r for r in rows), rows


def test_the_lock_refuses_a_second_holder_and_frees_itself(tmp_path):
    run = tmp_path / "job"
    with hold(run):
        assert is_held(run)
        with pytest.raises(RunHeld, match=f"pid {os.getpid()} on "):
            with hold(run):
                pass
    assert not is_held(run)
    with hold(run):  # free again
        pass
    assert issubclass(RunHeld, UserError)


def test_two_processes_on_one_job(tmp_path, cache_dir):
    ledger = tmp_path / "steps"
    args = [LMLAB, "train", f"out_dir={tmp_path / 'runs'}", *SMALL, "max_steps=20", "checkpoint_every=10",
            "val_every=10", pause_at(step=5, ledger=ledger)]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pause(ledger, first)  # the first holds the job, at step 5
    assert [is_held(r) for r in _runs(tmp_path / "runs")] == [True]
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    Path(f"{ledger}.go").touch()
    assert first.wait() == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2
    assert f"is being trained by pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    (run,) = _runs(tmp_path / "runs")
    assert status(run) == "done"
    assert json.loads((run / "results.json").read_text())["metrics"]["train/steps"] == 20


def test_sigterm_saves_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(tmp_path, cache_dir):
    common = [*SMALL, "max_steps=60", "checkpoint_every=50", "val_every=30", "objective=mlm"]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    straight = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'a'}", *common], env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ledger = tmp_path / "steps"
    interrupted = [LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common, "logger=csv", pause_at(25, ledger)]
    proc = subprocess.Popen(interrupted, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pause(ledger, proc)  # held after step 25: the signal arrives there, whatever the machine's speed
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 2, proc.stderr.read()[-2000:]
    (run,) = _runs(tmp_path / "b")
    assert not (run / "DONE").exists()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "interrupted" and status(run) == "interrupted"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert saved == results["step"] == 25  # saved at the signal, not a periodic one (50)
    resumed = subprocess.run(interrupted, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr + resumed.stdout  # the batches follow the step: nothing to warn
    a = json.loads((_runs(tmp_path / "a")[0] / "results.json").read_text())["metrics"]
    b = json.loads((run / "results.json").read_text())["metrics"]
    assert b["train/steps"] == a["train/steps"] == 60
    for key in ("perplexity/loss", "perplexity/gap", "val/loss"):
        assert math.isclose(b[key], a[key], rel_tol=0, abs_tol=1e-6), (key, a[key], b[key])


def test_a_truncated_last_checkpoint_resumes_from_the_previous_one(tmp_path, cache_dir):
    common = [*SMALL, "max_steps=30", "checkpoint_every=10", "val_every=30"]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    straight = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'a'}", *common], env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common], env=env, capture_output=True,
                           text=True)
    assert first.returncode == 0
    (run,) = _runs(tmp_path / "b")
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "previous-last.ckpt", weights_only=True)["global_step"] == 20  # the last two kept
    # pretend the run stopped after step 30's checkpoint was half-written: truncate it and remove the results
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    for name in ("DONE", "results.json", "model.pt"):
        (run / name).unlink()
    resumed = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "last.ckpt is damaged: resuming from the checkpoint before it, previous-last.ckpt" in resumed.stdout
    a = json.loads((_runs(tmp_path / "a")[0] / "results.json").read_text())["metrics"]
    b = json.loads((run / "results.json").read_text())["metrics"]
    assert b["train/steps"] == 30 and b["perplexity/loss"] == pytest.approx(a["perplexity/loss"], abs=1e-6)
    # every checkpoint damaged: one sentence
    for name in ("last.ckpt", "previous-last.ckpt"):
        (ckpts / name).write_bytes(b"not a checkpoint")
    (run / "DONE").unlink()
    broken = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common], env=env, capture_output=True,
                            text=True)
    assert broken.returncode == 2 and "every checkpoint in" in broken.stderr and "delete that folder" in broken.stderr


def test_a_damaged_cache_entry_is_rebuilt(lmlab, cache_dir):
    args = [*SMALL, "max_steps=2", "val_every=2", "checkpoint_every=2"]
    code, out = lmlab("train", *args)
    assert code == 0, out
    from lmlab.io import MANIFEST, intact

    entries = [p.parent for p in Path(cache_dir).glob(f"*/{MANIFEST}")]
    entry = next(e for e in entries if (e / "dataset_dict.json").exists() and "PCFG" in e.name)
    arrow = next(entry.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-16] + b"\0" * 16)  # same size, different bytes
    assert not intact(entry)
    code, out = lmlab("train", *args, "seed=1")
    assert code == 0, out
    assert "is damaged (a file is missing or changed): rebuilding it" in out and intact(entry)


def test_a_full_disk_leaves_no_done_and_says_what_failed(lmlab, monkeypatch):
    import errno

    import lmlab.pipeline as pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_results", full)
    code, out = lmlab("train", *SMALL, "max_steps=4", "val_every=2", "checkpoint_every=2")
    assert code == 2 and "No space left on device" in out and "free space" in out
    (run,) = _runs(lmlab.runs)
    assert not (run / "DONE").exists() and not (run / "results.json").exists()
    assert not [p for p in run.rglob(".*") if p.name not in (".lock", ".hydra") and ".hydra" not in p.parts]
