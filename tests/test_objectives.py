"""CLM and MLM: batch preparation, BERT masking statistics, and exact evaluation on known answers."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lmlab.objectives.clm import CLM
from lmlab.objectives.mlm import MLM
from lmlab.vocab import BOS_ID, EOS_ID, MASK_ID, N_SPECIAL, PAD_ID


class UnigramSource:
    """Rows ``[BOS] w.. [EOS]`` with i.i.d. words from a known unigram ``p`` (EOS ignored by the truth)."""

    def __init__(self, p_words: np.ndarray) -> None:
        self.vocab_size = N_SPECIAL + len(p_words)
        self.p = np.zeros(self.vocab_size)
        self.p[N_SPECIAL:] = p_words

    def rows(self, n: int, length: int, seed: int = 0) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        words = rng.choice(self.vocab_size, size=(n, length), p=self.p)
        return [[BOS_ID, *map(int, w), EOS_ID] for w in words]

    def single_mask_conditionals(self, rows):
        return [np.tile(self.p, (sum(t >= N_SPECIAL for t in r), 1)) for r in rows]

    def sequence_nll(self, rows):
        return None


class FixedModel(nn.Module):
    """A 'backbone' whose logits at every position are ``logits`` (or the one-hot of the input, if
    ``copy_input``, a model that cheats when a position is not really masked)."""

    def __init__(self, logits: torch.Tensor, copy_input: bool = False) -> None:
        super().__init__()
        self.register_buffer("fixed", logits.float())
        self.dummy = nn.Parameter(torch.zeros(1))
        self.copy_input = copy_input
        self.vocab_size = len(logits)

    def forward(self, input_ids, attention):
        if self.copy_input:
            return nn.functional.one_hot(input_ids, self.vocab_size).float() * 30.0
        return torch.zeros(*input_ids.shape, 1) + self.dummy

    def logits(self, hidden):
        if self.copy_input:
            return hidden
        return self.fixed.expand(*hidden.shape[:-1], len(self.fixed))


def test_clm_prepare_hand_batch():
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    p = CLM().prepare({"input_ids": ids, "seed": 0})
    assert torch.equal(p.inputs, torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]))
    assert torch.equal(p.targets, torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]]))
    assert torch.equal(p.loss_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool))
    assert p.attention.kind == "causal"
    assert torch.equal(p.attention.padding, p.inputs != PAD_ID)
    assert not (p.targets[p.loss_mask] == BOS_ID).any()


def test_mlm_masking_statistics():
    V, B, L = 1000, 400, 50
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((B, 1), BOS_ID), torch.randint(N_SPECIAL, V, (B, L), generator=g),
                     torch.full((B, 1), EOS_ID), torch.full((B, 3), PAD_ID)], dim=1)
    p = MLM(vocab_size=V).prepare({"input_ids": ids, "seed": 7})
    words = ids >= N_SPECIAL
    sel = p.loss_mask
    assert not (sel & ~words).any()  # specials are never chosen
    assert torch.equal(p.inputs[~words], ids[~words])  # nor changed
    assert torch.equal(p.targets, ids)
    assert abs(sel.sum().item() / words.sum().item() - 0.15) < 0.01
    n = sel.sum().item()
    masked = (p.inputs[sel] == MASK_ID).sum().item() / n
    kept = (p.inputs[sel] == ids[sel]).sum().item() / n
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02
    assert ((p.inputs[sel] >= N_SPECIAL) | (p.inputs[sel] == MASK_ID)).all()
    assert torch.equal(p.inputs[~sel], ids[~sel])
    assert p.attention.kind == "bidirectional" and torch.equal(p.attention.padding, ids != PAD_ID)


def test_mlm_is_reproducible_per_seed_and_masks_at_least_one():
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2], [1, 2, 0, 0, 0]])
    mlm = MLM()
    a, b = mlm.prepare({"input_ids": ids, "seed": 3}), mlm.prepare({"input_ids": ids, "seed": 3})
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.loss_mask, b.loss_mask)
    never = MLM(mask_prob=0.0).prepare({"input_ids": ids, "seed": 3})
    assert never.loss_mask.sum(1).tolist() == [1, 1, 0]  # one per row with words; none without
    big = torch.randint(N_SPECIAL, 50, (64, 40), generator=torch.Generator().manual_seed(0))
    masks = [mlm.prepare({"input_ids": big, "seed": s}).loss_mask for s in (1, 2)]
    assert not torch.equal(*masks)
    # without vocab_size, random words come from the batch's own words
    rand = MLM(mask_token_frac=0.0, random_token_frac=1.0).prepare({"input_ids": big, "seed": 1})
    assert set(rand.inputs[rand.loss_mask].tolist()) <= set(big.unique().tolist())


def test_clm_evaluate_equals_hand_nll():
    V = 8
    probs = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.1, 0.3, 0.25, 0.15])
    model = FixedModel(torch.log(probs.clamp_min(1e-30)))
    rows = [[1, 5, 6, 2], [1, 7, 2]]
    expected = -(math.log(0.3) + math.log(0.25) + math.log(0.2) + math.log(0.15) + math.log(0.2)) / 5

    class Truth:
        def sequence_nll(self, rows):
            return np.array([1.0, 2.0])

    for bs in (1, 2):
        out = CLM().evaluate(model, rows, Truth(), batch_size=bs)
        assert abs(out["loss"] - expected) < 1e-6
        assert abs(out["optimum"] - 3.0 / 5) < 1e-12
        assert abs(out["gap"] - (expected - 0.6)) < 1e-6
    assert set(CLM().evaluate(model, rows, UnigramSource(np.ones(V - 4) / 4), 2)) == {"loss"}
    assert V == len(probs)


def test_mlm_evaluate_gap_is_zero_for_the_truth_and_positive_otherwise():
    p_words = np.array([0.4, 0.3, 0.2, 0.1])
    source = UnigramSource(p_words)
    rows = source.rows(60, 6, seed=1)
    rows += source.rows(20, 3, seed=2)  # different lengths: padding inside the masked batches
    truth = FixedModel(torch.log(torch.tensor(source.p).clamp_min(1e-30)))
    out = MLM().evaluate(truth, rows, source, batch_size=37)
    entropy = float(-(p_words * np.log(p_words)).sum())
    assert abs(out["gap"]) < 1e-6
    assert abs(out["optimum"] - entropy) < 1e-9
    assert abs(out["loss"] - entropy) < 0.15  # equal only in expectation
    n = sum(len(r) - 2 for r in rows)
    words = [t for r in rows for t in r if t >= N_SPECIAL]
    assert len(words) == n
    assert abs(out["loss"] - float(np.mean([-np.log(source.p[t]) for t in words]))) < 1e-5

    uniform = FixedModel(torch.zeros(source.vocab_size))
    out = MLM().evaluate(uniform, rows, source, batch_size=64)
    kl = float((p_words * np.log(p_words * source.vocab_size)).sum())
    assert out["gap"] > 0.1 and abs(out["gap"] - kl) < 1e-5
    assert abs(out["loss"] - math.log(source.vocab_size)) < 1e-5


def test_mlm_evaluate_really_masks_the_position():
    source = UnigramSource(np.array([0.5, 0.5]))
    rows = source.rows(10, 4)
    cheat = FixedModel(torch.zeros(source.vocab_size), copy_input=True)
    out = MLM().evaluate(cheat, rows, source, batch_size=8)
    assert out["loss"] > 10  # it sees MASK, never the word it must predict
