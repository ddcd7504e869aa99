"""The objective contract: a batch in, model inputs/targets/loss mask/attention out, and a loss.

``prepare(batch) -> Prepared`` turns a collated batch (``input_ids`` padded with PAD, ``seed``: an int
that makes any random choice of this batch reproducible, e.g. after a resume) into what the model
reads. ``loss(model, prepared) -> (loss, metrics)`` computes the training loss. ``evaluate(model, rows,
source)`` is the exact-comparison evaluation used by ``eval=perplexity``: the per-token loss on a fixed
set of rows and, where the source knows the true distribution, the optimum and the gap to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.attention import Attention

IGNORE = -100  # cross-entropy's ignore_index for positions outside the loss mask


@dataclass
class Prepared:
    inputs: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long; only positions with loss_mask count
    loss_mask: torch.Tensor  # (B, T) bool
    attention: Attention


class Objective(ABC):
    attention: str  # the attention pattern the model must honour: causal, bidirectional or prefix
    # True where ``loss_mask`` covers nearly every position (next-token prediction): ``loss`` computes the
    # logits everywhere and drops the rest by ``ignore_index``, with no boolean indexing (which reads the
    # mask back to the host, a sync per step on an accelerator). False (sparse masks, e.g. MLM's 15%):
    # logits only at the masked positions, which saves most of the LM head's work.
    dense_loss: bool = False

    def bind(self, source, splits) -> None:
        """Called once the data is loaded, before any batch: the source (vocabulary, exact
        distributions) and its splits (``DatasetDict``), for objectives that need more than batches."""

    @abstractmethod
    def prepare(self, batch: dict) -> Prepared: ...

    def extra_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per token the training step spends outside the model (a teacher's forward, a generator's
        forward and backward), in the convention of ``Backbone.flops_per_token``; MFU counts them too."""
        return 0.0

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over the positions of ``loss_mask`` (see ``dense_loss``)."""
        hidden = model(prepared.inputs, prepared.attention)
        if self.dense_loss:
            targets = prepared.targets.masked_fill(~prepared.loss_mask, IGNORE)
            return F.cross_entropy(model.logits(hidden).flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE), {}
        logits = model.logits(hidden[prepared.loss_mask])
        return F.cross_entropy(logits.float(), prepared.targets[prepared.loss_mask]), {}

    def held_out(self, model) -> dict[str, float]:
        """Metrics of the objective's own trained parts on held-out rows, measured once after training and
        recorded as ``objective/<name>`` in the results (an adversary's head, say); none by default."""
        return {}

    @abstractmethod
    def evaluate(self, model, rows: list[list[int]], source, batch_size: int) -> dict[str, float]:
        """``{"loss": .., "optimum": .., "gap": ..}`` per token on ``rows`` (optimum and gap only where
        the source knows them)."""
