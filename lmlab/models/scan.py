"""Sequence-mixing kernels of the recurrent and long-convolution models, each beside its sequential
reference (the test oracle), apart from the layers that use them (as flash-linear-attention separates its
ops from its layers). The layers in ``mamba``, ``mamba2``, ``mom``, ``transnormer`` and ``hyena`` build the
kernels' inputs from their projections; everything here is a pure function of tensors.

* Mamba's selective scan (Gu & Dao 2023, arXiv 2312.00752): ``selective_scan_sequential`` (reference),
  ``selective_scan`` (``impl``: the blocked scan with a hand-written reverse-scan backward,
  ``_ChunkedSelectiveScan``, or the fused ``mamba_ssm`` CUDA kernel when installed).
* Mamba-2's SSD (Dao & Gu 2024, arXiv 2405.21060): ``ssd_sequential`` (reference), ``ssd_chunked`` (the chunked
  algorithm of the released ``ssd_minimal.py``), ``ssd`` (dispatch by ``impl``; the ``mamba_ssm`` Triton kernel
  on CUDA when installed).
* The gated delta rule of MoM's memories (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464):
  ``gated_delta_rule`` (reference, one step at a time), ``chunk_gated_delta_rule`` (the chunkwise WY/UT form),
  and ``fla_chunk_gated_delta_rule``, flash-linear-attention's Triton kernel (``None`` when not installed).
* TransNormer's causal linear attention with decay (Qin et al., arXiv 2307.14995 / 2401.04658):
  ``masked_linear_attention`` (the O(T^2) masked form, reference), ``lightning_attention`` (block-wise,
  Lightning Attention-2).
* Hyena's long convolution (Poli et al., arXiv 2302.10866): ``direct_causal_conv`` (the O(T^2) sum, reference),
  ``fft_causal_conv`` (through the FFT, O(T log T)).

The fused kernels are optional and never required: every kernel has a plain-PyTorch path on every device.

``reference_scan()`` (a context manager) makes the dispatchers take paths that autograd can differentiate
twice and ``torch.func`` can ``vmap`` (``eval=flatness`` enters it): ``selective_scan`` runs
``selective_scan_sequential`` (the chunked scan's hand-written backward is first-order only and has no vmap
rule), and ``ssd`` and MoM's memories skip the fused CUDA/Triton kernels for their plain-PyTorch forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

try:  # optional fused kernels (CUDA only); never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _cuda_selective_scan = None
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _cuda_ssd
except Exception:  # noqa: BLE001
    _cuda_ssd = None
try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
except Exception:  # noqa: BLE001
    fla_chunk_gated_delta_rule = None

IMPLS = ("auto", "chunked", "sequential")  # the ``impl`` values of ``selective_scan`` and ``ssd``

_REFERENCE = ContextVar("lmlab_reference_scan", default=False)


@contextmanager
def reference_scan() -> Iterator[None]:
    """Within: every scan dispatcher here takes a plain-PyTorch path (twice differentiable, vmappable); see
    the module docstring."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def reference_scan_active() -> bool:
    """Whether the caller is inside ``reference_scan()``."""
    return _REFERENCE.get()


# ----- Mamba: the selective scan -----

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
    state, by ``impl`` (auto, chunked or sequential; always sequential inside ``reference_scan()``). The
    chunked scan computes in fp32 at least (fp64 stays fp64)."""
    if impl == "sequential" or reference_scan_active():
        return selective_scan_sequential(x, delta, A, B, C, D)
    if impl == "auto" and x.is_cuda and _cuda_selective_scan is not None:
        return _cuda_selective_scan(x.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                                    B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                                    D.float()).transpose(1, 2)
    dtype = x.dtype
    ct = torch.promote_types(dtype, torch.float32)
    y = _ChunkedSelectiveScan.apply(*(t.to(ct) for t in (x, delta, A, B, C, D)), chunk)
    return y.to(dtype)


# ----- Mamba-2: state-space duality (SSD) -----

def ssd_sequential(x, dt, A, B, C, D, h0=None, return_state=False):
    """The per-step recurrence. ``x``: (b, T, H, P); ``dt``: (b, T, H) (after softplus); ``A``: (H,);
    ``B, C``: (b, T, G, N) with H a multiple of G; ``D``: (H,). Returns y (b, T, H, P) [and the last state
    (b, H, P, N)]."""
    b, T, H, P = x.shape
    rep = H // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)      # (b, T, H, N)
    h = x.new_zeros(b, H, P, B.shape[-1]) if h0 is None else h0
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) + D[:, None] * x
    return (y, h) if return_state else y


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): ``out[i, j] = a[j+1] + ... + a[i]`` for i >= j, -inf above the diagonal
    (summed from masked copies, not as a difference of cumulative sums, for precision)."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)                                          # a[..., i, j] = a_i
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    s = torch.cumsum(a.masked_fill(~strict, 0.0), dim=-2)
    return s.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_chunked(x, dt, A, B, C, D, chunk: int = 64):
    """The chunked SSD form of ``ssd_sequential`` (same arguments, zero initial state); T need not be a
    multiple of ``chunk`` (the tail is padded with Δ = 0, which neither decays nor writes the state)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    rep = H // G
    chunk = min(chunk, T)
    pad = (-T) % chunk
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = x.shape[1] // chunk
    xdt = (x * dt[..., None]).reshape(b, c, chunk, H, P)
    a = (dt * A).reshape(b, c, chunk, H).permute(0, 3, 1, 2)                      # (b, H, c, l)
    B = B.reshape(b, c, chunk, G, N).repeat_interleave(rep, dim=3)                # (b, c, l, H, N)
    C = C.reshape(b, c, chunk, G, N).repeat_interleave(rep, dim=3)
    a_cs = torch.cumsum(a, dim=-1)
    # 1. inside each chunk: the masked quadratic (attention-like) form
    L = torch.exp(segsum(a))                                                      # (b, H, c, l, l)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * L
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # 2. each chunk's state from its own inputs
    decay_states = torch.exp(a_cs[..., -1:] - a_cs)                               # (b, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, xdt)
    # 3. carry the states across chunks: state entering chunk k
    chunk_decay = torch.exp(a_cs[..., -1])                                        # (b, H, c)
    h = x.new_zeros(b, H, P, N)
    entering = []
    for k in range(c):
        entering.append(h)
        h = chunk_decay[:, :, k, None, None] * h + states[:, k]
    entering = torch.stack(entering, dim=1)                                       # (b, c, H, P, N)
    # 4. read the entering state out with the in-chunk decay
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cs))
    y = y.reshape(b, c * chunk, H, P)[:, :T]
    return y + D[:, None] * x[:, :T]


# Under ``torch.compile`` (``compile=true``) the chunked SSD runs eager and the rest of the mixer compiled:
# inductor (torch 2.13) fails on this mixer once the sequence length turns dynamic ("cannot determine truth
# value of Relational" in its stride ordering), although ``ssd_chunked`` alone compiles.
_ssd_outside_graph = torch.compiler.disable(ssd_chunked)


def ssd(x, dt, A, B, C, D, impl: str = "auto", chunk: int = 64):
    """``y`` of SSD (shapes as ``ssd_sequential``), zero initial state, by ``impl``: sequential, chunked
    (computed in fp32, returned in x's dtype), or auto (the ``mamba_ssm`` Triton kernel on CUDA when installed,
    else chunked; chunked inside ``reference_scan()``)."""
    if impl == "sequential":
        return ssd_sequential(x, dt, A, B, C, D)
    if impl == "auto" and x.is_cuda and _cuda_ssd is not None and not reference_scan_active():
        return _cuda_ssd(x, dt, A, B, C, chunk, D=D)
    dtype = x.dtype
    y = _ssd_outside_graph(x.float(), dt.float(), A, B.float(), C.float(), D.float(), chunk)
    return y.to(dtype)


# ----- MoM: the gated delta rule -----

CHUNK = 32  # steps per chunk of the chunked rule (faster than 16 or 64 at head_dim 32 on a CPU)


def gated_delta_rule(q, k, v, beta, g, S0=None, return_state=False):
    """The gated delta rule, one step at a time. ``q, k``: (n, T, d_k) (q already scaled), ``v``:
    (n, T, d_v), ``beta``: (n, T), ``g`` = log α: (n, T). Returns o (n, T, d_v) [and S (n, d_k, d_v)]."""
    n, T, dk = k.shape
    S = q.new_zeros(n, dk, v.shape[-1]) if S0 is None else S0
    alpha = torch.exp(g)
    out = []
    for t in range(T):
        S = S * alpha[:, t, None, None]
        kt = k[:, t]
        # products by broadcasting: a batched matmul of many 1 x d_k rows is far slower on CPU
        u = beta[:, t, None] * (v[:, t] - (kt[:, :, None] * S).sum(1))
        S = S + kt[:, :, None] * u[:, None, :]
        out.append((q[:, t, :, None] * S).sum(1))
    o = torch.stack(out, dim=1)
    return (o, S) if return_state else o


def chunk_gated_delta_rule(q, k, v, beta, g, chunk=CHUNK, S0=None, return_state=False):
    """The gated delta rule in chunkwise-parallel (WY / UT-transform) form: same arguments and results as
    ``gated_delta_rule``, any T (the tail is padded with β = 0, g = 0, which leave the state unchanged).

    Derivation. Write the step as ``S_t = α_t S_{t-1} + k_t u_tᵀ`` with ``u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t)``.
    In a chunk starting from state S (steps i = 1..C), let ``γ_i = α_1···α_i`` and ``D_ij = γ_i / γ_j =
    exp(g_{j+1} + ... + g_i)`` for j ≤ i (0 above the diagonal). Unrolling,
    ``α_i S_{i-1} = γ_i S + Σ_{j<i} D_ij k_j u_jᵀ``, so
    ``u_i + β_i Σ_{j<i} D_ij (k_i·k_j) u_j = β_i v_i - β_i γ_i Sᵀ k_i``, i.e. ``(I + A) U = diag(β) V -
    diag(βγ) K S`` with A strictly lower, ``A_ij = β_i D_ij k_i·k_j``. With ``W = (I + A)^{-1} diag(βγ) K`` and
    ``U' = (I + A)^{-1} diag(β) V`` (one unit-triangular solve), ``U = U' - W S``. Then
    ``o_i = S_iᵀ q_i = γ_i Sᵀ q_i + Σ_{j≤i} D_ij (q_i·k_j) u_j``: with ``P = (Q Kᵀ) ⊙ D`` (causal),
    ``O = P U' + (diag(γ) Q - P W) S``, and the state after the chunk is
    ``S' = γ_C S + K̃ᵀ U = (γ_C I - K̃ᵀ W) S + K̃ᵀ U'`` with ``K̃_j = D_Cj k_j``. Everything but the
    map ``S -> S'`` is computed for all chunks at once; the loop over chunks is one d_k x d_k by d_k x d_v
    product each. ``log D_ij`` is summed over the segment (a cumulative sum of the masked matrix
    ``g_s·1[j < s ≤ i]``), not taken as a difference of cumulative sums, and set to -inf above the diagonal
    before ``exp``: all decays are in [0, 1], nothing overflows, and no precision is lost to cancellation
    when g is very negative."""
    n, T, dk = k.shape
    dv = v.shape[-1]
    C = chunk
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    N = (T + pad) // C
    q, k, v = q.reshape(n, N, C, dk), k.reshape(n, N, C, dk), v.reshape(n, N, C, dv)
    beta, g = beta.reshape(n, N, C), g.reshape(n, N, C)
    i = torch.arange(C, device=g.device)
    causal, strict = i[:, None] >= i[None, :], i[:, None] > i[None, :]
    seg = torch.where(strict, g[..., :, None], 0.0).cumsum(-2)                # Σ_{j<s≤i} g_s at [i, j]
    D = torch.where(causal, seg, float("-inf")).exp()                         # (n, N, C, C)
    gamma = g.cumsum(-1).exp()                                                # γ_i, from the chunk's start
    # A's diagonal and upper part are never read: the solver takes I + (the strictly lower part of) A
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * D
    rhs = torch.cat([(beta * gamma)[..., None] * k, beta[..., None] * v], dim=-1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)   # [W | U']
    P = (q @ k.transpose(-1, -2)) * D
    PW, out = (P @ X).split([dk, dv], dim=-1)                                 # the in-chunk part
    Qs = gamma[..., None] * q - PW                                            # reads the chunk's initial state
    KW, Bc = ((k * D[..., -1, :, None]).transpose(-1, -2) @ X).split([dk, dv], dim=-1)   # K̃ᵀ [W | U']
    Mc = gamma[..., -1, None, None] * torch.eye(dk, device=k.device, dtype=k.dtype) - KW
    S = q.new_zeros(n, dk, dv) if S0 is None else S0
    starts = []
    for M_c, B_c in zip(Mc.unbind(1), Bc.unbind(1)):
        starts.append(S)
        S = M_c @ S + B_c
    out = out + Qs @ torch.stack(starts, dim=1)
    o = out.reshape(n, N * C, dv)[:, :T]
    return (o, S) if return_state else o


# ----- TransNormer: causal linear attention with decay -----

def masked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The O(T^2) reference: (B, H, T, d) q, k, v and (H,) decay exponents -> ``[(Q K^T) * M] V``."""
    T = q.shape[-2]
    i = torch.arange(T, device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    diff = i[:, None] - i[None, :]
    M = torch.exp(-s.to(q.device, i.dtype)[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
    return ((q @ k.transpose(-1, -2)) * M.to(q.dtype)) @ v


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                        block_size: int = 64) -> torch.Tensor:
    """Block-wise causal linear attention with decay (Lightning Attention-2), equal to
    ``masked_linear_attention``: (B, H, T, d_k), (B, H, T, d_k), (B, H, T, d_v), (H,) -> (B, H, T, d_v)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    n = -(-T // block_size)
    pad = n * block_size - T
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    blk = block_size
    qb = q.view(B, H, n, blk, dk)
    kb = k.view(B, H, n, blk, dk)
    vb = v.view(B, H, n, blk, dv)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32  # decays in fp32 at least
    s = s.to(q.device, ct)
    r = torch.arange(blk, device=q.device, dtype=ct)
    diff = r[:, None] - r[None, :]
    D = (torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)).to(q.dtype)  # (H, blk, blk)
    intra = ((qb @ kb.transpose(-1, -2)) * D[None, :, None]) @ vb  # (B, H, n, blk, dv)
    if n == 1:
        out = intra
    else:
        q_decay = torch.exp(-s[:, None] * (r + 1)[None]).to(q.dtype)  # lambda^(i+1), (H, blk)
        k_decay = torch.exp(-s[:, None] * (blk - 1 - r)[None]).to(q.dtype)  # lambda^(blk-1-r)
        block_decay = torch.exp(-s * blk).to(q.dtype)[None, :, None, None]  # lambda^blk
        # each block's contribution to the state, then the recurrence over blocks (a short loop)
        contrib = (kb * k_decay[None, :, None, :, None]).transpose(-1, -2) @ vb  # (B, H, n, dk, dv)
        states = []
        kv = q.new_zeros(B, H, dk, dv)
        for b in range(n):
            states.append(kv)
            kv = block_decay * kv + contrib[:, :, b]
        states = torch.stack(states, dim=2)  # state before each block
        inter = (qb * q_decay[None, :, None, :, None]) @ states
        out = intra + inter
    return out.reshape(B, H, n * blk, dv)[:, :, :T]


# ----- Hyena: the long causal convolution -----

def direct_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The O(T^2) reference of ``fft_causal_conv``."""
    T = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(T):
        for s in range(t + 1):
            y[..., t] += h[..., s] * u[..., t - s]
    return y


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal convolution along the last axis, ``y_t = sum_{s <= t} h_s u_{t-s}``, through the FFT.
    ``u``: (..., C, T); ``h``: (C, T) (broadcast over the leading axes). Computed in fp32 at least."""
    T = u.shape[-1]
    n = 2 * T
    dtype = torch.promote_types(u.dtype, torch.float32)
    uf = torch.fft.rfft(u.to(dtype), n=n)
    hf = torch.fft.rfft(h.to(dtype), n=n)
    return torch.fft.irfft(uf * hf, n=n)[..., :T].to(u.dtype)
