"""Mamba: the selective state-space model of Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces" (arXiv 2312.00752), the Mamba-1 block of the released code (``mamba_simple.py``).

Block: ``x + Mixer(RMSNorm(x))`` with ``xz = in_proj(x)`` (D -> 2·ED), ``x = SiLU(conv1d_k(x))`` (causal,
depthwise), ``(δ, B, C) = x_proj(x)`` (ED -> R + 2N), ``Δ = softplus(dt_proj(δ) + dt_bias)``, the selective
scan ``h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t ⊙ x_t) ⊗ B_t``, ``y_t = h_t C_t + D ⊙ x_t`` (ZOH on A, Euler on B,
as the paper's code), ``y ⊙ SiLU(z)``, ``out_proj`` (ED -> D). Initialisation as the released code: S4D-real
``A = -(1..N)``, ``Δ ~ logU[1e-3, 1e-1]`` through an inverse-softplus bias, ``D = 1``.

Scans (``impl``): ``sequential`` is the naive per-step recurrence under autograd (the test oracle and the
benchmark's baseline); ``chunked`` (the CPU default) is a custom autograd function that walks time in blocks
of ``chunk_size`` steps, materialises the (block, B, ED, N) decays and inputs only one block at a time (so
they stay in cache), keeps only the block-boundary states, and hand-writes the backward as the reverse scan
``G_t = C_t dy_t + Ā_{t+1} G_{t+1}`` (recomputing each block's states from its boundary state); ``auto``
is ``chunked``, or the fused ``mamba_ssm`` CUDA kernel on a CUDA device when that package is installed.

Also here: ``MixerBackbone``, the stack shared by the recurrent models of lmlab (Mamba, Mamba-2, MoM):
embedding, ``n_layers`` residual pre-norm mixer blocks (optionally each followed by a residual MLP),
final norm, tied LM head, and step-by-step decoding through each mixer's recurrent state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.layers import MLP, CausalDepthwiseConv1d, make_norm

try:  # optional fused kernels (CUDA only); never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _cuda_selective_scan = None
try:
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except Exception:  # noqa: BLE001
    _cuda_causal_conv1d = None

IMPLS = ("auto", "chunked", "sequential")


def short_conv(conv: CausalDepthwiseConv1d, x: torch.Tensor) -> torch.Tensor:
    """``SiLU(conv(x))`` for (B, T, C) inputs; the fused ``causal_conv1d`` kernel on CUDA when installed."""
    if x.is_cuda and _cuda_causal_conv1d is not None:
        out = _cuda_causal_conv1d(x.transpose(1, 2).contiguous(), conv.conv.weight[:, 0, :], conv.conv.bias,
                                  activation="silu")
        return out.transpose(1, 2)
    return F.silu(conv(x))


# ----- the selective scan -----

def selective_scan_sequential(x, delta, A, B, C, D, h0=None, return_state=False):
    """The reference recurrence, one step at a time under autograd.

    ``x, delta``: (batch, T, E); ``A``: (E, N); ``B, C``: (batch, T, N); ``D``: (E,). Returns ``y``
    (batch, T, E) and, with ``return_state``, the last state (batch, E, N).
    """
    dA = torch.exp(delta[..., None] * A)                       # (b, T, E, N)
    dBx = (delta * x)[..., None] * B[:, :, None, :]            # (b, T, E, N)
    h = torch.zeros_like(dA[:, 0]) if h0 is None else h0
    ys = []
    # unbind, not dA[:, t]: the backward of T slicings would write T full-size zero gradients
    for dA_t, dBx_t, C_t in zip(dA.unbind(1), dBx.unbind(1), C.unbind(1)):
        h = dA_t * h + dBx_t
        ys.append((h * C_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) + D * x
    return (y, h) if return_state else y


def _auto_chunk(batch: int, E: int, N: int) -> int:
    """Time steps per block so that one (block, batch, E, N) fp32 tensor is about 1 MiB (8 to 64 steps)."""
    return max(8, min(64, (1 << 18) // max(1, batch * E * N)))


class _ChunkedSelectiveScan(torch.autograd.Function):
    """The selective scan walked in time blocks, with a hand-written reverse-scan backward.

    Tensors are time-major inside (each step's state is one contiguous (batch, E, N) slab). A block's decays
    Ā and states h are built just before its steps run and dropped after, so they stay in cache and memory
    holds only the states at block boundaries (far less than sequential autograd keeps). Backward recomputes
    a block's Ā and h from its boundary state, runs the adjoint recurrence ``G_t = C_t dy_t + Ā_{t+1}
    G_{t+1}`` backwards (one fused multiply-add per step) and reads every other gradient off G with batched
    matmuls: ``dΔx = G·B``, ``dB = Σ_e G Δx``, ``dC = Σ_e dy h`` and, through ``log Ā = Δ A``,
    ``dΔ += Σ_n (G ⊙ Ā ⊙ h_{t-1}) A``, ``dA = Σ_{t,b} (G ⊙ Ā ⊙ h_{t-1}) Δ``.
    """

    @staticmethod
    def _block(dt, du, A, Bt, h, s, e):
        """Decays and states of steps s..e-1 from the state h before step s."""
        dA = torch.exp(dt[s:e, :, :, None] * A)                                       # (l, b, E, N)
        hs = du[s:e, :, :, None] * Bt[s:e, :, None, :]                                # becomes the states
        for a_t, h_t in zip(dA.unbind(0), hs.unbind(0)):
            torch.addcmul(h_t, a_t, h, out=h_t)
            h = h_t
        return dA, hs

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, chunk):
        xt, dt = x.transpose(0, 1).contiguous(), delta.transpose(0, 1).contiguous()   # (T, b, E)
        Bt, Ct = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()       # (T, b, N)
        T, b, E = xt.shape
        chunk = chunk or _auto_chunk(b, E, A.shape[1])
        du = dt * xt
        y = torch.empty_like(xt)
        h = xt.new_zeros(b, E, A.shape[1])
        starts = []
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            starts.append(h)
            _, hs = _ChunkedSelectiveScan._block(dt, du, A, Bt, h, s, e)
            torch.matmul(hs, Ct[s:e, :, :, None], out=y[s:e, :, :, None])
            h = hs[-1].clone()
        ctx.save_for_backward(xt, dt, A, Bt, Ct, D, torch.stack(starts))
        ctx.chunk = chunk
        return (y + D * xt).transpose(0, 1)

    @staticmethod
    def backward(ctx, gy):
        xt, dt, A, Bt, Ct, D, starts = ctx.saved_tensors
        chunk = ctx.chunk
        gyt = gy.transpose(0, 1).contiguous()                                         # (T, b, E)
        T, b, E = xt.shape
        du = dt * xt
        g_du, g_dt = torch.empty_like(xt), torch.empty_like(xt)
        gB, gC = torch.empty_like(Bt), torch.empty_like(Ct)
        gA = torch.zeros_like(A)
        nxt = None                                                                    # (Ā_{t+1}, G_{t+1})
        for k in reversed(range(len(starts))):
            s, e = k * chunk, min((k + 1) * chunk, T)
            dA, hs = _ChunkedSelectiveScan._block(dt, du, A, Bt, starts[k], s, e)
            torch.matmul(gyt[s:e, :, None, :], hs, out=gC[s:e, :, None, :])           # dC = Σ_e dy h
            G = gyt[s:e, :, :, None] * Ct[s:e, :, None, :]                            # dy C, becomes G
            for a_t, g_t in zip(reversed(dA.unbind(0)), reversed(G.unbind(0))):
                if nxt is not None:
                    torch.addcmul(g_t, *nxt, out=g_t)
                nxt = (a_t, g_t)
            torch.matmul(G, Bt[s:e, :, :, None], out=g_du[s:e, :, :, None])          # d(Δx) = G·B
            torch.matmul(du[s:e, :, None, :], G, out=gB[s:e, :, None, :])             # dB = Σ_e G Δx
            nxt = (dA[0], G[0].clone())
            glog = G.mul_(dA)                                                         # d log Ā = G Ā h_{t-1}
            glog[0].mul_(starts[k])
            glog[1:].mul_(hs[:-1])
            torch.matmul(glog[..., None, :], A[:, :, None], out=g_dt[s:e, :, :, None, None])
            gA += glog.mul_(dt[s:e, :, :, None]).sum((0, 1))
        gx = g_du * dt + gyt * D
        gdelta = g_dt + g_du * xt
        gD = (gyt * xt).sum((0, 1))
        return (gx.transpose(0, 1), gdelta.transpose(0, 1), gA, gB.transpose(0, 1), gC.transpose(0, 1), gD,
                None)


def selective_scan(x, delta, A, B, C, D, impl: str = "auto", chunk: int | None = None):
    """``y`` (batch, T, E) of the selective scan (shapes as ``selective_scan_sequential``), zero initial
    state, by ``impl`` (auto, chunked or sequential)."""
    if impl == "sequential":
        return selective_scan_sequential(x, delta, A, B, C, D)
    if impl == "auto" and x.is_cuda and _cuda_selective_scan is not None:
        return _cuda_selective_scan(x.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                                    B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                    D.float()).transpose(1, 2)
    dtype = x.dtype
    y = _ChunkedSelectiveScan.apply(x.float(), delta.float(), A.float(), B.float(), C.float(), D.float(), chunk)
    return y.to(dtype)


# ----- the Mamba-1 mixer -----

class MambaMixer(nn.Module):
    """The Mamba-1 mixer (D -> D). ``forward(x)`` on (B, T, D); ``step(x_t, state)`` on (B, D) with state
    ``(conv inputs (B, ED, d_conv - 1), h (B, ED, N))``."""

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4, impl: str = "auto", chunk_size: int | None = None) -> None:
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
        return delta, B, C, -torch.exp(self.A_log.float())

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

    def __init__(self, mixer: nn.Module, d_model: int, norm: str, d_ff: int, mlp: str) -> None:
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.mixer = mixer
        self.norm2 = make_norm(norm, d_model) if d_ff else None
        self.mlp = MLP(d_model, d_ff, mlp) if d_ff else None

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.mixer(self.norm(x), padding)
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

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
                 norm: str = "rmsnorm", d_ff: int = 0, mlp: str = "swiglu", tie_embeddings: bool = True,
                 activation_checkpointing: bool = False) -> None:
        super().__init__(vocab_size, d_model, attention, activation_checkpointing)
        self.n_layers, self.tie_embeddings = n_layers, tie_embeddings
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MixerBlock(make_mixer(), d_model, norm, d_ff, mlp) for _ in range(n_layers))
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if tie_embeddings:
            self.head.weight = self.embed.weight
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def init_state(self, batch_size: int, device=None, dtype=None) -> list:
        """The recurrent state before the first token, one entry per layer."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [block.mixer.init_state(batch_size, device, dtype) for block in self.blocks]

    def step(self, token_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per row: (B,) ids and the state -> (B, d_model) hidden (as ``forward`` at that
        position) and the next state."""
        x = self.embed(token_ids)
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_state.append(s)
        return self.norm(x), new_state

    def non_embedding_parameters(self) -> int:
        skip = {id(self.embed.weight), id(self.head.weight)}
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if id(p) not in skip)

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
    ``tie_embeddings``, ``activation_checkpointing`` (recompute each block in the backward pass while training).
    """

    def __init__(self, vocab_size: int, attention: str = CAUSAL, d_model: int = 64, n_layers: int = 2,
                 d_state: int = 16, expand: int = 2, d_conv: int = 4, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, impl: str = "auto", chunk_size: int | None = None,
                 norm: str = "rmsnorm", tie_embeddings: bool = True, activation_checkpointing: bool = False) -> None:
        def make_mixer():
            return MambaMixer(d_model, d_state, expand, d_conv, dt_rank, dt_min, dt_max, impl=impl,
                              chunk_size=chunk_size)

        super().__init__(vocab_size, attention, d_model, n_layers, make_mixer, norm=norm,
                         tie_embeddings=tie_embeddings, activation_checkpointing=activation_checkpointing)
