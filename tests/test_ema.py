"""``callbacks=ema``: an exponential moving average of the weights, checked against the average computed here
from the weights recorded after every step; its state in every checkpoint (a kept one included), so a run killed
and resumed ends with the average of an uninterrupted one; its evaluation under ``ema/``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lmlab.training.callbacks import kept_checkpoint
from tests.conftest import TINY, train_run
from tests.signals import pause_at, wait_for_pause
from tests.test_trajectory_eval import hand_loss

LMLAB = str(Path(sys.executable).with_name("lmlab"))
DECAY = 0.8
COMMON = [*TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]", "checkpoint_every=4",
          "val_every=8", f"callbacks.ema.decay={DECAY}"]

RECORDED: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, model weights) seen by Record


class Record(L.Callback):
    """Records the model's weights when training starts and after every step (in this process)."""

    def _record(self, trainer, pl_module) -> None:
        RECORDED.append((trainer.global_step, {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}))

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)


def test_the_ema_is_the_average_of_the_weights_after_each_step(tmp_path, cache_dir):
    RECORDED.clear()
    run = train_run(tmp_path, *COMMON, "max_steps=6", "callbacks=[trajectory,ema]", "callbacks.trajectory.log=null",
                    "callbacks.trajectory.steps=[3]", "+callbacks.record={_target_:tests.test_ema.Record}")
    assert [s for s, _ in RECORDED] == list(range(7))  # the weights at step 0 (the start) and after steps 1 .. 6
    ema, by_step = {}, {}
    for step, weights in RECORDED:  # ema_0 = w_0; ema_t = d ema_(t-1) + (1 - d) w_t, in float64
        ema = {k: w.double() if not ema else DECAY * ema[k] + (1 - DECAY) * w.double() for k, w in weights.items()}
        by_step[step] = ema
    trained = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    averaged = torch.load(run / "model_ema.pt", map_location="cpu", weights_only=True)
    assert averaged.keys() == trained.keys() == by_step[6].keys()
    for key, value in averaged.items():
        assert torch.allclose(value.double(), by_step[6][key], atol=1e-6), key
    assert any(not torch.allclose(averaged[k], trained[k], atol=1e-3) for k in trained)  # not the trained weights
    # the checkpoint kept at step 3 (written by a callback that runs before the EMA's) holds the average of step 3
    state = torch.load(kept_checkpoint(run, 3), map_location="cpu", weights_only=True)["callbacks"]["EMA"]
    assert state["step"] == 3
    for key, value in state["weights"].items():
        assert torch.allclose(value.double(), by_step[3][key], atol=1e-6), key
    # the run's results: the evaluation of the averaged weights under ema/, as computed here by hand
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics["ema/perplexity/loss"] == pytest.approx(hand_loss(run, averaged), abs=1e-6)
    assert metrics["ema/perplexity/loss"] != pytest.approx(metrics["perplexity/loss"], abs=1e-3)


def test_the_ema_survives_a_kill_and_resume(lmlab, tmp_path, cache_dir):
    args = [*COMMON, "max_steps=8", "callbacks=ema"]
    reference = train_run(tmp_path / "whole", *args)
    code, out = lmlab("eval", f"run={reference}", "eval=perplexity", "checkpoints=all")  # it kept no checkpoints
    assert code == 2 and out.strip().splitlines()[-1] == (
        f"lmlab: error: the run {reference} kept no checkpoints along its training, only its final model (step 8): "
        "train it with callbacks=trajectory, or leave out checkpoints=."), out
    ledger = tmp_path / "steps"
    command = [LMLAB, "train", f"out_dir={tmp_path / 'killed'}", *args, pause_at(6, ledger)]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pause(ledger, proc)  # held after step 6; the last checkpoint is that of step 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = {p.parent for p in (tmp_path / "killed").rglob("config_resolved.yaml")}
    assert not (run / "model_ema.pt").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = torch.load(reference / "model_ema.pt", map_location="cpu", weights_only=True)
    again = torch.load(run / "model_ema.pt", map_location="cpu", weights_only=True)
    assert torch.allclose(torch.load(reference / "model.pt", weights_only=True)["embed.weight"],
                          torch.load(run / "model.pt", weights_only=True)["embed.weight"], atol=1e-6)
    for key, value in whole.items():
        assert torch.allclose(again[key], value, atol=1e-6), key


def test_the_ema_refuses_a_sparse_run(lmlab):
    code, out = lmlab("train", *COMMON, "max_steps=2", "callbacks=ema", "sparsity=0.5")
    assert code == 2, out
    assert out.strip().splitlines()[-1] == ("lmlab: error: callbacks.ema averages dense weights and this run trains "
                                            "with sparsity=0.5: drop callbacks.ema or set sparsity=0.")
