"""init_from.run=<run dir> (lmlab/training/init_from.py) and the growth operators (lmlab/models/grow.py).

Known answers: an exact copy reproduces the parent's validation loss; a new vocabulary keeps every body weight
bit-identical; depth up-scaling with zero residual outputs and widening keep the parent's logits; switching the
attention pattern copies the weights."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmlab.attention import BIDIRECTIONAL, CAUSAL, Attention
from lmlab.errors import UserError
from lmlab.models.grow import deepen, is_repeat, residual_outputs, solar_layers
from lmlab.models.transformer import Transformer
from lmlab.run_dir import (
    PARENT,
    lineage,
    load_backbone,
    read_parent,
    read_results,
    save_model,
    write_config,
    write_parent,
)
from lmlab.training.init_from import InitFrom, start_from, token_bytes
from tests.conftest import FAST, TINY, train_run

BASE = [*TINY, *FAST, "eval=[perplexity]"]
EMBEDDINGS = ("embed.weight", "head.weight")


@pytest.fixture(scope="module")
def parent(tmp_path_factory, cache_dir):
    """A finished CLM run on the default grammar (2 layers, d_model 64, tied)."""
    return train_run(tmp_path_factory.mktemp("parent"), *BASE)


def _cfg(overrides: list[str]):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _child(parent, *overrides: str, tmp_path=None, base=BASE):
    """The child's objective, source, model and splits, its model filled by ``start_from`` (as the pipeline does);
    returns (objective, source, model, splits, its own initial weights, the record)."""
    from lmlab.pipeline import build

    cfg = _cfg([*base, f"init_from.run={parent}", *overrides])
    L.seed_everything(cfg.seed, verbose=False)
    objective, source, model, _, splits = build(cfg)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    run_dir = tmp_path or parent.parent / "child"
    run_dir.mkdir(exist_ok=True)
    record = start_from(cfg, run_dir, model, source, objective.attention, resuming=False)
    return objective, source, model.eval(), splits, own, record


def _ids(vocab: int = 34):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 9), generator=g)
    ids[1, 6:] = 0
    return ids


def _logits(model, ids, kind=CAUSAL):
    with torch.no_grad():
        return model.logits(model(ids, Attention(kind, padding=ids != 0)))[ids != 0]


# ----- the pure operators -----

def test_solar_layer_map():
    # SOLAR (arXiv 2312.15166): 32 layers -> 48 keeps layers 0..23 of one copy and 8..31 of the other
    assert solar_layers(32, 48) == list(range(24)) + list(range(8, 32))
    assert solar_layers(2, 4) == [0, 1, 0, 1]
    assert solar_layers(3, 4) == [0, 1, 1, 2]
    assert solar_layers(2, 2) == [0, 1]
    assert is_repeat([0, 1, 1, 2]) == [False, False, True, False]
    with pytest.raises(UserError, match="between 2 and 4"):
        solar_layers(2, 5)


@pytest.mark.parametrize("n_new", [3, 4])
def test_deepen_with_zero_residual_outputs_keeps_the_function(n_new):
    torch.manual_seed(0)
    small = Transformer(34, CAUSAL, d_model=16, n_layers=2, n_heads=2).eval()
    deep = Transformer(34, CAUSAL, d_model=16, n_layers=n_new, n_heads=2).eval()
    zero = tuple(residual_outputs(deep.blocks[0]))
    assert set(zero) == {"attn.out.weight", "mlp.down.weight"}
    layers = solar_layers(2, n_new)
    deep.load_state_dict(deepen(small.state_dict(), layers, zero))
    ids = _ids()
    torch.testing.assert_close(_logits(deep, ids), _logits(small, ids), atol=1e-6, rtol=1e-6)
    # the duplicated layers without zeroing are copies of the parent's, and change the function
    dup = Transformer(34, CAUSAL, d_model=16, n_layers=n_new, n_heads=2).eval()
    dup.load_state_dict(deepen(small.state_dict(), layers))
    for i, j in enumerate(layers):
        for (k, a), b in zip(dup.blocks[i].state_dict().items(), small.blocks[j].state_dict().values()):
            assert torch.equal(a, b), k
    assert not torch.allclose(_logits(dup, ids), _logits(small, ids), atol=1e-3)


def test_token_bytes_match_a_bpe_and_the_byte_tokenizer():
    from lmlab.data.tokenizers import BPE, Byte

    bpe = BPE(vocab_size=300)
    bpe.train(["the cat sat on the mat", "the dog ate the hat", "héllo wörld"] * 20)
    got = token_bytes(bpe)
    assert len(got) == len(bpe._model().get_vocab()) - 4  # every ordinary token
    for i, b in got.items():
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character
        assert bpe.decode([i]) == text
    the = bpe.encode([" the"])[0]
    assert len(the) == 1 and got[the[0]] == b" the"
    byte = token_bytes(Byte())
    assert byte[4 + ord("a")] == b"a" and len(byte) == 256


# ----- through the pipeline's hook, on a finished run -----

def test_exact_copy_reproduces_the_parents_validation_loss(parent, lmlab):
    """Known answer: same data, model and objective -> the loss at step 0 is the parent's final loss."""
    expected = read_results(parent)["metrics"]["perplexity/loss"]
    objective, source, model, splits, _, record = _child(parent)
    rows = [list(r) for r in splits["validation"].with_format(None)["input_ids"]]
    loss = objective.evaluate(model, rows, source, 64)["loss"]
    assert loss == pytest.approx(expected, abs=1e-6)
    weights = load_backbone(parent).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert record["operators"] == ["copy"] and record["status"] == "done"

    # end to end: the child's run directory records its parent, in parent.json and results.json
    code, out = lmlab("train", *BASE, f"init_from.run={parent}", "eval_every=1000", "eval_along=[perplexity]")
    assert code == 0, out
    (child,) = [p for p in lmlab.runs.glob("default/*") if (p / PARENT).exists()]
    first = read_results(child)["history"][0]  # evaluated at step 0, before any update: the parent's loss
    assert first["step"] == 0 and first["perplexity/loss"] == pytest.approx(expected, abs=1e-6)
    saved = read_parent(child)
    assert saved["run"] == str(parent.resolve()) and saved["command"].startswith("lmlab train")
    assert saved["metrics"]["perplexity/loss"] == expected
    assert read_results(child)["init_from"]["operators"] == ["copy"]
    assert lineage(child) == [child, parent.resolve()]
    code, out = lmlab("report", str(child))  # the chain, newest first, each run with its status and command
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"{child}  [done]  lmlab train")
    assert lines[1].startswith(f"  <- {parent.resolve()}  [done]") and lines[1].endswith("  init_from: copy")


def test_new_vocabulary_keeps_the_body_bit_identical(parent):
    _, _, model, _, own, record = _child(parent, "data.vocab_size=40")
    weights = load_backbone(parent).state_dict()
    state = model.state_dict()
    assert model.vocab_size == 44 and weights["embed.weight"].shape[0] == 34
    for key, value in state.items():
        if key not in EMBEDDINGS:
            assert torch.equal(value, weights[key]), key
    # the special tokens' rows come from the parent, the others from the child's own initialisation
    assert torch.equal(state["embed.weight"][:4], weights["embed.weight"][:4])
    assert torch.equal(state["embed.weight"][4:], own["embed.weight"][4:])
    assert model.head.weight is model.embed.weight
    assert "new vocabulary: 34 -> 44 tokens" in record["operators"][0]
    # reset=[embeddings] without mapping: the whole embedding is the child's own
    _, _, model, _, own, _ = _child(parent, "init_from.reset=[embeddings]", "init_from.map_shared_tokens=false")
    assert torch.equal(model.embed.weight, own["embed.weight"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("extra, layers", [([], [0, 1, 0, 1]), (["init_from.layers=[0,0,1,1]"], [0, 0, 1, 1])])
def test_depth_up_scaling_with_zero_outputs_computes_the_parents_logits(parent, extra, layers):
    _, _, model, _, _, record = _child(parent, "model.n_layers=4", "init_from.depth=zero", *extra)
    assert f"parent layers {layers}" in record["operators"][0]
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(load_backbone(parent), ids), atol=1e-6, rtol=1e-6)


def test_widening_computes_the_parents_logits(parent):
    _, _, model, _, _, record = _child(parent, "model.d_model=128", "model.n_heads=8", "model.tie_embeddings=false")
    assert record["operators"] == ["widen: d_model 64 -> 128"]
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(load_backbone(parent), ids), atol=1e-5, rtol=1e-5)


def test_switching_to_bidirectional_attention_copies_the_weights(parent):
    _, _, model, _, _, record = _child(parent, "objective=mlm")
    assert model.attention_kind == BIDIRECTIONAL
    assert record["operators"] == ["attention: causal -> bidirectional"]
    weights = load_backbone(parent).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_model_that_cannot_attend_that_way_is_refused(tmp_path):
    from lmlab.models.mamba import Mamba

    run = tmp_path / "mamba"
    run.mkdir()
    cfg = OmegaConf.create({"model": {"_target_": "lmlab.models.mamba.Mamba", "d_model": 16, "n_layers": 1},
                            "cache_dir": str(tmp_path)})
    write_config(run, cfg)
    save_model(run, Mamba(34, CAUSAL, d_model=16, n_layers=1), vocab_size=34, attention=CAUSAL)
    model = Transformer(34, BIDIRECTIONAL, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(UserError, match="cannot attend 'bidirectional'"):
        InitFrom(run=str(run)).apply(model, BIDIRECTIONAL, OmegaConf.create(dict(cfg.model)))


@pytest.mark.parametrize("overrides, message", [
    (["model=lstm"], "trained a Transformer and this run builds a LSTM"),
    (["model.norm=layernorm"], "set model.norm=rmsnorm as the parent has them"),
    (["model.d_model=96", "model.n_heads=4"], "not an integer multiple of the parent's d_model=64"),
    (["model.d_model=128"], "set model.n_heads=8 model.tie_embeddings=false"),
    (["model.n_layers=1"], "set model.n_layers to 2 or more"),
    (["model.n_layers=5"], "between 2 and 4"),
    (["model.n_layers=3", "init_from.layers=[0,1]"], "lists 2 layers and model.n_layers is 3"),
    (["model.n_layers=3", "init_from.layers=[0,1,2]"], "names a layer the parent lacks"),
])
def test_what_cannot_grow_is_refused_in_one_sentence(parent, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        _child(parent, *overrides)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_the_cli_refuses_with_exit_code_2(parent, lmlab):
    code, out = lmlab("train", *BASE, f"init_from.run={parent}", "model.n_layers=1")
    assert code == 2 and "set model.n_layers to 2 or more" in out
    code, out = lmlab("train", *BASE, "init_from.depth=copy")
    assert code == 2 and "init_from.depth must be one of" in out
    code, out = lmlab("train", *BASE, f"init_from.run={parent / 'nowhere'}")
    assert code == 2 and "is not a directory" in out


def test_a_resumed_run_keeps_its_checkpoint_weights(parent, tmp_path):
    """A run that resumes takes its weights from the checkpoint: start_from leaves the model alone and returns
    the parent record of the first start."""
    cfg = _cfg([*BASE, f"init_from.run={parent}"])
    model = Transformer(34, CAUSAL, d_model=64, n_layers=2, n_heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_parent(tmp_path, {"run": str(parent), "operators": ["copy"]})
    record = start_from(cfg, tmp_path, model, None, CAUSAL, resuming=True)
    assert record == json.loads((tmp_path / PARENT).read_text())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----- two text tokenizers: the vocabularies are compared by their tokens -----

def _text_corpus(path, words: str, seed: int):
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(words.split(), size=12)) + "." for _ in range(300)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _text(corpus) -> list[str]:
    """A text run on ``corpus`` with a BPE of 300 ids (special tokens included)."""
    return ["data=text", f"data.paths={corpus}", "data.tokenizer.vocab_size=300", "data.block_size=32",
            "model.d_model=32", "model.n_layers=1", *FAST, "eval=[perplexity]"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two corpora whose BPEs of the same size share some merged tokens (" the", " a", "the") at other ids,
    and have others of their own (" dog" only in the second)."""
    out = tmp_path_factory.mktemp("corpora")
    return (_text_corpus(out / "cats.jsonl", "the cat sat on a mat with another cat", 0),
            _text_corpus(out / "dogs.jsonl", "a dog ran under the tree near the river bank", 1))


@pytest.fixture(scope="module")
def text_parent(tmp_path_factory, cache_dir, corpora):
    from lmlab.cli import main

    run = tmp_path_factory.mktemp("text_parent") / "p"
    try:
        main(["train", f"out_dir={run.parent}", *_text(corpora[0]), f"hydra.run.dir={run}"])
    except SystemExit as e:
        assert not e.code
    return run


def _one_token(tokenizer, text: str) -> int:
    (ids,) = tokenizer.encode([text])
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_two_bpes_of_the_same_size_are_mapped_by_bytes(text_parent, corpora, lmlab):
    """Known answer: the child's row of a byte-string both BPEs have is the parent's row of the same bytes (found
    by encoding the text with each tokenizer), a token only the child has keeps the child's own row, and the
    special tokens are copied; the body is the parent's."""
    from lmlab.run_dir import read_config
    from lmlab.training.init_from import _parent_tokenizer

    _, source, model, _, own, record = _child(text_parent, base=_text(corpora[1]))
    theirs, ours = _parent_tokenizer(text_parent, read_config(text_parent)), source.tokenizer
    assert theirs.vocab_size == ours.vocab_size == model.vocab_size == 300
    (operator,) = record["operators"]
    assert operator.startswith("new vocabulary: 300 -> 300 tokens (other tokens), rows mapped by bytes: ")
    got, weights = model.state_dict()["embed.weight"], load_backbone(text_parent).state_dict()
    parent_rows = weights["embed.weight"]
    moved = 0
    for text in (" the", " a", "the"):
        i, j = _one_token(ours, text), _one_token(theirs, text)
        moved += i != j
        assert torch.equal(got[i], parent_rows[j]), text
    assert moved >= 2  # shared byte-strings at other ids: a copy by id would take another token's row
    i = _one_token(ours, " dog")
    assert len(theirs.encode([" dog"])[0]) > 1  # the parent has no token " dog"
    assert torch.equal(got[i], own["embed.weight"][i]) and not torch.equal(got[i], parent_rows[i])
    assert torch.equal(got[:4], parent_rows[:4])

    # every row, against the text each id decodes to (both corpora are ASCII: every merged token decodes, and
    # the 128 bytes >= 0x80, shared single-byte tokens, do not decode alone; ids past the vocabulary decode to "")
    texts = [theirs.decode([j]) for j in range(300)]
    by_text = {t: j for j, t in enumerate(texts) if j >= 4 and t and "\ufffd" not in t}
    shared = 0
    for i in range(4, 300):
        text = ours.decode([i])
        if "\ufffd" in text:
            continue
        expected = parent_rows[by_text[text]] if text in by_text else own["embed.weight"][i]
        assert torch.equal(got[i], expected), (i, text)
        shared += text in by_text
    assert f": {4 + 128 + shared} shared rows copied, the others initialised anew" in operator
    for key, value in model.state_dict().items():
        if key not in EMBEDDINGS:
            assert torch.equal(value, weights[key]), key

    # end to end: the log, parent.json and `lmlab report <run>` say how the vocabulary was carried over
    code, out = lmlab("train", *_text(corpora[1]), f"init_from.run={text_parent}")
    assert code == 0, out
    assert "rows mapped by bytes" in out
    (child,) = [p for p in lmlab.runs.glob("default/*") if (p / PARENT).exists()]
    assert read_parent(child)["operators"] == [operator]
    code, out = lmlab("report", str(child))
    assert code == 0 and out.strip().splitlines()[1].endswith(f"init_from: {operator}")


def test_an_identical_text_tokenizer_is_copied(text_parent, corpora):
    _, _, model, _, _, record = _child(text_parent, base=_text(corpora[0]))
    assert record["operators"] == ["copy"]
    weights = load_backbone(text_parent).state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_parent_tokenizer_missing_from_the_cache_is_refused_unless_the_embeddings_start_anew(text_parent, corpora,
                                                                                            tmp_path):
    """Without the parent's trained BPE the two vocabularies cannot be compared: the run is refused in one
    sentence, and starting the embeddings anew (nothing to compare or map) is allowed."""
    import shutil

    moved = tmp_path / "p"
    shutil.copytree(text_parent, moved)
    config = moved / "config_resolved.yaml"
    cfg = OmegaConf.load(config)
    cfg.cache_dir = str(tmp_path / "empty-cache")
    config.write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(UserError, match="is not in its data cache") as e:
        _child(moved, base=_text(corpora[1]), tmp_path=tmp_path / "c1")
    assert "init_from.reset=[embeddings] init_from.map_shared_tokens=false" in str(e.value)
    _, _, model, _, own, record = _child(moved, "init_from.reset=[embeddings]", "init_from.map_shared_tokens=false",
                                         base=_text(corpora[1]), tmp_path=tmp_path / "c2")
    assert record["operators"] == ["new vocabulary: 300 -> 300 tokens (init_from.reset=[embeddings]), embeddings "
                                   "and head initialised anew"]
    assert torch.equal(model.embed.weight, own["embed.weight"])
