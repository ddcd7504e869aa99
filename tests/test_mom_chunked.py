"""Known-answer tests of MoM's chunked gated delta rule (``chunk_gated_delta_rule``, the WY/UT form) against
the per-step recurrence ``gated_delta_rule``: outputs, final state and gradients, at lengths that are and are
not multiples of the chunk, with routing masks (β = 0, g = 0), a given initial state and very negative
log-decays; and the whole MoM model with impl=chunked against impl=recurrent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmlab.models.mom as mom
from lmlab.attention import Attention
from lmlab.models.mom import MoM, mom_mix_gathered, mom_mix_masked
from lmlab.models.scan import chunk_gated_delta_rule, gated_delta_rule


def _inputs(n=3, T=21, dk=5, dv=4, dtype=torch.float64, mask=True, strong=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, T, dk, generator=gen, dtype=dtype), dim=-1) / dk ** 0.5
    k = F.normalize(torch.randn(n, T, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(n, T, dv, generator=gen, dtype=dtype)
    beta = torch.rand(n, T, generator=gen, dtype=dtype)
    g = -2 * torch.rand(n, T, generator=gen, dtype=dtype)
    if strong:  # isolated and consecutive huge decays, then ordinary ones (a cancellation trap for cumsums)
        g[0, 2] = -1e4
        g[1, 3:7] = -300.0
        g[2, ::3] = -60.0
    if mask:  # tokens not routed to this memory: β = 0, g = 0
        off = torch.rand(n, T, generator=gen) < 0.35
        beta, g = beta.masked_fill(off, 0.0), g.masked_fill(off, 0.0)
    S0 = torch.randn(n, dk, dv, generator=gen, dtype=dtype)
    return q, k, v, beta, g, S0


def _run(rule, q, k, v, beta, g, S0, **kw):
    """Outputs, final state and the gradients w.r.t. every input of a random linear read-out of both."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta, g, S0)]
    o, S = rule(*leaves[:5], S0=leaves[5], return_state=True, **kw)
    gen = torch.Generator().manual_seed(123)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)  # the same weights in any dtype
    ws = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    grads = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), leaves)
    return o.detach(), S.detach(), grads


NAMES = ("q", "k", "v", "beta", "g", "S0")


@pytest.mark.parametrize("T", [16, 21, 5])        # 2 chunks of 8, 2 chunks + a padded tail, one padded chunk
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("strong", [False, True])
def test_chunked_equals_recurrent_float64(T, mask, strong):
    x = _inputs(T=T, mask=mask, strong=strong)
    o1, S1, g1 = _run(gated_delta_rule, *x)
    o2, S2, g2 = _run(chunk_gated_delta_rule, *x, chunk=8)
    assert torch.allclose(o2, o1, atol=1e-10, rtol=0)
    assert torch.allclose(S2, S1, atol=1e-10, rtol=0)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.isfinite(b).all(), name
        assert torch.allclose(b, a, atol=1e-10, rtol=0), name


def test_chunked_without_initial_state_and_without_state():
    q, k, v, beta, g, _ = _inputs(T=19)
    o1, S1 = gated_delta_rule(q, k, v, beta, g, return_state=True)
    o2, S2 = chunk_gated_delta_rule(q, k, v, beta, g, chunk=4, return_state=True)
    assert torch.allclose(o2, o1, atol=1e-12) and torch.allclose(S2, S1, atol=1e-12)
    assert torch.allclose(chunk_gated_delta_rule(q, k, v, beta, g), o1, atol=1e-12)  # default chunk > T


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_float32_with_huge_decays_matches_float64_recurrence(chunk):
    """In float32, strongly negative g neither overflows nor loses the small decays that follow it (errors
    about 1e-7 here; decays taken as differences of cumulative sums would be off by about 6e-5)."""
    x64 = _inputs(T=45, strong=True, seed=3)
    o_ref, S_ref, g_ref = _run(gated_delta_rule, *x64)
    o, S, grads = _run(chunk_gated_delta_rule, *(t.float() for t in x64), chunk=chunk)
    assert torch.allclose(o.double(), o_ref, atol=1e-5) and torch.allclose(S.double(), S_ref, atol=1e-5)
    for name, a, b in zip(NAMES, g_ref, grads):
        assert torch.isfinite(b).all(), name
        assert torch.allclose(b.double(), a, atol=1e-5, rtol=1e-5), name


def test_fully_masked_and_padded_steps_leave_the_state_unchanged():
    q, k, v, beta, g, S0 = _inputs(T=11, mask=False)
    _, S = chunk_gated_delta_rule(q, k, v, torch.zeros_like(beta), torch.zeros_like(g), chunk=4, S0=S0,
                                  return_state=True)
    assert torch.equal(S, S0)


def test_masked_routing_with_chunked_equals_gather_scatter():
    """MoM's masked routing run by the chunked rule == each memory run over its own routed tokens only."""
    gen = torch.Generator().manual_seed(1)
    b, T, M, H, dk, dv = 2, 37, 3, 2, 4, 3
    q = F.normalize(torch.randn(b, T, H, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, T, M + 1, H, dk, generator=gen), dim=-1)
    v = torch.randn(b, T, M + 1, H, dv, generator=gen)
    beta, g = torch.rand(b, T, M + 1, H, generator=gen), -torch.rand(b, T, M + 1, H, generator=gen)
    probs = torch.softmax(torch.randn(b, T, M, generator=gen), -1)
    top, idx = probs.topk(2, -1)
    weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    masked = mom_mix_masked(q, k, v, beta, g, weights, True, impl="chunked")
    assert torch.allclose(masked, mom_mix_gathered(q, k, v, beta, g, weights, True), atol=1e-5)


def test_auto_runs_the_chunked_rule_on_cpu(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return chunk_gated_delta_rule(*args, **kwargs)

    monkeypatch.setattr(mom, "chunk_gated_delta_rule", spy)
    model = MoM(20, d_model=16, n_layers=1, n_heads=2, head_dim=8, num_memories=3, top_k=2)
    assert model.blocks[0].mixer.impl == "auto"
    model(torch.randint(4, 20, (2, 7)), Attention())
    assert len(calls) == 1


def test_mom_model_chunked_equals_recurrent_loss_and_grads():
    """The whole model (2 layers, 3 memories + shared, padded rows) with impl=chunked gives impl=recurrent's
    loss (LM + balancing) and gradients; T = 45 spans two chunks of 32, the second padded."""
    torch.manual_seed(0)
    a = MoM(20, d_model=16, n_layers=2, n_heads=2, head_dim=8, num_memories=3, top_k=2, impl="chunked")
    b = MoM(20, d_model=16, n_layers=2, n_heads=2, head_dim=8, num_memories=3, top_k=2, impl="recurrent")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(4, 20, (2, 45))
    ids[1, 30:] = 0
    attention = Attention(padding=ids != 0)
    losses, grads = [], []
    for model in (a, b):
        hidden = model(ids, attention)
        loss = F.cross_entropy(model.logits(hidden[:, :-1]).reshape(-1, 20), ids[:, 1:].reshape(-1)) + model.aux_loss
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-6)
    for (name, _), ga, gb in zip(a.named_parameters(), *grads):
        assert torch.allclose(ga, gb, atol=1e-5), name
