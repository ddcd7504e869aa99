"""The attention record: which positions may attend to which, for one batch.

Objectives say which pattern they need (causal, bidirectional, prefix) and build an ``Attention`` for each
batch; models say which patterns they support and read the record in ``forward``. Both import it from
here, so neither depends on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.vocab import BOS_ID, EOS_ID, PAD_ID

CAUSAL, BIDIRECTIONAL, PREFIX = "causal", "bidirectional", "prefix"


@dataclass
class Attention:
    """Which positions may attend to which, for one batch.

    ``kind`` is causal, bidirectional or prefix. ``padding`` is a bool (B, T) tensor, True on real
    tokens (``None``: no padding). ``prefix_len`` is a long (B,) tensor: with ``kind == "prefix"``,
    positions < prefix_len attend bidirectionally within the prefix, the rest causally.

    ``documents`` (a long (B, T) tensor, ``documents_of``) keeps the documents packed in one row apart: a
    position attends only to positions of its own document. ``window`` (causal only) is sliding-window
    attention with attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): query ``i`` sees key
    ``j <= i`` when ``i - j < window`` or ``j < sinks``. ``cache_positions`` says how a rotary model places the
    sink keys: at their positions in the cache (``True``, the paper's scheme: the query sits at cache slot
    ``min(i, sinks + window - 1)``, so no query-key distance exceeds ``sinks + window - 1``) or at their
    original positions (``False``: distances up to ``i``).
    """

    kind: str = CAUSAL
    padding: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    window: int | None = None
    sinks: int | None = None  # None: the model's own (``model.sinks``); 0 without a model that has any
    cache_positions: bool = True

    def windowed(self, seq_len: int) -> bool:
        """Whether the sliding window restricts a sequence of ``seq_len`` positions."""
        return self.window is not None and self.window < seq_len

    def mask(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """A bool (B or 1, 1, T, T) mask, True where attention is allowed; ``None`` for causal attention
        (the fused causal path) and for bidirectional attention without padding."""
        if self.window is not None and self.kind != CAUSAL:
            raise ValueError(f"a sliding window needs causal attention, not {self.kind!r}")
        if self.kind == CAUSAL:
            # Rows are right-padded (see ``collate``): under causal attention a real token never sees a
            # pad, so padding needs no mask and the fused causal kernel applies.
            if self.documents is None and not self.windowed(seq_len):
                return None
            i = torch.arange(seq_len, device=device)
            allowed = i[:, None] >= i[None, :]
            if self.windowed(seq_len):
                allowed = allowed & ((i[:, None] - i[None, :] < self.window) | (i[None, :] < (self.sinks or 0)))
            return self._within_documents(allowed[None, None], device)
        allowed = None
        if self.kind == PREFIX:
            i = torch.arange(seq_len, device=device)
            causal = i[:, None] >= i[None, :]
            in_prefix = i[None, None, :] < self.prefix_len.to(device)[:, None, None]  # key in prefix
            q_in_prefix = i[None, :, None] < self.prefix_len.to(device)[:, None, None]
            allowed = (causal[None] | (in_prefix & q_in_prefix))[:, None]
        if self.padding is not None:
            keys = self.padding[:, None, None, :].to(device)
            allowed = keys if allowed is None else allowed & keys
            # a padded query row would have no key at all: let it see itself (its output is ignored)
            allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)[None, None]
        if self.documents is not None:
            if allowed is None:
                allowed = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device)
            allowed = self._within_documents(allowed, device)
        return allowed

    def _within_documents(self, allowed: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.documents is None:
            return allowed
        doc = self.documents.to(device)
        return allowed & (doc[:, None, :, None] == doc[:, None, None, :])


def documents_of(ids: torch.Tensor) -> torch.Tensor:
    """The index of the document each position of a packed (B, T) row belongs to, counted from 0 in each
    row: a document starts at a ``[BOS]`` and after an ``[EOS]`` (the ``[EOS]`` belongs to the document it
    ends; a ``[BOS]`` right after an ``[EOS]`` starts one document, not two)."""
    starts = torch.zeros_like(ids, dtype=torch.long)
    starts[:, 1:] = ((ids[:, 1:] == BOS_ID) | (ids[:, :-1] == EOS_ID)).long()
    return starts.cumsum(1)


def padding_of(ids: torch.Tensor, padded: bool | None = None) -> torch.Tensor | None:
    """True on real tokens; ``None`` when the batch has no padding (lets models take fused paths).

    ``padded`` is the collated batch's flag (``batch["padded"]``, known on the host): with it no value is
    read back from the device; without it (``None``) the ids are checked, a host sync on an accelerator."""
    if padded is False:
        return None
    padding = ids != PAD_ID
    if padded is None and bool(padding.all()):
        return None
    return padding
