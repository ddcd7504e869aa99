"""Optimiser parameter groups shared by every training loop (the pipeline's and the selectors' own)."""

from __future__ import annotations

from torch import nn


def decay_groups(module: nn.Module) -> list[dict]:
    """Two parameter groups for an AdamW-style optimiser: weight matrices (``ndim >= 2``, embeddings
    excepted: a parameter whose name holds ``embed``) get the optimiser's weight decay; biases, norms and
    embeddings get none. Frozen parameters (``requires_grad`` False) are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
