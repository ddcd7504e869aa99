"""Mamba: the selective state-space model of Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces" (arXiv 2312.00752), the Mamba-1 block of the released code (``mamba_simple.py``).

Block: ``x + Mixer(RMSNorm(x))`` with ``xz = in_proj(x)`` (D -> 2·ED), ``x = SiLU(conv1d_k(x))`` (causal,
depthwise), ``(δ, B, C) = x_proj(x)`` (ED -> R + 2N), ``Δ = softplus(dt_proj(δ) + dt_bias)``, the selective
scan ``h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ x_t) ⊗ B_t``, ``y_t = h_t C_t + D ⊙ x_t`` (ZOH on A, Euler on B,
as the paper's code), ``y ⊙ SiLU(z)``, ``out_proj`` (ED -> D). Initialisation as the released code: S4D-real
``A = -(1..N)``, ``Δ ~ logU[1e-3, 1e-1]`` through an inverse-softplus bias, ``D = 1``.

Scans (``impl``; the kernels are in ``lmlab.models.scan``): ``sequential`` is the naive per-step recurrence
under autograd (the test oracle and the benchmark's baseline); ``chunked`` (the CPU default) is a custom
autograd function that walks time in blocks of ``chunk_size`` steps, materialises the (block, B, ED, N) decays
and inputs only one block at a time (so they stay in cache), keeps only the block-boundary states, and
hand-writes the backward as the reverse scan ``G_t = C_t dy_t + Ā_{t+1} G_{t+1}`` (recomputing each block's
states from its boundary state); ``auto`` is ``chunked``, or the fused ``mamba_ssm`` CUDA kernel on a CUDA
device when that package is installed.

Also here: ``MixerBackbone``, the stack shared by the recurrent models of lmlab (Mamba, Mamba-2, MoM):
``n_layers`` residual pre-norm mixer blocks (optionally each followed by a residual MLP) on the ``Backbone``
skeleton (embedding, final norm, tied LM head, step-by-step decoding through each mixer's recurrent state),
with Mamba's initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLP, CausalDepthwiseConv1d, MLPKind, NormKind, make_norm, norm_kind, short_conv
from lmlab.models.scan import IMPLS, selective_scan
from lmlab.models.spec import HF_SPECIAL_IDS, HFAdapter, ModelSpec, Unmappable
from lmlab.settings import Optional, Positive, PositiveFloat

# ----- the Mamba-1 mixer -----

class MambaMixer(nn.Module):
    """The Mamba-1 mixer (D -> D). ``forward(x)`` on (B, T, D); ``step(x_t, state)`` on (B, D) with state
    ``(conv inputs (B, ED, d_conv - 1), h (B, ED, N))``."""

    def __init__(self, d_model: int, d_state: Positive = 16, expand: Positive = 2, d_conv: Positive = 4,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4, impl: str = "auto", chunk_size: Optional[Positive] = None) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise UserError(f"unknown mamba impl {impl!r}: choose one of {', '.join(IMPLS)}.")
        self.d_inner, self.d_state = expand * d_model, d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.impl, self.chunk_size = impl, chunk_size
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv = CausalDepthwiseConv1d(E, d_conv)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.out_proj.is_residual_proj = True
        # Δ initialisation: weights U(±R^-1/2), bias = softplus^-1(dt), dt ~ logU[dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias.keep_init = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))

    def _ssm_inputs(self, u: torch.Tensor):
        dbc = self.x_proj(u)
        dlow, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dlow))
        return delta, B, C, -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = short_conv(self.conv, u)
        delta, B, C, A = self._ssm_inputs(u)
        y = selective_scan(u, delta, A, B, C, self.D, self.impl, self.chunk_size)
        return self.out_proj(y * F.silu(z))

    def init_state(self, batch_size: int, device=None, dtype=None):
        return (self.conv.init_cache(batch_size, device, dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, x: torch.Tensor, state):
        conv_state, h = state
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, conv_state = self.conv.step(u, conv_state)
        u = F.silu(u)
        delta, B, C, A = self._ssm_inputs(u)
        h = torch.exp(delta[..., None].float() * A) * h + (delta * u)[..., None].float() * B[:, None, :].float()
        y = (h * C[:, None, :].float()).sum(-1).to(u.dtype) + self.D * u
        return self.out_proj(y * F.silu(z)), (conv_state, h)

    def scan_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the scan outside the weight matmuls: exp(ΔA), Δx ⊗ B, Ā ⊙ h + B̄x and
        the read-out h·C, about 9 per (channel, state) pair."""
        return 9.0 * self.d_inner * self.d_state


# ----- the shared recurrent stack -----

class MixerBlock(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` when the block has an MLP."""

    def __init__(self, mixer: nn.Module, d_model: int, norm: str, d_ff: int, mlp: str,
                 norm_eps: float | None = None) -> None:
        super().__init__()
        self.norm = make_norm(norm, d_model, norm_eps)
        self.mixer = mixer
        self.norm2 = make_norm(norm, d_model, norm_eps) if d_ff else None
        self.mlp = MLP(d_model, d_ff, mlp) if d_ff else None

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.mixer(self.norm(x), padding)
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def init_state(self, batch_size: int, device=None, dtype=None):
        return self.mixer.init_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state):
        y, state = self.mixer.step(self.norm(x), state)
        x = x + y
        return (x if self.mlp is None else x + self.mlp(self.norm2(x))), state


class MixerBackbone(Backbone):
    """Embedding, ``n_layers`` ``MixerBlock``s built by ``make_mixer()``, final norm, LM head (tied by
    default). Causal only. Subclasses build their mixers and may add to ``aux_loss`` in ``forward``.
    ``activation_checkpointing``: recompute each block in the backward pass while training.

    Initialisation (as Mamba's released code): embedding N(0, 0.02), linear biases zero (except those
    marked ``keep_init``), residual output projections divided by sqrt(n_layers) after PyTorch's default.
    """

    supported_attention = (CAUSAL,)

    def __init__(self, vocab_size: int, attention: str, d_model: int, n_layers: int, make_mixer,
                 norm: NormKind = "rmsnorm", d_ff: int = 0, mlp: MLPKind = "swiglu", tie_embeddings: bool = True,
                 activation_checkpointing: bool = False, norm_eps: float | None = None) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        self.n_layers = n_layers
        self.blocks = nn.ModuleList(MixerBlock(make_mixer(), d_model, norm, d_ff, mlp, norm_eps)
                                    for _ in range(n_layers))
        self.add_head(make_norm(norm, d_model, norm_eps), tie_embeddings)
        nn.init.normal_(self.embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m.bias is not None and not getattr(m.bias, "keep_init", False):
                    nn.init.zeros_(m.bias)
                if getattr(m, "is_residual_proj", False):
                    with torch.no_grad():
                        m.weight /= math.sqrt(n_layers)

    def forward(self, input_ids: torch.Tensor, attention: Attention | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model); right padding needs no mask (the scan is causal)."""
        if attention is not None and attention.kind != CAUSAL:
            raise UserError(f"model {type(self).__name__} cannot attend {attention.kind!r}: it is causal "
                            "only; use objective=clm.")
        padding = attention.padding if attention is not None else None
        x = self.run_blocks(self.blocks, self.embed(input_ids), padding)
        return self.norm(x)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

            6 * N + 6 * d_model * vocab_size + 3 * n_layers * mixer.scan_flops(seq_len)

        N = ``non_embedding_parameters()`` (each weight is used once per token: the projections, the
        depthwise conv, the norms), the LM head, and the mixer's sequence-mixing work outside its weights
        (its ``scan_flops``)."""
        scan = sum(block.mixer.scan_flops(seq_len) for block in self.blocks)
        return float(6 * self.non_embedding_parameters() + 6 * self.d_model * self.vocab_size + 3 * scan)


class Mamba(MixerBackbone):
    """Mamba-1 language model: ``n_layers`` residual Mamba blocks (no MLP), RMSNorm, tied head.

    Args: ``d_model``, ``n_layers``, ``d_state`` (N), ``expand`` (E), ``d_conv``, ``dt_rank`` (null:
    ceil(d_model / 16)), ``dt_min``/``dt_max`` (Δ initialisation range), ``impl`` (auto, chunked or
    sequential), ``chunk_size`` (time steps per block of the chunked scan; null: automatic), ``norm``,
    ``norm_eps`` (null: the norm's own, 1e-6 for RMSNorm), ``tie_embeddings``, ``activation_checkpointing``
    (recompute each block in the backward pass while training).
    """

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: Positive = 64, n_layers: Positive = 2,
                 d_state: Positive = 16, expand: Positive = 2, d_conv: Positive = 4, dt_rank: Optional[Positive] = None,
                 dt_min: PositiveFloat = 1e-3, dt_max: PositiveFloat = 1e-1, impl: str = "auto",
                 chunk_size: Optional[Positive] = None, norm: NormKind = "rmsnorm",
                 norm_eps: Optional[PositiveFloat] = None, tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        def make_mixer():
            return MambaMixer(d_model, d_state, expand, d_conv, dt_rank, dt_min, dt_max, impl=impl,
                              chunk_size=chunk_size)

        super().__init__(vocab_size, attention, d_model, n_layers, make_mixer, norm=norm,
                         tie_embeddings=tie_embeddings, activation_checkpointing=activation_checkpointing,
                         norm_eps=norm_eps)


# ----- the specs: blocks, adapter targets and the Hugging Face mapping (transformers' Mamba classes) -----

def mixer_state_to_hf(model: MixerBackbone, mixer_keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict of ``transformers``' Mamba/Mamba-2 causal LMs (``backbone.layers.<i>.mixer.<name>``) from a
    mixer backbone's, ``mixer_keys`` mapping transformers' mixer names to lmlab's."""
    if norm_kind(model.norm) != "rmsnorm":
        raise Unmappable(f"the run's {type(model).__name__} has norm={norm_kind(model.norm)}")
    w = {"backbone.embeddings.weight": model.embed.weight, "backbone.norm_f.weight": model.norm.weight,
         "lm_head.weight": model.embed.weight if model.tie_embeddings else model.head.weight}
    for i, block in enumerate(model.blocks):
        if block.mlp is not None:
            raise Unmappable(f"the run's {type(model).__name__} has an MLP in its blocks")
        w[f"backbone.layers.{i}.norm.weight"] = block.norm.weight
        mixer = dict(block.mixer.named_parameters())
        for theirs, ours in mixer_keys.items():
            w[f"backbone.layers.{i}.mixer.{theirs}"] = mixer[ours]
    return w


def mixer_state_from_hf(config, state: dict[str, torch.Tensor], mixer_keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of ``mixer_state_to_hf``."""
    tied = bool(getattr(config, "tie_word_embeddings", True))
    s = {"embed.weight": state["backbone.embeddings.weight"], "norm.weight": state["backbone.norm_f.weight"]}
    for i in range(config.num_hidden_layers):
        s[f"blocks.{i}.norm.weight"] = state[f"backbone.layers.{i}.norm.weight"]
        for theirs, ours in mixer_keys.items():
            s[f"blocks.{i}.mixer.{ours}"] = state[f"backbone.layers.{i}.mixer.{theirs}"]
    s["head.weight"] = s["embed.weight"] if tied else state["lm_head.weight"]
    return s


def check_mixer_config(config, **wanted) -> None:
    """Refuse a ``transformers`` Mamba config whose settings lmlab's mixers do not compute (``wanted``: the
    setting and the value they need)."""
    for key, value in wanted.items():
        if getattr(config, key, value) != value:
            raise UserError(f"the {type(config).__name__} checkpoint has {key}={getattr(config, key)}, which lmlab's "
                            f"{type(config).__name__.removesuffix('Config')} does not compute: import one with "
                            f"{key}={value}.")


MAMBA_KEYS = {"in_proj.weight": "in_proj.weight", "out_proj.weight": "out_proj.weight",
              "conv1d.weight": "conv.conv.weight", "conv1d.bias": "conv.conv.bias", "x_proj.weight": "x_proj.weight",
              "dt_proj.weight": "dt_proj.weight", "dt_proj.bias": "dt_proj.bias", "A_log": "A_log", "D": "D"}


def _mamba_to_hf(model: Mamba, context: int):
    from transformers import MambaConfig

    mixer = model.blocks[0].mixer
    w = mixer_state_to_hf(model, MAMBA_KEYS)
    config = MambaConfig(vocab_size=model.vocab_size, hidden_size=model.d_model, state_size=mixer.d_state,
                         num_hidden_layers=model.n_layers, layer_norm_epsilon=model.norm.eps,
                         expand=mixer.d_inner // model.d_model, conv_kernel=mixer.conv.kernel, use_bias=False,
                         use_conv_bias=True, hidden_act="silu", residual_in_fp32=True, time_step_rank=mixer.dt_rank,
                         tie_word_embeddings=model.tie_embeddings, use_mambapy=False,
                         architectures=["MambaForCausalLM"], **HF_SPECIAL_IDS)
    return config, w


def _mamba_from_hf(config, state: dict[str, torch.Tensor]):
    check_mixer_config(config, use_bias=False, use_conv_bias=True, hidden_act="silu")
    if config.intermediate_size != config.expand * config.hidden_size:
        raise UserError(f"the MambaConfig checkpoint has intermediate_size={config.intermediate_size}, not expand * "
                        "hidden_size as lmlab's Mamba: import one where they agree.")
    kwargs = dict(d_model=config.hidden_size, n_layers=config.num_hidden_layers, d_state=config.state_size,
                  expand=config.expand, d_conv=config.conv_kernel, dt_rank=config.time_step_rank, norm="rmsnorm",
                  norm_eps=float(config.layer_norm_epsilon),
                  tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)))
    return kwargs, mixer_state_from_hf(config, state, MAMBA_KEYS)


Mamba.spec = ModelSpec(
    block=MixerBlock,
    lora=("in_proj", "x_proj", "dt_proj", "out_proj"), ia3=("in_proj", "out_proj"), ia3_feedforward=("out_proj",),
    hf=HFAdapter(("MambaForCausalLM",), _mamba_to_hf, _mamba_from_hf, "model=mamba with norm=rmsnorm"),
)
