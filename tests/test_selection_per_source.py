"""Per-source selection (``data.select_per_source``, ``Selector.run(..., by="source")``): each source's rows are
selected alone, with known answers against a brute-force reference, over a ``Dataset`` and over shards."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from lmlab.data.mixture import MixtureSource
from lmlab.data.shards import ShardRows, ShardSource, write_shards
from lmlab.errors import UserError
from lmlab.selection.base import column
from lmlab.selection.curriculum import Curriculum
from lmlab.selection.dedup import Dedup
from lmlab.selection.random import RandomSelection
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

PCFG = "lmlab.data.pcfg.PCFGSource"


def small(train_size: int = 200, **kw) -> dict:
    return {"_target_": PCFG, "train_size": train_size, "validation_size": 10, "test_size": 10,
            "downstream_size": 10, **kw}


def pool_of(rows: list[list[int]], sources: list) -> Dataset:
    """Rows with their ``source`` and their position (``row``), to name the kept rows."""
    return Dataset.from_dict({"input_ids": rows, "source": sources, "row": list(range(len(rows)))})


def random_rows(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS_ID, *rng.integers(N_SPECIAL, 500, int(rng.integers(8, 16))).tolist(), EOS_ID] for _ in range(n)]


class PrefersA(RandomSelection):
    """Random scores, plus 1 on source ``a``'s rows: over the pooled rows it keeps source ``a`` first."""

    def score(self, pool, target, workdir):
        return super().score(pool, target, workdir) + (column(pool, "source") == "a")


def reference(selector, pool: Dataset, tmp_path) -> set[int]:
    """Brute force: the selector's own ``select`` on each source's rows alone, the kept ``row``s joined."""
    kept: set[int] = set()
    sources = np.asarray(pool["source"])
    for name in np.unique(sources):
        part = pool.select(np.flatnonzero(sources == name))
        kept |= set(selector.select(part, None, tmp_path / f"ref-{name}").dataset["row"])
    return kept


def test_per_source_random_equals_each_source_selected_alone(tmp_path):
    sources = ["a"] * 70 + ["b"] * 31
    pool = pool_of(random_rows(101), list(np.random.default_rng(1).permutation(sources)))
    selection = RandomSelection(fraction=0.3, seed=2).run(pool, None, tmp_path, "k", by="source")
    kept = selection.dataset["row"]
    assert len(kept) == len(set(kept)) and set(kept) == reference(RandomSelection(fraction=0.3, seed=2), pool,
                                                                  tmp_path)
    assert selection.stats["kept_a"] == round(0.3 * 70) / 70 and selection.stats["kept_b"] == round(0.3 * 31) / 31
    # the scores sit at the rows' pool positions: each source's own scores
    at = np.asarray(pool["source"]) == "b"
    np.testing.assert_array_equal(selection.scores[at], np.random.default_rng(2).random(31))
    assert selection.report == {"per_source": {"a": None, "b": None}}
    pooled = RandomSelection(fraction=0.3, seed=2).run(pool, None, tmp_path, "k")
    assert pooled.cache_path != selection.cache_path and selection.cache_path.name.endswith("-by_source")


def test_per_source_keeps_each_weighted_source_where_pooled_selection_drops_one(tmp_path):
    m = MixtureSource(sources={"a": {**small(), "weight": 0.75},
                               "b": {**small(grammar_seed=1, seed=1), "weight": 0.25}}, train_size=400)
    pool = m.build()["train"].add_column("row", list(range(400)))
    n = {s: int((np.asarray(pool["source"]) == s).sum()) for s in "ab"}
    assert 0 < n["b"] < 0.4 * 400
    per_source = PrefersA(fraction=0.5).run(pool, None, tmp_path, m.cache_key(), by="source")
    pooled = PrefersA(fraction=0.5).run(pool, None, tmp_path, m.cache_key())
    for s in "ab":
        assert per_source.stats[f"kept_{s}"] == round(0.5 * n[s]) / n[s]
    assert pooled.stats["kept_b"] < 0.1 and pooled.stats["kept_a"] > 0.6  # the pooled selection drops source b
    share = np.mean(np.asarray(per_source.dataset["source"]) == "a")
    assert abs(share - n["a"] / 400) < 0.01  # the mixture's proportions survive
    assert set(per_source.dataset["row"]) == reference(PrefersA(fraction=0.5), pool, tmp_path)


class MaterialisingRandom(RandomSelection):
    on_shards = "materialise"  # a shard pool is loaded as a Dataset: the selection is saved as rows, not an index


@pytest.mark.parametrize("make,kept,index", [(lambda: RandomSelection(fraction=0.4, seed=5), 12 + 24, True),
                                              (lambda: Dedup(), 84, True),
                                              (lambda: MaterialisingRandom(fraction=0.4, seed=5), 12 + 24, False)],
                         ids=["chunked", "dedup", "materialise"])
def test_per_source_over_shards_keeps_the_rows_it_keeps_in_memory(make, kept, index, tmp_path):
    rows = random_rows(90, seed=4)
    rows[60:66] = rows[0:6]  # duplicates: rows 60-65 repeat rows 0-5
    codes = [0 if i % 3 else 1 for i in range(90)]  # shards hold integer labels: sources 0 and 1
    pool = pool_of(rows, codes)
    out = write_shards({"train": pool}, tmp_path / "shards", rows_per_shard=32)
    shards = ShardSource(path=str(out)).load(None)["train"]
    on_shards = make().run(shards, None, tmp_path / "s", "k", by="source")
    in_memory = make().run(pool, None, tmp_path / "m", "k", by="source")
    assert on_shards.dataset[:]["row"] == in_memory.dataset["row"]
    assert on_shards.dataset[:]["input_ids"] == in_memory.dataset["input_ids"]
    assert on_shards.stats == in_memory.stats and on_shards.stats["rows"] == kept  # 0.4 of 30 and 60; 6 copies
    assert isinstance(on_shards.dataset, ShardRows) == index == (on_shards.cache_path / "indices.npy").exists()


def test_dedup_per_source_keeps_duplicates_across_sources(tmp_path):
    rows = random_rows(6, seed=7)
    x, y = rows[0], rows[1]
    pool = pool_of([x, y, y, rows[2], rows[3], x, rows[4]], ["a", "a", "a", "a", "b", "b", "b"])
    per_source = Dedup().run(pool, None, tmp_path, "k", by="source")
    assert sorted(per_source.dataset["row"]) == [0, 1, 3, 4, 5, 6]  # x kept in a and in b; y's copy in a removed
    assert per_source.report["per_source"]["a"]["removed_exact"] == 1
    assert per_source.report["per_source"]["b"]["removed_exact"] == 0
    assert per_source.report["removed_exact"] == 1 and per_source.report["pool_rows"] == 7
    pooled = Dedup().run(pool, None, tmp_path, "k")
    assert sorted(pooled.dataset["row"]) == [0, 1, 3, 4, 6]  # pooled: x in b is a duplicate of x in a


def test_the_curriculum_refuses_per_source_selection(tmp_path):
    pool = pool_of(random_rows(20), ["a", "b"] * 10)
    with pytest.raises(UserError, match="set data.select_per_source=false"):
        Curriculum(key="length").run(pool, None, tmp_path, "k", by="source")


def test_the_setting_validates_and_keys_the_selection_not_the_rows(tmp_path):
    with pytest.raises(UserError, match="data.select_per_source is 'maybe'; make it true or false"):
        MixtureSource(sources={"a": small()}, select_per_source="maybe")
    off, on = MixtureSource(sources={"a": small()}), MixtureSource(sources={"a": small()}, select_per_source=True)
    assert not off.select_per_source and on.select_per_source
    assert off.cache_key() == on.cache_key()  # the same rows: one data cache entry
    pool = pool_of(random_rows(20), ["a", "b"] * 10)
    per_source = RandomSelection(fraction=0.5).run(pool, None, tmp_path, "k", by="source")
    pooled = RandomSelection(fraction=0.5).run(pool, None, tmp_path, "k")
    assert per_source.cache_path != pooled.cache_path


MIX = ["data=mixture", "data.train_size=300",
       *[f"data.sources.{s}.{k}={v}" for s in "ab" for k, v in
         (("train_size", 200), ("validation_size", 20), ("test_size", 20), ("downstream_size", 20))]]


def test_cli_selects_per_source(lmlab, tmp_path):
    code, out = lmlab("train", *MIX, "max_steps=2", "val_every=2", "checkpoint_every=2", "batch_size=16",
                      "logger=none", "model.d_model=32", "eval=[]", "data.select_per_source=true", "selection=random")
    assert code == 0, out
    metrics = json.loads(next(lmlab.runs.rglob("results.json")).read_text())["metrics"]
    code, out = lmlab("select", f"out_dir={tmp_path / 'select'}", *MIX, "data.select_per_source=true",
                      "selection=random")
    assert code == 0, out
    run = next((tmp_path / "select").glob("select/*"))
    assert json.loads((run / "selection.json").read_text())["metrics"] == {
        k: v for k, v in metrics.items() if k.startswith("selection/")}  # both commands: the same selection
    kept = Counter(load_from_disk(str(run / "selected"))["source"])
    pool_rows = {s: kept[s] / metrics[f"selection/kept_{s}"] for s in "ab"}
    assert metrics["selection/pool_rows"] == 300 and sum(pool_rows.values()) == pytest.approx(300)
    for s in "ab":  # fraction 0.5 (selection=random's default) of each source's rows
        assert kept[s] == round(0.5 * round(pool_rows[s]))
    code, out = lmlab("train", *MIX, "data.select_per_source=maybe")
    assert code == 2 and "data.select_per_source" in out and "true or false" in out and "Traceback" not in out
