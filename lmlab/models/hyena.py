"""Hyena: implicit long convolutions with data-controlled gating, causal.

Poli et al., "Hyena Hierarchy: Towards Larger Convolutional Language Models" (ICML 2023, arXiv
2302.10866), in the HyenaDNA form (Nguyen et al. 2023, arXiv 2306.15794, ``standalone_hyenadna.py``).
Causal only.

Block: ``x + Hyena(norm(x))`` then ``x + MLP(norm(x))`` (pre-norm, the shared MLP).
Hyena operator of order N (default 2):

* ``u = in_proj(x)`` (D -> (N+1) D), then a causal depthwise short convolution (kernel 3) over all
  (N+1) D channels; split into gates ``x_0 .. x_{N-1}`` and the value ``v``.
* For each of the N-1 long filters o (paired with ``x_{N-1}, .., x_1``): ``v = x_i * v``, then
  ``v = (h_o * v) + bias_o * v`` (causal convolution along time, per channel). Finally ``y = x_0 * v``
  and ``out_proj``. Order 2 is therefore ``out_proj(x_0 * (h * (x_1 * v) + bias * v))``.
* Implicit filters ``h`` (every channel, every order, positions ``t = 0..T-1``): positional features
  ``z(t) = [t / (l_max - 1), Re exp(-i f_b w_t), Im exp(-i f_b w_t)]`` with ``w_t = 2 pi t / l_max`` and
  ``f_b = linspace(1e-4, bands - 1, bands)``, ``bands = (emb_dim - 1) / 2``; an FFN
  ``Linear(emb_dim, filter_order) -> Sin -> [Linear(filter_order, filter_order) -> Sin] x num_inner_mlps
  -> Linear(filter_order, (N-1) D, no bias)`` where ``Sin(x) = sin(w x)`` has a learnable frequency per
  unit (init ``w = 1``); then the exponential-decay window ``h <- h (exp(-|delta_d| t/(l_max-1)) + 0.05)``
  with ``delta = linspace(ln(1e-2)/0.3, ln(1e-2)/1.5, D)`` (fast to slow decay over the channels).
  The features depend on ``t`` and ``l_max`` only, so a token's output never depends on the sequence's
  length; sequences longer than ``l_max`` are refused.
* ``fft_causal_conv`` (in ``lmlab.models.scan``): ``y = irfft(rfft(u, 2T) rfft(h, 2T))[:T]`` (zero padding
  to 2T makes the circular convolution linear, hence causal), O(T log T), computed in fp32.

Not done: the FlashFFTConv kernel (HazyResearch/flash-fft-conv); ``torch.fft`` runs on every device. The
paper's separate learning rates for the filter network (1e-3, no weight decay) are not applied: the
filter parameters train with the optimiser's settings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLP, CausalDepthwiseConv1d, MLPKind, NormKind, make_norm
from lmlab.models.scan import fft_causal_conv
from lmlab.models.spec import ModelSpec
from lmlab.settings import Fraction, NonNegative, Optional, Positive, PositiveFloat


class Sin(nn.Module):
    def __init__(self, dim: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Positional features -> FFN -> exponential-decay window: ``forward(T) -> (n_filters, D, T)``."""

    def __init__(self, d_model: int, n_filters: int, l_max: int, emb_dim: int = 3, filter_order: int = 64,
                 num_inner_mlps: int = 2, w: float = 1.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.05) -> None:
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise UserError(f"model.filter_emb_dim={emb_dim} must be odd and at least 3: change it.")
        self.d_model, self.n_filters, self.l_max, self.shift = d_model, n_filters, l_max, shift
        bands = (emb_dim - 1) // 2
        t = torch.arange(l_max, dtype=torch.float32)
        t_norm = t / max(l_max - 1, 1)
        f = torch.linspace(1e-4, bands - 1, bands, device=t.device)  # (the device of t: meta in a dry build)
        angle = 2 * math.pi * t[:, None] / l_max * f[None]
        self.register_buffer("z", torch.cat([t_norm[:, None], torch.cos(angle), -torch.sin(angle)], -1),
                             persistent=False)  # (l_max, emb_dim)
        self.register_buffer("t", t_norm, persistent=False)
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order), Sin(filter_order, w)]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order), Sin(filter_order, w)]
        layers.append(nn.Linear(filter_order, n_filters * d_model, bias=False))
        self.ffn = nn.Sequential(*layers)
        deltas = torch.linspace(math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct, d_model)
        self.register_buffer("deltas", deltas.abs(), persistent=False)

    def forward(self, T: int) -> torch.Tensor:
        h = self.ffn(self.z[:T]).view(T, self.n_filters, self.d_model)  # (T, N-1, D)
        window = torch.exp(-self.t[:T, None] * self.deltas[None]) + self.shift  # (T, D)
        return (h * window[:, None]).permute(1, 2, 0)  # (N-1, D, T)


class HyenaOperator(nn.Module):
    def __init__(self, d_model: int, l_max: int, order: int = 2, short_filter: int = 3, **filter_args) -> None:
        super().__init__()
        if order < 2:
            raise UserError(f"model.order={order} must be at least 2: raise it.")
        self.d_model, self.order, self.l_max = d_model, order, l_max
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.short_conv = CausalDepthwiseConv1d((order + 1) * d_model, short_filter)
        self.filter = ImplicitFilter(d_model, order - 1, l_max, **filter_args)
        self.filter_bias = nn.Parameter(torch.randn(order - 1, d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.out_proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        u = self.short_conv(self.in_proj(x)).transpose(1, 2)  # (B, (N+1) D, T)
        *gates, v = u.split(D, dim=1)
        h = self.filter(T)
        for o, x_i in enumerate(reversed(gates[1:])):
            v = v * x_i
            v = fft_causal_conv(v, h[o]) + self.filter_bias[o][None, :, None] * v
        return self.out_proj((v * gates[0]).transpose(1, 2))


class HyenaBlock(nn.Module):
    def __init__(self, d_model: int, d_ff: int, norm: str, mlp: str, dropout: float, **hyena_args) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(norm, d_model), make_norm(norm, d_model)
        self.mixer = HyenaOperator(d_model, **hyena_args)
        self.mlp = MLP(d_model, d_ff, mlp, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class Hyena(Backbone):
    """Hyena backbone. Args: ``d_model``, ``n_layers``, ``d_ff`` (default ``4 * d_model``), ``order``,
    ``l_max`` (longest sequence), ``filter_order`` (width of the filter FFN), ``filter_emb_dim`` (positional
    features, odd), ``num_inner_mlps``, ``filter_w`` (Sin frequency init), ``short_filter`` (short conv
    kernel), ``norm``, ``mlp``, ``dropout``, ``tie_embeddings``, ``activation_checkpointing`` (recompute each
    block in the backward pass while training). Linear and embedding weights N(0, 0.02),
    residual projections scaled by ``1/sqrt(2 n_layers)``; the filter FFN keeps PyTorch's default init."""

    supported_attention = (CAUSAL,)

    spec = ModelSpec(block=HyenaBlock, lora=("in_proj", "out_proj", "up", "gate", "down"), ia3=("in_proj", "down"),
                     ia3_feedforward=("down",))

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 d_ff: Optional[Positive] = None, order: Positive = 2, l_max: Positive = 1024,
                 filter_order: Positive = 64, filter_emb_dim: Positive = 3, num_inner_mlps: NonNegative = 2,
                 filter_w: PositiveFloat = 1.0, short_filter: Positive = 3,
                 norm: NormKind = "rmsnorm", mlp: MLPKind = "gelu", dropout: Fraction = 0.0,
                 tie_embeddings: bool = True, activation_checkpointing: bool = False) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        self.n_layers, self.order, self.l_max, self.d_ff = n_layers, order, l_max, d_ff or 4 * d_model
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            HyenaBlock(d_model, self.d_ff, norm, mlp, dropout, l_max=l_max, order=order, short_filter=short_filter,
                       emb_dim=filter_emb_dim, filter_order=filter_order, num_inner_mlps=num_inner_mlps,
                       w=filter_w)
            for _ in range(n_layers))
        self.add_head(make_norm(norm, d_model), tie_embeddings)
        resid_std = 0.02 / math.sqrt(2 * n_layers)
        filters = {id(m) for b in self.blocks for m in b.mixer.filter.modules()}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in filters:
                nn.init.normal_(m.weight, 0.0, resid_std if getattr(m, "is_residual_proj", False) else 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(B, T) -> (B, T, d_model); rows are right-padded, so real tokens never see a pad."""
        if attention.kind != CAUSAL:
            raise UserError(f"model Hyena cannot attend {attention.kind!r}: use a causal objective.")
        T = input_ids.shape[1]
        if T > self.l_max:
            raise UserError(f"sequence of {T} tokens is longer than model.l_max={self.l_max}: raise model.l_max.")
        x = self.run_blocks(self.blocks, self.emb_dropout(self.embed(input_ids)))
        return self.norm(x)

    def filter_parameters(self) -> int:
        return sum(p.numel() for b in self.blocks for p in b.mixer.filter.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3 x forward, 2 per multiply-add):

            6 * (N - N_filter) + 6 * d_model * vocab_size + 3 * n_layers * (order - 1) * d_model * F(T)

        N = parameters outside the embedding/head (each used once per token: projections, short conv,
        MLP, filter bias); N_filter = the implicit-filter networks, which run once per batch, not per token,
        and are left out. F(T) = forward FLOPs per token and channel of one FFT convolution at length
        T = seq_len: three real FFTs of size n = 2T at 2.5 n log2 n each (the filter's transform counted
        as if per sequence) plus the complex product (6 per frequency), divided by T:
        ``F(T) = (7.5 n log2 n + 6 (T + 1)) / T``. Gates, norms and activations are ignored."""
        n = self.non_embedding_parameters() - self.filter_parameters()
        T = max(seq_len, 1)
        fft = (7.5 * 2 * T * math.log2(2 * T) + 6 * (T + 1)) / T
        return float(6 * n + 6 * self.d_model * self.vocab_size
                     + 3 * self.n_layers * (self.order - 1) * self.d_model * fft)

    def sparse_targets(self) -> list[tuple[str, nn.Linear, float]]:
        """The blocks' projections and MLPs; the implicit filter networks (run once per batch, not per token)
        stay dense."""
        return [t for t in super().sparse_targets() if ".filter." not in t[0]]
