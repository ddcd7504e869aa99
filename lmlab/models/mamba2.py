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
from lmlab.models.mamba import MixerBackbone, MixerBlock, check_mixer_config, mixer_state_from_hf, mixer_state_to_hf
from lmlab.models.scan import IMPLS, ssd, ssd_sequential
from lmlab.models.spec import HF_SPECIAL_IDS, HFAdapter, ModelSpec, Unmappable
from lmlab.settings import Optional, Positive, PositiveFloat


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (D -> D). ``forward(x)`` on (B, T, D); ``step(x_t, state)`` on (B, D) with state
    ``(conv inputs (B, ED + 2GN, d_conv - 1), h (B, H, P, N))``."""

    def __init__(self, d_model: int, d_state: Positive = 16, headdim: int = 16, expand: Positive = 2, ngroups: int = 1,
                 d_conv: Positive = 4, chunk_size: Positive = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4, A_init_range: tuple = (1, 16), impl: str = "auto",
                 norm_eps: float | None = None) -> None:
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
        self.norm = GatedRMSNorm(E, norm_before_gate=False) if norm_eps is None else \
            GatedRMSNorm(E, norm_before_gate=False, eps=norm_eps)
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
    ``chunk_size`` (SSD chunk), ``impl`` (auto, chunked or sequential), ``norm``, ``norm_eps`` (null: 1e-6, the
    gated norm's too), ``tie_embeddings``,
    ``activation_checkpointing`` (recompute each block in the backward pass while training).
    The released defaults are d_state 128, headdim 64; lmlab's YAML shrinks them for small models.
    """

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 d_state: Positive = 16, headdim: Positive = 16, expand: Positive = 2, ngroups: Positive = 1,
                 d_conv: Positive = 4,
                 chunk_size: Positive = 64, impl: str = "auto", norm: NormKind = "rmsnorm",
                 norm_eps: Optional[PositiveFloat] = None, tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        def make_mixer():
            return Mamba2Mixer(d_model, d_state, headdim, expand, ngroups, d_conv, chunk_size, impl=impl,
                               norm_eps=norm_eps)

        super().__init__(vocab_size, attention, d_model, n_layers, make_mixer, norm=norm,
                         tie_embeddings=tie_embeddings, activation_checkpointing=activation_checkpointing,
                         norm_eps=norm_eps)


# ----- the spec: blocks, adapter targets and the Hugging Face mapping (transformers' Mamba2ForCausalLM) -----

MAMBA2_KEYS = {"in_proj.weight": "in_proj.weight", "out_proj.weight": "out_proj.weight",
               "conv1d.weight": "conv.conv.weight", "conv1d.bias": "conv.conv.bias", "dt_bias": "dt_bias",
               "A_log": "A_log", "D": "D", "norm.weight": "norm.weight"}


def _to_hf(model: Mamba2, context: int):
    from transformers import Mamba2Config

    mixer = model.blocks[0].mixer
    w = mixer_state_to_hf(model, MAMBA2_KEYS)
    if mixer.ngroups != 1:
        raise Unmappable(f"the run's mamba2 has ngroups={mixer.ngroups} with one gated norm over all channels")
    if any(block.mixer.norm.eps != model.norm.eps for block in model.blocks):
        raise Unmappable("the run's mamba2 has a gated norm eps other than its RMSNorm eps")
    config = Mamba2Config(vocab_size=model.vocab_size, hidden_size=model.d_model, num_heads=mixer.n_heads,
                          head_dim=mixer.headdim, state_size=mixer.d_state, num_hidden_layers=model.n_layers,
                          layer_norm_epsilon=model.norm.eps, expand=mixer.d_inner // model.d_model, n_groups=1,
                          conv_kernel=mixer.conv.kernel, use_bias=False, use_conv_bias=True, hidden_act="silu",
                          residual_in_fp32=True, time_step_limit=(0.0, float("inf")),
                          chunk_size=mixer.chunk_size, tie_word_embeddings=model.tie_embeddings,
                          architectures=["Mamba2ForCausalLM"], **HF_SPECIAL_IDS)
    return config, w


def _from_hf(config, state: dict[str, torch.Tensor]):
    check_mixer_config(config, use_bias=False, use_conv_bias=True, hidden_act="silu", n_groups=1)
    limit = tuple(float(t) for t in getattr(config, "time_step_limit", (0.0, float("inf"))))
    if limit != (0.0, float("inf")):
        raise UserError(f"the Mamba2Config checkpoint has time_step_limit={limit}, which lmlab's Mamba2 does not "
                        "compute: import one with time_step_limit=(0.0, inf).")
    if config.num_heads * config.head_dim != config.expand * config.hidden_size:
        raise UserError(f"the Mamba2Config checkpoint has num_heads * head_dim = {config.num_heads * config.head_dim}, "
                        "not expand * hidden_size as lmlab's Mamba2: import one where they agree.")
    kwargs = dict(d_model=config.hidden_size, n_layers=config.num_hidden_layers, d_state=config.state_size,
                  headdim=config.head_dim, expand=config.expand, ngroups=1, d_conv=config.conv_kernel,
                  chunk_size=config.chunk_size, norm="rmsnorm", norm_eps=float(config.layer_norm_epsilon),
                  tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)))
    return kwargs, mixer_state_from_hf(config, state, MAMBA2_KEYS)


Mamba2.spec = ModelSpec(
    block=MixerBlock,
    lora=("in_proj", "out_proj"), ia3=("in_proj", "out_proj"), ia3_feedforward=("out_proj",),
    hf=HFAdapter(("Mamba2ForCausalLM",), _to_hf, _from_hf, "model=mamba2 with norm=rmsnorm ngroups=1"),
)
