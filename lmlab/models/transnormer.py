"""TransNormerLLM with Lightning Attention: linear attention with exponential decay, block-wise.

Qin et al., "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer"
(arXiv 2307.14995) and "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models" (arXiv 2401.04658). Causal only.

Layer (as the released TransNormerLLM code): ``x + NormLinearAttention(SRMSNorm(x))`` then
``x + GLU(SRMSNorm(x))``, where GLU has no activation (``down(l1 x * l2 x)``). NormLinearAttention:
``q, k, v, u = proj(x)``; ``q, k = SiLU(q), SiLU(k)``; optional LRPE on q and k; per head h

    o_i = sum_{j <= i} lambda_h^(i - j) (q_i . k_j) v_j        (no softmax, no denominator)

then ``o = SRMSNorm(o) * u`` per token (over all heads) and an output projection.

Decay ``lambda_h = exp(-s_h)``, ``decay`` chooses the formula (layer l of L, head h of H):
``alibi_layerwise`` (released code): ``s_h = 2^(-8(h+1)/H) * (1 - l/(L-1) + 1e-5)`` (the last layer
barely decays; with one layer the factor is 1); ``paper``: ``s_h = (8h/H) * (1 - l/L)`` (head 0 does not
decay), as FLA's ``chunk_lightning_attn``.

LRPE (``lrpe: true``, every layer; the release enables it per layer): ``x_n -> [x_n cos(theta n),
x_n sin(theta n)]`` with learnable ``theta_i`` initialised at ``10000^(-2i/d)``, so ``q_n . k_m`` depends on
``n - m`` only; it doubles the q/k head size.

Lightning Attention-2 (``lightning_attention``, in ``lmlab.models.scan``): the sequence is cut into blocks of
``block_size``; inside a block the masked quadratic form ``[(Q_b K_b^T) * D] V_b`` with ``D_ij = lambda^(i-j)
[i >= j]``; across blocks a (d_k x d_v) state ``KV = sum_{j < start} lambda^(start-1-j) k_j v_j^T`` read as
``(Q_b * lambda^(1..B)) KV`` and updated ``KV <- lambda^B KV + (K_b * lambda^(B-1..0))^T V_b``. A partial last
block is zero-padded (zero keys add nothing). ``step`` is the recurrence ``S = lambda S + k v^T; o = q S``.
The Triton kernels (``lightning-attn``, FLA) are not wired in: this is the pure-PyTorch path on every device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import GLU, SimpleRMSNorm
from lmlab.models.scan import lightning_attention
from lmlab.models.spec import ModelSpec
from lmlab.settings import Fraction, Optional, Positive

DECAYS = ("alibi_layerwise", "paper")


def decay_rates(kind: str, n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """The per-head decay exponents ``s_h`` (``lambda_h = exp(-s_h)``) of layer ``layer``."""
    h = torch.arange(n_heads, dtype=torch.float64)
    if kind == "alibi_layerwise":
        factor = 1.0 - layer / (n_layers - 1) + 1e-5 if n_layers > 1 else 1.0
        return (2.0 ** (-8.0 * (h + 1) / n_heads) * factor).float()
    if kind == "paper":
        return (8.0 * h / n_heads * (1.0 - layer / n_layers)).float()
    raise UserError(f"unknown model.decay {kind!r}: choose one of {', '.join(DECAYS)}.")


class LRPE(nn.Module):
    """Linearized relative positional encoding: ``x_n -> [x_n cos(theta n), x_n sin(theta n)]``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(10000.0 ** (-2.0 * torch.arange(head_dim, dtype=torch.float32) / head_dim))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, H, T, d) at positions offset .. offset+T-1 -> (B, H, T, 2d)."""
        n = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        angle = (n[:, None] * self.theta[None]).to(x.dtype)
        return torch.cat([x * angle.cos(), x * angle.sin()], dim=-1)


class NormLinearAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, s: torch.Tensor, lrpe: bool, block_size: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.block_size = n_heads, d_model // n_heads, block_size
        self.qkvu = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.is_residual_proj = True
        self.norm = SimpleRMSNorm(d_model)
        self.lrpe = LRPE(self.head_dim) if lrpe else None
        self.register_buffer("s", s, persistent=False)

    def _project(self, x: torch.Tensor, offset: int):
        B, T, D = x.shape
        q, k, v, u = self.qkvu(x).view(B, T, 4, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = nn.functional.silu(q), nn.functional.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        return q, k, v, u

    def _finish(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o.shape
        o = self.norm(o.transpose(1, 2).reshape(B, T, H * d)) * u.transpose(1, 2).reshape(B, T, H * d)
        return self.out(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, u = self._project(x, 0)
        return self._finish(lightning_attention(q, k, v, self.s, self.block_size), u)

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, tuple]:
        """(B, d_model) at position ``pos`` with state ``(S, pos)`` -> output, ``(S', pos + 1)``."""
        kv, pos = state
        q, k, v, u = self._project(x[:, None], pos)  # (B, H, 1, d)
        lam = torch.exp(-self.s).to(x.dtype)[None, :, None, None]
        kv = lam * kv + k.transpose(-1, -2) @ v
        return self._finish(q @ kv, u)[:, 0], (kv, pos + 1)


class TNLBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, s: torch.Tensor, lrpe: bool, block_size: int,
                 dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = SimpleRMSNorm(d_model), SimpleRMSNorm(d_model)
        self.attn = NormLinearAttention(d_model, n_heads, s, lrpe, block_size)
        self.mlp = GLU(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[torch.Tensor, int]:
        """The attention state ``(S, position)``: S (B, H, d_qk, d_v) zeros at position 0."""
        attn = self.attn
        d_qk = attn.head_dim * (2 if attn.lrpe is not None else 1)
        return torch.zeros(batch_size, attn.n_heads, d_qk, attn.head_dim, device=device, dtype=dtype), 0

    def step(self, x: torch.Tensor, state):
        a, state = self.attn.step(self.norm1(x), state)
        x = x + a
        return x + self.mlp(self.norm2(x)), state


class TransNormer(Backbone):
    """TransNormerLLM backbone. Args: ``d_model``, ``n_layers``, ``n_heads``, ``d_ff`` (GLU hidden size,
    default ``4 * d_model``), ``decay`` (alibi_layerwise or paper), ``lrpe``, ``block_size`` (Lightning
    Attention block), ``dropout``, ``tie_embeddings``, ``activation_checkpointing`` (recompute each block in the
    backward pass while training). Init: N(0, 0.02), residual projections scaled by
    ``1/sqrt(2 n_layers)`` (as the Transformer). ``init_state(batch)`` / ``step(ids, state)`` decode one
    token at a time with the recurrent state and equal ``forward``."""

    supported_attention = (CAUSAL,)

    spec = ModelSpec(block=TNLBlock, lora=("qkvu", "out", "l1", "l2", "down"), ia3=("qkvu", "down"),
                     ia3_feedforward=("down",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 n_heads: Positive = 4, d_ff: Optional[Positive] = None, decay: str = "alibi_layerwise",
                 lrpe: bool = False, block_size: Positive = 64, dropout: Fraction = 0.0, tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        if d_model % n_heads:
            raise UserError(f"d_model={d_model} is not a multiple of n_heads={n_heads}: change one of them.")
        if block_size < 1:
            raise UserError(f"model.block_size={block_size} must be at least 1: raise it.")
        self.n_layers, self.n_heads, self.d_ff = n_layers, n_heads, d_ff or 4 * d_model
        self.lrpe, self.block_size = lrpe, block_size
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TNLBlock(d_model, n_heads, self.d_ff, decay_rates(decay, n_heads, i, n_layers), lrpe, block_size, dropout)
            for i in range(n_layers))
        self.add_head(SimpleRMSNorm(d_model), tie_embeddings)
        resid_std = 0.02 / math.sqrt(2 * n_layers)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, resid_std if getattr(m, "is_residual_proj", False) else 0.02)

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) -> (B, T, d_model). Rows are right-padded, so causal outputs never see a pad."""
        if attention.kind != CAUSAL:
            raise UserError(f"model TransNormer cannot attend {attention.kind!r}: use a causal objective.")
        x = self.run_blocks(self.blocks, self.emb_dropout(self.embed(input_ids)))
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward, 2 per multiply-add):

            6 * N + 6 * d_model * vocab_size + 3 * n_layers * H * (2 * b * (d_qk + d_v) + 4 * d_qk * d_v)

        N = parameters outside the embedding/head (each weight is used once per token); per layer and head,
        the intra-block part costs 2 * b * (d_qk + d_v) forward FLOPs (scores and weighted sum over the
        full b = min(block_size, seq_len) block, masked half included) and the inter-block part
        4 * d_qk * d_v (reading and updating the state), with d_qk = 2 d_v under LRPE. Norms, gates,
        decays are ignored."""
        n = self.non_embedding_parameters()
        dv = self.d_model // self.n_heads
        dk = dv * (2 if self.lrpe else 1)
        b = min(self.block_size, seq_len)
        attn = self.n_layers * self.n_heads * (2 * b * (dk + dv) + 4 * dk * dv)
        return float(6 * n + 6 * self.d_model * self.vocab_size + 3 * attn)
