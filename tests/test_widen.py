"""Function-preserving widening (lmlab/models/widen.py): same logits, and the known change of the trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.models.transformer import Transformer
from lmlab.models.widen import widen

VOCAB = 20


def _model(attention: str, **kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(VOCAB, attention, **{"d_model": 16, "n_layers": 2, "n_heads": 2, **kw})
    # non-trivial norm gains, so that tiling them is exercised
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "weight") and mod.weight is not None and mod.weight.ndim == 1:
                mod.weight.uniform_(0.5, 1.5)
            if getattr(mod, "bias", None) is not None and mod.bias.ndim == 1:
                mod.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    ids[1, 7:] = 0  # right padding
    padding = ids != 0
    prefix = torch.tensor([3, 4, 2]) if kind == PREFIX else None
    return ids, Attention(kind, padding=padding, prefix_len=prefix)


@pytest.mark.parametrize("kind", [CAUSAL, BIDIRECTIONAL, PREFIX])
@pytest.mark.parametrize("variant, k", [
    ({}, 1),  # rmsnorm, rotary, gelu, tied: an untied copy
    ({}, 2),
    ({}, 3),
    ({"norm": "layernorm", "positions": "learned", "mlp": "swiglu", "tie_embeddings": False, "max_len": 16}, 2),
    ({"d_ff": 24, "dropout": 0.1}, 3),
])
def test_widened_model_gives_the_same_logits(kind, variant, k):
    small = _model(kind, **variant)
    wide = widen(small, k * small.d_model)
    assert wide.d_model == k * small.d_model and wide.n_heads == k * small.n_heads
    assert wide.d_ff == k * small.d_ff and not wide.tie_embeddings
    ids, att = _batch(kind)
    with torch.no_grad():
        a = small.logits(small(ids, att))
        b = wide.logits(wide(ids, att))
        # the residual stream itself is the tiled one
        h_small, h_wide = small(ids, att), wide(ids, att)
    real = ids != 0
    torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_wide[real], h_small[real].repeat(1, k), atol=1e-5, rtol=1e-5)
    assert not wide.training


def test_widen_refuses_bad_widths():
    m = _model(CAUSAL)
    with pytest.raises(UserError, match="multiple"):
        widen(m, 24)
    with pytest.raises(UserError, match="multiple"):
        widen(m, 8)


def _head_trace(model: Transformer, ids: torch.Tensor, att: Attention, targets: torch.Tensor) -> float:
    """Exact trace of the Hessian of the mean CE w.r.t. the LM-head weight only."""
    with torch.no_grad():
        hidden = model(ids, att)[ids != 0].double()
    y = targets[ids != 0]

    def loss(w):
        return F.cross_entropy(hidden @ w.T, y)

    h = torch.autograd.functional.hessian(loss, model.head.weight.detach().double())
    n = model.head.weight.numel()
    return float(h.reshape(n, n).diagonal().sum())


def test_widening_multiplies_the_head_trace_by_the_ratio():
    """Parameterisation dependence, known answer: the Hessian of softmax-CE w.r.t. the head W is
    sum_n (diag p_n - p_n p_n^T) (x) h_n h_n^T, so its trace is sum_n (1 - |p_n|^2) |h_n|^2; the widened
    head reads the tiled hidden state (|h'|^2 = k |h|^2) with the same p, so the trace is k times larger
    although the function is the same."""
    small = _model(BIDIRECTIONAL, tie_embeddings=False)
    ids, att = _batch(BIDIRECTIONAL)
    targets = torch.randint(4, VOCAB, ids.shape, generator=torch.Generator().manual_seed(2))
    base = _head_trace(small, ids, att, targets)
    for k in (2, 3):
        wide = _head_trace(widen(small, k * small.d_model), ids, att, targets)
        assert wide == pytest.approx(k * base, rel=1e-6)


def test_widening_a_fixed_head_size_model_gives_the_wide_models_shapes():
    """``head_dim`` fixed: the widened model is exactly ``Transformer(d_model=128, head_dim=16)`` (untied)."""
    torch.manual_seed(0)
    small = Transformer(VOCAB, CAUSAL, d_model=32, head_dim=16, n_layers=2).eval()
    assert small.n_heads == 2
    wide = widen(small, 128)
    ref = Transformer(VOCAB, CAUSAL, d_model=128, head_dim=16, n_layers=2, tie_embeddings=False)
    assert wide.n_heads == ref.n_heads == 8
    assert {n: p.shape for n, p in wide.named_parameters()} == {n: p.shape for n, p in ref.named_parameters()}
    ids, att = _batch(CAUSAL)
    with torch.no_grad():
        torch.testing.assert_close(wide.logits(wide(ids, att)), small.logits(small(ids, att)), atol=1e-5, rtol=1e-5)


def test_head_dim_sets_the_number_of_heads():
    from lmlab.models.moe import MoETransformer

    m = Transformer(VOCAB, CAUSAL, d_model=48, n_heads=4, head_dim=16)  # head_dim wins over n_heads
    assert m.n_heads == 3 and m.blocks[0].attn.head_dim == 16
    assert Transformer(VOCAB, CAUSAL, d_model=48, n_heads=4).n_heads == 4  # n_heads alone as before
    assert MoETransformer(VOCAB, CAUSAL, d_model=32, head_dim=8, n_experts=2, top_k=1).n_heads == 4
    with pytest.raises(UserError, match="head_dim"):
        Transformer(VOCAB, CAUSAL, d_model=40, head_dim=16)
