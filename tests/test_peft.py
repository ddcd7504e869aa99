"""eval=peft: LoRA and (IA)^3 through the peft library on every model, with known answers (identity at
initialisation, trained-parameter counts by formula, frozen weights bit-identical)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate
from torch import nn

from lmlab.attention import Attention
from lmlab.data.datamodule import DataModule
from lmlab.data.source import Source
from lmlab.errors import UserError
from lmlab.evaluation.peft import Peft, adapt, base_weights, check_frozen, count_parameters, default_targets
from lmlab.models.transformer import Transformer
from lmlab.objectives.mlm import MLM
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

from .conftest import FAST, TINY

MODELS = Path(__file__).resolve().parents[1] / "lmlab" / "conf" / "model"
SMALL = {"d_model": 16, "n_layers": 1}
SMALL_BY_MODEL = {"hat": {"d_word": 16, "n_heads": 2, "byte_heads": 2}, "transformer": {"n_heads": 2},
                  "moe": {"n_heads": 2}, "transnormer": {"n_heads": 2}, "mom": {"n_heads": 2, "head_dim": 8},
                  "mamba2": {"headdim": 8}, "hyena": {"l_max": 64, "filter_order": 8}}


def tiny_model(name: str):
    cfg = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    cfg.update(SMALL, **SMALL_BY_MODEL.get(name, {}))
    torch.manual_seed(0)
    model = instantiate(cfg, vocab_size=260 if name == "hat" else 40)
    kind = model.supported_attention[0]
    ids = torch.randint(N_SPECIAL, model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, kind, ids


def by_formula(model: nn.Module, method: str, targets: list[str], ff: list[str], r: int) -> int:
    """Trained parameters by hand: LoRA r (in + out) per linear layer, r (V + d) per embedding; (IA)^3 out per
    layer, in per feed-forward layer."""
    total = 0
    for name, m in model.named_modules():
        path = set(name.split("."))
        if not path & set(targets):
            continue
        if isinstance(m, nn.Linear):
            if method == "lora":
                total += r * (m.in_features + m.out_features)
            else:
                total += m.in_features if path & set(ff) else m.out_features
        elif isinstance(m, nn.Embedding) and method == "lora":
            total += r * (m.num_embeddings + m.embedding_dim)
    return total


@pytest.mark.parametrize("name", sorted(p.stem for p in MODELS.glob("*.yaml")))
def test_adapters_on_every_model(name):
    model, kind, ids = tiny_model(name)
    model.eval()
    with torch.no_grad():
        reference = model(ids, Attention(kind))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    methods = ["lora"] if name == "lstm" else ["lora", "ia3"]
    for method in methods:
        targets, ff = default_targets(model, method)
        adapted = adapt(model, method, r=4)
        adapted.eval()
        # at initialisation (LoRA: B = 0; (IA)^3: ones) the adapted copy equals the frozen model exactly
        with torch.no_grad():
            assert torch.equal(adapted(ids, Attention(kind)), reference), method
        trained, total = count_parameters(adapted)
        assert trained == by_formula(model, method, targets, ff, 4) > 0, method
        assert total == sum(p.numel() for p in model.parameters()) + trained
        # one optimiser step moves the adapters and nothing else
        snapshot = {n: p.detach().clone() for n, p in base_weights(adapted).items()}
        adapters = [p for p in adapted.parameters() if p.requires_grad]
        opt = torch.optim.SGD(adapters, lr=0.1)
        adapted.train()
        for _ in range(2):  # LoRA's first step moves B only; the second also A
            opt.zero_grad()
            (adapted(ids, Attention(kind)) ** 2).mean().backward()
            opt.step()
        check_frozen(adapted, snapshot, dict(model.named_parameters()))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters), method
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the model itself is untouched
    assert not any("lora" in n or "ia3" in n for n, _ in model.named_parameters())
    if name == "lstm":
        with pytest.raises(UserError, match="method=lora"):
            adapt(model, "ia3")


def test_check_frozen_raises_on_a_changed_weight():
    model, kind, _ = tiny_model("transformer")
    adapted = adapt(model, "lora", r=2)
    snapshot = {n: p.detach().clone() for n, p in base_weights(adapted).items()}
    check_frozen(adapted, snapshot, dict(model.named_parameters()))
    with torch.no_grad():
        adapted.blocks[0].attn.qkv.base_layer.weight[0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        check_frozen(adapted, snapshot, dict(model.named_parameters()))


def test_settings_that_name_no_layer_are_user_errors():
    model, _, _ = tiny_model("transformer")
    with pytest.raises(UserError, match="eval.peft.target_modules"):
        adapt(model, "lora", target_modules=["nope"])
    with pytest.raises(UserError, match="feedforward_modules"):
        adapt(model, "ia3", target_modules=["qkv"], feedforward_modules=["down"])
    with pytest.raises(UserError, match="lora or ia3"):
        adapt(model, "prompt")
    lora = adapt(model, "lora", target_modules=["qkv"], r=3)  # a settable list: qkv alone
    assert count_parameters(lora)[0] == 3 * (16 + 48)
    lora = adapt(model, "lora", target_modules=["blocks.0.mlp.up"], r=3)  # a full name
    assert count_parameters(lora)[0] == 3 * (16 + 64)


def test_a_model_without_defaults_gets_every_block_linear_layer():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4)) for _ in range(2))
            self.router = nn.Linear(4, 2)
            self.head = nn.Linear(4, 9)

    targets, ff = default_targets(Other(), "lora")
    assert targets == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"] and ff == []
    assert count_parameters(adapt(Other(), "lora", r=2))[0] == 4 * 2 * (4 + 5)


class ParitySource(Source):
    """Rows of 6 words; the label is whether word 2 is below the middle of the vocabulary (0/1)."""

    tasks = {"half": 2}

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + 20

    def _split(self, n: int, seed: int) -> Dataset:
        words = np.random.default_rng(seed).integers(N_SPECIAL, self.vocab_size, size=(n, 6))
        rows = [[BOS_ID, *map(int, w), EOS_ID] for w in words]
        return Dataset.from_dict({"input_ids": rows, "half": [int(w[2] >= N_SPECIAL + 10) for w in words]})

    def build(self) -> DatasetDict:
        sizes = {"train": 20, "validation": 20, "test": 200, "downstream": 600}
        return DatasetDict({k: self._split(n, i) for i, (k, n) in enumerate(sizes.items())})


def test_evaluator_trains_adapters_and_head_only():
    source = ParitySource()
    dm = DataModule(source, source.build(), batch_size=16, seed=0)
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, "bidirectional", d_model=32, n_layers=1, n_heads=2)
    model.train()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    module = SimpleNamespace(model=model, objective=MLM())
    out = Peft(r=4, epochs=8, lr=3e-3, seeds=2, pooling="concat")(module, dm, None)
    assert set(out) == {f"peft/{k}" for k in ("acc", "acc_std", "acc_ci95", "chance", "ece", "trained_params",
                                                "trained_share")}
    lora = 4 * (32 + 96) + 4 * (32 + 32) + 2 * 4 * (32 + 128)  # qkv, out, up and down (d_ff 128)
    head = (8 * 32 + 1) * 2  # concat pooling over the 8 tokens of a row, 2 classes
    assert out["peft/trained_params"] == lora + head
    assert out["peft/trained_share"] == pytest.approx((lora + head) / (model.num_parameters() + lora + head))
    assert out["peft/acc"] > out["peft/chance"] + 0.1, out  # word 2 is readable from the concatenated states
    assert model.training and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    ia3 = Peft(method="ia3", epochs=1, seeds=1)(module, dm, None)
    assert ia3["peft/trained_params"] == 96 + 128 + (32 + 1) * 2  # qkv scaled at its output, down at its input; head


def test_peft_through_the_cli(lmlab):
    code, out = lmlab("train", *TINY, *FAST, "objective=mlm", "eval=peft", "eval.peft.method=ia3",
                      "eval.peft.target_modules=[qkv,down]")
    assert code == 0, out
    run = next(lmlab.runs.rglob("results.json")).parent
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    d, layers = 64, 2
    assert metrics["peft/trained_params"] == layers * (3 * d + 4 * d) + (d + 1) * 3  # task_a: 3 classes
    code, out = lmlab("train", *TINY, *FAST, "eval=peft", "eval.peft.method=dora")
    assert code == 2 and "eval.peft.method" in out
