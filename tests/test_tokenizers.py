"""The tokenizers of the text sources: known ids, round trips, BPE against the tokenizers library, save/load,
the config group data/tokenizer, the cache key and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.data.shards import write_shards
from lmlab.data.text import TextSource
from lmlab.data.tokenizers import (
    BPE,
    DNA,
    SAMPLES,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Byte,
    Chars,
    Protein,
    Tokenizer,
)
from lmlab.errors import UserError
from lmlab.vocab import N_SPECIAL

TOKENIZER_CONF = Path(__file__).resolve().parents[1] / "lmlab" / "conf" / "data" / "tokenizer"
DOCS = [f"doc {i}: the cat sat on the mat, the dog ran under the tree; naïve café {i % 7}" for i in range(200)]


def test_byte_ids_and_round_trip():
    tok = Byte()
    assert tok.vocab_size == 260
    assert tok.encode(["ab", "", "é☕"]) == [[101, 102], [], [4 + 0xC3, 4 + 0xA9, 4 + 0xE2, 4 + 0x98, 4 + 0x95]]
    ids, lengths = tok.encode_flat(["ab", "", "é"])
    assert ids.dtype == np.int32 and ids.tolist() == [101, 102, 199, 173] and lengths.tolist() == [2, 0, 2]
    text = "Hello, wörld! 你好\n\t[EOS]"
    assert tok.decode(tok.encode([text])[0]) == text
    assert tok.decode([1, 101, 2, 102, 0, 3]) == "ab"  # special ids dropped
    assert tok.encode([]) == [] and tok.trained


def test_char_alphabets_exact_ids():
    dna, protein = DNA(), Protein()
    assert dna.vocab_size == 9 and protein.vocab_size == 25
    assert dna.encode(["ACGTN", "acgtn", "RYKMSWBDHV"]) == [[4, 5, 6, 7, 8], [4, 5, 6, 7, 8], [8] * 10]
    assert dna.encode(["A C\nG-T*1é"]) == [[4, 5, 6, 7]]  # whitespace, gaps, stops, digits, non-ASCII dropped
    assert protein.encode(["ACDEFGHIKLMNPQRSTVWYX"]) == [list(range(4, 25))]
    assert protein.encode(["BZJUO"]) == [[24] * 5]
    assert dna.decode([1, 4, 5, 2, 8, 0, 99]) == "ACN" and protein.decode([20, 24]) == "TX"
    custom = Chars("AU", "U", name="two")
    assert custom.vocab_size == 6 and custom.encode(["aUx"]) == [[4, 5, 5]]
    assert dna.config != protein.config != custom.config


def bpe_reference(docs: list[str], vocab_size: int):
    """A byte-level BPE trained directly with the tokenizers library, the same settings as ``BPE``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return tok


def test_bpe_agrees_with_the_tokenizers_library(tmp_path):
    bpe = BPE(vocab_size=320)
    assert not bpe.trained
    with pytest.raises(RuntimeError, match="not trained"):
        bpe.encode(["the cat"])
    bpe.train(DOCS)
    assert bpe.trained and bpe.vocab_size == 320
    reference = bpe_reference(DOCS, 320)
    assert bpe.model.get_vocab() == reference.get_vocab()
    texts = ["the cat sat on the mat", "naïve café ☕", "unseen words: xylophone 12345", ""]
    expected = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    assert bpe.encode(texts) == expected
    assert [bpe.decode(ids) for ids in expected] == texts
    assert [bpe.model.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
    assert min(bpe.encode(["a [EOS] b [PAD]"])[0]) >= N_SPECIAL  # special-token strings are plain text
    assert len(bpe.encode(["the cat sat on the mat"])[0]) < len("the cat sat on the mat")  # merges learnt


def test_save_and_load_round_trip(tmp_path):
    bpe = BPE(vocab_size=300)
    bpe.train(DOCS)
    bpe.save(tmp_path)
    again = BPE(vocab_size=300)
    again.load(tmp_path)
    texts = ["the dog ran under the tree", "café [MASK]"]
    assert again.encode(texts) == bpe.encode(texts) and again.decode(bpe.encode(texts)[0]) == texts[0]
    for tok in (Byte(), DNA(), Protein()):
        directory = tmp_path / tok.name
        directory.mkdir()
        tok.save(directory)
        assert json.loads((directory / TOKENIZER_FILE).read_text()) == {"lmlab_tokenizer": tok.name}
        fresh = type(tok)()
        fresh.load(directory)
        assert fresh.encode(["ACGT"]) == tok.encode(["ACGT"])


@pytest.mark.parametrize("path", sorted(TOKENIZER_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_tokenizer_yaml_instantiates(path):
    tok = instantiate(OmegaConf.load(path))
    assert isinstance(tok, Tokenizer) and tok.name == path.stem
    assert tok.vocab_size == {"bpe": 1024, "byte": 260, "dna": 9, "protein": 25, "file": 673}[path.stem]


def test_the_data_tokenizer_group_and_the_cache_key():
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        def source(*overrides: str) -> TextSource:
            return instantiate(compose(config_name="train", overrides=list(overrides)).data)

        text, byte = source("data=text"), source("data=text", "data/tokenizer=byte")
        big = source("data=text", "data.tokenizer.vocab_size=2048")
        dna, protein = source("data=dna"), source("data=protein")
        hf = source("data=hf", "data.name=text", "data/tokenizer=protein")
    assert isinstance(text.tokenizer, BPE) and text.vocab_size == 1024 and big.vocab_size == 2048
    assert isinstance(byte.tokenizer, Byte) and isinstance(dna.tokenizer, DNA)
    assert isinstance(protein.tokenizer, Protein) and isinstance(hf.tokenizer, Protein)
    keys = {s.cache_key() for s in (text, byte, big)}
    assert len(keys) == 3  # the tokenizer's settings are part of the key
    assert TextSource(tokenizer=BPE(300)).cache_key() == TextSource(tokenizer=BPE(300)).cache_key()


def test_errors_name_the_fix(tmp_path):
    for bad in (100, 259, True, "big"):
        with pytest.raises(UserError, match=r"data\.tokenizer\.vocab_size.*260 or more\.$"):
            BPE(vocab_size=bad)
    with pytest.raises(UserError, match="data/tokenizer=") as info:
        TextSource(tokenizer="byte")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="data.tokenizer.unknown"):
        Chars("ACGT", "N")
    with pytest.raises(UserError, match="trained BPE"):
        write_shards(["some text"], tmp_path / "shards", tokenizer=BPE())


def test_token_bytes_spell_out_every_encoding():
    """Known answer: the bytes of a text's tokens, joined, are the text's UTF-8 bytes; special ids have none."""
    from lmlab.training.init_from import token_bytes as init_from_token_bytes

    bpe = BPE(vocab_size=300)
    bpe.train(DOCS)
    text = "the cat sat, naïve café ☕\n\tend"
    for tok in (Byte(), bpe):
        table = tok.token_bytes()
        assert b"".join(table[i] for i in tok.encode([text])[0]) == text.encode()
        assert min(table) == N_SPECIAL and all(i not in table for i in range(N_SPECIAL))
        assert table == init_from_token_bytes(tok)
    assert len(bpe.token_bytes()) == len(bpe.model.get_vocab()) - N_SPECIAL  # every learned token
    dna = DNA()
    assert dna.token_bytes() == {4: b"A", 5: b"C", 6: b"G", 7: b"T", 8: b"N"}
    assert b"".join(dna.token_bytes()[i] for i in dna.encode(["ac gt"])[0]) == b"ACGT"
    assert dna.token_bytes() == init_from_token_bytes(dna)


# ----- a tokenizer read from a file or a finished run (data/tokenizer=file) -----

def _trained(docs, vocab_size=300) -> BPE:
    bpe = BPE(vocab_size=vocab_size)
    bpe.train(docs)
    return bpe


def test_file_tokenizer_reads_a_saved_bpe_and_keys_on_its_content(tmp_path):
    from lmlab.data.tokenizers import File

    bpe = _trained(DOCS)
    bpe.save(tmp_path)
    text = ["the cat sat\non the [EOS] mat, naïve", "doc 7"]
    for path in (tmp_path / TOKENIZER_FILE, tmp_path):  # the file, or a directory holding it
        tok = File(path=str(path))
        assert tok.encode(text) == bpe.encode(text) and tok.decode(tok.encode(text)[0]) == text[0]
        assert tok.token_bytes() == bpe.token_bytes() and tok.trained
    assert tok.vocab_size == bpe.model.get_vocab_size() and File(str(tmp_path), vocab_size=300).vocab_size == 300
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    key = TextSource(paths=str(corpus), tokenizer=File(str(tmp_path))).cache_key()
    _trained([d.upper() for d in DOCS]).save(tmp_path)  # another vocabulary at the same path
    assert TextSource(paths=str(corpus), tokenizer=File(str(tmp_path))).cache_key() != key
    cfg = OmegaConf.load(TOKENIZER_CONF / "file.yaml")
    assert cfg._target_ == "lmlab.data.tokenizers.File" and cfg.path is None
    sample = File()  # null: the bundled sample tokenizer, a BPE of the sample corpus
    assert sample.path == SAMPLES / TOKENIZER_FILE
    again = BPE(1024)
    again.train([ln for ln in (SAMPLES / "tiny_corpus.txt").read_text().splitlines() if ln.strip()])
    assert sample.encode(DOCS[:3]) == again.encode(DOCS[:3]) and sample.vocab_size == again.model.get_vocab_size()


def test_file_tokenizer_errors_name_the_fix(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from lmlab.data.tokenizers import File
    from tests.test_text import sentence

    assert "data.tokenizer.path" in sentence(lambda: File(""))
    assert "does not exist" in sentence(lambda: File(str(tmp_path / "nope.json")))
    assert "neither a run directory" in sentence(lambda: File(str(tmp_path)))
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot read" in sentence(lambda: File(str(tmp_path / "bad.json")))
    foreign = HFTokenizer(models.BPE())  # a tokenizer whose ids 0..3 are not lmlab's special tokens
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    foreign.save(str(tmp_path / "foreign.json"))
    assert "[PAD] [BOS] [EOS] [MASK]" in sentence(lambda: File(str(tmp_path / "foreign.json")))
    _trained(DOCS).save(tmp_path)
    assert "data.tokenizer.vocab_size" in sentence(lambda: File(str(tmp_path), vocab_size=260))


def _fake_run(tmp_path, name: str, *overrides: str) -> tuple[Path, TextSource]:
    """A finished run's directory as far as its tokenizer goes: its resolved config and its data cache entry."""
    from tests.test_text import data_config

    tmp_path.mkdir(exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    run, cache = tmp_path / name, tmp_path / "cache"
    run.mkdir()
    data = data_config(f"data.paths='{corpus}'", "data.block_size=16", *overrides)
    OmegaConf.save(OmegaConf.create({"data": OmegaConf.to_container(data), "cache_dir": str(cache)}),
                   run / "config_resolved.yaml")
    source = instantiate(data)
    source.load(cache)
    return run, source


@pytest.mark.parametrize("streamed", [False, True])
def test_file_tokenizer_from_a_finished_run(tmp_path, streamed):
    from lmlab.data.tokenizers import File

    extra = ["data.stream_above_bytes=0", "data.validation_fraction=0.2", "data.test_fraction=0.2"] if streamed else []
    run, source = _fake_run(tmp_path, "data=text,seed=0", "data.tokenizer.vocab_size=300", *extra)
    assert source.streams() == streamed
    from lmlab.data.text import as_tokenizer

    with pytest.raises(UserError, match="inside data=text"):  # only a text source finds a run's cache entry
        File(str(run)).encode(["a"])
    tok = as_tokenizer(File(str(run)))  # what a text source does with its tokenizer
    text = ["doc 12: the cat sat on the mat", "naïve café 3"]
    assert tok.encode(text) == source.tokenizer.encode(text) and tok.vocab_size == 300
    assert tok.token_bytes() == source.tokenizer.token_bytes()
    child, _ = _fake_run(tmp_path / "second", "child", "data/tokenizer=file", f"data.tokenizer.path='{run}'")
    assert as_tokenizer(File(str(child))).encode(text) == tok.encode(text)  # a run that read the file passes it on


def test_file_tokenizer_refuses_a_run_without_a_trained_tokenizer(tmp_path):
    from lmlab.data.text import as_tokenizer
    from lmlab.data.tokenizers import File
    from tests.test_text import sentence

    run, _ = _fake_run(tmp_path, "byte", "data/tokenizer=byte")
    assert "data/tokenizer=byte" in sentence(lambda: as_tokenizer(File(str(run))))


def test_a_text_mixture_shares_one_tokenizer_file(tmp_path):
    from lmlab.data.mixture import MixtureSource

    _trained(DOCS).save(tmp_path)
    shared = {"_target_": "lmlab.data.tokenizers.File", "path": str(tmp_path / TOKENIZER_FILE)}
    parts = {}
    for name, docs in (("a", DOCS[:100]), ("b", [d.upper() for d in DOCS[100:]])):
        parts[name] = tmp_path / f"{name}.jsonl"
        parts[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def source(name, tokenizer):
        return {"_target_": "lmlab.data.text.TextSource", "paths": str(parts[name]), "tokenizer": tokenizer,
                "block_size": 16}

    mix = MixtureSource(sources={"a": source("a", shared), "b": source("b", dict(shared))}, train_size=200)
    splits = mix.load(tmp_path / "cache")
    train = splits["train"]
    assert set(train["source"]) == {"a", "b"} and mix.vocab_size == mix.sources["a"].vocab_size
    tok = mix.sources["a"].tokenizer
    for row, origin in zip(train["input_ids"][:40], train["source"][:40]):
        text = tok.decode(row)
        assert (text.upper() == text) == (origin == "b")  # b's rows decode to b's upper-case text
    with pytest.raises(UserError, match="share one token space"):
        MixtureSource(sources={"a": source("a", {"_target_": "lmlab.data.tokenizers.BPE", "vocab_size": 300}),
                       "b": source("b", {"_target_": "lmlab.data.tokenizers.BPE", "vocab_size": 300})})
    (tmp_path / "other").mkdir()
    _trained([d.upper() for d in DOCS]).save(tmp_path / "other")
    other = {"_target_": "lmlab.data.tokenizers.File", "path": str(tmp_path / "other")}
    with pytest.raises(UserError, match="share one token space"):
        MixtureSource(sources={"a": source("a", shared), "b": source("b", other)})
