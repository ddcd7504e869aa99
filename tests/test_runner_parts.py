"""Unit tests of the runner's own pieces: batch order, schedules, selection stage, atomic writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from lmlab import schedule
from lmlab.attention import CAUSAL
from lmlab.data.datamodule import StepBatches, collate
from lmlab.errors import UserError
from lmlab.io import _atomic, write_json
from lmlab.models.base import Backbone
from lmlab.selection.none import NoSelection
from lmlab.selection.random import RandomSelection


def test_step_batches_cover_each_epoch_and_resume_exactly():
    s = StepBatches(n_rows=10, batch_size=4, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(5)]  # 20 rows = two epochs
    assert [b[0] for b in first] == list(range(5))  # each item starts with its step
    rows = [i for b in first for i in b[1:]]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    resumed = iter(StepBatches(n_rows=10, batch_size=4, seed=3, start=3))
    assert next(resumed) == first[3] and next(resumed) == first[4]
    assert StepBatches(10, 4, seed=4).batch(0) != s.batch(0)


def test_step_batches_are_the_epoch_permutations_read_in_order_whatever_the_access_order():
    """Known answer: batch s holds rows s*B .. s*B+B-1 of perm(seed, 0) ++ perm(seed, 1) ++ ... (the cached
    permutations change nothing, also when steps are asked out of order or a batch spans two epochs)."""
    import numpy as np

    stream = np.concatenate([np.random.default_rng([3, e]).permutation(10) for e in range(12)])
    s = StepBatches(n_rows=10, batch_size=4, seed=3)
    for step in [0, 1, 2, 29, 3, 7, 2, 28, 0]:
        assert s.batch(step) == stream[4 * step : 4 * step + 4].tolist()


def test_step_batches_ranks_split_the_global_batch():
    single = StepBatches(n_rows=50, batch_size=8, seed=0)
    ranks = [StepBatches(n_rows=50, batch_size=4, seed=0, rank=r, world=2) for r in range(2)]
    for step in range(7):
        assert ranks[0].batch(step) + ranks[1].batch(step) == single.batch(step)


def test_collate_pads_and_stacks_labels():
    batch = collate([{"input_ids": [1, 5, 2], "task": 3}, {"input_ids": [1, 2], "task": -1}], seed=7)
    assert batch["input_ids"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["task"].tolist() == [3, -1] and batch["seed"] == 7


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_schedules_warm_up_linearly(name):
    fn = getattr(schedule, name)
    assert fn(0, 100, warmup=0.1) == pytest.approx(0.1)
    assert fn(9, 100, warmup=0.1) == pytest.approx(1.0)


def test_schedule_known_values():
    assert schedule.constant(50, 100) == 1.0
    assert schedule.cosine(10, 110, warmup=10 / 110, min_ratio=0.0) == pytest.approx(1.0)
    assert schedule.cosine(60, 110, warmup=10 / 110, min_ratio=0.0) == pytest.approx(0.5)
    assert schedule.cosine(110, 110, warmup=10 / 110, min_ratio=0.1) == pytest.approx(0.1)
    assert schedule.linear(60, 110, warmup=10 / 110) == pytest.approx(0.5)
    assert schedule.cosine(35, 110, warmup=10 / 110, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25)))


def test_random_selection_keeps_a_fraction_cached_with_scores(tmp_path):
    pool = Dataset.from_dict({"input_ids": [[1, i + 4, 2] for i in range(100)]})
    sel = RandomSelection(fraction=0.3, seed=1)
    out = sel.run(pool, None, tmp_path, "data-key").dataset
    assert len(out) == 30
    assert len({tuple(r) for r in out["input_ids"]}) == 30
    (cached,) = list((tmp_path / "selection").iterdir())
    scores = np.load(cached / "scores.npy")
    kept = sorted(np.argsort(-scores)[:30])
    assert out["input_ids"] == [pool[int(i)]["input_ids"] for i in kept]
    again = RandomSelection(fraction=0.3, seed=1).run(pool, None, tmp_path, "data-key").dataset
    assert again["input_ids"] == out["input_ids"]
    assert NoSelection().run(pool, None, tmp_path, "data-key").dataset is pool
    with pytest.raises(UserError, match="fraction"):
        RandomSelection(fraction=0.0)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})

    def crash_midway(tmp: str) -> None:
        Path(tmp).write_text('{"a": 2, "half-wri')
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic(path, crash_midway)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_backbone_refuses_an_attention_pattern_it_lacks():
    class CausalOnly(Backbone):
        supported_attention = (CAUSAL,)

    assert CausalOnly(10, 4, "causal").attention_kind == "causal"
    with pytest.raises(UserError, match="cannot attend 'bidirectional'.*choose another model or objective"):
        CausalOnly(10, 4, "bidirectional")


def test_eval_along_picks_the_named_evaluations_and_refuses_others():
    from omegaconf import OmegaConf

    from lmlab.errors import UserError
    from lmlab.pipeline import evaluations_along

    evaluators = {"perplexity": 1, "probe": 2, "flatness": 3}
    assert evaluations_along(OmegaConf.create({"eval_along": None}), evaluators) == evaluators
    assert evaluations_along(OmegaConf.create({"eval_along": ["flatness", "perplexity"]}), evaluators) == {
        "flatness": 3, "perplexity": 1}
    with pytest.raises(UserError, match="eval_along names probes, which is not among"):
        evaluations_along(OmegaConf.create({"eval_along": ["probes"]}), evaluators)
