"""Hugging Face import (``init_from.hf``, the models' ``HFAdapter.from_hf``): export -> import gives the same
logits for every architecture export supports, and a checkpoint built by ``transformers`` itself continues
pretraining through ``lmlab train data=text init_from.hf=<dir>`` with the checkpoint recorded as the parent."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lmlab.attention import CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.spec import hf_adapter
from lmlab.vocab import BOS_ID
from tests.conftest import FAST, stressed_model

VOCAB = 40
TRANSFORMER = {"_target_": "lmlab.models.transformer.Transformer", "d_model": 16, "n_layers": 2, "n_heads": 2}
MAMBA = {"_target_": "lmlab.models.mamba.Mamba", "d_model": 16, "n_layers": 2}
CONFIGS = {  # tiny shapes; weights moved away from their initial values (norms, biases, Δ, A, D)
    "GPT2LMHeadModel": {**TRANSFORMER, "norm": "layernorm", "positions": "learned", "max_len": 16, "norm_eps": 1e-6},
    "ArceeForCausalLM": {**TRANSFORMER, "rope_base": 500.0, "norm_eps": 1e-5},
    "LlamaForCausalLM": {**TRANSFORMER, "mlp": "swiglu", "tie_embeddings": False, "d_ff": 24},
    "MambaForCausalLM": {**MAMBA, "norm_eps": 1e-5},
    "Mamba2ForCausalLM": {**MAMBA, "_target_": "lmlab.models.mamba2.Mamba2", "chunk_size": 4,
                          "tie_embeddings": False, "norm_eps": 1e-5},
}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids, Attention(CAUSAL)))


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_export_then_import_gives_the_same_logits(architecture, tmp_path):
    """lmlab -> transformers checkpoint on disk -> lmlab: every setting and every weight comes back (logits equal
    to 1e-6), through the model's own adapter both ways."""
    from transformers import AutoModelForCausalLM

    from lmlab.export import hf_model

    model = stressed_model(CONFIGS[architecture], VOCAB)
    hf = hf_model(model, 16)
    assert type(hf).__name__ == architecture
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    kwargs, state = hf_adapter(type(model)).from_hf(loaded.config, loaded.state_dict())
    back = get_class(CONFIGS[architecture]["_target_"])(VOCAB, CAUSAL, **kwargs)
    back.load_state_dict(state, strict=True)
    back.eval()
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = BOS_ID
    ours, again = _logits(model, ids), _logits(back, ids)
    assert ours.abs().max() > 0.1  # the logits carry signal
    assert (ours - again).abs().max() <= 1e-6
    theirs = loaded(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4 * (1 + ours.abs().max())


def test_a_checkpoint_the_model_does_not_compute_is_refused_in_one_sentence(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    with pytest.raises(UserError, match=r"the LlamaForCausalLM checkpoint has num_key_value_heads=2 \(grouped-query "
                                        r"attention\), which lmlab's Transformer does not compute"):
        hf_adapter(get_class(TRANSFORMER["_target_"])).from_hf(config, {})


# ----- a checkpoint built by transformers itself, continued by `lmlab train` -----

def _transformers_checkpoint(path, sample_text: str, layout: str = "lmlab") -> None:
    """Random weights and a fast BPE tokenizer trained on ``sample_text``, each saved by transformers'
    save_pretrained. ``layout="lmlab"``: a Llama whose tokenizer has lmlab's four special tokens as ids 0..3;
    ``"gpt2"``: a Mamba whose tokenizer has GPT-2's one ``<|endoftext|>`` (id 0) as its BOS and EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"] if layout == "lmlab" else ["<|endoftext|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(sample_text.splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if layout == "lmlab":
        roles = dict(pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")
    else:
        roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **roles).save_pretrained(path)
    torch.manual_seed(0)
    if layout == "lmlab":
        config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config = MambaConfig(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4, time_step_rank=2, layer_norm_epsilon=1e-5, use_bias=False,
                             use_conv_bias=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        MambaForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize(("layout", "model", "vocab"), [("lmlab", "transformer", 320), ("gpt2", "mamba", 304)])
def test_a_transformers_checkpoint_continues_pretraining(layout, model, vocab, tmp_path, cache_dir):
    """``lmlab train data=text init_from.hf=<dir>``: the run builds the checkpoint's model, reads the text with its
    tokenizer (GPT-2's layout: lmlab's special tokens as 4 new ids first), starts from its weights, trains, and
    records the checkpoint as its parent."""
    from transformers import AutoModelForCausalLM

    from lmlab import run_dir
    from lmlab.cli import main
    from lmlab.data.tokenizers import SAMPLES

    ckpt = tmp_path / "ckpt"
    _transformers_checkpoint(ckpt, (SAMPLES / "tiny_corpus.txt").read_text(), layout)
    out = tmp_path / "runs"
    try:
        main(["train", f"out_dir={out}", *FAST, "data=text", "data.block_size=32", "eval=[perplexity]",
              f"model={model}", f"init_from.hf={ckpt}"])
    except SystemExit as e:
        raise AssertionError(f"training failed with exit code {e.code}") from e
    (done,) = out.rglob("DONE")
    run = done.parent
    parent = run_dir.read_parent(run)
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    assert parent["hf"] == str(ckpt.resolve()) and parent["architecture"] == type(hf).__name__
    assert json.loads((run / "results.json").read_text())["init_from"] == parent
    assert run_dir.model_args(run)["vocab_size"] == vocab
    cfg = run_dir.read_config(run)
    trained = run_dir.load_backbone(run)
    if layout == "lmlab":
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.mlp, cfg.model.tie_embeddings, cfg.model.norm_eps) \
            == (32, 2, "swiglu", False, 1e-5)
        assert cfg.data.tokenizer.path == str(ckpt.resolve() / "tokenizer.json")
        start, now = hf.model.layers[0].mlp.gate_proj.weight, trained.blocks[0].mlp.gate.weight
    else:
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.d_state, cfg.model.dt_rank, cfg.model.norm_eps) == \
            (32, 2, 8, 2, 1e-5)
        assert "hf_tokenizers" in cfg.data.tokenizer.path
        assert parent["operators"][1] == ("vocabulary: ids shifted by 4 for lmlab's special tokens ([PAD] from the "
                                          "mean row, [BOS] from id 0, [EOS] from id 0, [MASK] from the mean row)")
        start, now = hf.backbone.layers[0].mixer.in_proj.weight, trained.blocks[0].mixer.in_proj.weight
    # the run started from the checkpoint's weights and trained them: close to them after 4 steps, not equal
    assert not torch.equal(start, now) and (start - now).abs().max() < 0.05



def test_the_lineage_of_an_imported_run_names_the_checkpoint(tmp_path, capsys):
    """``lmlab report <run>`` on a run continued from a transformers checkpoint: the checkpoint is its parent,
    shown as a checkpoint (it is not a run, so it has no run status)."""
    from lmlab import run_dir
    from lmlab.cli import main

    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ckpt.mkdir()
    run_dir.write_parent(run, {"run": str(ckpt), "hf": str(ckpt), "architecture": "LlamaForCausalLM",
                               "status": "imported", "operators": ["import: LlamaForCausalLM -> Transformer"]})
    (run / run_dir.CONFIG).write_text("seed: 0\n")
    main(["report", str(run)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"  <- {ckpt}  [transformers checkpoint, LlamaForCausalLM]  ?  init_from: import: "
                        "LlamaForCausalLM -> Transformer"), lines


def test_a_tokenizer_in_another_layout_is_shifted_and_the_model_with_it(tmp_path):
    """GPT-2's layout: lmlab's ids are the checkpoint's plus 4, and the imported model's logits over the old ids
    are the checkpoint's logits, exactly; the new special rows copy the rows of the same roles."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.data.tokenizers import SAMPLES
    from lmlab.training.init_from import hf_settings, import_hf

    ckpt = tmp_path / "ckpt"
    text = (SAMPLES / "tiny_corpus.txt").read_text()
    _transformers_checkpoint(ckpt, text, "gpt2")
    cfg = OmegaConf.create({"model": MAMBA, "cache_dir": str(tmp_path / "cache"), "init_from": {"hf": str(ckpt)},
                            "data": {"tokenizer": {"_target_": "lmlab.data.tokenizers.BPE"}}})
    cfg = hf_settings(cfg)
    ours = instantiate(cfg.data.tokenizer)
    theirs = AutoTokenizer.from_pretrained(ckpt)
    sample = [text.splitlines()[0][:60], "unseen wörds 🙂 [EOS]"]
    assert ours.encode(sample) == [[i + 4 for i in theirs(t)["input_ids"]] for t in sample]
    # as everywhere in lmlab, a special token's string inside a text is text
    assert 4 not in ours.encode(["a <|endoftext|> b"])[0] and 0 in theirs("a <|endoftext|> b")["input_ids"]
    model = instantiate(cfg.model, vocab_size=ours.vocab_size, attention=CAUSAL).eval()
    assert model.vocab_size == 304
    record = import_hf(ckpt, model)
    assert record["operators"][0] == "import: MambaForCausalLM -> Mamba"
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([theirs(sample[0])["input_ids"][:12]])
    logits = _logits(model, ids + 4)
    assert (logits[..., 4:] - hf(input_ids=ids).logits).abs().max() <= 1e-4
    embed = model.embed.weight
    assert torch.equal(embed[1], embed[4]) and torch.equal(embed[2], embed[4])  # [BOS], [EOS] <- <|endoftext|>
    assert torch.allclose(embed[0], hf.backbone.embeddings.weight.mean(0))  # [PAD]: no pad token named


def test_an_architecture_override_the_checkpoint_fixes_is_refused(tmp_path, lmlab):
    from lmlab.data.tokenizers import SAMPLES

    ckpt = tmp_path / "llama"
    _transformers_checkpoint(ckpt, (SAMPLES / "tiny_corpus.txt").read_text())
    code, out = lmlab("train", *FAST, "data=text", f"init_from.hf={ckpt}", "model.d_model=64")
    assert code == 2, out
    assert (f"init_from.hf={ckpt.resolve()} fixes the model's architecture (d_model=32), so model.d_model=64 would "
            "not take effect: drop the override.") in out
    assert "Traceback" not in out and not list(lmlab.runs.rglob("results.json"))
    code, out = lmlab("train", *FAST, "data=text", f"init_from.hf={ckpt}", "model=mamba")
    assert code == 2 and "holds a LlamaForCausalLM, which model=mamba does not import: choose model=transformer." \
        in out, out


def test_import_settings_that_cannot_work_are_refused_in_one_sentence(tmp_path):
    from lmlab.data.tokenizers import SAMPLES
    from lmlab.training.init_from import hf_settings

    ckpt = tmp_path / "ckpt"
    _transformers_checkpoint(ckpt, (SAMPLES / "tiny_corpus.txt").read_text())

    def settings(**changes):
        cfg = OmegaConf.create({"model": TRANSFORMER, "cache_dir": str(tmp_path / "cache"),
                                "init_from": {"hf": str(ckpt)},
                                "data": {"_target_": "lmlab.data.text.TextSource",
                                         "tokenizer": {"_target_": "lmlab.data.tokenizers.BPE"}}})
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
        return hf_settings(cfg)

    assert settings().model.d_model == 32  # the checkpoint's, not the YAML's 16
    cases = {
        "init_from.hf": (str(tmp_path / "nowhere"), "is not a directory: point it at a local transformers checkpoint"),
        "init_from.run": (str(tmp_path), "init_from.run and init_from.hf are both set: start from one of them"),
        "init_from.reset": (["head"], "init_from.reset, init_from.depth and init_from.layers apply to init_from.run"),
        "data": ({"_target_": "lmlab.data.pcfg.PCFGSource"}, "and data=PCFGSource has no tokenizer: use data=text"),
        "data.tokenizer": ({"_target_": "lmlab.data.tokenizers.Byte"},
                           "not data.tokenizer (lmlab.data.tokenizers.Byte)"),
        "model._target_": ("lmlab.models.mamba.Mamba", "holds a LlamaForCausalLM, which model=mamba does not import: "
                                                       "choose model=transformer."),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            settings(**{key: value})
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"holds no tokenizer.json: save the checkpoint's fast tokenizer there"):
        settings()
