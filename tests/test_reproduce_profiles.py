"""``scripts/reproduce_paper.py``'s profiles: the long profile's settings, ``--only continue`` and ``--data``, the
seeds split over the workers, the expected wall time of ``--dry-run``; and the probe's prefix-table ceiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmlab.data.pcfg import PCFGSource
from lmlab.data.tasks import labelled_rows
from lmlab.evaluation.probe import prefix_table_accuracy
from lmlab.run_dir import run_name
from tests.conftest import reproduce_driver

ROOT = Path(__file__).resolve().parents[1]


# ----- the prefix-table ceiling -----

def test_prefix_table_known_answer():
    """Rows [BOS] w1 w2 ... : the table on the first 2 words. Train: (5,6) -> 1, 1, 0 (majority 1); (7,8) -> 0, 2
    (a tie: the smaller label, 0); overall majority 1 (three 1s, two 0s, one 2). Test: (5,6) label 1 (right),
    (7,8) label 2 (wrong: the tie went to 0), (9,9) unseen label 1 (right: the overall majority), (9,5) unseen
    label 0 (wrong)."""
    bos = 1
    train = [[bos, 5, 6, 4], [bos, 5, 6, 7], [bos, 5, 6], [bos, 7, 8, 5], [bos, 7, 8], [bos, 4, 4]]
    train_y = np.array([1, 1, 0, 0, 2, 1])
    test = [[bos, 5, 6, 9], [bos, 7, 8, 9], [bos, 9, 9], [bos, 9, 5, 5]]
    test_y = np.array([1, 2, 1, 0])
    assert prefix_table_accuracy(train, train_y, test, test_y, 2) == 0.5
    # one word: 5 -> 1 (two 1s, one 0), 7 -> 0 (tie 0/2), 4 -> 1, 9 unseen -> 1: right, wrong, right, wrong
    assert prefix_table_accuracy(train, train_y, test, test_y, 1) == 0.5
    # the table fitted and scored on the same rows with an unambiguous key gets every row right
    assert prefix_table_accuracy(train[:3], [1, 1, 1], train[:3], [1, 1, 1], 3) == 1.0


def test_pcfg_task_labels_are_functions_of_their_prefix():
    """Tasks B and C label the nonterminal spanning the first 4 / 2 words: a table on those words, fitted and
    scored on the same rows, is exact; on one word fewer it is not (the grammar's labels need the last word)."""
    source = PCFGSource(train_size=10, validation_size=10, test_size=10, downstream_size=3000)
    splits = source.build()
    assert source.task_prefix_words == {"task_b": 4, "task_c": 2}
    for task, words in source.task_prefix_words.items():
        rows, y = labelled_rows(splits["downstream"], task)
        assert len(rows) > 500
        assert prefix_table_accuracy(rows, y, rows, y, words) == 1.0
        assert prefix_table_accuracy(rows, y, rows, y, words - 1) < 1.0


def test_probe_reports_the_table_ceiling(cache_dir):
    from types import SimpleNamespace

    import torch

    from lmlab.attention import BIDIRECTIONAL
    from lmlab.data.datamodule import DataModule
    from lmlab.evaluation.probe import Probe
    from lmlab.models.transformer import Transformer
    from lmlab.objectives.mlm import MLM

    source = PCFGSource(train_size=40, validation_size=10, test_size=400, downstream_size=400)
    splits = source.build()
    dm = DataModule(source, splits, batch_size=16, seed=0)
    torch.manual_seed(0)
    module = SimpleNamespace(model=Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2),
                             objective=MLM())
    out = Probe(task=["task_b", "task_c"], seeds=1, epochs=1, lookup=False, max_train=150)(module, dm, None)
    for task, words in (("task_b", 4), ("task_c", 2)):
        train, train_y = labelled_rows(splits["downstream"], task, 150)
        test, test_y = labelled_rows(splits["test"], task)
        assert out[f"probe/{task}/table_acc"] == prefix_table_accuracy(train, train_y, test, test_y, words)
    assert out["probe/table_acc"] == out["probe/task_b/table_acc"]


def test_the_cpu_grammar_leaves_tasks_b_and_c_headroom_over_a_prefix_table():
    """data=pcfg_headroom (the cpu profile's PCFG) at the size experiment's split sizes and the probe's 10,000
    training and test rows: the prefix table's accuracy on tasks B and C lies between 40% and 70%, while data=pcfg's
    table solves task C."""
    conf = ROOT / "lmlab" / "conf"
    size = OmegaConf.load(conf / "experiment" / "same_loss" / "size.yaml")
    probe = size.eval.probe

    def tables(*names):
        cfg = OmegaConf.merge(*(OmegaConf.load(conf / "data" / f"{n}.yaml") for n in names))
        cfg = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "defaults")}
        source = PCFGSource(**{**cfg, "train_size": 10, "validation_size": 10,
                               "test_size": size.data.test_size, "downstream_size": size.data.downstream_size})
        splits = source.build()
        out = {}
        for task, words in source.task_prefix_words.items():
            train, train_y = labelled_rows(splits["downstream"], task, probe.max_train)
            test, test_y = labelled_rows(splits["test"], task, probe.max_test)
            assert len(train) == probe.max_train and len(test) == probe.max_test
            out[task] = prefix_table_accuracy(train, train_y, test, test_y, words)
        return out

    headroom = tables("pcfg", "pcfg_headroom")
    assert all(0.40 <= acc <= 0.70 for acc in headroom.values()), headroom
    assert tables("pcfg")["task_c"] > 0.95


def test_each_profile_has_its_own_pcfg(tmp_path):
    """The cpu profile probes the grammar with headroom, the long profile the 30-word one (its parents reach
    0.02 nats), and --pcfg chooses either for both."""
    driver = reproduce_driver()

    def data(profile, **kw):
        return {o for s in driver.sweeps(profile, tmp_path, None, datasets=["pcfg"], **kw) for o in s.overrides
                if o.startswith("data=")}

    assert data("cpu") == {"data=pcfg_headroom"} and data("long") == {"data=pcfg"}
    assert data("cpu", pcfg="pcfg") == {"data=pcfg"} and data("long", pcfg="pcfg_headroom") == {"data=pcfg_headroom"}


# ----- the profiles -----

def test_long_profile_parents_reach_the_regime(tmp_path):
    """Every parent sweep of the long profile: a pool that does not repeat, a learning rate never below 10% of
    its peak, the gap evaluated every 500 steps (twice per plateau window), and the plateau settings."""
    driver = reproduce_driver()
    p = driver.PROFILES["long"]
    assert (p["plateau"], p["plateau_steps"], p["margin"], p["target_gap"]) == (0.003, 1000, 0.02, 0.02)
    assert driver.parse_seeds(p["seeds"]) == [0, 1, 2, 3, 4]
    plan = driver.sweeps("long", tmp_path, None)
    for sweep in plan:
        if sweep.experiment == "continue":
            assert any(o.startswith("optim.lr=") for o in sweep.overrides)
            continue
        experiment = OmegaConf.load(Path(driver.ROOT) / "lmlab/conf/experiment/same_loss" / f"{sweep.experiment}.yaml")
        for job in driver._jobs_of(sweep):
            cfg = dict(o.split("=", 1) for o in job)
            cfg.setdefault("schedule.min_ratio", experiment.schedule.min_ratio)  # the YAML unless overridden
            steps = int(cfg["max_steps"])
            assert int(cfg["data.train_size"]) >= steps * 256, sweep.label
            assert float(cfg["schedule.min_ratio"]) >= 0.1 and int(cfg["eval_every"]) <= p["plateau_steps"] // 2
    widths = {o for s in plan if s.experiment == "size" for o in s.overrides if o.startswith("model.d_model=")}
    assert widths == {"model.d_model=64,128"}
    assert {o for s in plan for o in s.overrides if o.startswith("data=")} == {"data=hmm", "data=pcfg"}
    wide = driver.sweeps("long", tmp_path, None, datasets=["pcfg"], pcfg="pcfg_headroom")
    assert {o for s in wide for o in s.overrides if o.startswith("data=")} == {"data=pcfg_headroom"}


def test_only_continue_trains_its_parents_only(tmp_path):
    driver = reproduce_driver()
    plan = driver.sweeps("long", tmp_path, None, only=["continue"], datasets=["pcfg"])
    # the seeds split over the two workers: each continue part waits for the size part of the same seeds
    assert [s.label for s in plan] == ["size-pcfg-seeds0-2", "size-pcfg-seeds3-4",
                                       "continue-pcfg-seeds0-2", "continue-pcfg-seeds3-4"]
    assert [s.needs for s in plan] == [None, None, "size-pcfg-seeds0-2", "size-pcfg-seeds3-4"]
    parents = plan[0]
    assert "model.d_model=choice(64)" in parents.overrides and "seed=0,1,2" in parents.overrides
    jobs = driver._jobs_of(parents)
    assert len(jobs) == 3 and all("model.d_model=64" in j for j in jobs)
    # a parent run keeps the name it has in the whole size sweep, so a later full run skips it
    full = next(s for s in driver.sweeps("long", tmp_path, None, datasets=["pcfg"]) if s.label == parents.label)

    def names(sweep):
        swept = [o.split("=", 1)[0] for o in sweep.overrides if "," in o.split("=", 1)[1] or "choice(" in o]
        return {run_name([o for o in job if not o.startswith("experiment=")], swept)
                for job in driver._jobs_of(sweep)}

    assert names(parents) < names(full)
    with pytest.raises(ValueError, match="--data"):
        driver.sweeps("long", tmp_path, None, datasets=["wiki"])
    assert driver.main(["--profile", "long", "--data", "wiki", "--out", str(tmp_path), "--dry-run"]) == 2


def test_seed_parts():
    driver = reproduce_driver()
    assert driver.seed_parts([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert driver.seed_parts([7], 2) == [[7]]
    assert driver.seed_parts(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


def test_schedule_seconds_known_answer():
    """Two workers; a (10 s) and b (4 s) start at 0; c (5 s) needs b: starts at 4, ends at 9; d (3 s) needs a:
    starts at 10, ends at 13. One worker: 10 + 4 + 5 + 3 = 22."""
    driver = reproduce_driver()
    plan = [driver.Sweep("size", "a", []), driver.Sweep("size", "b", []),
            driver.Sweep("continue", "b", [], needs="size-b"), driver.Sweep("continue", "a", [], needs="size-a")]
    durations = {"size-a": 10.0, "size-b": 4.0, "continue-b": 5.0, "continue-a": 3.0}
    assert driver.schedule_seconds(plan, durations, 2) == 13.0
    assert driver.schedule_seconds(plan, durations, 1) == 22.0


def test_long_dry_run_states_steps_and_time(tmp_path, capsys):
    driver = reproduce_driver()
    assert driver.main(["--profile", "long", "--only", "continue", "--data", "hmm", "--out", str(tmp_path),
                        "--dry-run"]) == 0
    out = capsys.readouterr().out
    steps = driver.LONG_STEPS["hmm"]
    assert out.count(f"{steps:,} steps x batch 256") == 2  # the two parts of the parents' sweep
    assert "dry run: 10 jobs in 4 sweeps compose" in out and "expected wall time:" in out
    # the parts run side by side, each continue part after its parents: the longer chain is 3 parents + 3 continues
    rate, ev = driver.MEASURED_STEPS_PER_S[("hmm", 64)], driver.MEASURED_EVAL_S
    parent = steps / rate + (steps // 500 + 1) * ev[("size", "hmm")][0] + ev[("size", "hmm")][1]
    cont = 500 / rate + (500 // 100 + 1) * ev[("continue", "hmm")][0] + ev[("continue", "hmm")][1]
    assert f"expected wall time: {driver._duration(3 * parent + 3 * cont)} with 2 sweep(s)" in out
    assert "measured on a 2-core CPU machine" in out
