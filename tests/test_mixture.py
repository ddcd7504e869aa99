"""data=mixture: weighted and temperature-sampled mixtures of sources, with known answers."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from lmlab.data.mixture import MixtureSource, mixture_probabilities
from lmlab.errors import UserError

PCFG = "lmlab.data.pcfg.PCFGSource"
HMM = "lmlab.data.hmm.HMMSource"
TEXT = "lmlab.data.text.TextSource"


def small(target: str, train_size: int = 200, **kw) -> dict:
    return {"_target_": target, "train_size": train_size, "validation_size": 10, "test_size": 10,
            "downstream_size": 10, **kw}


def test_weights_give_their_share_within_sampling_error():
    n = 4000
    m = MixtureSource(sources={"a": {**small(PCFG), "weight": 0.75},
                               "b": {**small(PCFG, grammar_seed=1), "weight": 0.25}}, train_size=n)
    train = m.build()["train"]
    share = Counter(train["source"])["a"] / n
    assert len(train) == n and m.probabilities == pytest.approx({"a": 0.75, "b": 0.25})
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)  # binomial, 4 sigma


ROOT3 = math.sqrt(3)


@pytest.mark.parametrize("alpha,expect", [(1.0, [0.75, 0.25]), (0.0, [0.5, 0.5]),
                                          (0.5, [ROOT3 / (1 + ROOT3), 1 / (1 + ROOT3)])])
def test_temperature_sampling_over_the_sizes(alpha, expect):
    assert mixture_probabilities([1, 1], [300, 100], alpha) == pytest.approx(expect)
    m = MixtureSource(sources={"a": small(PCFG, 300), "b": small(HMM, 100)}, temperature=alpha)
    train = m.build()["train"]
    assert [m.probabilities["a"], m.probabilities["b"]] == pytest.approx(expect)
    assert len(train) == 400  # default train_size: the sum of the sources' training rows


def test_weights_multiply_the_temperature_and_none_means_weights_alone():
    assert mixture_probabilities([1, 3], [300, 100], 1.0) == pytest.approx([0.5, 0.5])
    assert mixture_probabilities([1, 3], [300, 100], None) == pytest.approx([0.25, 0.75])


def test_two_builds_give_identical_rows_and_the_cache_restores_the_proportions(tmp_path):
    sources = {"a": {**small(PCFG), "weight": 2}, "b": small(HMM)}
    first = MixtureSource(sources=sources, train_size=300, seed=3).build()
    second = MixtureSource(sources=sources, train_size=300, seed=3).build()
    for split in first:
        assert first[split].to_list() == second[split].to_list()
    other = MixtureSource(sources=sources, train_size=300, seed=4).build()
    assert other["train"]["input_ids"] != first["train"]["input_ids"]
    MixtureSource(sources=sources, train_size=300, seed=3).load(tmp_path)
    fresh = MixtureSource(sources=sources, train_size=300, seed=3)  # reads the cache entry
    loaded = fresh.load(tmp_path)
    assert loaded["train"].to_list() == first["train"].to_list()
    assert fresh.probabilities == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert fresh.sizes == {"a": 200, "b": 200}


def test_splits_vocabulary_and_task_columns():
    m = MixtureSource(sources={"a": small(PCFG, vocab_size=20), "b": small(HMM, vocab_size=40)})
    splits = m.build()
    assert m.vocab_size == 44  # the larger source's: 40 words + 4 special ids
    assert set(m.tasks) == {"a_task_a", "a_task_b", "a_task_c", "b_task_z"}
    val = splits["validation"]
    assert val["source"] == ["a"] * 10 + ["b"] * 10  # each source's own validation rows, in order
    assert all(v == -1 for v in val["b_task_z"][:10]) and all(v >= 0 for v in val["b_task_z"][10:])
    assert all(v == -1 for v in val["a_task_a"][10:])
    rows_a = m.sources["a"].build()["validation"]["input_ids"]
    assert val["input_ids"][:10] == rows_a


def test_sequence_nll_is_the_mixture_optimum():
    m = MixtureSource(sources={"a": {**small(PCFG), "weight": 3}, "b": small(HMM, vocab_size=40)})
    val = m.build()["validation"]
    rows = val["input_ids"]
    got = m.sequence_nll(rows)
    a = m.sources["a"].sequence_nll([r for r in rows if max(r) < m.sources["a"].vocab_size])
    b = m.sources["b"].sequence_nll(rows)
    nll_a = np.full(len(rows), np.inf)
    nll_a[[max(r) < m.sources["a"].vocab_size for r in rows]] = a
    with np.errstate(divide="ignore"):
        want = -np.log(0.75 * np.exp(-nll_a) + 0.25 * np.exp(-b))
    assert np.isfinite(got).all() and got == pytest.approx(want)
    # one source: the mixture's optimum is that source's
    one = MixtureSource(sources={"a": small(PCFG)})
    one_rows = one.build()["validation"]["input_ids"]
    assert one.sequence_nll(one_rows) == pytest.approx(one.sources["a"].sequence_nll(one_rows))


@pytest.mark.parametrize("kwargs,expect", [
    ({"sources": {}}, "data.sources is empty"),
    ({"sources": {"a": {"grammar_seed": 0}}}, "give it a _target_"),
    ({"sources": {"a": {**small(PCFG), "weight": -1}}}, "make it a number >= 0"),
    ({"sources": {"a": {**small(PCFG), "weight": 0}}}, "give some source a weight > 0"),
    ({"sources": {"a": small(PCFG)}, "temperature": -1}, "data.temperature"),
    ({"sources": {"a": small(PCFG), "t": {"_target_": TEXT}}}, "do not share one token space"),
    ({"sources": {"t": {"_target_": TEXT, "tokenizer": {"_target_": "lmlab.data.tokenizers.BPE"}},
                  "u": {"_target_": TEXT, "tokenizer": {"_target_": "lmlab.data.tokenizers.BPE"}}}},
     "do not share one token space"),
    ({"sources": {"t": {"_target_": TEXT, "tokenizer": {"_target_": "lmlab.data.tokenizers.Byte"}},
                  "u": {"_target_": TEXT, "tokenizer": {"_target_": "lmlab.data.tokenizers.DNA"}}}},
     "do not share one token space"),
])
def test_user_errors(kwargs, expect):
    with pytest.raises(UserError, match=expect):
        MixtureSource(**kwargs)


def test_text_sources_with_one_fixed_tokenizer_mix():
    byte = {"_target_": "lmlab.data.tokenizers.Byte"}
    m = MixtureSource(sources={"t": {"_target_": TEXT, "tokenizer": byte, "seed": 0},
                       "u": {"_target_": TEXT, "tokenizer": byte, "seed": 1}})
    assert m.vocab_size == m.sources["t"].vocab_size


MIX = ["data=mixture", "data.train_size=300", "max_steps=4", "val_every=2", "checkpoint_every=2", "batch_size=16",
       "logger=none", "model.d_model=32", "eval=[perplexity]",
       *[f"data.sources.{s}.{k}={v}" for s in "ab" for k, v in
         (("train_size", 200), ("validation_size", 20), ("test_size", 20), ("downstream_size", 20))]]


def test_cli_trains_on_a_mixture_deterministically_and_resumes(lmlab, tmp_path):
    code, out = lmlab("train", *MIX)
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("DONE"))
    first = json.loads((run / "results.json").read_text())["metrics"]
    assert first["train/steps"] == 4
    assert first["perplexity/gap"] == pytest.approx(first["perplexity/loss"] - first["perplexity/optimum"])
    # per source: each on its own rows, with the mixture's optimum. The 40 validation rows are all scored, so the
    # pooled per-token loss is a token-weighted mean of the two sources' and lies between them
    names = sorted({k.split("/")[1] for k in first if k.count("/") == 2 and k.startswith("perplexity/")})
    assert names == ["a", "b"], first
    per_source = [first[f"perplexity/{n}/loss"] for n in names]
    assert min(per_source) - 1e-9 <= first["perplexity/loss"] <= max(per_source) + 1e-9
    for n in names:
        assert first[f"perplexity/{n}/gap"] == pytest.approx(first[f"perplexity/{n}/loss"]
                                                             - first[f"perplexity/{n}/optimum"])
    # the same job in another directory: the same numbers
    code, out = lmlab("train", f"out_dir={tmp_path / 'again'}", *MIX)
    assert code == 0, out
    again = json.loads(next((tmp_path / "again").rglob("results.json")).read_text())["metrics"]
    assert again["perplexity/loss"] == first["perplexity/loss"]
    # a finished run whose results are lost resumes from its checkpoint and ends with the same numbers
    for name in ("DONE", "results.json", "model.pt"):
        (run / name).unlink()
    code, out = lmlab("train", *MIX)
    assert code == 0 and "resuming from" in out, out
    resumed = json.loads((run / "results.json").read_text())["metrics"]
    assert resumed["perplexity/loss"] == pytest.approx(first["perplexity/loss"], abs=1e-6)


def test_a_selection_over_a_mixture_reports_what_it_kept_of_each_source(tmp_path):
    """Known answer: the share of each source's pool rows in the selection, counted by hand."""
    from lmlab.selection.base import selection_stats
    from lmlab.selection.random import RandomSelection

    m = MixtureSource(sources={"a": small(PCFG), "b": small(HMM, vocab_size=20)})
    pool = m.build()["train"]
    chosen = RandomSelection(fraction=0.3).run(pool, None, tmp_path, m.cache_key())
    stats = selection_stats(pool, chosen.dataset)
    sources, kept = np.asarray(pool["source"]), Counter(chosen.dataset["source"])
    for name in ("a", "b"):
        assert stats[f"kept_{name}"] == kept[name] / (sources == name).sum()
    assert chosen.stats["kept_a"] == stats["kept_a"]  # what the pipeline records as selection/kept_a
    assert 0.15 < stats["kept_a"] < 0.45 and 0.15 < stats["kept_b"] < 0.45
