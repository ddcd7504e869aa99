"""Model specs (lmlab/models/spec.py): every model declares its own, the FSDP trainer, peft, widening, export and
import read it, and a model added by following docs/adding-a-recipe.md alone (a module and a YAML outside lmlab)
exports, imports, takes LoRA targets and has an FSDP unit."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.spec import declared_models, spec_of, wrap_policy

MODELS = Path(__file__).resolve().parents[1] / "lmlab" / "conf" / "model"


@pytest.mark.parametrize("name", sorted(p.stem for p in MODELS.glob("*.yaml")))
def test_every_model_declares_its_own_spec(name):
    cls = get_class(OmegaConf.load(MODELS / f"{name}.yaml")._target_)
    spec = spec_of(cls)
    assert cls in declared_models()
    assert spec.lora  # every model has LoRA targets of its own
    if spec.block is not None:  # the FSDP unit is the model's block class, one per layer
        model = instantiate(OmegaConf.load(MODELS / f"{name}.yaml"), vocab_size=260, attention=CAUSAL)
        assert sum(type(m) is spec.block for m in model.modules()) >= 2


@pytest.mark.parametrize(("model", "block"), [("transformer", "lmlab.models.transformer.Block"),
                                               ("mamba", "lmlab.models.mamba.MixerBlock"),
                                               ("hyena", "lmlab.models.hyena.HyenaBlock")])
def test_fsdp_wraps_the_block_class_the_model_declares(model, block):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose("train", ["trainer=fsdp", f"model={model}"])
    policy = instantiate(cfg.trainer.strategy.auto_wrap_policy)
    assert policy._module_classes == {get_class(block)}


def test_a_model_without_a_spec_or_without_a_mapping_is_refused_in_one_sentence():
    from lmlab.export import hf_model
    from lmlab.models.lstm import LSTM
    from lmlab.models.moe import MoETransformer
    from lmlab.models.transformer import Transformer
    from lmlab.models.widen import widen

    class Unspecified(Transformer):  # a subclass never inherits its parent's spec
        pass

    with pytest.raises(UserError, match=r"^model Unspecified declares no spec: set `spec = ModelSpec\(...\)`"):
        spec_of(Unspecified)
    with pytest.raises(UserError, match="model LSTM declares no block class to shard: set its spec's block"):
        wrap_policy("lmlab.models.lstm.LSTM")
    with pytest.raises(UserError, match="model MoETransformer declares no widening in its spec"):
        widen(MoETransformer(12, CAUSAL, d_model=16, n_layers=1, n_heads=2, n_experts=2, top_k=1), 32)
    with pytest.raises(UserError, match="the run's model is LSTM, which lmlab cannot export exactly"):
        hf_model(LSTM(12, CAUSAL, d_model=8, n_layers=1))


# ----- a new model, following docs/adding-a-recipe.md alone -----

MODULE = '''
"""A Transformer whose residual output projections start at zero, so that every block starts as the identity
(the zero-initialised residual branches of Fixup, Zhang et al. 2019, arXiv 1901.09321)."""

from dataclasses import replace

from torch import nn

from lmlab.models.transformer import Transformer


class ZeroResidual(Transformer):
    """``Transformer`` with ``attn.out`` and ``mlp.down`` zero at initialisation."""

    # the Transformer's blocks, weights and Hugging Face mapping; LoRA on the attention only
    spec = replace(Transformer.spec, lora=("qkv", "out"))

    def _init_weights(self) -> None:
        super()._init_weights()
        for m in self.modules():
            if isinstance(m, nn.Linear) and getattr(m, "is_residual_proj", False):
                nn.init.zeros_(m.weight)
'''
YAML = '''
_target_: zero_residual_pkg.zero_residual.ZeroResidual
d_model: 16
n_layers: 2
n_heads: 2
mlp: swiglu
'''


def test_a_model_added_by_the_docs_alone_exports_imports_adapts_and_shards(tmp_path, monkeypatch):
    from lmlab.data.tokenizers import Byte
    from lmlab.evaluation.peft import adapt
    from lmlab.export import hf_model
    from lmlab.training.init_from import hf_settings, import_hf

    package = tmp_path / "zero_residual_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "zero_residual.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "zero_residual.yaml").write_text(textwrap.dedent(YAML))
    monkeypatch.syspath_prepend(str(tmp_path))
    model_cfg = OmegaConf.load(tmp_path / "zero_residual.yaml")
    vocab = Byte().vocab_size
    torch.manual_seed(0)
    model = instantiate(model_cfg, vocab_size=vocab, attention=CAUSAL).eval()
    with torch.no_grad():  # trained weights: the residual projections no longer zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # exports (the Transformer's adapter: SwiGLU -> Llama), with a tokenizer, as `lmlab export` writes it
    ckpt = tmp_path / "ckpt"
    hf = hf_model(model, 32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf.save_pretrained(ckpt)
    Byte().to_hf(32).save_pretrained(ckpt)
    # imports into the same class through init_from.hf
    cfg = OmegaConf.create({"model": model_cfg, "data": {"tokenizer": {"_target_": "lmlab.data.tokenizers.BPE"}},
                            "init_from": {"hf": str(ckpt)}, "cache_dir": str(tmp_path / "cache")})
    cfg = hf_settings(cfg)
    assert cfg.data.tokenizer.path == str(ckpt / "tokenizer.json")
    back = instantiate(cfg.model, vocab_size=vocab, attention=CAUSAL).eval()
    record = import_hf(ckpt, back)
    assert record["operators"] == ["import: LlamaForCausalLM -> ZeroResidual"]
    ids = torch.randint(4, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.logits(model(ids, Attention(CAUSAL))) - back.logits(back(ids, Attention(CAUSAL)))).abs().max() \
            <= 1e-6
    # takes its own LoRA targets
    adapted = adapt(model, "lora", r=2)
    wrapped = {name.split(".lora_A")[0] for name, _ in adapted.named_parameters() if ".lora_A" in name}
    assert wrapped == {f"blocks.{i}.attn.{x}" for i in range(2) for x in ("qkv", "out")}
    # and has an FSDP unit: the Transformer's block
    from lmlab.models.transformer import Block

    assert wrap_policy(model_cfg._target_)._module_classes == {Block}
    assert spec_of(sys.modules["zero_residual_pkg.zero_residual"].ZeroResidual).block is Block
