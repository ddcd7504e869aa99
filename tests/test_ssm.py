"""Known-answer tests of the recurrent models (Mamba, Mamba-2, MoM): fast scans against the sequential
recurrence (forward and gradients), step-by-step decoding against the parallel forward, MoM's masked routing
against gather/scatter, the balancing loss, and training / refusal through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import Attention
from lmlab.models.mamba import Mamba
from lmlab.models.mamba2 import Mamba2
from lmlab.models.mom import MoM, load_balancing_loss, mom_mix_gathered, mom_mix_masked
from lmlab.models.scan import gated_delta_rule, selective_scan, selective_scan_sequential, ssd_chunked, ssd_sequential
from tests.conftest import TINY


def _grads(fn, inputs, weight):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, weight)


def _close(a, b):
    """Equal to 1e-5 in fp32 (relative to the tensor's scale, for gradients summed over many terms)."""
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-5 * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("T,chunk", [(37, 8), (50, 16), (9, None)])
def test_mamba_chunked_scan_equals_sequential(T, chunk):
    torch.manual_seed(T)
    b, E, N = 2, 6, 4
    inputs = [torch.randn(b, T, E), F.softplus(torch.randn(b, T, E)), -torch.rand(E, N) * 3,
              torch.randn(b, T, N), torch.randn(b, T, N), torch.randn(E)]
    inputs = [t.requires_grad_() for t in inputs]
    weight = torch.randn(b, T, E)
    y_ref, g_ref = _grads(selective_scan_sequential, inputs, weight)
    y, g = _grads(lambda *a: selective_scan(*a, impl="chunked", chunk=chunk), inputs, weight)
    _close(y, y_ref)
    for got, ref in zip(g, g_ref):
        _close(got, ref)


def test_mamba_scan_small_delta_gives_skip():
    """Δ -> 0: the state never moves, y = D x."""
    b, T, E, N = 1, 5, 3, 2
    x, D = torch.randn(b, T, E), torch.randn(E)
    y = selective_scan(x, torch.zeros(b, T, E), -torch.ones(E, N), torch.randn(b, T, N), torch.randn(b, T, N), D,
                       impl="chunked")
    assert torch.allclose(y, D * x)


@pytest.mark.parametrize("T,chunk", [(37, 8), (20, 16)])
def test_mamba2_ssd_chunked_equals_sequential(T, chunk):
    torch.manual_seed(T)
    b, H, P, G, N = 2, 4, 3, 2, 5
    inputs = [torch.randn(b, T, H, P), F.softplus(torch.randn(b, T, H)), -torch.rand(H) * 5,
              torch.randn(b, T, G, N), torch.randn(b, T, G, N), torch.randn(H)]
    inputs = [t.requires_grad_() for t in inputs]
    weight = torch.randn(b, T, H, P)
    y_ref, g_ref = _grads(ssd_sequential, inputs, weight)
    y, g = _grads(lambda *a: ssd_chunked(*a, chunk=chunk), inputs, weight)
    _close(y, y_ref)
    for got, ref in zip(g, g_ref):
        _close(got, ref)


SMALL = {
    "mamba": lambda: Mamba(20, d_model=16, n_layers=2, impl="chunked", chunk_size=3),
    "mamba-seq": lambda: Mamba(20, d_model=16, n_layers=2, impl="sequential"),
    "mamba2": lambda: Mamba2(20, d_model=16, n_layers=2, headdim=8, chunk_size=4),
    "mom": lambda: MoM(20, d_model=16, n_layers=2, n_heads=2, head_dim=8, num_memories=3, top_k=2),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_step_decoding_equals_parallel_forward(name):
    torch.manual_seed(0)
    model = SMALL[name]().eval()
    ids = torch.randint(4, 20, (2, 11))
    with torch.no_grad():
        parallel = model(ids, Attention())
        state = model.init_state(2)
        steps = []
        for t in range(ids.shape[1]):
            h, state = model.step(ids[:, t], state)
            steps.append(h)
    assert torch.allclose(torch.stack(steps, dim=1), parallel, atol=1e-5)


def test_mamba_chunked_and_sequential_models_agree():
    torch.manual_seed(0)
    a = Mamba(20, d_model=16, impl="chunked", chunk_size=4)
    b = Mamba(20, d_model=16, impl="sequential")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(4, 20, (2, 13))
    assert torch.allclose(a(ids, Attention()), b(ids, Attention()), atol=1e-5)


def _mom_inputs(b=2, T=9, M=3, H=2, dk=4, dv=3, top_k=2, shared=True):
    torch.manual_seed(1)
    Mt = M + int(shared)
    q = F.normalize(torch.randn(b, T, H, dk), dim=-1)
    k = F.normalize(torch.randn(b, T, Mt, H, dk), dim=-1)
    v = torch.randn(b, T, Mt, H, dv)
    beta, g = torch.rand(b, T, Mt, H), -torch.rand(b, T, Mt, H)
    probs = torch.softmax(torch.randn(b, T, M), -1)
    top, idx = probs.topk(top_k, -1)
    weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    return q, k, v, beta, g, weights


@pytest.mark.parametrize("shared", [True, False])
def test_mom_masked_equals_gather_scatter(shared):
    q, k, v, beta, g, weights = _mom_inputs(shared=shared)
    masked = mom_mix_masked(q, k, v, beta, g, weights, shared)
    gathered = mom_mix_gathered(q, k, v, beta, g, weights, shared)
    assert torch.allclose(masked, gathered, atol=1e-6)


def test_mom_mixing_outputs_equals_reading_mixed_memory():
    """Σ_m w_m qᵀS_m == qᵀ(Σ_m w_m S_m): q is shared, so mixing reads mixes memories (the paper's form)."""
    torch.manual_seed(0)
    S, q, w = torch.randn(3, 4, 5), torch.randn(4), torch.rand(3)
    assert torch.allclose(sum(w[m] * (q @ S[m]) for m in range(3)), q @ torch.einsum("m,mkv->kv", w, S), atol=1e-6)


def test_delta_rule_with_full_beta_stores_and_returns_v():
    k = F.normalize(torch.randn(1, 1, 6), dim=-1)
    v = torch.randn(1, 1, 4)
    _, S = gated_delta_rule(k, k, v, torch.ones(1, 1), torch.zeros(1, 1), S0=torch.randn(1, 6, 4),
                            return_state=True)
    assert torch.allclose(k[:, 0] @ S, v[:, 0], atol=1e-6)


def test_load_balancing_uniform_router_gives_top_k():
    probs = torch.full((2, 7, 4), 0.25)
    idx = torch.randint(0, 4, (2, 7, 1)).expand(2, 7, 2).clone()
    idx[..., 1] = (idx[..., 0] + 1) % 4
    assert load_balancing_loss(probs, idx, None).item() == pytest.approx(2.0)
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[:, 5:] = False
    assert load_balancing_loss(probs, idx, padding).item() == pytest.approx(2.0)


def test_mom_aux_loss_is_set_and_trains_the_router():
    model = SMALL["mom"]()
    hidden = model(torch.randint(4, 20, (2, 6)), Attention())
    assert model.aux_loss is not None and model.aux_loss.item() > 0
    model.aux_loss.backward()
    assert model.blocks[0].mixer.router.weight.grad.abs().sum() > 0
    assert hidden.shape == (2, 6, 16)


def test_flops_per_token_formulas():
    m = Mamba(20, d_model=16, n_layers=2, d_state=4, expand=2)
    assert m.flops_per_token(8) == 6 * m.non_embedding_parameters() + 6 * 16 * 20 + 3 * 2 * 9 * 32 * 4
    mom = SMALL["mom"]()
    mixer = mom.blocks[0].mixer
    assert mom.flops_per_token(8) < 6 * mom.non_embedding_parameters() + 6 * 16 * 20 + 3 * 2 * 7 * 3 * 2 * 8 * 8
    assert Mamba2(20).flops_per_token(512) > Mamba2(20).flops_per_token(8)
    assert mixer.per_memory_parameters() > 0


# ----- through the real CLI -----

LOSS_RUN = ["max_steps=40", "val_every=1000", "checkpoint_every=1000", "batch_size=16", "logger=none",
            "eval=[perplexity]", "data.levels=2", "optim.lr=0.01", *TINY]
MODEL_ARGS = {
    "mamba": ["model.d_model=32"],
    "mamba2": ["model.d_model=32"],
    "mom": ["model.d_model=32", "model.head_dim=8", "model.num_memories=3"],
}


@pytest.mark.parametrize("name", list(MODEL_ARGS))
def test_trains_through_cli_and_loss_goes_down(lmlab, name):
    code, out = lmlab("train", f"model={name}", *LOSS_RUN, *MODEL_ARGS[name])
    assert code == 0, out
    run = next(p.parent for p in lmlab.runs.rglob("results.json"))
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    # an untrained model sits near log(vocab) (34 ids); the grammar's optimum is far below
    assert metrics["perplexity/loss"] < math.log(34) - 1.0, metrics
    assert metrics["perplexity/gap"] < 1.0, metrics


@pytest.mark.parametrize("name", list(MODEL_ARGS))
def test_mlm_is_refused_in_one_sentence(lmlab, name):
    code, out = lmlab("train", f"model={name}", "objective=mlm", "max_steps=2", "logger=none", *TINY)
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1 and "causal" in errors[0] and errors[0].rstrip().endswith(".")
    assert "Traceback" not in out


def test_reference_scan_takes_the_sequential_path_with_a_double_backward():
    """Inside ``reference_scan()`` the selective scan is the sequential reference (differentiable twice,
    vmappable); outside it the chunked kernel (first-order backward only) again."""
    from lmlab.models.scan import reference_scan, reference_scan_active, selective_scan, selective_scan_sequential

    g = torch.Generator().manual_seed(0)
    b, T, E, N = 2, 7, 3, 4
    x, B, C = torch.randn(b, T, E, generator=g), torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    delta = torch.rand(b, T, E, generator=g) * 0.5
    A = -torch.rand(E, N, generator=g).requires_grad_(True)
    D = torch.randn(E, generator=g)
    with reference_scan():
        assert reference_scan_active()
        y = selective_scan(x, delta, A, B, C, D)
        (gA,) = torch.autograd.grad(y.pow(2).sum(), A, create_graph=True)
        (hA,) = torch.autograd.grad(gA.sum(), A)  # a double backward
    assert not reference_scan_active()
    assert torch.isfinite(hA).all()
    torch.testing.assert_close(y, selective_scan_sequential(x, delta, A, B, C, D))
    assert selective_scan(x, delta, A, B, C, D).grad_fn.name().startswith("_ChunkedSelectiveScan")
