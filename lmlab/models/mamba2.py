"""Mamba-2: the state-space duality (SSD) layer of Dao & Gu 2024, "Transformers are SSMs: Generalized Models
and Efficient Algorithms Through Structured State Space Duality" (arXiv 2405.21060), the block of the released
code (``mamba2.py``) with ``ngroups`` B/C groups and the chunked SSD algorithm of its ``ssd_minimal.py``.

Block: ``in_proj`` (D -> [z, x, B, C, dt]), a causal depthwise conv + SiLU over (x, B, C), a scalar decay per
head ``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ`` (per head a P x N state), ``y_t = h_t C_t + D x_t``,
``RMSNorm(y ⊙ SiLU(z))`` (the gated norm after the gate, as the released default), ``out_proj``.
Initialisation as the released code: ``A = -U[1, 16]`` per head, ``Δ ~ logU[1e-3, 1e-1]`` through an
inverse-softplus bias, ``D = 1``.

Scans (``impl``; the kernels are in ``lmlab.models.scan``): ``sequential`` runs the per-step recurrence (the
test oracle); ``chunked`` (the CPU default) is SSD: inside chunks of ``chunk_size`` steps the output is the
masked quadratic form ``(C Bᵀ ∘ L) (Δ x)`` with ``L = exp(segsum(Δ A))``, chunk states are carried across
chunks by their own (short) scan, and the carried state is read out with the in-chunk decays; autograd
differentiates it.
``auto`` uses the Triton kernel ``mamba_chunk_scan_combined`` of ``mamba_ssm`` on CUDA when installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL
from lmlab.errors import UserError
from lmlab.models.layers import CausalDepthwiseConv1d, GatedRMSNorm, NormKind, short_conv
from lmlab.models.mamba import MixerBackbone
from lmlab.models.scan import IMPLS, ssd, ssd_sequential
from lmlab.settings import Positive


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (D -> D). ``forward(x)`` on (B, T, D); ``step(x_t, state)`` on (B, D) with state
    ``(conv inputs (B, ED + 2GN, d_conv - 1), h (B, H, P, N))``."""

    def __init__(self, d_model: int, d_state: Positive = 16, headdim: int = 16, expand: Positive = 2, ngroups: int = 1,
                 d_conv: Positive = 4, chunk_size: Positive = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4, A_init_range: tuple = (1, 16), impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise UserError(f"unknown mamba2 impl {impl!r}: choose one of {', '.join(IMPLS)}.")
        E = expand * d_model
        if E % headdim:
            raise UserError(f"expand * d_model = {E} is not a multiple of headdim={headdim}: change one of them.")
        H = E // headdim
        if H % ngroups:
            raise UserError(f"{H} heads are not a multiple of ngroups={ngroups}: change ngroups.")
        self.d_inner, self.n_heads, self.headdim, self.ngroups, self.d_state = E, H, headdim, ngroups, d_state
        self.chunk_size, self.impl = chunk_size, impl
        conv_dim = E + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, E + conv_dim + H, bias=False)
        self.conv = CausalDepthwiseConv1d(conv_dim, d_conv)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, norm_before_gate=False)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.out_proj.is_residual_proj = True

    def _split(self, zxbcdt: torch.Tensor):
        E, GN = self.d_inner, self.ngroups * self.d_state
        return zxbcdt.split([E, E + 2 * GN, self.n_heads], dim=-1)

    def _heads(self, xbc: torch.Tensor, dt: torch.Tensor):
        E, G, N = self.d_inner, self.ngroups, self.d_state
        x, B, C = xbc.split([E, G * N, G * N], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.n_heads, self.headdim), F.softplus(dt + self.dt_bias),
                B.reshape(*lead, G, N), C.reshape(*lead, G, N))

    def forward(self, u: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        b, T, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))
        x, dt, B, C = self._heads(short_conv(self.conv, xbc), dt)
        y = ssd(x, dt, -torch.exp(self.A_log.float()), B, C, self.D, self.impl, self.chunk_size)
        return self.out_proj(self.norm(y.reshape(b, T, self.d_inner), z))

    def init_state(self, batch_size: int, device=None, dtype=None):
        return (self.conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size, self.n_heads, self.headdim, self.d_state, device=device,
                            dtype=torch.float32))

    def step(self, u: torch.Tensor, state):
        conv_state, h = state
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, conv_state = self.conv.step(xbc, conv_state)
        x, dt, B, C = self._heads(F.silu(xbc), dt)
        y, h = ssd_sequential(x[:, None].float(), dt[:, None].float(), -torch.exp(self.A_log.float()),
                              B[:, None].float(), C[:, None].float(), self.D.float(), h0=h, return_state=True)
        y = y[:, 0].to(u.dtype).reshape(u.shape[0], self.d_inner)
        return self.out_proj(self.norm(y, z)), (conv_state, h)

    def scan_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of chunked SSD outside the weight matmuls (Q = chunk, counted in full):
        in-chunk scores C·Bᵀ ``2 Q G N``, their weighted sum of Δx ``2 Q ED``, the chunk states and their
        read-out ``2 ED N`` each (decays and masks ignored)."""
        Q = min(self.chunk_size, seq_len)
        return float(2 * Q * self.ngroups * self.d_state + 2 * Q * self.d_inner + 4 * self.d_inner * self.d_state)


class Mamba2(MixerBackbone):
    """Mamba-2 language model: ``n_layers`` residual Mamba-2 blocks (no MLP), RMSNorm, tied head.

    Args: ``d_model``, ``n_layers``, ``d_state`` (N), ``headdim`` (P), ``expand``, ``ngroups``, ``d_conv``,
    ``chunk_size`` (SSD chunk), ``impl`` (auto, chunked or sequential), ``norm``, ``tie_embeddings``,
    ``activation_checkpointing`` (recompute each block in the backward pass while training).
    The released defaults are d_state 128, headdim 64; lmlab's YAML shrinks them for small models.
    """

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 d_state: Positive = 16, headdim: Positive = 16, expand: Positive = 2, ngroups: Positive = 1,
                 d_conv: Positive = 4,
                 chunk_size: Positive = 64, impl: str = "auto", norm: NormKind = "rmsnorm",
                 tie_embeddings: bool = True, activation_checkpointing: bool = False) -> None:
        def make_mixer():
            return Mamba2Mixer(d_model, d_state, headdim, expand, ngroups, d_conv, chunk_size, impl=impl)

        super().__init__(vocab_size, attention, d_model, n_layers, make_mixer, norm=norm,
                         tie_embeddings=tie_embeddings, activation_checkpointing=activation_checkpointing)
