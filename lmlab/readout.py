"""Reading a backbone from outside: its device, rows padded into a batch, the attention a whole row is read
with, and pooled features. Shared by the downstream evaluators and by objectives that train a head on
pooled states (adversarial MLM)."""

from __future__ import annotations

import torch

from lmlab.attention import PREFIX, Attention
from lmlab.errors import UserError
from lmlab.vocab import PAD_ID


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def pad_rows(rows: list[list[int]], length: int | None = None) -> torch.Tensor:
    """(n, length) long tensor of ``rows`` right-padded with PAD (``length``: the longest row)."""
    length = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r[:length], dtype=torch.long)
    return ids


def reading_attention(kind: str, ids: torch.Tensor) -> Attention:
    """How a backbone reads whole unmasked rows for features: the objective's attention pattern with a
    padding mask; for prefix attention the whole row is the prefix."""
    padding = ids != PAD_ID
    prefix_len = padding.sum(1) if kind == PREFIX else None
    return Attention(kind, padding=None if bool(padding.all()) else padding, prefix_len=prefix_len)


def pool(hidden: torch.Tensor, ids: torch.Tensor, pooling: str, length: int) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, F) features: ``mean`` over real (non-PAD) tokens (F = d), or
    ``concat`` of the token states, zero-padded to ``length`` positions (F = length * d)."""
    real = (ids != PAD_ID).unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
    if pooling == "concat":
        h = hidden * real
        B, T, d = h.shape
        if T < length:
            h = torch.cat([h, h.new_zeros(B, length - T, d)], dim=1)
        return h[:, :length].reshape(B, length * d)
    raise UserError(f"unknown pooling {pooling!r}: choose mean or concat.")


def feature_dim(d_model: int, pooling: str, length: int) -> int:
    return d_model * (length if pooling == "concat" else 1)


def features(model, ids: torch.Tensor, kind: str, pooling: str, length: int) -> torch.Tensor:
    """Pooled features of a batch of padded ids (gradients flow if enabled)."""
    ids = ids.to(model_device(model))
    return pool(model(ids, reading_attention(kind, ids)), ids, pooling, length)
