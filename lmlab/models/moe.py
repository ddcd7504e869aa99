"""The Transformer with a mixture-of-experts feed-forward block: top-k routing with a load-balancing loss.

Switch Transformers (Fedus, Zoph, Shazeer 2021, arXiv 2101.03961) for top-1 routing and its auxiliary
loss; GShard (Lepikhin et al. 2020, arXiv 2006.16668) for top-2 routing with renormalised gates and
capacity-limited dispatch in order of choice. Every block of ``lmlab.models.transformer.Transformer``
keeps its attention (causal, bidirectional or prefix); only its MLP becomes ``MoEMLP``.

Routing, per token x (all tokens of the batch, padding included, form one routing group):

* ``p = softmax(W_r x)`` over E experts (in fp32); the experts are the ``top_k`` largest ``p_e``
  (ties: the lower index). Gates: with ``top_k == 1`` the raw probability ``p_e`` (Switch: renormalising
  one gate would make it 1 and cut the router's gradient); with ``top_k > 1`` the chosen probabilities
  renormalised to sum to 1 (GShard, Mixtral).
* Capacity (``capacity_factor`` c, ``null`` = unlimited): each expert takes at most
  ``C = ceil(c * N * top_k / E)`` of the N tokens' assignments. Slots are filled by choice rank first
  (every token's first choice before any second choice), then by token order; an assignment that finds
  its expert full is dropped (it contributes nothing; the residual stream carries the token on). Note
  that dropping lets one token's routing depend on other tokens of the batch, later ones included,
  so a causal model with a finite capacity is not exactly causal; the default is unlimited capacity.
* Output: ``y = sum over kept assignments of gate * expert_e(x)``; each expert is the dense ``MLP`` of
  ``lmlab.models.layers`` with ``d_ff`` hidden units (default ``4 * d_model``, as each Switch expert).
* Load-balancing loss per layer (Switch eq. 4, extended to top-k as in the MoM reference code):
  ``E * sum_k sum_e f_{k,e} * P_e``, with ``f_{k,e}`` the fraction of tokens whose k-th choice is e
  (before capacity drops) and ``P_e`` the mean router probability of expert e. It is ``top_k`` when
  routing is uniform. ``model.aux_loss = aux_loss_coef * mean over layers`` is set by every forward;
  the training step adds it to the objective's loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.models.layers import MLP, MLPKind
from lmlab.models.spec import ModelSpec
from lmlab.models.transformer import Block, Transformer
from lmlab.settings import Fraction, NonNegativeFloat, Optional, Positive, PositiveFloat


def route(probs: torch.Tensor, top_k: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, E) router probabilities -> ``(experts, gates, keep)``, each (N, top_k): the chosen experts in
    order of preference, their gates, and whether the assignment found room under ``capacity``."""
    top_p, experts = probs.topk(top_k, dim=-1)  # sorted, ties broken towards the lower index
    gates = top_p if top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    if capacity is None:
        return experts, gates, torch.ones_like(experts, dtype=torch.bool)
    E = probs.shape[-1]
    # position of each assignment in its expert's queue: rank-major, then token order
    onehot = F.one_hot(experts.t().reshape(-1), E)  # (top_k * N, E), rank-major
    position = (onehot.cumsum(0) - 1).gather(1, experts.t().reshape(-1, 1)).view(top_k, -1).t()
    return experts, gates, position < capacity


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_{k,e} f_{k,e} P_e`` for (N, E) probabilities and (N, k) choices."""
    N, E = probs.shape
    f = F.one_hot(experts, E).float().mean(0)  # (k, E): fraction of tokens whose k-th choice is e
    return E * (f * probs.mean(0)[None]).sum()


class MoEMLP(nn.Module):
    """A router and ``n_experts`` dense MLPs; ``forward`` stores this layer's balance loss in ``self.aux``."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, capacity_factor: float | None,
                 mlp: MLPKind = "gelu", dropout: Fraction = 0.0) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.router.is_readout = True  # an output weight (fan-out fixed) under muP, not a hidden one
        self.router_mult = 1.0  # the factor on the router's scores (muP's output multiplier), set by the model
        self.experts = nn.ModuleList(MLP(d_model, d_ff, mlp, dropout) for _ in range(n_experts))
        self.aux: torch.Tensor | None = None

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = self.router(flat)
        if self.router_mult != 1.0:
            scores = scores * self.router_mult
        probs = F.softmax(scores.float(), dim=-1)
        experts, gates, keep = route(probs, self.top_k, self.capacity(flat.shape[0]))
        self.aux = balance_loss(probs, experts)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((experts == e) & keep, as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * gates[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        return out.view(shape)


class MoETransformer(Transformer):
    """``Transformer`` whose blocks use ``MoEMLP``. Extra args: ``n_experts``, ``top_k``,
    ``capacity_factor`` (``null`` = no token is dropped), ``aux_loss_coef`` (Switch's alpha, 0.01);
    ``d_ff`` is each expert's hidden size. Under ``parametrization=mup`` or ``completep`` the experts are hidden
    weights and the router an output weight (initialisation and learning rate kept, scores times
    ``base_width / d_model``). Every other argument is the Transformer's (with
    ``activation_checkpointing`` the balancing loss keeps its value and gradient: see ``Backbone.run_blocks``)."""

    supported_attention = (CAUSAL, BIDIRECTIONAL, PREFIX)

    # the Transformer's blocks and targets (the routers are never adapted); other weights than the Transformer's
    # (no Hugging Face mapping) and no widening
    spec = ModelSpec(block=Block, lora=("qkv", "out", "up", "gate", "down"), ia3=("qkv", "down"),
                     ia3_feedforward=("down",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 n_heads: Positive = 4, d_ff: Optional[Positive] = None, n_experts: Positive = 4, top_k: Positive = 2,
                 capacity_factor: Optional[PositiveFloat] = None, aux_loss_coef: NonNegativeFloat = 0.01,
                 mlp: MLPKind = "gelu", dropout: Fraction = 0.0, **kwargs) -> None:
        if not 1 <= top_k <= n_experts:
            raise UserError(f"model.top_k={top_k} must be between 1 and model.n_experts={n_experts}: change one "
                            "of them.")
        if capacity_factor is not None and capacity_factor <= 0:
            raise UserError(f"model.capacity_factor={capacity_factor} must be positive (or null for no limit): "
                            "change it.")
        expert_ff = d_ff or 4 * d_model
        super().__init__(vocab_size, attention, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         d_ff=expert_ff, mlp=mlp, dropout=dropout,
                         ffn_factory=lambda i: MoEMLP(d_model, expert_ff, n_experts, top_k, capacity_factor,
                                                      mlp, dropout),
                         **kwargs)
        self.n_experts, self.top_k, self.aux_loss_coef = n_experts, top_k, aux_loss_coef
        for block in self.blocks:  # the router is a readout: muP multiplies its scores as the logits
            block.mlp.router_mult = self.output_mult

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        hidden = super().forward(input_ids, attention)
        self.aux_loss = self.aux_loss_coef * torch.stack([b.mlp.aux for b in self.blocks]).mean()
        return hidden

    def flops_per_token(self, seq_len: int) -> float:
        """The Transformer's formula with N = the parameters a token actually uses: every expert that a
        token is not routed to (``n_experts - top_k`` per layer) is subtracted. The router's matmul is
        counted (it is in N); the dispatch itself is ignored."""
        per_expert = sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
        unused = self.n_layers * (self.n_experts - self.top_k) * per_expert
        return super().flops_per_token(seq_len) - 6.0 * unused

    def sparse_targets(self) -> list[tuple[str, nn.Linear, float]]:
        """Every block matrix, the experts' used by ``top_k / n_experts`` of the tokens (as ``flops_per_token``
        counts them)."""
        share = self.top_k / self.n_experts
        return [(name, m, share if ".experts." in name else uses) for name, m, uses in super().sparse_targets()]
