"""The backbone contract: the skeleton every architecture shares.

A backbone maps token ids to hidden states (``forward(input_ids, attention) -> (B, T, d_model)``) and
owns an LM head (``logits(hidden)``). It declares which attention patterns it can honour; asked for
another at construction, it refuses with one sentence, before any data is generated.

``Backbone`` holds what every model writes the same way: the token embedding ``embed`` (created by
``__init__``), the final norm ``norm`` and the LM head ``head`` (created by ``add_head``, once the blocks
exist, tied to the embedding or not), ``logits``, parameter counts, ``device``, ``run_blocks`` (activation
checkpointing) and, for models whose blocks decode one token at a time, ``init_state``/``step``. A model
file holds its blocks, its initialisation, its ``forward`` and ``flops_per_token``.

For sparse pretraining (``lmlab.models.sparsity``, SPDF: fixed random masks on the block matrices, a treatment
that training applies), ``sparse_targets`` names the matrices a sparsity masks and ``sparse_flops_per_token`` the
FLOPs a sparse kernel would need.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.attention import CAUSAL
from lmlab.errors import UserError
from lmlab.models.sparsity import masked_entries_per_token


class Backbone(nn.Module):
    """Base class of every architecture.

    A subclass sets ``supported_attention`` and, in its constructor:

    1. calls ``super().__init__(vocab_size, d_model, attention, activation_checkpointing)`` first (the last a
       constructor argument of every model): it checks the attention pattern and creates the token embedding
       ``self.embed`` (``nn.Embedding(vocab_size, d_model)``, PyTorch's default initialisation);
    2. builds its blocks (typically ``self.blocks``, run through ``run_blocks``, which honours activation
       checkpointing);
    3. calls ``self.add_head(norm, tie_embeddings)``, which sets the final norm ``self.norm`` (``None`` for
       none) and creates the LM head ``self.head`` (``nn.Linear(d_model, vocab_size, bias=False)``), tied to
       the embedding when asked;
    4. initialises its weights as its paper does.

    It implements ``forward(input_ids, attention)`` and ``flops_per_token(seq_len)``. A recurrent model whose
    blocks have ``init_state(batch_size, device, dtype)`` and ``step(x, state)`` gets token-by-token decoding
    (``init_state``, ``step``) from this class. The order of these steps is the order in which parameters are
    created and random numbers drawn: it fixes every model's initialisation for a given seed.
    """

    supported_attention: tuple[str, ...] = (CAUSAL,)
    # the factor on the logits (``lmlab.models.parametrization``: muP's output multiplier); 1 leaves them as is
    output_mult: float = 1.0

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
        self.embed = nn.Embedding(vocab_size, d_model)

    def add_head(self, norm: nn.Module | None, tie_embeddings: bool = True) -> None:
        """The final norm (``None``: no norm) and the LM head, tied to the token embedding with
        ``tie_embeddings`` (then one matrix serves both). Called once the blocks are built."""
        self.norm = norm
        self.head = nn.Linear(self.d_model, self.vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (``lmlab.models.parametrization``; ``lmlab.optim.decay_groups``
        puts them into the optimiser's groups); a parameter not named trains at the optimiser's rate."""
        return {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d_model) hidden states -> (..., vocab_size), times ``output_mult`` where it is not 1."""
        logits = self.head(hidden)
        return logits if self.output_mult == 1.0 else logits * self.output_mult

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def non_embedding_parameters(self) -> int:
        """Parameters outside the embeddings (token, and learned positions where a model has them) and the
        LM head: the weights a token's forward pass multiplies once each, for the FLOP counts."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} | {id(self.head.weight)}
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if id(p) not in skip)

    def sparse_targets(self) -> list[tuple[str, nn.Linear, float]]:
        """The weight matrices that a training ``sparsity`` masks, as ``(name, module, uses)``: ``uses`` is the share of
        tokens that multiply the matrix, as ``flops_per_token`` counts it (1 for a matrix every token passes
        through). By default every ``nn.Linear`` under ``self.blocks`` (never the embedding or the LM head); a
        model overrides this where its blocks live elsewhere or a token uses only some of them."""
        blocks = getattr(self, "blocks", None)
        if not isinstance(blocks, nn.Module):
            return []
        return [(f"blocks.{name}", m, 1.0) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]

    def sparse_flops_per_token(self, seq_len: int, sparsity: float) -> float:
        """``flops_per_token`` less 6 FLOPs for every weight a token multiplies that ``sparsity`` masks (forward,
        input gradient and weight gradient: 2 each): the sparse-ideal training FLOPs, the pretraining budget as
        SPDF counts it. Equal to ``flops_per_token`` at sparsity 0. Dense kernels multiply the zeros anyway: the
        executed FLOPs, and the time a step takes, are ``flops_per_token``."""
        return self.flops_per_token(seq_len) - 6.0 * masked_entries_per_token(self, sparsity)

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

    # ----- token-by-token decoding, for models whose blocks carry a recurrent state -----

    @property
    def decodes_by_step(self) -> bool:
        """Whether ``init_state``/``step`` decode token by token: every block has a ``step`` (a model with its
        own recurrence, e.g. the LSTM, overrides this with its ``step``)."""
        blocks = getattr(self, "blocks", None)
        return blocks is not None and all(hasattr(block, "step") for block in blocks)

    def init_state(self, batch_size: int, device=None, dtype=None) -> list:
        """The recurrent state before the first token, one entry per block (each block's ``init_state``);
        on the model's device and in its embedding's dtype unless given. Only where ``decodes_by_step``."""
        if not self.decodes_by_step:
            raise TypeError(f"model {type(self).__name__} does not decode token by token: check decodes_by_step")
        device = device or self.device
        dtype = dtype or self.embed.weight.dtype
        return [block.init_state(batch_size, device, dtype) for block in self.blocks]

    def step(self, token_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per row: (B,) ids and the state -> (B, d_model) hidden (as ``forward`` at that
        position) and the next state: the embedding, each block's ``step``, the final norm."""
        x = self.embed(token_ids)
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_state.append(s)
        return self.norm(x), new_state
