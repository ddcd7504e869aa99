"""Cooldown branches (``branch.run``, ``branch.step``): a run continued from a kept stable-phase checkpoint of a
longer parent with only the decay ends exactly where a run trained to the branch's length from the start ends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY

COMMON = [*TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]", "checkpoint_every=4",
          "val_every=4", "schedule=wsd", "schedule.warmup_steps=2", "schedule.decay_steps=4",
          "schedule.shape=linear"]


def _metrics(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["metrics"]


def _run(root: Path, name: str) -> Path:
    (run,) = {p.parent for p in (root / name).rglob("DONE")}
    return run


def test_a_cooldown_branch_matches_a_run_of_its_length(lmlab):
    # the parent: 16 steps, stable from step 2 to 12, step 8 kept; the branch decays over steps 8..12
    code, out = lmlab("train", *COMMON, "name=parent", "max_steps=16", "callbacks=trajectory",
                      "callbacks.trajectory.log=null", "callbacks.trajectory.steps=[8]")
    assert code == 0, out
    parent = _run(lmlab.runs, "parent")
    code, out = lmlab("train", *COMMON, "name=straight", "max_steps=12")
    assert code == 0, out
    code, out = lmlab("train", *COMMON, "name=branch", "max_steps=12", f"branch.run={parent}", "branch.step=8")
    assert code == 0, out
    assert "resuming from" in out
    straight, branch = _metrics(_run(lmlab.runs, "straight")), _metrics(_run(lmlab.runs, "branch"))
    assert branch["train/steps"] == straight["train/steps"] == 12
    for key in ("perplexity/loss", "val/loss", "train/loss"):
        assert math.isclose(branch[key], straight[key], rel_tol=0, abs_tol=1e-6), (key, branch[key], straight[key])
    assert not math.isclose(_metrics(parent)["perplexity/loss"], straight["perplexity/loss"], abs_tol=1e-6)


@pytest.mark.parametrize("override,message", [
    ("branch.step=3", "kept no checkpoint of step 3 (it kept [8])"),
    ("model.d_model=16", "the branch's model differs from its parent's"),
])
def test_a_branch_is_refused_at_a_step_not_kept_or_with_another_model(lmlab, override, message):
    code, out = lmlab("train", *COMMON, "name=parent", "max_steps=16", "callbacks=trajectory",
                      "callbacks.trajectory.log=null", "callbacks.trajectory.steps=[8]")
    assert code == 0, out
    parent = _run(lmlab.runs, "parent")
    code, out = lmlab("train", *COMMON, "name=branch", "max_steps=12", f"branch.run={parent}", "branch.step=8",
                      override)
    assert code == 2 and message in out, out
    assert not list((lmlab.runs / "branch").rglob("DONE"))
