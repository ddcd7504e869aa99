"""The planted-structure pool: composition, origins, target-only evaluation splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.data.planted import DISTRACTOR, DUPLICATE, JUNK, TARGET, PlantedSource
from lmlab.errors import UserError

SMALL = dict(train_size=1000, validation_size=50, test_size=40, downstream_size=60, target_size=70)


@pytest.fixture(scope="module")
def planted():
    source = PlantedSource(**SMALL)
    return source, source.build()


def test_pool_composition_and_origins(planted):
    source, splits = planted
    pool = splits["train"]
    origin = np.asarray(pool["origin"])
    assert np.bincount(origin, minlength=4).tolist() == [250, 500, 100, 150]
    rows = [tuple(r) for r in pool["input_ids"]]
    assert all(r[0] == 1 and r[-1] == 2 for r in rows)  # [BOS] .. [EOS]
    assert max(max(r) for r in rows) < source.vocab_size
    # duplicates are exact copies of at most `duplicate_sources` other pool rows
    dups = {rows[i] for i in np.flatnonzero(origin == DUPLICATE)}
    others = {rows[i] for i in np.flatnonzero(origin != DUPLICATE)}
    assert dups <= others and len(dups) <= 20
    # target rows have a finite likelihood under the target grammar; junk repeats are degenerate
    target_rows = [list(rows[i]) for i in np.flatnonzero(origin == TARGET)[:50]]
    assert np.isfinite(source.sequence_nll(target_rows)).all()
    distractor_rows = [list(rows[i]) for i in np.flatnonzero(origin == DISTRACTOR)[:200]]
    assert np.isinf(source.sequence_nll(distractor_rows)).mean() > 0.5  # most are impossible under the target
    junk = [rows[i][1:-1] for i in np.flatnonzero(origin == JUNK)]
    assert sum(len(set(r)) == 1 for r in junk) > 20
    assert (np.asarray(pool["task_a"]) == -1).all()


def test_evaluation_splits_are_target_only_and_deterministic(planted):
    source, splits = planted
    for split in ("validation", "test", "downstream", "target"):
        assert "origin" not in splits[split].column_names
        nll = source.sequence_nll([list(r) for r in splits[split]["input_ids"]])
        assert np.isfinite(nll).all()
    assert (np.asarray(splits["downstream"]["task_a"]) >= 0).any()
    again = PlantedSource(**SMALL).build()
    assert again["train"]["input_ids"] == splits["train"]["input_ids"]
    assert again["validation"]["input_ids"] == splits["validation"]["input_ids"]
    # the target's evaluation splits are those of the plain PCFG source with the same grammar
    from lmlab.data.pcfg import PCFGSource

    plain = PCFGSource(grammar_seed=0, seed=0, train_size=0, validation_size=50, test_size=40,
                       downstream_size=60).build()
    assert plain["test"]["input_ids"] == splits["test"]["input_ids"]


def test_target_split_is_an_independent_target_sample(planted):
    """The selection's target set: ``target_size`` labelled target-grammar rows from their own random stream
    (not the validation rows), and resizing it leaves the other splits alone."""
    source, splits = planted
    target = [tuple(r) for r in splits["target"]["input_ids"]]
    assert len(target) == 70 and splits["target"].column_names == splits["validation"].column_names
    assert (np.asarray(splits["target"]["task_a"]) >= 0).any()
    validation = [tuple(r) for r in splits["validation"]["input_ids"]]
    assert target[: len(validation)] != validation
    assert len(set(target) - set(validation)) > 35  # an independent sample: short sentences may recur
    resized = PlantedSource(**{**SMALL, "target_size": 30}).build()
    assert len(resized["target"]) == 30
    for split in ("train", "validation", "test", "downstream"):
        assert resized[split]["input_ids"] == splits[split]["input_ids"]
    assert len(PlantedSource(**{**SMALL, "target_size": 0}).build()["target"]) == 0


@pytest.mark.parametrize("kwargs,expect", [
    (dict(target_share=0.8, junk_share=0.5), "exceed 1"),
    (dict(distractor_seeds=[0]), "grammar_seed"),
    (dict(target_share=1.5), "target_share"),
    (dict(target_size=-1), "target_size"),
])
def test_bad_input(kwargs, expect):
    with pytest.raises(UserError, match=expect):
        PlantedSource(**{**SMALL, **kwargs})
