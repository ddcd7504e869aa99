"""``lmlab export`` (``lmlab.export``): a finished run as a Hugging Face ``transformers`` checkpoint.

Known answers from an independent implementation, ``transformers`` itself: for every exportable
configuration a tiny model is trained through the real CLI, exported, loaded back with ``AutoModelForCausalLM``
and ``AutoTokenizer``, and its logits equal lmlab's at the real positions of rows with and without right
padding; the tokenizer's ids equal lmlab's for the same text and decode back to it. Then the refusals (one
sentence naming what exports), the tokenizer alone for each lmlab tokenizer, and the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab import run_dir
from lmlab.attention import BIDIRECTIONAL, CAUSAL, Attention
from lmlab.data.tokenizers import BPE, DNA, SAMPLES, Byte, Protein
from lmlab.errors import UserError
from lmlab.export import EXPORTABLE, RECORD, export_run, hf_tokenizer
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID
from tests.conftest import FAST, TINY, stressed_model

TEXT = ["data=text", "data.block_size=32", "eval=[perplexity]", "model.d_model=32"]
# (lmlab overrides, transformers class): every exportable configuration, each on another tokenizer
CASES = {
    "default": ([*TEXT, "data.tokenizer.vocab_size=300"], "ArceeForCausalLM"),
    "swiglu": ([*TEXT, "data/tokenizer=byte", "model.mlp=swiglu", "model.tie_embeddings=false", "model.d_ff=48"],
               "LlamaForCausalLM"),
    "gpt2": (["data=dna", "data.block_size=96", "eval=[perplexity]", "model.d_model=32", "model.norm=layernorm",
              "model.positions=learned", "model.max_len=128"], "GPT2LMHeadModel"),
    "mamba": (["data=protein", "data.block_size=32", "eval=[perplexity]", "model=mamba", "model.d_model=32"],
              "MambaForCausalLM"),
    "mamba2": ([*TEXT, "data/tokenizer=byte", "model=mamba2", "model.chunk_size=8"], "Mamba2ForCausalLM"),
}
PCFG = [*TINY, "eval=[perplexity]", "model.d_model=32"]  # a grammar: no text tokenizer
LOGIT_TOLERANCE = 1e-5


def _train(tmp_path_factory, cache_dir, overrides: list[str]) -> Path:
    from lmlab.cli import main

    out = tmp_path_factory.mktemp("runs")
    try:
        main(["train", f"out_dir={out}", *FAST, *overrides])
    except SystemExit as e:
        raise AssertionError(f"training failed with exit code {e.code}") from e
    (done,) = out.rglob("DONE")
    return done.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """``trained(name) -> run directory``: each configuration trained once for the whole module."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            runs[name] = _train(tmp_path_factory, cache_dir, CASES[name][0] if name in CASES else PCFG)
        return runs[name]

    return get


def _lmlab_tokenizer(run: Path):
    """The run's tokenizer the way the pipeline gets it: its data source loaded from the data cache."""
    cfg = run_dir.read_config(run)
    source = instantiate(cfg.data)
    source.load(cfg.cache_dir)
    return source.tokenizer


def _texts(tokenizer) -> list[str]:
    lines = [ln for ln in tokenizer.sample.read_text().splitlines() if ln.strip()]
    return [lines[0][:40], " ".join(lines[1:4])[:70] + " Ünïcödé 🙂 [EOS] x", lines[5][:15]]


# ----- known answers: every exportable configuration -----

@pytest.mark.parametrize("name", list(CASES))
def test_export_computes_the_runs_logits_and_tokens(name, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained(name)
    out = export_run(run, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", RECORD} <= {
        p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == CASES[name][1]
    model = run_dir.load_backbone(run)
    assert hf.config.vocab_size == model.vocab_size

    # the tokenizer: lmlab's ids, BOS first, special tokens 0..3, text back
    ours = _lmlab_tokenizer(run)
    texts = _texts(ours)
    own_ids = ours.encode(texts)
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == own_ids
    assert [tok(t)["input_ids"] for t in texts] == [[BOS_ID, *ids] for ids in own_ids]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (PAD_ID, BOS_ID, EOS_ID, 3)
    for t, ids in zip(texts, own_ids):
        assert tok.decode([BOS_ID, *ids, EOS_ID], skip_special_tokens=True) == ours.decode(ids)
        if not isinstance(ours, DNA | Protein):  # an alphabet keeps only its letters: the rest is not text back
            assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t

    # the model: rows of different lengths, right-padded, and one row without padding
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask.all()) and ids[mask == 0].eq(PAD_ID).all() and ids[:, 0].eq(BOS_ID).all()
    full = ids[1:2, : int(mask[1].sum())]
    worst = 0.0
    with torch.no_grad():
        for x, m, padding in ((ids, mask, mask.bool()), (full, torch.ones_like(full), None)):
            expected = model.logits(model(x, Attention(CAUSAL, padding=padding)))
            got = hf(input_ids=x, attention_mask=m).logits
            real = m.bool()
            assert got.shape == expected.shape
            worst = max(worst, float((got - expected)[real].abs().max()))
    assert worst <= LOGIT_TOLERANCE, f"{name}: max |logit difference| {worst:.3g}"
    record = json.loads((out / RECORD).read_text())
    assert record["architecture"] == CASES[name][1] and record["probe_max_abs_logit_difference"] <= 1e-4
    # the context length is the length of the rows it was trained on, data.block_size
    block = run_dir.read_config(run).data.block_size
    assert record["context_length"] == tok.model_max_length == block
    assert getattr(hf.config, "max_position_embeddings", getattr(hf.config, "n_positions", block)) == block
    print(f"\n{name} -> {CASES[name][1]}: max |logit difference| {worst:.2e}")  # shown with pytest -s


def test_default_output_folder_and_replacing_an_earlier_export(trained, tmp_path):
    run = trained("default")
    out = export_run(run)
    assert out == run / "hf" and (out / "config.json").is_file()
    (out / "stale.txt").write_text("from an earlier export")
    assert export_run(run, out) == out  # an earlier export is replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="already holds files that no export wrote: pass an empty or new directory"):
        export_run(run, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_grammar_run_exports_the_model_without_a_tokenizer(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run = trained("pcfg")
    out = export_run(run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not {"tokenizer.json", "tokenizer_config.json"} & names
    assert "no text tokenizer" in json.loads((out / RECORD).read_text())["note"]
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    model = run_dir.load_backbone(run)
    ids = torch.tensor([[BOS_ID, *range(N_SPECIAL, min(model.vocab_size, N_SPECIAL + 9)), EOS_ID]])
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - model.logits(model(ids, Attention(CAUSAL)))).abs().max()
    assert float(diff) <= LOGIT_TOLERANCE


def test_a_bpe_run_whose_data_cache_is_gone_is_refused(trained, tmp_path):
    run = trained("default")
    cfg = run_dir.read_config(run)
    cfg.cache_dir = str(tmp_path / "empty_cache")
    copy = tmp_path / "run"
    copy.mkdir()
    run_dir.write_config(copy, cfg)
    for name in (run_dir.MODEL, run_dir.MODEL_ARGS):
        (copy / name).write_bytes((run / name).read_bytes())
    with pytest.raises(UserError, match=r"the trained BPE tokenizer of .* is not in its data cache .*: rerun the "
                                        r"run's `lmlab train` command"):
        export_run(copy, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_data_hf_run_exports_the_bpe_trained_on_its_documents(tmp_path):
    """data=hf (a local json file): the exported tokenizer is the BPE in the run's data cache entry."""
    from transformers import AutoTokenizer

    docs = [f"document {i} says the cat sat on the mat with {'a hat' if i % 2 else 'the dog'}" for i in range(120)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    data = {"_target_": "lmlab.data.hf.HFSource", "name": "json", "data_files": str(jsonl), "block_size": 32,
            "tokenizer": {"_target_": "lmlab.data.tokenizers.BPE", "vocab_size": 300}}
    cache = tmp_path / "cache"
    source = instantiate(OmegaConf.create(data))
    source.load(cache)  # what `lmlab train` does first: build the splits, train the BPE, cache both
    run = _hand_made_run(tmp_path / "run", TRANSFORMER, vocab=300, data=data, cache_dir=str(cache))
    out = export_run(run, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    texts = [docs[3], "the cat and a hat, unseen 🙂"]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == source.tokenizer.encode(texts)
    assert tok(texts[0])["input_ids"][0] == BOS_ID


# ----- refusals: hand-made runs (no training needed) -----

def _hand_made_run(path: Path, model_cfg: dict, attention: str = CAUSAL, vocab: int = N_SPECIAL + 12,
                   data: dict | None = None, cache_dir: str | None = None) -> Path:
    torch.manual_seed(0)
    cfg = OmegaConf.create({"model": model_cfg, "data": data or {"_target_": "lmlab.data.pcfg.PCFGSource"},
                            "cache_dir": cache_dir})
    model = instantiate(cfg.model, vocab_size=vocab, attention=attention)
    run_dir.write_config(path, cfg)
    run_dir.save_model(path, model, vocab_size=vocab, attention=attention)
    return path


TRANSFORMER = {"_target_": "lmlab.models.transformer.Transformer", "d_model": 16, "n_layers": 1, "n_heads": 2}
REFUSED = {
    "lstm": ({"_target_": "lmlab.models.lstm.LSTM", "d_model": 8, "n_layers": 1}, CAUSAL, "the run's model is LSTM"),
    "layernorm+rotary": ({**TRANSFORMER, "norm": "layernorm"}, CAUSAL,
                         "the run's transformer has norm=layernorm positions=rotary mlp=gelu"),
    "learned+swiglu": ({**TRANSFORMER, "positions": "learned", "mlp": "swiglu", "norm": "layernorm"}, CAUSAL,
                       "the run's transformer has norm=layernorm positions=learned mlp=swiglu"),
    "mlm": (TRANSFORMER, BIDIRECTIONAL, "the run's Transformer was trained with bidirectional attention"),
    "moe": ({"_target_": "lmlab.models.moe.MoETransformer", "d_model": 16, "n_layers": 1, "n_heads": 2}, CAUSAL,
            "the run's model is MoETransformer"),
    "mamba2 groups": ({"_target_": "lmlab.models.mamba2.Mamba2", "d_model": 16, "n_layers": 1, "ngroups": 2},
                      CAUSAL, "the run's mamba2 has ngroups=2"),
    "mamba layernorm": ({"_target_": "lmlab.models.mamba.Mamba", "d_model": 16, "n_layers": 1,
                         "norm": "layernorm"}, CAUSAL, "the run's Mamba has norm=layernorm"),
}


MAMBA = {"_target_": "lmlab.models.mamba.Mamba", "d_model": 16, "n_layers": 2}
STRESSED = {  # hand-made models whose norms, biases, Δ, A and D are far from their initial values
    "ArceeForCausalLM": {**TRANSFORMER, "n_layers": 2},
    "LlamaForCausalLM": {**TRANSFORMER, "n_layers": 2, "mlp": "swiglu", "tie_embeddings": False},
    "GPT2LMHeadModel": {**TRANSFORMER, "n_layers": 2, "norm": "layernorm", "positions": "learned"},
    "MambaForCausalLM": MAMBA,
    "Mamba2ForCausalLM": {**MAMBA, "_target_": "lmlab.models.mamba2.Mamba2", "chunk_size": 4,
                          "tie_embeddings": False},
}


@pytest.mark.parametrize("architecture", list(STRESSED))
def test_every_weight_of_the_mapping_reaches_the_logits(architecture):
    """The transformers model agrees with lmlab's to float rounding, and nudging any one of its weights moves
    the logits far beyond that: no weight is dropped, and the agreement is not an accident of initial values."""
    from lmlab.export import hf_model, logit_difference, probe_ids

    model = stressed_model(STRESSED[architecture], 40)
    hf = hf_model(model)
    assert type(hf).__name__ == architecture
    ids, mask = probe_ids(40, 12)
    agreement, _ = logit_difference(model, hf, ids, mask)
    assert agreement <= 1e-6
    for name, p in hf.named_parameters():
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
        moved, _ = logit_difference(model, hf, ids, mask)
        with torch.no_grad():
            p.copy_(saved)
        assert moved > 100 * max(agreement, 1e-7), name


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_without_a_transformers_counterpart_are_refused_in_one_sentence(name, tmp_path):
    model_cfg, attention, reason = REFUSED[name]
    run = _hand_made_run(tmp_path / "run", model_cfg, attention)
    with pytest.raises(UserError) as info:
        export_run(run, tmp_path / "hf")
    message = str(info.value)
    assert message.startswith(reason) and message.endswith(f"only {EXPORTABLE} export.")
    assert message.count(". ") == 0 and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_a_directory_that_is_not_a_finished_run_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a finished lmlab run"):
        export_run(tmp_path, tmp_path / "hf")


# ----- the tokenizer alone, against lmlab's for each kind -----

def _tokenizer_round_trip(ours, texts: list[str], tmp_path: Path):
    from transformers import AutoTokenizer

    hf_tokenizer(ours).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        ids = ours.encode([text])[0]
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok(text)["input_ids"] == [BOS_ID, *ids]
        assert tok.decode(ids) == ours.decode(ids)
    return tok


def test_byte_tokenizer_ids_are_four_plus_the_utf8_bytes(tmp_path):
    from tokenizers import pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    texts = ["héllo wörld\t\n 🙂 中文", "[BOS] [PAD] are text here", "", "  leading spaces", "\x00\x7f control"]
    tok = _tokenizer_round_trip(Byte(), texts, tmp_path)
    for text in texts:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # every byte value has its token, at 4 + byte (transformers' own byte-to-character table)
    vocab = tok.get_vocab()
    assert all(vocab[ch] == N_SPECIAL + b for b, ch in bytes_to_unicode().items())
    assert set(bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert len(vocab) == Byte().vocab_size


@pytest.mark.parametrize("alphabet", [DNA, Protein])
def test_alphabet_tokenizers_normalise_as_lmlab_does(alphabet, tmp_path):
    texts = ["ACGTN acgtn", "RYKMSWBDHV ryk", "MKT-AYIAKQR*\n12 xbzjuo", "Ünïcödé ACGT é", "", "[BOS]ACGT"]
    tok = _tokenizer_round_trip(alphabet(), texts, tmp_path)
    assert len(tok.get_vocab()) == alphabet().vocab_size


def test_bpe_tokenizer_keeps_the_trained_merges(tmp_path):
    docs = [ln for ln in (SAMPLES / "tiny_corpus.txt").read_text().splitlines() if ln.strip()][:200]
    bpe = BPE(vocab_size=300)
    bpe.train(docs)
    texts = [docs[0], "unseen wörds 🙂 and [EOS] inside", " two  spaces"]
    tok = _tokenizer_round_trip(bpe, texts, tmp_path)
    assert any(len(tok.convert_ids_to_tokens([i])[0]) > 1 for i in tok(docs[0])["input_ids"][1:])  # merges used


# ----- the command line -----

def test_cli_export_writes_and_names_the_architecture(trained, lmlab, tmp_path):
    run = trained("default")
    out = tmp_path / "exported"
    code, text = lmlab("export", f"run={run}", f"out={out}")
    assert code == 0, text
    assert str(out) in text and "ArceeForCausalLM" in text and (out / "model.safetensors").is_file()
    code, text = lmlab("export", f"out={out}")
    assert code == 2 and "lmlab: error: lmlab export needs run=<run dir>" in text
    code, text = lmlab("export", f"run={run}", "format=gguf")
    assert code == 2 and "lmlab: error:" in text and "run=<run dir> [out=<dir>]" in text
    code, text = lmlab("export", f"run={tmp_path / 'nothing'}")
    assert code == 2 and "is not a finished lmlab run" in text and "Traceback" not in text
    lstm = _hand_made_run(tmp_path / "lstm", REFUSED["lstm"][0])
    code, text = lmlab("export", f"run={lstm}")
    assert code == 2 and "the run's model is LSTM" in text and "Traceback" not in text
    code, text = lmlab("--help")
    assert "export" in text
