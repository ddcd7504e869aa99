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

from lmlab.models.base import Attention


@dataclass
class Prepared:
    inputs: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long; only positions with loss_mask count
    loss_mask: torch.Tensor  # (B, T) bool
    attention: Attention


class Objective(ABC):
    attention: str  # the attention pattern the model must honour: causal, bidirectional or prefix

    def bind(self, source, splits) -> None:
        """Called once the data is loaded, before any batch: the source (vocabulary, exact
        distributions) and its splits (``DatasetDict``), for objectives that need more than batches."""

    @abstractmethod
    def prepare(self, batch: dict) -> Prepared: ...

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over the positions of ``loss_mask`` (logits computed only there)."""
        hidden = model(prepared.inputs, prepared.attention)
        logits = model.logits(hidden[prepared.loss_mask])
        loss = F.cross_entropy(logits.float(), prepared.targets[prepared.loss_mask])
        return loss, {}

    @abstractmethod
    def evaluate(self, model, rows: list[list[int]], source, batch_size: int) -> dict[str, float]:
        """``{"loss": .., "optimum": .., "gap": ..}`` per token on ``rows`` (optimum and gap only where
        the source knows them)."""
