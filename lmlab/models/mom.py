"""MoM: Mixture-of-Memories, Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories"
(arXiv 2502.13685), with the released default back-end, the gated delta rule (``mom_gated_deltanet.py``).

Per layer: a router ``p_t = softmax(W_g x_t)`` over M memories picks the top-k, renormalised to weights
``w``. Every memory m has its own k, v, β, α projections (q is shared) and its own state S ∈ R^{d_k x d_v}
per head, updated only on the tokens routed to it by the gated delta rule (Yang et al. 2024, arXiv
2412.06464): ``S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``α = exp(-exp(A_log) softplus(a +
dt_bias))``, ``β = sigmoid(b)``, q and k L2-normalised after a short conv + SiLU. A shared memory sees
every token. Output ``o_t = Σ_{m ∈ topk} w_{t,m} S^mᵀ q_t / sqrt(d_k) + S^sharedᵀ q_t / sqrt(d_k)``, then
a gated RMSNorm per head (``norm(o) ⊙ SiLU(g_proj(x))``) and ``o_proj``. Each block is followed by a
SwiGLU MLP, as the released model.

Routing is computed in masked form: every memory runs over the whole sequence with ``β ← β·1[routed]``
and ``log α ← log α·1[routed]`` (α = 1, β = 0 leave a state unchanged), which equals running each memory
over its gathered tokens only (``mom_mix_gathered``, the test reference). Deviation from the released
code: the short convs of k and v run over the full sequence, not over each memory's compacted sequence.
With capacity 1.0 (the released default) no token is dropped; capacity is not a setting here.

Load balancing (Switch-style, per layer): ``aux = M Σ_e f_e P_e`` with f_e the fraction of (token, choice)
pairs sent to memory e (summed over the k choices) and P_e the mean router probability, over real
(non-pad) tokens. ``forward`` sets ``model.aux_loss = aux_loss_scale · Σ_layers aux``.

The recurrence (``impl``; the kernels are in ``lmlab.models.scan``): ``chunked``, what ``impl: auto`` (the
default) runs everywhere but on CUDA with ``flash-linear-attention``, is the chunkwise-parallel form of the
gated delta rule in plain PyTorch (``chunk_gated_delta_rule``, chunks of ``CHUNK`` = 32 steps): the
WY/UT-transform algorithm of Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule" (arXiv 2412.06464), which adds the decay to Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length" (arXiv 2406.06484); derived in its docstring, written from the
recurrence. Inside a chunk everything is matrix products and one unit-triangular solve; only the state crosses
chunks, in a loop of T/C small products. In-chunk decays are sums of log-decays over segments (never
differences of large cumulative sums), masked before ``exp``, so very negative g neither overflows nor loses
precision. ``recurrent`` is the per-step rule (``gated_delta_rule``), the test oracle (same results, about 5x
slower on a CPU). On CUDA with ``flash-linear-attention`` installed, ``impl: auto`` uses its
``chunk_gated_delta_rule`` Triton kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.layers import CausalDepthwiseConv1d, GatedRMSNorm, NormKind, short_conv
from lmlab.models.mamba import MixerBackbone, MixerBlock
from lmlab.models.scan import (
    chunk_gated_delta_rule,
    fla_chunk_gated_delta_rule,
    gated_delta_rule,
    reference_scan_active,
)
from lmlab.models.spec import ModelSpec
from lmlab.settings import NonNegativeFloat, Optional, Positive, PositiveFloat

IMPLS = ("auto", "chunked", "recurrent")


def _run_memories(q, k, v, beta, g, impl="recurrent"):
    """All memories over the full sequence. q: (b, T, H, dk); k: (b, T, Mt, H, dk); v: (b, T, Mt, H, dv);
    beta, g: (b, T, Mt, H) -> (b, T, Mt, H, dv). ``impl``: auto (the FLA kernel on CUDA when installed,
    else chunked; chunked inside ``reference_scan()``), chunked or recurrent."""
    b, T, Mt, H, dk = k.shape
    dv = v.shape[-1]
    if impl == "auto" and q.is_cuda and fla_chunk_gated_delta_rule is not None and not reference_scan_active():
        fold = lambda t: t.permute(0, 2, 1, 3, 4).reshape(b * Mt, T, H, -1)  # noqa: E731
        qq = q[:, :, None].expand(b, T, Mt, H, dk)
        o, _ = fla_chunk_gated_delta_rule(fold(qq), fold(k), fold(v), fold(g[..., None])[..., 0],
                                          fold(beta[..., None])[..., 0], scale=1.0)
        return o.reshape(b, Mt, T, H, dv).permute(0, 2, 1, 3, 4)
    fold = lambda t: t.permute(0, 2, 3, 1, 4).reshape(b * Mt * H, T, -1)  # noqa: E731
    qq = q[:, :, None].expand(b, T, Mt, H, dk)
    rule = gated_delta_rule if impl == "recurrent" else chunk_gated_delta_rule
    o = rule(fold(qq), fold(k), fold(v), fold(beta[..., None])[..., 0], fold(g[..., None])[..., 0])
    return o.reshape(b, Mt, H, T, dv).permute(0, 3, 1, 2, 4)


def mom_mix_masked(q, k, v, beta, g, weights, shared: bool, impl: str = "recurrent"):
    """The mixed memory read-out in masked form. ``weights``: (b, T, M) routing weights, zero where a
    token is not routed to a memory; k, v, beta, g hold M (+1 shared, last) memories. -> (b, T, H, dv)."""
    M = weights.shape[-1]
    routed = (weights > 0).to(beta.dtype)
    if shared:
        routed = torch.cat([routed, routed.new_ones(*routed.shape[:2], 1)], dim=-1)
    o = _run_memories(q, k, v, beta * routed[..., None], g * routed[..., None], impl)
    out = torch.einsum("btm,btmhv->bthv", weights, o[:, :, :M])
    return out + o[:, :, M] if shared else out


def mom_mix_gathered(q, k, v, beta, g, weights, shared: bool):
    """The same read-out by gather/scatter: each memory runs its recurrence only over the tokens routed to
    it (compacted, per row), and its outputs are scattered back and weighted."""
    b, T, H, _ = q.shape
    M, dv = weights.shape[-1], v.shape[-1]
    out = q.new_zeros(b, T, H, dv)
    for m in range(M + int(shared)):
        for r in range(b):
            idx = torch.arange(T) if m == M else (weights[r, :, m] > 0).nonzero()[:, 0]
            if len(idx) == 0:
                continue
            fold = lambda t: t.transpose(0, 1)  # noqa: E731  (T', H, ...) -> (H, T', ...)
            o = gated_delta_rule(fold(q[r, idx]), fold(k[r, idx, m]), fold(v[r, idx, m]), fold(beta[r, idx, m]),
                                 fold(g[r, idx, m]))                               # (H, T', dv)
            w = 1.0 if m == M else weights[r, idx, m][:, None, None]
            out[r, idx] += w * o.transpose(0, 1)
    return out


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """``M Σ_e f_e P_e`` over real tokens: probs (b, T, M), topk_idx (b, T, k), padding (b, T) True on real
    tokens (None: all real). Uniform probabilities give exactly k."""
    M = probs.shape[-1]
    real = probs.new_ones(probs.shape[:2]) if padding is None else padding.to(probs.dtype)
    n = real.sum().clamp(min=1)
    counts = F.one_hot(topk_idx, M).to(probs.dtype).sum(2)                          # (b, T, M)
    f = (counts * real[..., None]).sum((0, 1)) / n
    P = (probs * real[..., None]).sum((0, 1)) / n
    return M * (f * P).sum()


class MoMMixer(nn.Module):
    """The MoM gated-delta-rule mixer (D -> D); ``forward`` stores this layer's balancing loss in ``aux``."""

    def __init__(self, d_model: int, n_heads: Positive = 2, head_dim: int = 32, expand_v: float = 1.0,
                 num_memories: int = 4, top_k: Positive = 2, shared_memory: bool = True, d_conv: Positive = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise UserError(f"unknown mom impl {impl!r}: choose one of {', '.join(IMPLS)}.")
        if not 1 <= top_k <= num_memories:
            raise UserError(f"mom top_k={top_k} must be between 1 and num_memories={num_memories}: change one.")
        self.H, self.dk, self.dv = n_heads, head_dim, int(head_dim * expand_v)
        self.M, self.top_k, self.shared, self.impl = num_memories, top_k, shared_memory, impl
        self.Mt = num_memories + int(shared_memory)
        H, dk, dv, Mt = self.H, self.dk, self.dv, self.Mt
        self.router = nn.Linear(d_model, num_memories, bias=False)
        self.q_proj = nn.Linear(d_model, H * dk, bias=False)
        self.kv_proj = nn.Linear(d_model, Mt * H * (dk + dv), bias=False)      # each memory's k and v
        self.ba_proj = nn.Linear(d_model, Mt * H * 2, bias=False)             # each memory's β and α gates
        self.q_conv = CausalDepthwiseConv1d(H * dk, d_conv)
        self.kv_conv = CausalDepthwiseConv1d(Mt * H * (dk + dv), d_conv)
        dt = torch.exp(torch.rand(Mt, H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(Mt, H).uniform_(1, 16)))
        self.g_proj = nn.Linear(d_model, H * self.dv, bias=False)
        self.o_norm = GatedRMSNorm(H * self.dv, group=self.dv, norm_before_gate=True)
        self.o_proj = nn.Linear(H * self.dv, d_model, bias=False)
        self.o_proj.is_residual_proj = True
        self.aux: torch.Tensor | None = None

    def _route(self, x: torch.Tensor):
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return probs, idx, weights

    def _gates(self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor):
        lead, H, dk, dv, Mt = x.shape[:-1], self.H, self.dk, self.dv, self.Mt
        q = F.normalize(q.reshape(*lead, H, dk).float(), dim=-1) / math.sqrt(dk)
        kv = kv.reshape(*lead, Mt, H, dk + dv).float()
        k, v = F.normalize(kv[..., :dk], dim=-1), kv[..., dk:]
        b, a = self.ba_proj(x).float().reshape(*lead, Mt, H, 2).unbind(-1)
        beta = torch.sigmoid(b)
        g = -torch.exp(self.A_log.float()) * F.softplus(a + self.dt_bias)
        return q, k, v, beta, g

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        o = o.reshape(*o.shape[:-2], self.H * self.dv).to(x.dtype)
        return self.o_proj(self.o_norm(o, self.g_proj(x)))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        probs, idx, weights = self._route(x)
        self.aux = load_balancing_loss(probs, idx, padding)
        q, k, v, beta, g = self._gates(x, short_conv(self.q_conv, self.q_proj(x)),
                                       short_conv(self.kv_conv, self.kv_proj(x)))
        o = mom_mix_masked(q, k, v, beta, g, weights, self.shared, self.impl)
        return self._out(x, o)

    def init_state(self, batch_size: int, device=None, dtype=None):
        return (self.q_conv.init_cache(batch_size, device, dtype), self.kv_conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size * self.Mt * self.H, self.dk, self.dv, device=device, dtype=torch.float32))

    def step(self, x: torch.Tensor, state):
        q_state, kv_state, S = state
        _, _, weights = self._route(x)
        qc, q_state = self.q_conv.step(self.q_proj(x), q_state)
        kvc, kv_state = self.kv_conv.step(self.kv_proj(x), kv_state)
        q, k, v, beta, g = self._gates(x, F.silu(qc), F.silu(kvc))               # q (b, H, dk), k (b, Mt, H, dk)
        routed = (weights > 0).float()
        if self.shared:
            routed = torch.cat([routed, routed.new_ones(routed.shape[0], 1)], dim=-1)
        beta, g = beta * routed[..., None], g * routed[..., None]
        qq = q[:, None].expand_as(k)
        o, S = gated_delta_rule(qq.reshape(-1, 1, self.dk), k.reshape(-1, 1, self.dk), v.reshape(-1, 1, self.dv),
                                beta.reshape(-1, 1), g.reshape(-1, 1), S0=S, return_state=True)
        o = o.reshape(x.shape[0], self.Mt, self.H, self.dv)
        out = torch.einsum("bm,bmhv->bhv", weights, o[:, :self.M])
        if self.shared:
            out = out + o[:, self.M]
        return self._out(x, out), (q_state, kv_state, S)

    def per_memory_parameters(self) -> int:
        """Weights of one memory: its k, v, β, α projections, its conv channels, its A_log and dt_bias."""
        per = self.H * (self.dk + self.dv)
        return (self.kv_proj.in_features * per + self.kv_conv.conv.weight[:per].numel() + per
                + self.ba_proj.in_features * 2 * self.H + 2 * self.H)

    def scan_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the recurrence, counted for the memories a token actually updates
        (top_k + shared): per head decay d_k·d_v, Sᵀk 2 d_k·d_v, rank-1 update 2 d_k·d_v, read 2 d_k·d_v."""
        return 7.0 * (self.top_k + int(self.shared)) * self.H * self.dk * self.dv


class MoM(MixerBackbone):
    """MoM language model: ``n_layers`` blocks of (MoM mixer, SwiGLU MLP), RMSNorm, tied head.

    Args: ``d_model``, ``n_layers``, ``n_heads``, ``head_dim`` (d_k), ``expand_v`` (d_v / d_k),
    ``num_memories`` (M), ``top_k``, ``shared_memory``, ``d_conv``, ``d_ff`` (null: 2 d_model, the released
    hidden_ratio 3 times SwiGLU's 2/3), ``aux_loss_scale`` (weight of the balancing loss), ``impl`` (auto,
    chunked or recurrent; see the module docstring), ``norm``, ``tie_embeddings``, ``activation_checkpointing``
    (recompute each block in the backward pass while training; the balancing loss keeps its value and
    gradient, see ``Backbone.run_blocks``).
    """

    spec = ModelSpec(block=MixerBlock, lora=("q_proj", "kv_proj", "g_proj", "o_proj", "up", "gate", "down"),
                     ia3=("q_proj", "kv_proj", "down"), ia3_feedforward=("down",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 n_heads: Positive = 2, head_dim: Positive = 32, expand_v: PositiveFloat = 1.0,
                 num_memories: Positive = 4, top_k: Positive = 2, shared_memory: bool = True, d_conv: Positive = 4,
                 d_ff: Optional[Positive] = None, aux_loss_scale: NonNegativeFloat = 0.01, impl: str = "auto",
                 norm: NormKind = "rmsnorm", tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        def make_mixer():
            return MoMMixer(d_model, n_heads, head_dim, expand_v, num_memories, top_k, shared_memory, d_conv, impl)

        super().__init__(vocab_size, attention, d_model, n_layers, make_mixer, norm=norm,
                         d_ff=d_ff or 2 * d_model, mlp="swiglu", tie_embeddings=tie_embeddings,
                         activation_checkpointing=activation_checkpointing)
        self.aux_loss_scale = aux_loss_scale

    def forward(self, input_ids: torch.Tensor, attention: Attention | None = None) -> torch.Tensor:
        hidden = super().forward(input_ids, attention)
        self.aux_loss = self.aux_loss_scale * sum(block.mixer.aux for block in self.blocks)
        return hidden

    def flops_per_token(self, seq_len: int) -> float:
        """As ``MixerBackbone.flops_per_token``, with the weights of the memories a token is not routed to
        (M - top_k per layer) left out of N, as for a mixture of experts."""
        inactive = sum((m.M - m.top_k) * m.per_memory_parameters() for m in (b.mixer for b in self.blocks))
        return super().flops_per_token(seq_len) - 6.0 * inactive

    def sparse_targets(self) -> list[tuple[str, nn.Linear, float]]:
        """Every block matrix; the per-memory projections (k, v, beta, alpha) used for ``top_k`` (plus the shared)
        of the memories, as ``flops_per_token`` counts them."""
        out = []
        for name, m, uses in super().sparse_targets():
            if name.endswith((".kv_proj", ".ba_proj")):
                mixer = self.blocks[int(name.split(".")[1])].mixer
                uses = (mixer.Mt - (mixer.M - mixer.top_k)) / mixer.Mt
            out.append((name, m, uses))
        return out
