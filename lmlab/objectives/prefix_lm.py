"""Prefix language modelling, the non-causal decoder "PLM" of Wang et al. 2022, "What Language Model
Architecture and Pretraining Objective Work Best for Zero-Shot Generalization?" (arXiv 2204.05832;
T5's prefix LM, Raffel et al. 2020, arXiv 1910.10683), variant of the released
``bigscience-workshop/architecture-objective`` code (``pack_prefix_lm_decoder_only``), without packing.

For a row of n real tokens ``x_0 .. x_{n-1}`` a split point ``s`` is drawn uniformly from ``{1, .., n-1}``
per row (``batch["seed"]`` drives it). The model reads ``x_0 .. x_{n-2}`` (the ``CLM`` shift) with prefix
attention ``prefix_len = s``: the prefix ``x_0 .. x_{s-1}`` attends bidirectionally within itself, every
later position causally. The loss is next-token cross-entropy on the targets ``x_s .. x_{n-1}`` only
(``n - s`` tokens; ``x_s`` is predicted from the last prefix position, which has seen the whole prefix
and nothing after it). ``s = 1`` (the prefix is BOS alone) is plain causal language modelling.

A model that cannot attend bidirectionally over a prefix refuses this objective at construction.

Evaluation: ``CLM.evaluate``'s exact per-token NLL of whole rows, read with ``prefix_len = 1`` (a causal
reading, one of the training splits), so ``gap`` is the exact excess cross-entropy against the source's
``-log P(row)``, comparable with CLM's.
"""

from __future__ import annotations

import torch

from lmlab.attention import PREFIX, Attention, padding_of
from lmlab.objectives.base import Prepared
from lmlab.objectives.clm import CLM
from lmlab.vocab import PAD_ID


def split_points(lengths: torch.Tensor, seed: int) -> torch.Tensor:
    """A split ``s`` uniform on ``{1, .., n-1}`` for each row length n (``s = 1`` where n < 2)."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(lengths.shape, generator=g, dtype=torch.float64)
    span = (lengths.cpu() - 1).clamp_min(1)
    return (1 + (u * span).floor().long()).minimum(span)


class PrefixLM(CLM):
    """Next-token loss after a random split point, bidirectional attention over the prefix."""

    attention = PREFIX

    def prepare(self, batch: dict) -> Prepared:
        ids = batch["input_ids"]
        lengths = (ids != PAD_ID).sum(1)
        s = split_points(lengths, batch.get("seed", 0)).to(ids.device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        t = torch.arange(targets.shape[1], device=ids.device)
        loss_mask = (targets != PAD_ID) & (t[None, :] + 1 >= s[:, None])
        return Prepared(inputs=inputs, targets=targets, loss_mask=loss_mask,
                        attention=Attention(PREFIX, padding=padding_of(inputs, batch.get("padded")), prefix_len=s))

    def prepare_eval(self, batch: dict) -> Prepared:
        p = CLM.prepare(self, batch)
        ones = torch.ones(len(p.inputs), dtype=torch.long, device=p.inputs.device)
        return Prepared(p.inputs, p.targets, p.loss_mask, Attention(PREFIX, padding=p.attention.padding,
                                                                    prefix_len=ones))
