"""The learning-rate schedule spans the steps the trainer runs, whichever key sets them (``max_steps`` or
``trainer.max_steps``), and the schedules themselves have known values."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab import schedule
from tests.conftest import FAST, TINY


def test_schedule_formulas():
    # warmup 0.1 of 20 steps = 2 steps: 1/2, 2/2, then the decay from the base rate
    assert [schedule.constant(s, 20, 0.1) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    assert schedule.cosine(0, 20, 0.1) == 0.5
    assert schedule.cosine(2, 20, 0.1, 0.1) == pytest.approx(1.0)
    assert schedule.cosine(11, 20, 0.1, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.cosine(20, 20, 0.1, 0.1) == pytest.approx(0.1)
    assert schedule.linear(11, 20, 0.1, 0.0) == pytest.approx(0.5)


def _last_lr(run) -> float:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return float(ckpt["lr_schedulers"][0]["_last_lr"][0])


@pytest.mark.parametrize("key", ["max_steps", "trainer.max_steps"])
def test_max_steps_sets_the_schedule_length_from_either_key(lmlab, key):
    steps = 6
    args = [a for a in FAST if not a.startswith(("max_steps=", "checkpoint_every="))]
    code, out = lmlab("train", *TINY, *args, f"{key}={steps}", f"checkpoint_every={steps}", "eval=[perplexity]",
                      "schedule=linear", "schedule.warmup=0.0", "schedule.min_ratio=0.0")
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    # linear decay to 0 over exactly `steps` steps: after the last step the rate is base * (1 - steps/steps) = 0;
    # a schedule over the 1000 steps of the default max_steps would still be at 3e-3 * (1 - 6/1000)
    assert _last_lr(run) == pytest.approx(0.0, abs=1e-12)
