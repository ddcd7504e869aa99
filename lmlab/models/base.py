"""The backbone contract, and the attention description that objectives hand to models.

A backbone maps token ids to hidden states (``forward(input_ids, attention) -> (B, T, d_model)``) and
owns an LM head (``logits(hidden)``). It declares which attention patterns it can honour; asked for
another at construction, it refuses with one sentence, before any data is generated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.attention import CAUSAL
from lmlab.errors import UserError


class Backbone(nn.Module):
    """Base class of every architecture. Subclasses set ``supported_attention`` and implement
    ``forward``, ``logits`` and ``flops_per_token``; they call ``super().__init__(vocab_size, d_model,
    attention, activation_checkpointing)`` first (the last a constructor argument of every model), and run
    their stack of blocks through ``run_blocks``, which honours it."""

    supported_attention: tuple[str, ...] = (CAUSAL,)

    def __init__(self, vocab_size: int, d_model: int, attention: str = CAUSAL,
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if attention not in self.supported_attention:
            raise UserError(
                f"model {type(self).__name__} cannot attend {attention!r} (it supports "
                f"{', '.join(self.supported_attention)}): choose another model or objective."
            )
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.attention_kind = attention
        # An extra loss of the model's own (e.g. MoE load balancing), already weighted, set by ``forward``;
        # the training step adds it to the objective's loss.
        self.aux_loss: torch.Tensor | None = None

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def run_blocks(self, blocks, x: torch.Tensor, *args) -> torch.Tensor:
        """``x = block(x, *args)`` for each of ``blocks`` in turn (modules or any callables).

        With ``activation_checkpointing`` on, while training with grad enabled, each block keeps only its
        inputs for the backward pass and runs its forward again there (non-reentrant
        ``torch.utils.checkpoint``, RNG state restored so dropout repeats): activation memory of one block
        instead of all, for about one more forward pass of compute. Other tensors a block computes (an
        auxiliary loss it stores on itself) still get their gradients. The recomputation may set such an
        attribute again, to an equal value, after ``forward`` has formed ``aux_loss`` from the first one:
        nothing is counted twice."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, *args, use_reentrant=False) if recompute else block(x, *args)
        return x
