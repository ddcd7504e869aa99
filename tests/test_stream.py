"""Streaming preparation of text files into shards (lmlab/data/stream.py): packing parity, formats, splits by
hash, the tokenizer sample, resuming after an interruption, the already-prepared check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import stream
from lmlab.data.shards import INDEX, ShardSource
from lmlab.data.stream import PROGRESS, assign_splits, hash_units, prepare_shards
from lmlab.data.text import SAMPLE_CORPUS, TextSource, pack_stream
from lmlab.data.tokenizers import BPE, Byte
from lmlab.errors import UserError
from tests.test_text import documents, write_jsonl, write_parquet, write_txt

VAL, TEST = 0.1, 0.1


def source(path, tokenizer=None, block_size=16, **kw) -> TextSource:
    if Path(path).suffix == ".txt":
        kw.setdefault("documents", "line")  # these corpora hold one document per line
    return TextSource(paths=str(path), tokenizer=tokenizer or Byte(), block_size=block_size,
                      validation_fraction=VAL, test_fraction=TEST, **kw)


def rows_of(out: Path, split: str) -> np.ndarray:
    rows = ShardSource(path=str(out)).load(None)[split]
    return np.array(rows[:]["input_ids"] if split == "train" else rows["input_ids"], dtype=np.int64)


def expected(docs: list[str], block_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What the in-memory packing gives on the documents each split gets by hash (byte tokenizer)."""
    split = assign_splits(hash_units(docs, seed), VAL, TEST)
    out = {}
    for k, name in enumerate(("train", "validation", "test")):
        ids, lengths = Byte().encode_flat([d for d, s in zip(docs, split) if s == k])
        out[name] = pack_stream(ids, lengths, block_size).astype(np.int64)
    return out


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_streamed_rows_equal_the_in_memory_packing(tmp_path):
    docs = documents(600)
    corpus = write_txt(tmp_path / "c.txt", docs)
    out = prepare_shards(source(corpus), tmp_path / "s", rows_per_shard=50, batch_bytes=700)
    index = json.loads((out / INDEX).read_text())
    want = expected(docs, 16)
    for split in ("train", "validation", "test"):
        assert len(want[split]) > 0
        np.testing.assert_array_equal(rows_of(out, split), want[split])
    shards = [s["rows"] for s in index["splits"]["train"]["shards"]]
    assert shards[:-1] == [50] * (len(shards) - 1) and 0 < shards[-1] <= 50 and len(shards) > 3
    assert index["splits"]["downstream"]["rows"] == 0 and not (out / PROGRESS).exists()
    assert index["prepared"]["documents"] == len(docs)
    assert ShardSource(path=str(out)).vocab_size == Byte().vocab_size


def test_formats_give_the_same_rows(tmp_path):
    docs = documents(300)
    txt = prepare_shards(source(write_txt(tmp_path / "a.txt", docs)), tmp_path / "t", rows_per_shard=40,
                         batch_bytes=500)
    for name, path in (("jsonl", write_jsonl(tmp_path / "a.jsonl", docs)),
                       ("parquet", write_parquet(tmp_path / "a.parquet", docs))):
        got = prepare_shards(source(path), tmp_path / name, rows_per_shard=40, batch_bytes=500)
        for split in ("train", "validation", "test"):
            np.testing.assert_array_equal(rows_of(got, split), rows_of(txt, split))
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": d} for d in docs]))
    got = prepare_shards(source(array), tmp_path / "json", rows_per_shard=40, batch_bytes=500)
    np.testing.assert_array_equal(rows_of(got, "train"), rows_of(txt, "train"))
    # several files are one stream, in order
    half = len(docs) // 2
    two = [write_txt(tmp_path / "p1.txt", docs[:half]), write_parquet(tmp_path / "p2.parquet", docs[half:])]
    got = prepare_shards(TextSource(paths=[str(p) for p in two], tokenizer=Byte(), block_size=16,
                                    validation_fraction=VAL, test_fraction=TEST, documents="line"), tmp_path / "two",
                         rows_per_shard=40, batch_bytes=500)
    np.testing.assert_array_equal(rows_of(got, "train"), rows_of(txt, "train"))


def test_split_by_hash_is_stable_when_the_corpus_grows():
    docs = documents(400)
    first = assign_splits(hash_units(docs, 0), VAL, TEST)
    grown = assign_splits(hash_units(documents(800), 0), VAL, TEST)
    np.testing.assert_array_equal(grown[:400], first)
    counts = np.bincount(grown, minlength=3) / len(grown)
    assert abs(counts[1] - VAL) < 0.04 and abs(counts[2] - TEST) < 0.04
    assert (assign_splits(hash_units(docs, 1), VAL, TEST) != first).any()  # data.seed changes the split


def test_bpe_is_trained_on_a_bounded_sample(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", documents(2000))
    tok = BPE(vocab_size=300)
    out = prepare_shards(source(corpus, tok), tmp_path / "s", tokenizer_sample_bytes=5000, batch_bytes=4000)
    index = json.loads((out / INDEX).read_text())
    sample = index["prepared"]["tokenizer_sample"]
    assert index["prepared"]["tokenizer_sample_bytes"] == 5000
    assert 0 < sample["bytes"] <= 5000 and sample["docs"] > 0
    assert (out / "tokenizer.json").is_file() and index["vocab_size"] == 300
    row = rows_of(out, "train")[0]
    assert row[0] == 1 and row.max() < 300
    again = BPE(vocab_size=300)
    again.load(out)
    assert again.decode(row.tolist()) == tok.decode(row.tolist())
    full = prepare_shards(source(corpus, BPE(vocab_size=300)), tmp_path / "full", batch_bytes=4000)
    assert json.loads((full / INDEX).read_text())["prepared"]["tokenizer_sample"]["bytes"] > 5000


class Killed(Exception):
    pass


@pytest.mark.parametrize("tokenizer,kill_after", [("byte", 1), ("byte", 4), ("bpe", 3)])
def test_an_interrupted_preparation_resumes_to_identical_files(tmp_path, monkeypatch, tokenizer, kill_after):
    corpus = write_txt(tmp_path / "c.txt", (SAMPLE_CORPUS.read_text().splitlines() * 3)[:3000])

    def make():
        return source(corpus, Byte() if tokenizer == "byte" else BPE(vocab_size=300), block_size=32)

    settings = dict(rows_per_shard=20, batch_bytes=3000, tokenizer_sample_bytes=20000)
    whole = prepare_shards(make(), tmp_path / "whole", **settings)
    done = []

    def kill(split, i):
        done.append((split, i))
        if len(done) == kill_after:
            raise Killed

    with pytest.raises(Killed):
        prepare_shards(make(), tmp_path / "cut", on_shard=kill, **settings)
    cut = tmp_path / "cut"
    assert (cut / PROGRESS).exists() and not (cut / INDEX).exists()
    def no_training(self, docs):
        raise AssertionError("the tokenizer was trained again")

    seen = []
    with monkeypatch.context() as m:  # a resumed run reuses the saved tokenizer: it does not train again
        m.setattr(BPE, "train", no_training)
        prepare_shards(make(), cut, on_shard=lambda s, i: seen.append((s, i)), **settings)
    assert seen and seen[0] not in done[:-1]  # earlier complete shards were not written again
    assert files_of(cut) == files_of(whole)
    assert len([n for n in files_of(whole) if n.startswith("train-")]) > kill_after + 1


def test_prepared_directory_is_reused_unless_the_corpus_or_settings_change(tmp_path, monkeypatch):
    corpus = write_txt(tmp_path / "c.txt", documents(300))
    out = prepare_shards(source(corpus), tmp_path / "s", rows_per_shard=30)
    before = files_of(out)

    def no_reading(*args, **kwargs):
        raise AssertionError("an unchanged corpus was prepared again")

    with monkeypatch.context() as m:
        m.setattr(stream, "read_batches", no_reading)
        assert prepare_shards(source(corpus), out, rows_per_shard=30) == out
    assert files_of(out) == before
    key = json.loads((out / INDEX).read_text())["prepared"]["key"]
    write_txt(corpus, documents(320))  # new content, size and mtime
    os.utime(corpus, ns=(1, 1))
    prepare_shards(source(corpus), out, rows_per_shard=30)
    index = json.loads((out / INDEX).read_text())
    assert index["prepared"]["key"] != key and index["prepared"]["documents"] == 320
    np.testing.assert_array_equal(rows_of(out, "train"), expected(documents(320), 16)["train"])
    prepare_shards(source(corpus), out, rows_per_shard=7)  # a setting changes the key too
    assert {s["rows"] for s in json.loads((out / INDEX).read_text())["splits"]["train"]["shards"][:-1]} == {7}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        prepare_shards(source(corpus), tmp_path / "other")
    from lmlab.data.shards import write_shards

    written = write_shards(["some text"] * 20, tmp_path / "in-memory", block_size=8)
    with pytest.raises(UserError, match="holds other files"):  # shards not streamed here are not overwritten
        prepare_shards(source(corpus), written)


def test_bench_script_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"
    done = subprocess.run([sys.executable, str(script), "--sizes", "0.2", "--vocab", "300", "--dir", str(tmp_path)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout and "tokens/s" in done.stdout


def test_streaming_refuses_labels_and_too_little_text(tmp_path):
    corpus = write_txt(tmp_path / "c.txt", documents(5))
    labels = tmp_path / "l.csv"
    labels.write_text("text,label\na,0\nb,1\nc,0\nd,1\n")
    with pytest.raises(UserError, match="labels_csv"):
        prepare_shards(source(corpus, labels_csv=str(labels)), tmp_path / "a")
    with pytest.raises(UserError, match="fewer tokens than one block"):
        prepare_shards(source(corpus, block_size=4096), tmp_path / "b")


def test_progress_bar_runs(tmp_path, capsys):
    corpus = write_txt(tmp_path / "c.txt", documents(200))
    prepare_shards(source(corpus), tmp_path / "s", progress=True, batch_bytes=2000)
    assert "tokens/s" in capsys.readouterr().err


def test_shards_command_streams_data_text(tmp_path, capsys):
    from lmlab.data.prepare import main

    docs = documents(400)
    corpus = write_txt(tmp_path / "c.txt", docs)
    args = [str(tmp_path / "out"), "data=text", f"data.paths='{corpus}'", "data/tokenizer=byte", "data.block_size=16",
            "data.documents=line", f"data.validation_fraction={VAL}", f"data.test_fraction={TEST}"]
    main(args)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["prepared"]["documents"] == len(docs) and "wrote train:" in capsys.readouterr().out
    np.testing.assert_array_equal(rows_of(tmp_path / "out", "train"), expected(docs, 16)["train"])
    before = files_of(tmp_path / "out")
    main(args)  # an unchanged corpus: kept
    assert files_of(tmp_path / "out") == before


def test_data_text_streams_above_the_threshold(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from lmlab.data.shards import ShardRows
    from lmlab.settings import check_config
    from tests.test_text import data_config

    docs = documents(400)
    corpus = write_txt(tmp_path / "c.txt", docs)
    cfg = data_config(f"data.paths='{corpus}'", "data/tokenizer=bpe", "data.tokenizer.vocab_size=300",
                      "data.block_size=16", "data.stream_above_bytes=1000", "data.tokenizer_sample_bytes=4000",
                      "data.documents=line")
    check_config(cfg)
    big = instantiate(cfg)
    assert big.streams() and big.config == instantiate(data_config(f"data.paths='{corpus}'",
                                                                   "data.tokenizer.vocab_size=300",
                                                                   "data.block_size=16",
                                                                   "data.documents=line")).config
    splits = big.load(tmp_path / "cache")
    assert isinstance(splits["train"], ShardRows) and len(splits["validation"]) > 0
    row = splits["train"][0]["input_ids"]
    assert len(row) == 16 and row[0] == 1 and big.decode(row[1:])
    with monkeypatch.context() as m:  # served from the prepared shards the second time
        m.setattr(stream, "read_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
        again = instantiate(cfg)
        assert again.load(tmp_path / "cache")["train"][0]["input_ids"] == row
        assert again.decode(row) == big.decode(row)
    small = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, stream_above_bytes=10 ** 9,
                       documents="line")
    assert not small.streams() and not isinstance(small.load(tmp_path / "cache")["train"], ShardRows)
    labels = tmp_path / "l.csv"
    labels.write_text("text,label\na,0\nb,1\nc,0\nd,1\n")
    with pytest.raises(UserError, match="stream_above_bytes"):
        TextSource(paths=str(corpus), labels_csv=str(labels), stream_above_bytes=0).load(tmp_path / "cache")
    with pytest.raises(UserError, match="tokenizer_sample_bytes"):
        TextSource(paths=str(corpus), tokenizer_sample_bytes=0)


def test_data_text_trains_from_streamed_shards(lmlab, cache_dir):
    from tests.conftest import FAST

    code, output = lmlab("train", "data=text", "data/tokenizer=byte", "data.block_size=32",
                         "data.stream_above_bytes=0", "eval=[perplexity]", *FAST)
    assert code == 0, output
    prepared = list(Path(cache_dir).glob("lmlab.data.stream-*/index.json"))
    assert prepared and json.loads(prepared[0].read_text())["prepared"]["split"] == "blake2b"
