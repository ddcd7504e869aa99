"""Selection methods: known-answer tests of each formula, precision on planted structure, the curriculum's
stage release and its resume determinism, and the `lmlab select` command (outputs and bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.data.datamodule import Stages, StepBatches
from lmlab.data.planted import PlantedSource
from lmlab.errors import UserError
from lmlab.selection.base import selection_stats, top_fraction
from lmlab.selection.color_filter import ColorFilter, color_scores
from lmlab.selection.curriculum import Curriculum, Plateau, served_precision, stage_rows
from lmlab.selection.miniplm import MiniPLM, difference_scores
from lmlab.selection.preselect import PreSelect, predictive_strength, token_budget_keep
from lmlab.selection.random import RandomSelection
from lmlab.selection.reference import AuxLM, row_nll

# ----- known answers -----


def test_color_filter_known_answer():
    scores = color_scores([3, 2, 4, 2.5], [2, 1.9, 3.9, 1])
    assert top_fraction(scores, 1 / 2).tolist() == [0, 3]  # tau = 2
    assert np.allclose(color_scores([1.0, 2.0], [1.0, 2.0]), 0)  # conditional = prior: all zero
    s = np.random.default_rng(0).normal(size=640)  # nested: tau = 64 keeps a subset of tau = 32
    assert set(top_fraction(s, 1 / 64)) <= set(top_fraction(s, 1 / 32))


def test_miniplm_known_answer():
    scores = difference_scores([2, 3, 1, 4], [3, 3.1, 1, 6])
    assert top_fraction(scores, 0.5).tolist() == [0, 3]
    teacher, ref = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.5, 2.0])
    assert np.allclose(difference_scores(teacher + 0.7, ref + 0.7), difference_scores(teacher, ref))


def test_preselect_known_answers():
    bench = [1, 2, 3]
    losses = np.array([[3, 1, 2], [2, 2, 1], [1, 3, 3]], dtype=float)  # docs as columns
    assert np.allclose(predictive_strength(losses, bench), [1, 0, 1 / 3])
    # the threshold is the score of the row at which the cumulative length first reaches the target
    assert token_budget_keep(np.array([0.9, 0.8, 0.1]), np.array([10, 10, 80]), 0.1).tolist() == [0]
    assert token_budget_keep(np.array([0.9, 0.8, 0.1]), np.array([10, 10, 80]), 0.11).tolist() == [0, 1]
    with pytest.raises(UserError):
        predictive_strength(np.ones((1, 3)), [1])


def test_curriculum_plateau_trace():
    """TinyHelen's iterative schedule on a scripted validation trace: 5% -> 5% -> 10% -> 10% -> 15%."""
    plateau, share, shares = Plateau(patience=1, threshold=0.0), 0.05, []
    for loss in [3, 2.9, 2.95, 2.8, 2.85]:
        if plateau.update(loss):
            share += 0.05
        shares.append(round(share, 2))
    assert shares == [0.05, 0.05, 0.1, 0.1, 0.15]
    assert stage_rows(1000, 0.05) == 50 and stage_rows(10, 0.05) == 1


def test_served_precision_known_answer():
    """Steps 0-3 draw from the first 2 rows (1 target of 2), steps 4-9 from the first 4 (3 of 4)."""
    is_target = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    assert served_precision([(0, 2), (4, 4)], is_target, 10) == pytest.approx((4 * 0.5 + 6 * 0.75) / 10)
    assert served_precision([(0, 2), (4, 4), (12, 6)], is_target, 10) == pytest.approx(0.65)  # not reached
    assert served_precision([(0, 6)], is_target, 5) == pytest.approx(0.5)


def test_row_nll_matches_the_objective_loss():
    from lmlab.objectives.clm import CLM

    rows = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 2]]
    model = AuxLM(d_model=16, n_layers=1, n_heads=2).build(12, seed=0).eval()
    total = row_nll(model, rows, reduce="sum")
    mean = row_nll(model, rows)
    assert np.allclose(total / np.array([4, 2, 6]), mean)
    assert total.sum() / 12 == pytest.approx(CLM().evaluate(model, rows, None)["loss"], rel=1e-5)


def test_stage_batches_are_a_function_of_seed_step_and_record():
    """A sampler rebuilt from a saved stage record draws exactly the batches of the uninterrupted one."""
    stages = Stages(10, lag=2)
    live = StepBatches(100, 8, seed=3, stages=stages)
    drawn = {}
    for step in range(30):
        drawn[step] = live.batch(step)
        if step in (5, 12):  # a release decided after step `step`, effective `lag` steps later
            stages.release(step, stages.rows + 20)
    assert stages.history == [(0, 10), (7, 30), (14, 50)]
    assert all(max(drawn[s]) < 10 for s in range(7)) and all(max(drawn[s]) < 30 for s in range(7, 14))
    restored = Stages(10, lag=2)
    restored.load_state_dict(json.loads(json.dumps(stages.state_dict())))
    resumed = StepBatches(100, 8, seed=3, start=9, stages=restored)
    assert all(resumed.batch(s) == drawn[s] for s in range(9, 30))
    with pytest.raises(RuntimeError):  # a release that would change an already-drawn batch
        stages.release(25, 60)
    # without stages the order is the original one
    assert StepBatches(100, 8, seed=3).batch(4) == StepBatches(100, 8, seed=3, start=2).batch(4)


# ----- planted structure: each method lifts the target share well above random -----

FAST = {
    "color_filter": lambda: ColorFilter(tau=4, prior_rows=1000, prior_steps=60, finetune_steps=30, d_model=32),
    "miniplm": lambda: MiniPLM(fraction=0.25, teacher_d_model=48, teacher_layers=2, teacher_steps=60,
                               ref_rows=1000, ref_steps=60),
    "preselect": lambda: PreSelect(fraction=0.25, score_rows=800, min_positives=100, prior_rows=1000,
                                   prior_steps=60, family_steps=[0, 5, 10, 20, 40], d_model=32, epoch=10),
}


@pytest.fixture(scope="module")
def planted():
    source = PlantedSource(train_size=2000, validation_size=10, test_size=10, downstream_size=10, target_size=200)
    return source, source.build()


@pytest.mark.parametrize("method", list(FAST))
def test_method_raises_target_precision(planted, method, tmp_path):
    """Every filtering method keeps about a quarter of the pool, of which well over half is target grammar
    (the pool holds 25%; random selection keeps that share); the target set is the data's ``target`` split."""
    source, splits = planted
    selector = FAST[method]()
    selector.source = source
    selection = selector.select(splits["train"], splits["target"], tmp_path)
    selected, scores = selection.dataset, selection.scores
    stats = selection_stats(splits["train"], selected)
    assert len(scores) == len(splits["train"])
    assert stats["pool_precision"] == pytest.approx(0.25)
    assert 0.2 < stats["rows"] / stats["pool_rows"] < 0.3
    assert stats["precision"] > 0.6, stats  # random selection: 0.25
    if method == "preselect":  # the family is cut at its best held-out member (early stopping)
        report = selection.report
        assert report["family_members"] >= 2
        assert len(report["family_scores"]) == report["family_members"]
        assert np.argmax(report["family_scores"]) == report["family_members"] - 1


def test_random_selection_keeps_the_pool_share(planted):
    source, splits = planted
    selected = RandomSelection(fraction=0.25, seed=0).select(splits["train"], splits["target"], None).dataset
    assert abs(selection_stats(splits["train"], selected)["precision"] - 0.25) < 0.06


def test_selection_target_is_the_target_split_else_validation(planted, capsys):
    from lmlab.pipeline import selection_target
    from lmlab.selection.none import NoSelection

    _, splits = planted
    assert selection_target(splits, RandomSelection()) is splits["target"]
    assert "no target split" not in capsys.readouterr().out
    plain = {k: v for k, v in splits.items() if k != "target"}  # data=pcfg, text, ...: no target split
    assert selection_target(plain, RandomSelection()) is plain["validation"]
    assert "no target split" in capsys.readouterr().out
    selection_target(plain, NoSelection())  # a selection that keeps the pool needs no notice
    assert "no target split" not in capsys.readouterr().out


def test_curriculum_orders_target_first(planted, tmp_path):
    source, splits = planted
    selector = Curriculum(key="reference_loss", reference_steps=60, d_model=32)
    selector.source = source
    selection = selector.select(splits["train"], splits["target"], tmp_path)
    assert len(selection.dataset) == len(splits["train"])
    assert selection.report["first_stage_precision"] > 0.6
    length = Curriculum(key="length")
    ordered = length.select(splits["train"], None, tmp_path).dataset
    lengths = [len(r) for r in ordered["input_ids"]]
    assert lengths == sorted(lengths)
    # with fraction < 1 it is also a filter: the easiest quarter is mostly target grammar
    kept = Curriculum(key="reference_loss", reference_steps=60, d_model=32, fraction=0.25).select(
        splits["train"], splits["target"], tmp_path).dataset
    assert len(kept) == 500 and selection_stats(splits["train"], kept)["precision"] > 0.6


def test_methods_that_need_a_target_say_so(planted, tmp_path):
    source, splits = planted
    for selector in (FAST["color_filter"](), FAST["miniplm"](), FAST["preselect"]()):
        with pytest.raises(UserError, match="needs a target"):
            selector.select(splits["train"], None, tmp_path)


# ----- through the CLI -----

SELECT_FAST = ["data.train_size=600", "data.validation_size=60", "data.test_size=10", "data.downstream_size=10",
               "data.target_size=60"]


def test_select_command_writes_selection_and_is_cached(lmlab, tmp_path, monkeypatch):
    args = ("select", f"out_dir={tmp_path}", "selection=color_filter", "selection.prior_steps=20",
            "selection.finetune_steps=10", "selection.d_model=32", *SELECT_FAST)
    code, out = lmlab(*args)
    assert code == 0, out
    run = next(tmp_path.glob("select/*"))
    for name in ("selected/dataset_info.json", "scores.npy", "selection.json", "DONE"):
        assert (run / name).exists(), name
    info = json.loads((run / "selection.json").read_text())["metrics"]
    assert info["selection/rows"] == 150 and info["selection/precision"] > info["selection/pool_precision"]
    assert len(np.load(run / "scores.npy")) == 600
    scores = np.load(run / "scores.npy")
    (run / "DONE").unlink()

    def recompute(*_args, **_kwargs):
        raise AssertionError("the second run selected again instead of reading the cached selection")

    monkeypatch.setattr(ColorFilter, "select", recompute)
    code, out = lmlab(*args)  # a second run reads the cached selection
    assert code == 0, out
    assert json.loads((run / "selection.json").read_text())["metrics"] == info
    np.testing.assert_array_equal(np.load(run / "scores.npy"), scores)


@pytest.mark.parametrize("args,expect", [
    (["selection=miniplm", "selection.teacher=/no/such/run"], "selection.teacher=/no/such/run is not a directory"),
    (["selection=preselect", "selection.runs=[/no/such/run]"], "/no/such/run does not exist"),
    (["selection=color_filter", "data.target_size=0"], "needs a target set"),
    (["selection=random", "selection.fraction=0.0001"], "keeps no rows"),
])
def test_select_bad_input_is_one_sentence(lmlab, tmp_path, args, expect):
    code, out = lmlab("select", f"out_dir={tmp_path}", *SELECT_FAST, "selection.seed=0", *args)
    assert code != 0 and expect in out and "Traceback" not in out
    assert not list(tmp_path.rglob("DONE")) and not list(tmp_path.rglob("selected"))
    errors = [line for line in out.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1


def test_miniplm_with_a_teacher_run(lmlab, tmp_path):
    code, out = lmlab("train", "data=planted", *SELECT_FAST, "max_steps=30", "val_every=30", "batch_size=16",
                      "logger=none", "eval=[perplexity]", "model.d_model=32")
    assert code == 0, out
    teacher = next(p.parent for p in lmlab.runs.rglob("DONE"))
    code, out = lmlab("select", f"out_dir={tmp_path}", "selection=miniplm", f"selection.teacher='{teacher}'",
                      "selection.ref_steps=20", *SELECT_FAST)
    assert code == 0, out
    assert (next(tmp_path.glob("select/*")) / "scores.npy").exists()


def test_curriculum_in_train_saves_its_stages(lmlab):
    code, out = lmlab("train", "data=planted", "selection=curriculum", "selection.key=length", *SELECT_FAST,
                      "max_steps=40", "val_every=4", "selection.every=4", "checkpoint_every=20", "batch_size=16",
                      "logger=none", "eval=[perplexity]", "model.d_model=32")
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("DONE"))
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics["selection/rows"] == 600 and "selection/first_stage_precision" in metrics
    assert 0 <= metrics["selection/served_precision"] <= 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("CurriculumCallback"))
    history = state["stages"]["history"]
    assert history[0] == [0, 30] and len(history) >= 2  # 5% of 600 rows first, then releases on plateaus
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(history, history[1:]))
