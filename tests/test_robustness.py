"""``eval=robustness``: at noise 0 the numbers of ``eval=perplexity`` (and the probe's of ``eval=probe``); at
token noise 1 the loss on uniform random inputs (rows of the same layout give the same loss, and fresh uniform
draws come close); the noise functions against their definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from lmlab.evaluation.robustness import Robustness, byte_noise, token_noise
from lmlab.pipeline import rebuild
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
from tests.conftest import TINY


def test_token_noise_replaces_own_tokens_at_the_rate_and_keeps_specials():
    rng = np.random.default_rng(1)
    rows = [[BOS_ID, *rng.integers(N_SPECIAL, 40, 300).tolist(), EOS_ID] for _ in range(20)]
    assert token_noise(rows, 0.0, 40, seed=0) == rows
    noisy = token_noise(rows, 0.2, 40, seed=0)
    assert [(r[0], r[-1], len(r)) for r in noisy] == [(BOS_ID, EOS_ID, 302)] * 20
    changed = np.mean([a != b for r, s in zip(rows, noisy) for a, b in zip(r[1:-1], s[1:-1])])
    # a replaced token keeps its id with probability 1/36: the changed share is 0.2 * 35/36 = 0.194
    assert changed == pytest.approx(0.2 * 35 / 36, abs=0.015)
    assert all(N_SPECIAL <= t < 40 for r in noisy for t in r[1:-1])
    # rate 1: nothing of the tokens survives, only the layout
    other = [[BOS_ID, *([N_SPECIAL] * 300), EOS_ID] for _ in range(20)]
    assert token_noise(rows, 1.0, 40, seed=0) == token_noise(other, 1.0, 40, seed=0)


class Letters:
    """A text source of one byte per id, as ``data/tokenizer=byte`` (``N_SPECIAL + byte``)."""

    def decode(self, ids):
        return bytes(i - N_SPECIAL for i in ids).decode("utf-8", errors="replace")

    def encode(self, texts):
        return [[N_SPECIAL + b for b in t.encode("utf-8")] for t in texts]


def test_byte_noise_on_ascii_text_replaces_bytes_at_the_rate_and_keeps_the_layout():
    text = Letters().encode(["hello world " * 40])[0]
    rows = [[BOS_ID, *text, EOS_ID, *text[:50]] for _ in range(10)]
    assert byte_noise(rows, 0.0, Letters(), seed=0) == rows
    noisy = byte_noise(rows, 0.1, Letters(), seed=0)
    # ASCII replaced by printable ASCII: one byte for one, the specials in place
    assert [len(n) for n in noisy] == [len(r) for r in rows]
    assert all(n[0] == BOS_ID and n[481] == EOS_ID for n in noisy)
    assert all(32 + N_SPECIAL <= t < 127 + N_SPECIAL for n in noisy for t in n[1:481] + n[482:])
    changed = np.mean([a != b for r, n in zip(rows, noisy) for a, b in zip(r, n)])
    # a replaced byte keeps its value with probability 1/95
    assert changed == pytest.approx(0.1 * 530 / 532 * 94 / 95, abs=0.015)


def test_robustness_refuses_byte_noise_on_a_grammar(lmlab):
    code, out = lmlab("train", *TINY, "max_steps=2", "batch_size=16", "logger=none", "eval=[robustness]",
                      "eval.robustness.kinds=[byte]")
    assert code == 2 and "not text" in out, out


def test_noise_zero_equals_perplexity_and_noise_one_is_the_loss_on_uniform_inputs(lmlab):
    code, out = lmlab("train", *TINY, "max_steps=60", "val_every=60", "checkpoint_every=60", "batch_size=16",
                      "model.d_model=32", "logger=none", "eval=[perplexity,probe,robustness]",
                      "eval.robustness.rates=[0,0.1,1]")
    assert code == 0, out
    (run,) = lmlab.runs.rglob("results.json")
    m = json.loads(run.read_text())["metrics"]
    for key in ("loss", "ppl", "optimum", "gap"):
        assert m[f"robustness/token/0/{key}"] == m[f"perplexity/{key}"]  # exactly: the same computation
    assert "robustness/byte/0/loss" not in m  # a grammar has no bytes
    # the probe trained on clean rows and scored on the untouched test rows: eval=probe's accuracy
    assert m["robustness/token/0/probe_acc"] == m["probe/acc"]
    assert m["robustness/token/0/probe_acc_ci95"] == m["probe/acc_ci95"]
    assert all(0 <= m[f"robustness/token/{r}/probe_acc"] <= 1 for r in ("0.1", "1"))
    assert m["robustness/token/0/loss"] < m["robustness/token/0.1/loss"] < m["robustness/token/1/loss"]
    # rate 1 against uniform random inputs drawn here, of the same layout: the rate-1 loss is one draw from
    # the distribution of these losses, so it lies within a few of their standard deviations of their mean
    _, module, dm, _ = rebuild(run.parent)
    rows = [list(r) for r in dm.splits["validation"].with_format(None)["input_ids"]]
    rng = np.random.default_rng(12345)
    fresh = []
    for _ in range(8):
        uniform = [[t if t < N_SPECIAL else int(rng.integers(N_SPECIAL, dm.source.vocab_size)) for t in r]
                   for r in rows]
        fresh.append(module.objective.evaluate(module.model, uniform, None, 64)["loss"])
    assert abs(m["robustness/token/1/loss"] - np.mean(fresh)) < 4 * np.std(fresh, ddof=1)
    # and rows of the same layout with other tokens give exactly the rate-1 loss
    same_layout = [[t if t < N_SPECIAL else N_SPECIAL for t in r] for r in rows]
    again = Robustness(rates=[1.0], kinds=["token"])
    dm.splits["validation"] = Dataset.from_dict({"input_ids": same_layout})
    assert again(module, dm)["robustness/token/1/loss"] == m["robustness/token/1/loss"]
