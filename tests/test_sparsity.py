"""SPDF (Thangarasa et al. 2023, arXiv 2303.10464): fixed random masks in pretraining, dense fine-tuning after.

Known answers: each masked matrix holds exactly round(sparsity * n) zeros, the same ones, after AdamW steps with
weight decay; the dense copy's first forward equals the sparse model's; the sparse-ideal FLOPs are the dense
count less 6 per masked weight; sparsity is a setting of training (no model takes it); a resumed sparse run
takes its masks from the checkpoint; a sparse run's model.pt loads as a plain model (zeros in place) with the
sparse logits; an old-syntax ``model.sparsity`` is refused with the new key.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

from lmlab.attention import Attention
from lmlab.errors import UserError
from lmlab.models.lstm import LSTM
from lmlab.models.moe import MoETransformer
from lmlab.models.sparsity import densify, draw_mask, is_sparse, masks, sparsify
from lmlab.models.transformer import Transformer
from lmlab.optim import decay_groups
from tests.conftest import TINY

CAUSAL = Attention("causal")


def tiny(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=20, d_model=16, n_layers=2, n_heads=2, **kwargs)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 20, (3, 10), generator=torch.Generator().manual_seed(seed))


def test_draw_mask_has_exactly_round_sparsity_n_zeros():
    g = torch.Generator().manual_seed(0)
    for shape, s in [((48, 16), 0.75), ((7, 3), 0.5), ((5, 5), 0.1), ((4, 4), 0.0)]:
        mask = draw_mask(shape, s, g)
        assert mask.dtype == torch.bool and mask.shape == shape
        assert int((~mask).sum()) == round(s * shape[0] * shape[1])


@pytest.mark.parametrize("fused", [False, True])
def test_masked_weights_stay_exactly_zero_under_adamw_weight_decay(fused):
    model = tiny()
    sparsify(model, 0.75, seed=0)
    before = {k: v.clone() for k, v in masks(model).items()}
    assert len(before) == 8  # qkv, out, up, down in each of 2 blocks; not the embedding, head or norms
    assert not parametrize.is_parametrized(model.head) and not parametrize.is_parametrized(model.embed)
    start = {n: m.weight.detach().clone() for n, m, _ in model.sparse_targets()}
    opt = torch.optim.AdamW(decay_groups(model), lr=1e-2, weight_decay=0.5, fused=fused)
    for step in range(5):
        loss = model.logits(model(ids(step), CAUSAL)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert masks(model).keys() == before.keys()
    for name, module, _ in model.sparse_targets():
        mask = before[name]
        assert torch.equal(masks(model)[name], mask)  # the masks never move
        weight, original = module.weight, module.parametrizations.weight.original
        assert int((weight == 0).sum()) == round(0.75 * weight.numel())  # exactly the masked ones are zero
        assert torch.equal(weight == 0, ~mask)
        assert torch.all(original[~mask] == 0)  # decay and the moments do not revive the stored parameter
        assert not torch.equal(weight, start[name])  # while the kept weights did train


def test_masks_are_seeded_per_matrix_and_leave_the_global_stream_alone():
    a, b, c = tiny(), tiny(), tiny()
    state = torch.get_rng_state()
    sparsify(a, 0.75, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    sparsify(b, 0.75, seed=3)
    sparsify(c, 0.75, seed=4)
    ma, mb, mc = masks(a), masks(b), masks(c)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not any(torch.equal(ma[k], mc[k]) for k in ma)
    assert not torch.equal(ma["blocks.0.mlp.up"], ma["blocks.1.mlp.up"])  # one mask per matrix
    # the sparse model starts from the dense model's initialisation, masked
    dense = tiny()
    for name, module, _ in a.sparse_targets():
        plain = dict(dense.named_modules())[name].weight
        assert torch.equal(module.weight, plain * ma[name])


def test_dense_copy_starts_from_the_sparse_function_and_trains_every_weight():
    model = tiny()
    sparsify(model, 0.75, seed=0)
    model.eval()
    with torch.no_grad():
        sparse_logits = model.logits(model(ids(), CAUSAL))
    dense = densify(copy.deepcopy(model))
    assert not is_sparse(dense) and is_sparse(model)
    assert set(dense.state_dict()) == set(tiny().state_dict())  # plain keys: a dense model's
    with torch.no_grad():
        first = dense.logits(dense(ids(), CAUSAL))
    torch.testing.assert_close(first, sparse_logits, atol=1e-6, rtol=0)
    zeros = dense.blocks[0].mlp.up.weight == 0
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    dense.logits(dense(ids(), CAUSAL)).square().mean().backward()
    opt.step()
    assert (dense.blocks[0].mlp.up.weight[zeros] != 0).float().mean() > 0.5  # the fine-tune is dense


def test_sparse_flops_are_the_dense_count_less_six_per_masked_weight():
    model = tiny()  # per block: qkv 48x16, out 16x16, up 64x16, down 16x64; 75% of each masked
    per_block = round(0.75 * 768) + round(0.75 * 256) + 2 * round(0.75 * 1024)
    assert per_block == 2304
    assert model.sparse_flops_per_token(10, 0.75) == model.flops_per_token(10) - 6.0 * 2 * 2304
    assert model.sparse_flops_per_token(10, 0.0) == model.flops_per_token(10)
    # a mixture of experts: each expert's matrices count for the top_k / n_experts of tokens that use them
    torch.manual_seed(0)
    moe = MoETransformer(vocab_size=20, d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=1)
    attn = round(0.5 * 768) + round(0.5 * 256)
    experts = 4 * (round(0.5 * 1024) * 2) / 4
    router = round(0.5 * 4 * 16)
    expected = moe.flops_per_token(10) - 6.0 * (attn + experts + router)
    assert moe.sparse_flops_per_token(10, 0.5) == pytest.approx(expected)


def test_sparsity_is_a_setting_of_training_and_bad_values_are_refused():
    from lmlab.objectives.clm import CLM
    from lmlab.training.module import LMModule

    with pytest.raises(TypeError, match="sparsity"):  # no model takes it
        Transformer(vocab_size=20, d_model=16, n_layers=2, n_heads=2, sparsity=0.5)
    make = functools.partial(LMModule, objective=CLM(), optimizer=torch.optim.AdamW, schedule=None)
    module = make(tiny(), sparsity=0.5)
    assert module.sparsity == 0.5 and not is_sparse(module.model)
    module.configure_model()  # as fit starts: the masks go on
    assert is_sparse(module.model) and len(masks(module.model)) == 8
    module.on_fit_end()
    assert not is_sparse(module.model)
    dense = make(tiny())
    dense.configure_model()
    assert dense.sparsity == 0.0 and not is_sparse(dense.model)
    with pytest.raises(UserError, match="sparsity=1.0 must be at least 0 and below 1"):
        make(tiny(), sparsity=1.0)
    with pytest.raises(UserError, match="model LSTM has no weight matrices in its blocks to mask"):
        make(LSTM(vocab_size=20, d_model=16), sparsity=0.5)


def test_sparsity_is_checked_and_the_old_key_names_the_new_one(lmlab):
    code, out = lmlab("train", "sparsity=1.5")
    assert code == 2 and "sparsity must be less than 1" in out
    code, out = lmlab("train", "model.sparsity=0.5")
    assert code == 2, out
    assert "lmlab: error: model.sparsity is now sparsity" in out and "pass sparsity=0.5 instead." in out


def _run(root: Path) -> Path:
    runs = [p.parent for p in root.rglob("config_resolved.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def test_sparse_run_checkpoints_resumes_and_loads(lmlab):
    """A sparse run: the checkpoint holds the masks and a resumed run keeps them (even masks planted in the
    checkpoint by hand); model.pt is a plain model with zeros in place, loaded by load_backbone with the sparse
    model's logits; ``lmlab eval run=... eval=finetune`` fine-tunes it."""
    from lmlab.run_dir import load_backbone, run_name

    args = ["train", *TINY, "sparsity=0.75", "max_steps=4", "val_every=2", "checkpoint_every=2",
            "batch_size=16", "logger=none", "eval=[perplexity]", "model.d_model=32"]
    code, out = lmlab(*args)
    assert code == 0, out
    run = _run(lmlab.runs)
    weights = torch.load(run / "model.pt", weights_only=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("parametrizations" in k for k in weights)  # plain keys
    n_masked = 0
    for key, mask in ckpt.items():
        if key.startswith("model.") and key.endswith("parametrizations.weight.0.mask"):
            name = key[len("model."):-len(".parametrizations.weight.0.mask")]
            assert torch.equal(weights[f"{name}.weight"] != 0, mask)
            assert int((~mask).sum()) == round(0.75 * mask.numel())
            n_masked += 1
    assert n_masked == 8

    # load_backbone: a plain model; its logits are the sparse model's (rebuilt from the checkpoint, masks on)
    model = load_backbone(run)
    assert not is_sparse(model)
    sparse = copy.deepcopy(model)
    sparsify(sparse, 0.75, seed=123)
    sparse.load_state_dict({k[len("model."):]: v for k, v in ckpt.items() if k.startswith("model.")})
    assert is_sparse(sparse)
    x = torch.randint(4, model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(x, CAUSAL)), sparse.logits(sparse(x, CAUSAL)),
                                   atol=1e-6, rtol=0)

    # resume from the step-2 checkpoint with other masks planted in it: the run keeps the checkpoint's masks
    step2 = torch.load(run / "checkpoints" / "previous-last.ckpt", weights_only=True)
    assert step2["global_step"] == 2
    key = "blocks.0.mlp.up.parametrizations.weight"
    planted = draw_mask(step2["state_dict"][f"model.{key}.0.mask"].shape, 0.75, torch.Generator().manual_seed(9))
    for prefix in ("model.", "forward_model."):
        if f"{prefix}{key}.0.mask" in step2["state_dict"]:
            step2["state_dict"][f"{prefix}{key}.0.mask"] = planted
            step2["state_dict"][f"{prefix}{key}.original"] *= planted
    resumed_dir = lmlab.runs / "resumed" / run_name([*args[1:], "name=resumed"])
    (resumed_dir / "checkpoints").mkdir(parents=True)
    torch.save(step2, resumed_dir / "checkpoints" / "last.ckpt")
    code, out = lmlab(*args, "name=resumed")
    assert code == 0 and "resuming from" in out, out
    again = torch.load(resumed_dir / "model.pt", weights_only=True)
    assert torch.equal(again["blocks.0.mlp.up.weight"] != 0, planted)
    assert torch.equal(again["blocks.1.mlp.up.weight"] != 0, weights["blocks.1.mlp.up.weight"] != 0)

    code, out = lmlab("eval", f"run={run}", "eval=finetune", "eval.finetune.epochs=1")
    assert code == 0, out
    assert "finetune/acc" in json.loads((run / "evals" / "1.json").read_text())["metrics"]


def test_a_run_recorded_with_model_sparsity_reads_as_the_training_setting(tmp_path):
    """Runs recorded while sparsity was a model key: their config reads with the run's sparsity and a model node
    that builds (model.pt holds the densified weights)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lmlab.run_dir import CONFIG, read_config

    model = {"_target_": "lmlab.models.transformer.Transformer", "d_model": 16, "n_layers": 1, "n_heads": 2}
    OmegaConf.save({"seed": 0, "model": {**model, "sparsity": 0.75}}, tmp_path / CONFIG)
    cfg = read_config(tmp_path)
    assert cfg.sparsity == 0.75 and "sparsity" not in cfg.model
    built = instantiate(cfg.model, vocab_size=20, attention="causal")
    assert isinstance(built, Transformer) and not is_sparse(built)
