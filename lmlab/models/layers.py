"""Building blocks shared by every architecture: norms, the feed-forward block, rotary positions, the
causal depthwise short convolution.

Norms are chosen by name through ``NORMS`` (``make_norm``); the feed-forward block is a plain GELU MLP
or a gated one (SwiGLU, Shazeer 2020, arXiv 2002.05202); rotary position embeddings follow Su et al.
2021 (RoFormer, arXiv 2104.09864), in the "rotate half" layout.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import UserError
from lmlab.settings import Fraction, Positive

try:  # optional fused kernel (CUDA only); never required
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _cuda_causal_conv1d = None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, arXiv 1910.07467): ``x / rms(x) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(x.dtype) * self.weight


NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "layernorm": nn.LayerNorm}
NormKind = Literal[tuple(NORMS)]  # the ``norm`` setting of a model: one of NORMS (checked before any work)


def norm_kind(norm: nn.Module) -> str:
    """The ``NORMS`` name of a norm layer (its class name for another kind)."""
    return next((name for name, cls in NORMS.items() if type(norm) is cls), type(norm).__name__)


def make_norm(name: str, dim: int, eps: float | None = None) -> nn.Module:
    """A norm layer by name (a key of ``NORMS``), with its own default eps unless ``eps`` is given."""
    if name not in NORMS:
        raise UserError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}.")
    return NORMS[name](dim) if eps is None else NORMS[name](dim, eps=eps)


MLPS = ("gelu", "swiglu")
MLPKind = Literal[MLPS]  # the ``mlp`` setting of a model


class MLP(nn.Module):
    """The feed-forward block: ``down(gelu(up(x)))`` or, gated, ``down(silu(gate(x)) * up(x))``.

    ``down`` is the residual projection (``is_residual_proj = True``) that initialisers scale down.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", dropout: Fraction = 0.0) -> None:
        super().__init__()
        if kind not in MLPS:
            raise UserError(f"unknown mlp {kind!r}: choose one of {', '.join(MLPS)}.")
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if kind == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.is_residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x))
        return self.dropout(self.down(h))


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding for heads of size ``head_dim`` (even).

    ``forward(x)`` rotates a (B, T, ..., head_dim) tensor of queries and/or keys (the attention passes
    both at once, as one (B, T, 2, H, head_dim) view of its fused projection) by the absolute positions
    ``0..T-1`` of dim 1: in each head, the pair (x_i, x_{i + head_dim/2}) turns by the angle
    ``t * base^(-2i/head_dim)``. The cos/sin tables are cached for ``max_len`` positions and grown on demand.
    """

    def __init__(self, head_dim: int, max_len: Positive = 512, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise UserError(f"rotary positions need an even head size, got {head_dim}: change "
                            "d_model or n_heads.")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        self.register_buffer("cos", torch.cat([freqs, freqs], dim=-1).cos(), persistent=False)
        self.register_buffer("sin_signed", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        if seq_len > self.cos.shape[0]:
            self._build(seq_len)
        shape = (seq_len,) + (1,) * (x.dim() - 3) + (x.shape[-1],)
        cos = self.cos[:seq_len].to(x.dtype).view(shape)
        sin_signed = self.sin_signed[:seq_len].to(x.dtype).view(shape)
        # x * cos + rotate_half(x) * sin, with rotate-half's sign folded into the table: three kernels forward
        # and a lean backward; with queries and keys in one call, 0.5-0.65x the time of rotating each apart
        return torch.addcmul(x * cos, _swap_halves(x), sin_signed)

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward`` with position ``positions[t]`` (a long (T,) tensor) in place of ``t`` along dim 1."""
        if int(positions.max()) >= self.cos.shape[0]:
            self._build(int(positions.max()) + 1)
        shape = (positions.shape[0],) + (1,) * (x.dim() - 3) + (x.shape[-1],)
        cos = self.cos[positions].to(x.dtype).view(shape)
        sin_signed = self.sin_signed[positions].to(x.dtype).view(shape)
        return torch.addcmul(x * cos, _swap_halves(x), sin_signed)


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise causal convolution over time for (B, T, C) inputs: ``y_t = sum_{s<k} w_s x_{t-s} + b``.

    The input is left-padded with ``kernel - 1`` zeros, so ``y_t`` never sees ``x_{>t}``. ``step(x_t,
    cache)`` is the same map one token at a time: ``cache`` holds the last ``kernel - 1`` inputs (B, C,
    kernel - 1), zeros at the start (``init_cache``).
    """

    def __init__(self, channels: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return self.conv(u).transpose(1, 2)

    def init_cache(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.conv.in_channels, self.kernel - 1, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) input at one position -> ((B, C) output, new cache)."""
        window = torch.cat([cache, x[:, :, None]], dim=-1)  # (B, C, kernel), oldest first
        y = (window * self.conv.weight[:, 0, :]).sum(-1)
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return y, window[:, :, 1:]


def short_conv(conv: CausalDepthwiseConv1d, x: torch.Tensor) -> torch.Tensor:
    """``SiLU(conv(x))`` for (B, T, C) inputs; the fused ``causal_conv1d`` kernel on CUDA when installed."""
    if x.is_cuda and _cuda_causal_conv1d is not None:
        out = _cuda_causal_conv1d(x.transpose(1, 2).contiguous(), conv.conv.weight[:, 0, :], conv.conv.bias,
                                  activation="silu")
        return out.transpose(1, 2)
    return F.silu(conv(x))


class SimpleRMSNorm(nn.Module):
    """RMS norm without a gain (SRMSNorm of TransNormerLLM, arXiv 2307.14995): ``x / rms(x)``."""

    def __init__(self, dim: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GLU(nn.Module):
    """A gated linear unit without activation (TransNormerLLM's channel mixer): ``down(l1(x) * l2(x))``.
    ``down`` is the residual projection (``is_residual_proj = True``)."""

    def __init__(self, d_model: int, d_ff: int, dropout: Fraction = 0.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(d_model, d_ff, bias=False)
        self.l2 = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.is_residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.l1(x) * self.l2(x)))


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate ``z`` (Mamba-2's ``RMSNormGated``, MoM's output norm), over groups of
    ``group`` channels (per head; ``group=None``: all channels). ``norm_before_gate``: ``norm(x) * silu(z)``,
    else ``norm(x * silu(z))``."""

    def __init__(self, dim: int, group: int | None = None, norm_before_gate: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.group, self.norm_before_gate, self.eps = group or dim, norm_before_gate, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, gate = x.float(), F.silu(z.float())
        if not self.norm_before_gate:
            x = x * gate
        shape = x.shape
        x = x.reshape(*shape[:-1], -1, self.group)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(shape)
        if self.norm_before_gate:
            x = x * gate
        return x.to(dtype) * self.weight
