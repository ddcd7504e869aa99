"""A pre-LN decoder/encoder Transformer (Vaswani et al. 2017, arXiv 1706.03762; pre-LN as in GPT-2,
Radford et al. 2019) that honours causal, bidirectional and prefix attention.

One stack serves every objective: the attention pattern comes with each batch (``Attention``), so the
same weights can run as a causal LM (GPT), a masked LM (BERT) or a prefix LM (T5/UniLM-style).

Beyond the training length a causal model can attend through a sliding window with attention sinks
(StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): the record's ``window`` keeps the last ``window`` keys of
each query plus the first ``sinks`` (``model.sinks``, 4 as in the paper, unless the record says otherwise). With
rotary positions and ``cache_positions`` (the paper's scheme), the sink keys are scored as if the query sat at
its slot of a rolling cache of ``sinks + window`` entries (``min(i, sinks + window - 1)``), while the window keys
keep their true distances (the same in the cache, where they are contiguous); this is an explicit softmax over
the window scores and the sink scores together (``_attend_with_sinks``), not the fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLP, MLPKind, NormKind, Rotary, make_norm
from lmlab.settings import Fraction, NonNegative, Positive

POSITIONS = ("rotary", "learned")


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, rotary: Rotary | None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.is_residual_proj = True
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = rotary
        # ``inspect(q, k, mask, is_causal)``, when set (``lmlab.training.stats``, on the steps it records), sees
        # the queries and keys (B, H, T, d_head) that the attention kernel reads
        self.inspect: Callable | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                stream: tuple[int, int] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        if stream is not None and self.rotary is not None:
            y = self._attend_with_sinks(qkv, mask, *stream)
        elif self.rotary is not None:  # queries and keys rotated together, in one set of kernels
            qk, v = qkv.split([2, 1], dim=2)  # split's backward is one cat (slicing's: zeros + copies)
            q, k = self.rotary(qk).permute(2, 0, 3, 1, 4)
            v = v.squeeze(2).transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if stream is None or self.rotary is None:
            if self.inspect is not None:
                self.inspect(q, k, mask, is_causal)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, D)))

    def _attend_with_sinks(self, qkv: torch.Tensor, allowed: torch.Tensor, sinks: int,
                           window: int) -> torch.Tensor:
        """Attention over ``allowed`` (the window and sink mask) with the sink keys at cache positions: the
        window keys scored with queries at their own positions, the sink keys (``j < sinks``, outside the
        window) with each query rotated to cache slot ``min(i, sinks + window - 1)``; one softmax over both."""
        T = qkv.shape[1]
        sinks = min(sinks, T)
        qk, v = qkv.split([2, 1], dim=2)
        q, k = self.rotary(qk).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        v = v.squeeze(2).transpose(1, 2)
        slot = torch.arange(T, device=qkv.device).clamp(max=sinks + window - 1)
        q_slot = self.rotary.rotate_at(qk[:, :, 0], slot).transpose(1, 2)
        i = torch.arange(T, device=qkv.device)
        near = (i[:, None] - i[None, :]) < window
        scale = 1.0 / math.sqrt(self.head_dim)
        s_near = (q @ k.transpose(-1, -2)).float().mul(scale).masked_fill(~(allowed & near), float("-inf"))
        s_sink = (q_slot @ k[:, :, :sinks].transpose(-1, -2)).float().mul(scale)
        s_sink = s_sink.masked_fill(~(allowed[..., :sinks] & ~near[:, :sinks]), float("-inf"))
        w = torch.softmax(torch.cat([s_near, s_sink], dim=-1), dim=-1).to(v.dtype)
        return w[..., :T] @ v + w[..., T:] @ v[:, :, :sinks]


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: str, mlp: str, dropout: float,
                 rotary: Rotary | None, ffn: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, rotary)
        self.norm2 = make_norm(norm, d_model)
        # ``ffn`` replaces the dense MLP (a mixture of experts, say); it maps (B, T, d) -> (B, T, d)
        self.mlp = ffn if ffn is not None else MLP(d_model, d_ff, mlp, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                stream: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, is_causal, stream)
        return x + self.mlp(self.norm2(x))


class Transformer(Backbone):
    """Pre-LN Transformer backbone.

    Args: ``vocab_size`` and ``attention`` (the objective's pattern) come from the pipeline;
    ``d_model``, ``n_layers``, ``n_heads``, ``head_dim`` (if set, the heads' size: ``n_heads = d_model //
    head_dim``, so the head size stays fixed when the width changes; it wins over ``n_heads`` when both are
    given), ``d_ff`` (default ``4 * d_model``), ``norm`` (rmsnorm or
    layernorm), ``positions`` (rotary or learned; learned positions cover ``max_len`` tokens),
    ``mlp`` (gelu or swiglu), ``dropout`` (attention, residual and embedding dropout),
    ``tie_embeddings`` (the LM head reuses the token embedding), ``activation_checkpointing``
    (recompute each block in the backward pass while training), ``rope_base`` (the rotary base, 10000 as in
    RoFormer; rotary positions only), ``sinks`` (the first positions every query keeps under sliding-window
    attention, see the module docstring; full attention, as in training, never reads it).
    ``ffn_factory(layer_index)``, for
    subclasses (not a config key), builds each block's feed-forward module in place of the dense MLP.

    Initialisation (GPT-2): every weight N(0, 0.02), the residual output projections (attention out,
    MLP down) N(0, 0.02 / sqrt(2 * n_layers)), norms at one.
    """

    supported_attention = (CAUSAL, BIDIRECTIONAL, PREFIX)
    reads_documents = True  # the attention record's ``documents`` (``data.doc_mask``) mask attention

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 n_heads: Positive = 4, head_dim: Optional[Positive] = None, d_ff: Optional[Positive] = None,
                 norm: NormKind = "rmsnorm",
                 positions: str = "rotary", max_len: Positive = 512, dropout: Fraction = 0.0,
                 tie_embeddings: bool = True, activation_checkpointing: bool = False,
                 mlp: MLPKind = "gelu", rope_base: float = 10000.0, sinks: NonNegative = 4,
                 ffn_factory: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        if head_dim is not None:
            if d_model % head_dim:
                raise UserError(f"d_model={d_model} is not a multiple of head_dim={head_dim}: change one of them "
                                "(or set head_dim to null and use n_heads).")
            n_heads = d_model // head_dim
        if d_model % n_heads:
            raise UserError(f"d_model={d_model} is not a multiple of n_heads={n_heads}: change one "
                            "of them.")
        if positions not in POSITIONS:
            raise UserError(f"unknown positions {positions!r}: choose one of {', '.join(POSITIONS)}.")
        if not (math.isfinite(rope_base) and rope_base > 1.0):
            raise UserError(f"model.rope_base={rope_base} must be a finite number above 1: set it to 10000 "
                            "(RoFormer's).")
        if positions != "rotary" and rope_base != 10000.0:
            raise UserError(f"model.rope_base={rope_base} only applies to rotary positions and model.positions is "
                            f"{positions}: drop model.rope_base or set model.positions=rotary.")
        self.n_layers, self.n_heads = n_layers, n_heads
        self.rope_base, self.sinks = float(rope_base), int(sinks)
        self.d_ff = d_ff or 4 * d_model
        self.positions, self.max_len = positions, max_len

        self.pos_embed = nn.Embedding(max_len, d_model) if positions == "learned" else None
        rotary = Rotary(d_model // n_heads, max_len, base=rope_base) if positions == "rotary" else None
        self.emb_dropout = nn.Dropout(dropout)
        # one Rotary module shared by all blocks (its tables are non-persistent buffers)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, self.d_ff, norm, mlp, dropout, rotary,
                  ffn=ffn_factory(i) if ffn_factory is not None else None)
            for i in range(n_layers)
        )
        self.add_head(make_norm(norm, d_model), tie_embeddings)
        self._init_weights()

    def _init_weights(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.n_layers)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = resid_std if getattr(m, "is_residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) hidden states after the final norm."""
        if attention.kind not in self.supported_attention:
            raise UserError(f"model Transformer cannot attend {attention.kind!r}: choose causal, "
                            "bidirectional or prefix.")
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if T > self.max_len:
                raise UserError(f"sequence of {T} tokens is longer than model.max_len={self.max_len}: "
                                "raise model.max_len or use model.positions=rotary.")
            x = x + self.pos_embed.weight[:T]  # positions 0..T-1: a slice, not a lookup (cheaper backward)
        x = self.emb_dropout(x)
        if attention.window is not None:  # sliding-window attention: the model's sinks unless the record says
            attention = replace(attention, sinks=self.sinks if attention.sinks is None else attention.sinks)
        mask = attention.mask(T, input_ids.device)
        # ``mask() is None`` means "no restriction" for bidirectional and "plain causal" for causal
        is_causal = mask is None and attention.kind == CAUSAL
        stream = None
        if attention.windowed(T) and attention.sinks and attention.cache_positions and self.positions == "rotary":
            stream = (attention.sinks, attention.window)
        x = self.run_blocks(self.blocks, x, mask, is_causal, stream)
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

            6 * N + 6 * d_model * vocab_size + 12 * n_layers * d_model * seq_len

        where N = ``non_embedding_parameters()`` (every weight matmul of the blocks, plus the norm
        gains, which are negligible), ``d_model * vocab_size`` is the LM-head matmul (counted whether
        or not it is tied to the embedding; the embedding lookup itself costs nothing), and the last
        term is the attention scores and the weighted sum of values (``q.k`` and ``a.v``: 2 * 2 *
        seq_len * d_model forward FLOPs per layer), counted over the full T x T score matrix even for
        causal attention (as Kaplan et al. 2020, arXiv 2001.08361, without their causal halving).
        Softmax, norms, rotary and activations are ignored.
        """
        return float(6 * self.non_embedding_parameters() + 6 * self.d_model * self.vocab_size
                     + 12 * self.n_layers * self.d_model * seq_len)
