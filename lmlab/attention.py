"""The attention record: which positions may attend to which, for one batch.

Objectives say which pattern they need (causal, bidirectional, prefix) and build an ``Attention`` for each
batch; models say which patterns they support and read the record in ``forward``. Both import it from
here, so neither depends on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.vocab import PAD_ID

CAUSAL, BIDIRECTIONAL, PREFIX = "causal", "bidirectional", "prefix"


@dataclass
class Attention:
    """Which positions may attend to which, for one batch.

    ``kind`` is causal, bidirectional or prefix. ``padding`` is a bool (B, T) tensor, True on real
    tokens (``None``: no padding). ``prefix_len`` is a long (B,) tensor: with ``kind == "prefix"``,
    positions < prefix_len attend bidirectionally within the prefix, the rest causally.
    """

    kind: str = CAUSAL
    padding: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None

    def mask(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """A bool (B or 1, 1, T, T) mask, True where attention is allowed; ``None`` for causal attention
        (the fused causal path) and for bidirectional attention without padding."""
        if self.kind == CAUSAL:
            # Rows are right-padded (see ``collate``): under causal attention a real token never sees a
            # pad, so padding needs no mask and the fused causal kernel applies.
            return None
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
        return allowed


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
