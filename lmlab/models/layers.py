"""Building blocks shared by every architecture: norms, the feed-forward block, rotary positions.

Norms are chosen by name through ``NORMS`` (``make_norm``); the feed-forward block is a plain GELU MLP
or a gated one (SwiGLU, Shazeer 2020, arXiv 2002.05202); rotary position embeddings follow Su et al.
2021 (RoFormer, arXiv 2104.09864), in the "rotate half" layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import UserError


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


def make_norm(name: str, dim: int) -> nn.Module:
    """A norm layer by name (a key of ``NORMS``)."""
    if name not in NORMS:
        raise UserError(f"unknown norm {name!r}: choose one of {', '.join(NORMS)}.")
    return NORMS[name](dim)


MLPS = ("gelu", "swiglu")


class MLP(nn.Module):
    """The feed-forward block: ``down(gelu(up(x)))`` or, gated, ``down(silu(gate(x)) * up(x))``.

    ``down`` is the residual projection (``is_residual_proj = True``) that initialisers scale down.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", dropout: float = 0.0) -> None:
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


class Rotary(nn.Module):
    """Rotary position embedding for heads of size ``head_dim`` (even).

    ``forward(q, k)`` rotates (B, H, T, head_dim) queries and keys by their absolute positions
    ``0..T-1``. The cos/sin tables are cached for ``max_len`` positions and grown on demand.
    """

    def __init__(self, head_dim: int, max_len: int = 512, base: float = 10000.0) -> None:
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
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = q.shape[-2]
        if seq_len > self.cos.shape[0]:
            self._build(seq_len)
        cos = self.cos[:seq_len].to(q.dtype)
        sin = self.sin[:seq_len].to(q.dtype)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin
