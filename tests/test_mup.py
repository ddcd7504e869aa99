"""model.parametrization: the standard parameterisation unchanged, muP and CompleteP's multipliers (Tensor
Programs V, Table 8; CompleteP with alpha = 1) against hand computations, and the refusals."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.moe import MoETransformer
from lmlab.models.transformer import Transformer
from lmlab.optim import decay_groups
from lmlab.run_dir import load_backbone
from lmlab.training.module import make_optimizer
from tests.conftest import FAST, TINY, train_run

MODELS = {"transformer": Transformer, "moe": MoETransformer}
V = 40


def _build(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](V, CAUSAL, **kw)


def _gpt2_reference(name: str, seed: int = 0, **kw) -> nn.Module:
    """The model initialised by hand as GPT-2 (and as lmlab before parameterisations): every Linear and
    Embedding N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)), in module order, from the same seed."""
    model = _build(name, seed, **kw)
    torch.set_rng_state(_state_before_init(name, seed, **kw))  # the draws of the initialisation come last
    L = model.n_layers
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * L) if getattr(m, "is_residual_proj", False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
    return model


def _state_before_init(name: str, seed: int, **kw) -> torch.Tensor:
    """The CPU RNG state when the constructor starts ``_init_weights``."""
    cls = MODELS[name]
    captured = {}
    original = cls._init_weights

    def spy(self):
        captured["state"] = torch.get_rng_state()
        original(self)

    cls._init_weights = spy
    try:
        _build(name, seed, **kw)
    finally:
        cls._init_weights = original
    return captured["state"]


def _old_decay_groups(module: nn.Module) -> list[list[nn.Parameter]]:
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return [decay, no_decay]


@pytest.mark.parametrize("name", list(MODELS))
def test_sp_keeps_the_gpt2_initialisation_and_the_two_groups(name):
    model = _build(name, n_layers=3)
    reference = _gpt2_reference(name, n_layers=3)
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    groups = decay_groups(model)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g] for g in _old_decay_groups(model)]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert all("lr_mult" not in g for g in groups) and model.output_mult == 1.0
    assert all(b.attn.scale is None and b.branch_mult == 1.0 for b in model.blocks)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kw", [dict(parametrization="mup", base_width=48),
                                dict(parametrization="completep", base_width=48, base_depth=3)])
def test_at_the_base_shape_mup_and_completep_are_sp_exactly(name, kw):
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    sp, other = _build(name, d_model=48, n_layers=3), _build(name, d_model=48, n_layers=3, **kw)
    for k, v in sp.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    att = Attention(CAUSAL)
    assert torch.equal(sp.logits(sp(ids, att)), other.logits(other(ids, att)))
    assert [len(g["params"]) for g in decay_groups(sp)] == [len(g["params"]) for g in decay_groups(other)]


def test_mup_multipliers_by_hand():
    # width 128 from base 32 (m = 4), 4 heads: head size 32, 8 at the base
    model = _build("moe", d_model=128, n_heads=4, n_layers=2, parametrization="mup", base_width=32, n_experts=2,
                   top_k=1, tie_embeddings=False)
    m = 4.0
    assert model.output_mult == 1 / m
    mults = model.lr_multipliers()
    hidden = set(mults)
    expected = {n for n, _ in model.named_parameters() if n.startswith("blocks.") and n.endswith("weight")
                and ".norm" not in n and ".router." not in n}
    assert hidden == expected and set(mults.values()) == {1 / m}
    w = dict(model.named_parameters())
    # initialisation: hidden std 0.02 / sqrt(m) (residual ones 0.02 / sqrt(2 L) / sqrt(m)); embedding, head,
    # router unchanged
    assert w["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.02 / 2, rel=0.03)
    assert w["blocks.0.attn.out.weight"].std().item() == pytest.approx(0.02 / 2 / 2, rel=0.05)
    assert w["embed.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert w["head.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.router_mult == 1 / m
    # logits: the head's output over m
    h = torch.randn(3, 128)
    assert torch.equal(model.logits(h), (h @ w["head.weight"].T) * (1 / m))
    # attention: softmax(q k^T * sqrt(8) / 32) v, by hand
    attn = model.blocks[0].attn
    assert attn.scale == math.sqrt(8) / 32
    x = torch.randn(2, 5, 128)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 32).permute(2, 0, 3, 1, 4)
    q, k = attn.rotary(torch.stack([q, k], 0).permute(1, 3, 0, 2, 4)).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * (math.sqrt(8) / 32)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 128)
    torch.testing.assert_close(attn(x, None, True), attn.out(y), rtol=1e-5, atol=1e-6)


def test_router_scores_are_multiplied():
    model = _build("moe", d_model=64, parametrization="mup", base_width=32, n_experts=4, top_k=1)
    mlp = model.blocks[0].mlp
    x = torch.randn(6, 64)
    mlp(x)
    probs = F.softmax(mlp.router(x) * 0.5, dim=-1)
    # top-1 gates are the raw probabilities: the layer's output is gate * expert(x)
    e = probs.argmax(-1)
    want = torch.stack([probs[i, e[i]] * mlp.experts[int(e[i])](x[i:i + 1])[0] for i in range(6)])
    torch.testing.assert_close(mlp(x), want)


def test_head_dim_fixed_keeps_the_standard_attention_scale():
    model = _build("transformer", d_model=128, head_dim=16, parametrization="mup", base_width=32)
    assert model.blocks[0].attn.scale is None and model.n_heads == 8


def test_optimizer_groups_carry_the_multipliers_through_a_schedule():
    model = _build("transformer", d_model=64, parametrization="mup", base_width=16, tie_embeddings=False)
    opt = make_optimizer(partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), decay_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert {id(p) for g in opt.param_groups if g.get("lr_mult") for p in g["params"]} == hidden
    for n, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr"] == (1e-3 / 4 if id(p) in hidden else 1e-3), n
        assert g["weight_decay"] == (0.0 if p.ndim < 2 or "embed" in n else 0.1), n
    opt.step()
    sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3 / 8, 1e-3 / 2]


def test_copies_keep_the_multipliers_and_a_renaming_wrapper_is_refused():
    model = _build("transformer", d_model=64, parametrization="mup", base_width=32)
    groups = decay_groups(copy.deepcopy(model))
    assert [g.get("lr_mult") for g in groups] == [None, None, 0.5]
    assert len(groups[2]["params"]) == len(model.lr_multipliers()) == 2 * 4  # qkv, out, up, down per block

    class Renamed(nn.Module):  # a wrapper that holds the model's parameters under other names
        def __init__(self):
            super().__init__()
            self.inner = nn.ParameterDict({k.replace(".", "_"): p for k, p in model.named_parameters()})
            self.lr_multipliers = model.lr_multipliers

    with pytest.raises(UserError, match="find no parameter of that name"):
        decay_groups(Renamed())


def test_completep_scales_the_residual_branches_by_depth():
    model = _build("transformer", d_model=32, n_layers=8, parametrization="completep", base_width=16, base_depth=2)
    block = model.blocks[0]
    assert block.branch_mult == 0.25
    x = torch.randn(2, 6, 32)
    h = x + 0.25 * block.attn(block.norm1(x), None, True)
    torch.testing.assert_close(block(x, None, True), h + 0.25 * block.mlp(block.norm2(h)))
    # residual projections initialised for the base depth (0.02 / sqrt(2 * 2)), over sqrt(m) = sqrt(2)
    outs = torch.cat([b.attn.out.weight.flatten() for b in model.blocks])
    assert outs.std().item() == pytest.approx(0.02 / 2 / math.sqrt(2), rel=0.05)
    # alpha = 1: the hidden weights' rate depends on the width only
    assert model.lr_multipliers()["blocks.0.attn.qkv.weight"] == 0.5


@pytest.mark.parametrize("kw, phrase", [
    (dict(base_width=32), "only apply to model.parametrization=mup"),
    (dict(parametrization="mup"), "needs model.base_width"),
    (dict(parametrization="mup", base_width=32, base_depth=2), "only applies to model.parametrization=completep"),
    (dict(parametrization="completep", base_width=32), "needs model.base_depth"),
    (dict(parametrization="mu", base_width=32), "unknown model.parametrization"),
    (dict(parametrization="mup", base_width=30), "not a multiple of n_heads"),
])
def test_settings_that_would_not_take_effect_are_refused(kw, phrase):
    with pytest.raises(UserError, match=phrase):
        _build("transformer", d_model=64, **kw)


def test_export_and_widening_refuse_a_scaled_model():
    from lmlab.models.widen import widen

    model = _build("transformer", d_model=64, parametrization="mup", base_width=32)
    with pytest.raises(UserError, match="parametrization=mup"):
        Transformer.spec.hf.to_hf(model, 16)
    with pytest.raises(UserError, match="parametrization=sp"):
        widen(model, 128)


def test_a_mup_run_trains_with_the_scaled_groups(tmp_path):
    run = train_run(tmp_path, *TINY, *FAST, "model.d_model=64", "model.parametrization=mup", "model.base_width=32")
    results = json.loads((run / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["train/steps"] == 4
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    model = load_backbone(run)  # a recorded run rebuilds its multipliers
    assert model.parametrization.kind == "mup" and model.output_mult == 0.5
    assert model.lr_multipliers()["blocks.0.attn.qkv.weight"] == 0.5


def test_the_attention_statistics_see_the_scores_muP_computes():
    from lmlab.training.stats import attention_stats

    model = _build("transformer", d_model=64, parametrization="mup", base_width=16)
    attn, seen = model.blocks[0].attn, {}
    attn.inspect = lambda q, k, mask, causal: seen.update(stats=attention_stats(q, k, mask, causal))
    x = torch.randn(1, 6, 64) * 30
    attn(x, None, True)
    q, k, _ = attn.qkv(x).view(1, 6, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k = attn.rotary(torch.stack([q, k], 0).permute(1, 3, 0, 2, 4)).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * (math.sqrt(4) / 16)
    top = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")).amax()
    torch.testing.assert_close(seen["stats"][1], top)
