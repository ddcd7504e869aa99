"""Selection over memory-mapped shards (``data=shards``): every method trains through the CLI, chunked scorers
select the same rows over shards as over the same rows in memory, the selection is an index (``indices.npy``),
the curriculum keeps its stage contract, and the batch order over a shard selection resumes exactly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from lmlab.data.datamodule import DataModule
from lmlab.data.planted import PlantedSource
from lmlab.data.shards import ShardRows, ShardSource, write_shards
from lmlab.errors import UserError
from lmlab.selection import base
from lmlab.selection.base import INDICES, SELECTED, Selector, top_fraction
from lmlab.selection.color_filter import ColorFilter
from lmlab.selection.curriculum import Curriculum, stage_rows
from lmlab.selection.quality import Quality
from lmlab.selection.rephrase import Rephrase
from lmlab.vocab import PAD_ID

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "lmlab" / "conf" / "selection").glob("*.yaml"))
SIZES = dict(train_size=600, validation_size=40, test_size=10, downstream_size=10, target_size=60)
RUN = ["max_steps=4", "val_every=2", "checkpoint_every=2", "batch_size=16", "logger=none", "eval=[perplexity]",
       "model.d_model=32", "model.n_layers=1"]
TINY_SELECTION = {  # each method at a size that runs in seconds
    "color_filter": ["selection.prior_rows=200", "selection.prior_steps=6", "selection.finetune_steps=3",
                     "selection.d_model=16", "selection.n_layers=1"],
    "miniplm": ["selection.ref_rows=200", "selection.ref_steps=6", "selection.teacher_steps=6",
                "selection.teacher_d_model=16", "selection.teacher_layers=1", "selection.ref_d_model=16"],
    "preselect": ["selection.prior_rows=200", "selection.prior_steps=20", "selection.family_steps=[0,10,20,40]",
                  "selection.score_rows=300", "selection.min_positives=30", "selection.d_model=16",
                  "selection.n_layers=1", "selection.epoch=2"],
    "curriculum": ["selection.reference_steps=6", "selection.d_model=16", "selection.n_layers=1",
                   "selection.every=2"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A planted pool (origin labels, a target split) written as 5 shards of 128 rows, and the same splits
    in memory."""
    tmp = tmp_path_factory.mktemp("shards")
    source = PlantedSource(**SIZES)
    out = write_shards(source, tmp / "shards", cache_dir=tmp / "cache", rows_per_shard=128)
    return out, source, source.load(tmp / "cache")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ROWS", 100)  # several chunks of the 600-row pool


def test_shard_view_serves_like_a_dataset(shards):
    out, _, memory = shards
    pool = ShardSource(path=str(out)).load(None)["train"]
    assert len(pool.entry["shards"]) == 5
    view = pool.select([5, 300, 5, 599, 128]).select([4, 0, 1])  # a view of a view composes
    assert len(view) == 3 and view.index.tolist() == [128, 5, 300]
    assert view[[0, 1, 2]]["input_ids"] == [list(memory["train"][i]["input_ids"]) for i in (128, 5, 300)]
    assert view[-1]["input_ids"] == list(memory["train"][300]["input_ids"])
    assert view[:]["origin"] == [memory["train"][i]["origin"] for i in (128, 5, 300)]
    assert view["origin"].tolist() == view[:]["origin"] and view.column_names == pool.column_names
    assert pickle.loads(pickle.dumps(view))[:] == view[:]
    assert view.to_dataset().with_format(None)[:] == view[:]
    with pytest.raises(IndexError):
        pool.select([600])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_shards(lmlab, shards, cache_dir, small_chunks, method, tmp_path):
    out = shards[0]
    data = ["data=shards", f"data.path='{out}'"]
    extra = TINY_SELECTION.get(method, [])
    if method == "rephrase":  # a generator trained on the same shards
        code, output = lmlab("train", "name=gen", *data, *RUN, "eval=[]")
        assert code == 0, output
        generator = next(p.parent for p in (lmlab.runs / "gen").rglob("model.pt"))
        extra = [f"selection.generator='{generator}'"]
    code, output = lmlab("train", "name=sel", *data, f"selection={method}", *extra, *RUN)
    assert code == 0, output
    metrics = json.loads(next((lmlab.runs / "sel").rglob("results.json")).read_text())["metrics"]
    assert metrics["train/steps"] == 4
    if method == "none":
        return
    cls = (ROOT / "lmlab" / "conf" / "selection" / f"{method}.yaml").read_text().split("_target_:")[1].split()[0]
    key = ShardSource(path=str(out)).cache_key()  # this data's entries: the cache is shared with other tests
    entries = [p for p in (cache_dir / "selection").iterdir()
               if p.name.startswith(f"{key}-{cls.rsplit('.', 1)[1]}-")]
    assert len(entries) == 1
    assert metrics["selection/pool_rows"] == 600 and metrics["selection/rows"] == metrics["train/rows"]
    assert 0 <= metrics["selection/precision"] <= 1
    if method == "rephrase":
        assert metrics["train/rows"] == 1200  # ratio 0.5: as many new rows as real ones
    if method in ("random", "quality", "color_filter", "miniplm", "preselect", "curriculum", "dedup"):
        assert (entries[0] / INDICES).exists() and not (entries[0] / SELECTED).exists()  # an index, not rows
    else:
        assert (entries[0] / SELECTED).exists()  # materialised: the selected rows
    if method == "curriculum":
        assert metrics["train/rows"] == 600 and "selection/served_precision" in metrics


@pytest.mark.parametrize("make", [
    lambda: ColorFilter(tau=4, prior_rows=300, prior_steps=20, finetune_steps=10, d_model=16, n_layers=1),
    lambda: Quality(),
    lambda: Curriculum(key="reference_loss", reference_steps=10, d_model=16, n_layers=1, fraction=0.5),
], ids=["color_filter", "quality", "curriculum"])
def test_chunked_selection_over_shards_equals_in_memory(shards, small_chunks, make, tmp_path):
    out, source, memory = shards
    shard_source = ShardSource(path=str(out))
    splits = shard_source.load(None)
    assert isinstance(splits["train"], ShardRows) and len(splits["target"]) == 60
    on_shards = make().run(splits["train"], splits["target"], tmp_path / "a", "k", source=shard_source)
    in_memory = make()
    in_memory.source = source
    expect = in_memory.select(memory["train"], memory["target"], tmp_path)
    assert isinstance(on_shards.dataset, ShardRows) and (on_shards.cache_path / INDICES).exists()
    np.testing.assert_array_equal(on_shards.scores, expect.scores)
    if isinstance(in_memory, Curriculum):  # kept in difficulty order
        kept = np.argsort(-expect.scores, kind="stable")[: len(expect.dataset)]
    else:
        kept = np.flatnonzero(expect.scores) if isinstance(in_memory, Quality) else top_fraction(
            expect.scores, in_memory.fraction)
    assert on_shards.dataset.index.tolist() == kept.tolist()
    assert on_shards.dataset[:]["input_ids"] == [list(r) for r in expect.dataset.with_format(None)["input_ids"]]
    assert on_shards.stats["rows"] == len(expect.dataset) and "precision" in on_shards.stats
    again = make().run(splits["train"], splits["target"], tmp_path / "a", "k", source=shard_source)  # cached
    assert again.dataset.index.tolist() == kept.tolist()


class KeepFirst(Selector):  # a materialising selector (the default ``on_shards``), like rephrase
    fraction = 0.5

    def score(self, pool, target, workdir):
        assert isinstance(pool, Dataset)
        return -np.arange(len(pool), dtype=np.float64)


def test_materialising_selection_refuses_a_large_shard_pool(shards, monkeypatch, tmp_path):
    out = shards[0]
    pool = ShardSource(path=str(out)).load(None)["train"]
    assert Rephrase.on_shards == "materialise"
    monkeypatch.setenv("LMLAB_SELECT_MAX_ROWS", "599")
    with pytest.raises(UserError, match="above the limit of 599.*LMLAB_SELECT_MAX_ROWS"):
        KeepFirst().run(pool, None, tmp_path, "k")
    monkeypatch.setenv("LMLAB_SELECT_MAX_ROWS", "600")
    selection = KeepFirst().run(pool, None, tmp_path, "k")
    assert (selection.cache_path / SELECTED).exists() and len(selection.dataset) == 300


def test_curriculum_over_shards_keeps_its_stages_and_batches_resume(shards, small_chunks, tmp_path):
    """The kept rows are the pool in difficulty order; stage prefixes release the easiest rows first, and
    the batch order over the shard view is a function of (seed, step, stage record): resuming at any step
    draws the same batches."""
    out = shards[0]
    source = ShardSource(path=str(out))
    splits = source.load(None)
    selection = Curriculum(key="length").run(splits["train"], None, tmp_path, "k", source=source)
    view = selection.dataset
    lengths = [len(r) for r in view[:]["input_ids"]]
    assert len(view) == 600 and lengths == sorted(lengths)
    splits["train"] = view
    straight = DataModule(source, splits, batch_size=16, seed=3)
    stages = straight.use_stages(stage_rows(600, 0.05))
    stages.release(2, 120)
    loader = iter(straight.train_dataloader())
    drawn = [next(loader)["input_ids"] for _ in range(10)]
    served = {tuple(t for t in r.tolist() if t != PAD_ID) for b in drawn[:4] for r in b}  # before the release
    assert served <= {tuple(r) for r in view[:30]["input_ids"]}  # ... only the easiest 5%

    class Trainer:
        global_step, global_rank, world_size = 6, 0, 1

    resumed = DataModule(source, splits, batch_size=16, seed=3)
    resumed.use_stages(stage_rows(600, 0.05)).load_state_dict(stages.state_dict())
    resumed.trainer = Trainer()
    again = iter(resumed.train_dataloader())
    for step in range(6, 10):
        assert next(again)["input_ids"].equal(drawn[step])


def test_select_command_over_shards_writes_the_index(lmlab, shards, tmp_path):
    out = shards[0]
    code, output = lmlab("select", f"out_dir={tmp_path}", "data=shards", f"data.path='{out}'", "selection=random",
                         "selection.fraction=0.25")
    assert code == 0, output
    run = next(tmp_path.glob("select/*"))
    index = np.load(run / INDICES)
    assert len(index) == 150 and (run / "DONE").exists() and not (run / SELECTED).exists()
    assert json.loads((run / "selection.json").read_text())["metrics"]["selection/rows"] == 150
