"""TextSource: reading local files, tokenizers, packing, document splits, labels, errors and the cache."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lmlab.data.text import SAMPLE_CORPUS, TextSource
from lmlab.data.tokenizers import BPE, Byte
from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

WORDS = "the a cat dog sat ran on under mat tree big small red quiet café naïve".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents, each starting with a marker D0000.. that names it."""
    rng = np.random.default_rng(seed)
    return [f"D{i:04d} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 15))) + "." for i in range(n)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
    return path


def ids(split) -> np.ndarray:
    return np.array(split["input_ids"], dtype=np.int64).reshape(len(split), -1)


def stream_docs(source: TextSource, blocks: np.ndarray) -> list[str]:
    """The documents of a split, read back from its blocks (byte tokenizer): drop BOS, split at EOS."""
    stream = blocks[:, 1:].ravel()
    cuts = np.flatnonzero(stream == EOS_ID)
    return [source.decode(part.tolist()) for part in np.split(stream, cuts + 1)[:-1]]


def data_config(*overrides: str):
    """The composed ``data`` config of ``lmlab train data=text <overrides>``."""
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=["data=text", *overrides]).data


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_blocks_are_exact_and_in_vocabulary(tmp_path, tokenizer):
    docs = documents(200)
    source = TextSource(paths=str(write_txt(tmp_path / "c.txt", docs)),
                        tokenizer=Byte() if tokenizer == "byte" else BPE(vocab_size=300),
                        block_size=16, validation_fraction=0.1, test_fraction=0.1, documents="line")
    splits = source.build()
    assert source.vocab_size == (260 if tokenizer == "byte" else 300)
    for name in ("train", "validation", "test"):
        blocks = ids(splits[name])
        assert len(blocks) > 0 and blocks.shape[1] == 16
        assert (blocks[:, 0] == BOS_ID).all()
        assert blocks[:, 1:].min() >= EOS_ID and blocks.max() < source.vocab_size
        assert (blocks[:, 1:] != BOS_ID).all()
    assert len(splits["downstream"]) == 0 and source.tasks == {}


def test_byte_packing_round_trips_the_documents(tmp_path):
    docs = documents(120)
    source = TextSource(paths=str(write_txt(tmp_path / "c.txt", docs)), tokenizer=Byte(), block_size=32,
                        validation_fraction=0.2, test_fraction=0.2, seed=3, documents="line")
    splits = source.build()
    for name in ("train", "validation", "test"):
        expected = [docs[i] for i in source.doc_splits[name]]
        got = stream_docs(source, ids(splits[name]))
        assert got == expected[: len(got)] and len(got) >= len(expected) - 2  # only the tail is dropped
    assert source.decode(source.encode(["naïve café ☕"])[0]) == "naïve café ☕"
    assert source.encode(["ab"]) == [[N_SPECIAL + ord("a"), N_SPECIAL + ord("b")]]


def test_bpe_tokenizer(tmp_path):
    docs = documents(300)
    source = TextSource(paths=str(write_txt(tmp_path / "c.txt", docs)), tokenizer=BPE(vocab_size=400), block_size=16,
                        documents="line")
    source.build()
    tok = source.tokenizer.model
    assert [tok.token_to_id(t) for t in ("[PAD]", "[BOS]", "[EOS]", "[MASK]")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 400
    text = "D0007 the naïve cat sat on a [EOS] mat."
    encoded = source.encode([text])[0]
    assert min(encoded) >= N_SPECIAL  # special-token strings in the text are plain text
    assert source.decode(encoded) == text
    assert len(source.encode(["the cat sat on the mat"])[0]) < len("the cat sat on the mat")  # merges learnt


def test_splits_are_disjoint_by_document_and_deterministic(tmp_path):
    docs = documents(300)
    path = str(write_txt(tmp_path / "c.txt", docs))
    source = TextSource(paths=path, tokenizer=Byte(), block_size=24, validation_fraction=0.1, test_fraction=0.1,
                        documents="line")
    splits = source.build()
    parts = source.doc_splits
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(300))
    assert len(parts["validation"]) == 30 and len(parts["test"]) == 30
    seen = {}
    for name in ("train", "validation", "test"):
        text = "".join(source.decode(row) for row in splits[name]["input_ids"])
        seen[name] = set(re.findall(r"D\d{4}(?!\d)", text))
    assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]
    again = TextSource(paths=path, tokenizer=Byte(), block_size=24, validation_fraction=0.1, test_fraction=0.1,
                       documents="line")
    assert again.build()["validation"]["input_ids"] == splits["validation"]["input_ids"]
    other = TextSource(paths=path, tokenizer=Byte(), block_size=24, validation_fraction=0.1, test_fraction=0.1,
                       seed=1, documents="line")
    other.build()
    assert other.doc_splits["validation"].tolist() != parts["validation"].tolist()


def test_formats_lists_globs_and_directories(tmp_path):
    docs = documents(90)
    write_txt(tmp_path / "a.txt", docs[:30])
    write_jsonl(tmp_path / "b.jsonl", docs[30:60], field="body")
    write_parquet(tmp_path / "c.parquet", docs[60:], field="body")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "D9999 a last doc."}]), encoding="utf-8")
    kw = {"tokenizer": Byte(), "block_size": 8, "text_field": "body"}
    full = TextSource(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet"),
                             str(tmp_path / "d.json")], documents="line", **kw)
    assert full.read_documents() == [*docs, "D9999 a last doc."]
    assert TextSource(paths=str(tmp_path / "*.*"), documents="line", **kw).read_documents() == full.read_documents()
    assert TextSource(paths=str(tmp_path), documents="line", **kw).read_documents() == full.read_documents()
    assert TextSource(paths=str(tmp_path / "c.parquet"), **kw).read_documents() == docs[60:]
    blank = write_txt(tmp_path / "blank.txt", ["x y", "", "   ", "z"])
    assert TextSource(paths=str(blank), tokenizer=Byte(), documents="line").read_documents() == ["x y", "z"]


def test_labels_csv(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", documents(100))
    labels = tmp_path / "labels.csv"
    long_text = "word " * 50
    labels.write_text(f'text,label\n"hello, world",10\nbye,2\n{long_text},1\nagain,2\n', encoding="utf-8")
    source = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, labels_csv=str(labels),
                        labels_test_fraction=0, documents="line")
    assert source.tasks == {"label": 3} and source.label_names == ["1", "2", "10"]  # numeric order
    splits = source.build()
    down = splits["downstream"]
    assert down["label"] == [2, 1, 0, 1]
    rows = down["input_ids"]
    assert source.decode(rows[0]) == "hello, world" and rows[0][0] == BOS_ID and rows[0][-1] == EOS_ID
    assert len(rows[2]) == 16 and rows[2][-1] == EOS_ID  # cut to block_size, EOS kept
    assert set(splits["train"]["label"]) == {-1} and set(splits["test"]["label"]) == {-1}
    words = tmp_path / "words.csv"
    words.write_text("label,text\nneg,bad\npos,good\nneg,awful\n", encoding="utf-8")
    source = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, labels_csv=str(words),
                        labels_test_fraction=0, documents="line")
    assert source.label_names == ["neg", "pos"] and source.build()["downstream"]["label"] == [0, 1, 0]


def test_labelled_rows_are_split_between_downstream_and_test(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", documents(100))
    labels = tmp_path / "labels.csv"
    texts = [f"T{i:03d} {'good' if i % 3 else 'bad'}" for i in range(50)]
    labels.write_text("text,label\n" + "".join(f"{t},{t.split()[1]}\n" for t in texts), encoding="utf-8")
    source = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, labels_csv=str(labels),
                        labels_test_fraction=0.2, documents="line")
    splits = source.build()
    n_blocks = len(splits["test"]) - 10
    test = splits["test"].select(range(n_blocks, len(splits["test"])))
    assert set(splits["test"].select(range(n_blocks))["label"]) == {-1}
    held = [source.decode(r) for r in test["input_ids"]]
    down = [source.decode(r) for r in splits["downstream"]["input_ids"]]
    assert len(held) == 10 and len(down) == 40 and sorted(held + down) == texts
    assert test["label"] == [source.label_names.index(t.split()[1]) for t in held]
    again = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, labels_csv=str(labels), documents="line")
    assert again.build()["downstream"]["input_ids"] == splits["downstream"]["input_ids"]


def test_bundled_sample_corpus_and_yaml(tmp_path):
    assert SAMPLE_CORPUS.is_file() and SAMPLE_CORPUS.stat().st_size < 60_000
    cfg = data_config()
    assert cfg._target_ == "lmlab.data.text.TextSource" and cfg.paths is None
    source = instantiate(cfg)
    splits = source.load(tmp_path)
    assert source.vocab_size == cfg.tokenizer.vocab_size
    assert len(splits["train"]) > 0 and len(splits["validation"]) > 0 and len(splits["test"]) > 0
    assert ids(splits["train"]).shape[1] == cfg.block_size
    byte = instantiate(data_config("data/tokenizer=byte", "data.documents=line"), paths=[str(SAMPLE_CORPUS)])
    assert byte.vocab_size == 260 and len(byte.load(tmp_path)["train"]) > 0


def test_cache_is_reused_and_keyed_on_the_files(tmp_path, monkeypatch):
    corpus = write_txt(tmp_path / "c.txt", documents(200))
    cache = tmp_path / "cache"
    first = TextSource(paths=str(corpus), tokenizer=BPE(vocab_size=300), block_size=16, documents="line")
    splits = first.load(cache)
    assert (cache / first.cache_key() / "tokenizer.json").is_file()

    def no_build(self):
        raise AssertionError("the cache was not reused")

    with monkeypatch.context() as m:
        m.setattr(TextSource, "build", no_build)
        second = TextSource(paths=str(corpus), tokenizer=BPE(vocab_size=300), block_size=16, documents="line")
        again = second.load(cache)
        assert again["train"]["input_ids"] == splits["train"]["input_ids"]
        assert second.encode(["the cat sat"]) == first.encode(["the cat sat"])
        assert second.decode(again["train"][0]["input_ids"]) == first.decode(splits["train"][0]["input_ids"])
    assert len(list(cache.iterdir())) == 1
    key = first.cache_key()
    write_txt(corpus, documents(201))  # new content, size and mtime
    os.utime(corpus, ns=(1, 1))
    assert TextSource(paths=str(corpus), tokenizer=BPE(vocab_size=300), block_size=16).cache_key() != key
    assert TextSource(paths=str(corpus), tokenizer=BPE(vocab_size=300), block_size=32).cache_key() != \
        TextSource(paths=str(corpus), tokenizer=BPE(vocab_size=300), block_size=16).cache_key()


def error(**kwargs) -> str:
    return sentence(lambda: TextSource(**kwargs).build())


def sentence(call) -> str:
    """The message of the UserError ``call()`` raises, checked to be one sentence."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_bad_inputs(tmp_path):
    good = str(write_txt(tmp_path / "good.txt", documents(50)))
    assert "does not exist" in error(paths=str(tmp_path / "missing.txt")) and "data.paths" in \
        error(paths=str(tmp_path / "missing.txt"))
    assert "no files match" in error(paths=str(tmp_path / "nothing" / "*.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in error(paths=str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no text" in error(paths=str(tmp_path / "blank.txt"))
    (tmp_path / "doc.csv").write_text("a,b\n")
    assert "unknown extension" in error(paths=str(tmp_path / "doc.csv"))
    jsonl = str(write_jsonl(tmp_path / "x.jsonl", documents(20), field="body"))
    message = error(paths=jsonl)
    assert "no field 'text'" in message and "body" in message and "data.text_field" in message
    (tmp_path / "num.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    assert "not text" in error(paths=str(tmp_path / "num.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    assert "cannot read" in error(paths=str(tmp_path / "broken.jsonl"))
    tiny = str(write_txt(tmp_path / "tiny.txt", ["one short line"]))
    assert "data.block_size" in error(paths=tiny, tokenizer=Byte(), block_size=64, validation_fraction=0,
                                      test_fraction=0)
    assert "data.validation_fraction" in error(paths=good, tokenizer=Byte(), block_size=200,
                                               validation_fraction=0.02, test_fraction=0)
    assert "too few" in error(paths=tiny, validation_fraction=0.1, test_fraction=0.1)
    assert "data.tokenizer" in error(paths=good, tokenizer="wordpiece")
    assert "data.tokenizer.vocab_size" in sentence(lambda: BPE(vocab_size=100))
    assert "data.block_size" in error(paths=good, block_size=1)
    assert "data.test_fraction" in error(paths=good, test_fraction=1.5)
    assert "smaller than 1" in error(paths=good, validation_fraction=0.5, test_fraction=0.5)
    assert "empty list" in error(paths=[])
    assert "data.labels_csv" in error(paths=good, labels_csv=str(tmp_path / "nope.csv"))
    (tmp_path / "bad.csv").write_text("sentence,class\nhi,1\n")
    assert "text,label" in error(paths=good, labels_csv=str(tmp_path / "bad.csv"))
    (tmp_path / "none.csv").write_text("text,label\n")
    assert "no rows" in error(paths=good, labels_csv=str(tmp_path / "none.csv"))
    (tmp_path / "one.csv").write_text("text,label\nhi,1\n")
    assert "data.labels_test_fraction" in error(paths=good, labels_csv=str(tmp_path / "one.csv"), block_size=8)
    assert "data.labels_test_fraction" in error(paths=good, labels_test_fraction=-0.1)
