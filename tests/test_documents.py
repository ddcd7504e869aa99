"""What a document of a .txt file is (data.documents: file, paragraph, line), in the in-memory source
(lmlab/data/text.py) and the streamed preparation (lmlab/data/stream.py): newlines kept in the token stream, the
split by document, the summary line, the refusals."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.corpus import text_documents
from lmlab.data.shards import INDEX, ShardSource
from lmlab.data.stream import prepare_shards, read_batches
from lmlab.data.text import TextSource
from lmlab.data.tokenizers import BPE, Byte
from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
from tests.test_text import data_config, sentence

WORDS = "the river ran past an old mill where children played until the evening light faded".split()


def paragraph(marker: str, k: int, rng) -> str:
    """Prose of about 60 words, each line wrapped at 50 columns, every word tagged with ``marker``."""
    words = [f"{marker}{w}" if i % 5 == 0 else w for i, w in enumerate(rng.choice(WORDS, size=60 + k))]
    return textwrap.fill(" ".join(words), width=50)


def write_corpus(directory: Path, n_files: int = 3, n_paragraphs: int = 4) -> list[list[str]]:
    """``n_files`` files of wrapped paragraphs separated by blank lines; the paragraphs of each file."""
    rng = np.random.default_rng(0)
    out = []
    for f in range(n_files):
        paras = [paragraph(f"F{f}P{p}x", p, rng) for p in range(n_paragraphs)]
        text = "\n\n".join(paras) + "\n"
        if f == 1:  # Windows line ends and whitespace-only separator lines
            text = "\r\n   \r\n".join(p.replace("\n", "\r\n") for p in paras) + "\r\n"
        (directory / f"part{f}.txt").write_bytes(text.encode())
        out.append(paras)
    return out


def markers(text: str) -> set[str]:
    return set(re.findall(r"F\dP\dx", text))


def test_a_txt_file_is_one_document_with_its_newlines(tmp_path, capsys):
    """Three files of wrapped paragraphs: three documents, newlines in the token stream, split by document."""
    paras = write_corpus(tmp_path)
    files = sorted(tmp_path.glob("*.txt"))
    source = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=32)  # the defaults: file mode
    docs = source.read_documents()
    assert docs == [p.read_bytes().decode() for p in files]  # each file whole, exactly as written
    splits = source.build()
    assert {k: len(v) for k, v in source.doc_splits.items()} == {"train": 1, "validation": 1, "test": 1}
    for name, idx in source.doc_splits.items():
        rows = np.array(splits[name]["input_ids"])
        stream = rows[:, 1:].ravel()
        assert (rows[:, 0] == BOS_ID).all() and (stream == N_SPECIAL + ord("\n")).sum() > 10  # newlines kept
        assert (stream == EOS_ID).sum() <= 1  # one document: at most its closing EOS
        text = source.decode(stream.tolist())
        assert markers(text) == {f"F{int(idx[0])}P{p}x" for p in range(4)}  # the whole document, nothing else
    out = capsys.readouterr().out
    tokens = sum(len(d.encode()) for d in docs)  # byte tokenizer: one token per byte
    assert f"3 documents from 3 files (.txt: one document per file), split by document (seeded permutation, " \
           f"seed 0) into train 1, validation 1, test 1; {tokens:,} tokens" in out
    assert "[lmlab] data: reading 3 files" in out and "encoding and packing 3 documents" in out
    assert len(paras) == 3


def test_bpe_models_the_newlines(tmp_path):
    write_corpus(tmp_path)
    source = TextSource(paths=str(tmp_path), tokenizer=BPE(vocab_size=300), block_size=32)
    splits = source.build()
    table = source.tokenizer.token_bytes()
    stream = np.array(splits["train"]["input_ids"])[:, 1:].ravel()
    assert any(b"\n" in table[int(i)] for i in stream if i >= N_SPECIAL)
    assert "\n" in source.decode(stream.tolist())


def test_paragraph_and_line_modes_count_their_documents(tmp_path):
    paras = write_corpus(tmp_path)
    expected = [p for file in paras for p in file]
    by_paragraph = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=32, documents="paragraph")
    assert by_paragraph.read_documents() == expected  # inner newlines kept, \r\n read as \n
    assert all(d.count("\n") >= 2 for d in expected)
    by_line = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=32, documents="line")
    assert by_line.read_documents() == [line for p in expected for line in p.split("\n")]
    by_paragraph.build()
    assert sum(map(len, by_paragraph.doc_splits.values())) == 12
    assert text_documents("a\nb\n\n\n c \n", "paragraph") == ["a\nb", " c "]
    assert text_documents("a\nb\n\n\n c \n", "file") == ["a\nb\n\n\n c \n"]
    assert text_documents(" \n\t\n", "file") == [] == text_documents(" \n\t\n", "paragraph")


@pytest.mark.parametrize("documents, count", [("file", 3), ("paragraph", 12), ("line", None)])
def test_the_streamed_path_reads_the_same_documents(tmp_path, documents, count, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_corpus(corpus)
    source = TextSource(paths=str(corpus), tokenizer=Byte(), block_size=16, documents=documents,
                        validation_fraction=0.34, test_fraction=0.33)
    docs = source.read_documents()
    assert count is None or len(docs) == count
    streamed = [d for p in source.files for d, _ in _batches(p, documents, 150)]
    assert streamed == docs  # small batches end at paragraph (or line) boundaries only
    out = prepare_shards(source, tmp_path / "s", batch_bytes=150)
    index = json.loads((out / INDEX).read_text())["prepared"]
    assert index["documents"] == len(docs) and sum(index["split_documents"].values()) == len(docs)
    printed = capsys.readouterr().out
    assert f"{len(docs)} documents from 3 files (.txt: one document per {documents})" in printed
    if documents != "line":  # each document's blocks lie in one split
        seen = {}
        shards = ShardSource(path=str(out)).load(None)
        for split in ("train", "validation", "test"):
            rows = shards[split][:]["input_ids"] if split == "train" else shards[split]["input_ids"]
            seen[split] = markers(source.decode(np.asarray(rows).ravel().tolist()))
        assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
        assert not seen["validation"] & seen["test"]


def _batches(path: Path, documents: str, batch_bytes: int):
    for docs, _ in read_batches(path, "text", 0, batch_bytes, documents):
        for d in docs:
            yield d, None


def test_a_paragraph_stream_resumes_at_a_batch_boundary(tmp_path):
    write_corpus(tmp_path, n_files=1, n_paragraphs=6)
    path = tmp_path / "part0.txt"
    batches = list(read_batches(path, "text", 0, 200, "paragraph"))
    assert len(batches) > 2
    _, cut = batches[1]
    rest = [d for docs, _ in read_batches(path, "text", cut, 200, "paragraph") for d in docs]
    assert [d for docs, _ in batches[2:] for d in docs] == rest


def test_too_few_documents_for_three_splits(tmp_path):
    write_corpus(tmp_path, n_files=2)
    message = sentence(lambda: TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=16).build())
    assert "2 documents from 2 files" in message and "data.documents=paragraph" in message
    splits = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=16, test_fraction=0).build()
    assert len(splits["train"]) > 0 and len(splits["validation"]) > 0 and len(splits["test"]) == 0
    splits = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=16, documents="paragraph").build()
    assert all(len(splits[s]) > 0 for s in ("train", "validation", "test"))


def test_the_setting_is_checked_and_refused_where_it_cannot_apply(tmp_path):
    from lmlab.settings import check_config

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one record"}) + "\n")
    message = sentence(lambda: TextSource(paths=str(tmp_path / "a.jsonl"), documents="paragraph"))
    assert "data.documents" in message and ".txt" in message
    with pytest.raises(UserError, match="documents must be one of"):
        check_config(data_config("data.documents=sentence"))
    check_config(data_config("data.documents=paragraph"))
    assert data_config().documents is None
    default, line = TextSource(paths=str(tmp_path / "a.jsonl")), TextSource()  # null: file; the sample: line
    assert default.documents == "file" and line.documents == "line"
    # the cache key holds the setting as given (null for both), beside the paths that resolve it
    assert default.config["documents"] is None and line.config["documents"] is None
    write_corpus(tmp_path, n_files=1)
    keys = {TextSource(paths=str(tmp_path / "part0.txt"), documents=d).cache_key() for d in ("file", "paragraph")}
    assert len(keys) == 2


def test_large_text_streams_by_default(tmp_path):
    from lmlab.data.text import STREAM_ABOVE_BYTES

    assert data_config().stream_above_bytes == STREAM_ABOVE_BYTES == TextSource().stream_above_bytes
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    with open(big, "wb") as f:
        f.truncate(STREAM_ABOVE_BYTES + 1)  # only the size matters here
    small.write_text("a small corpus\n")
    assert TextSource(paths=str(big)).streams() and not TextSource(paths=str(small)).streams()
    assert not TextSource(paths=str(big), stream_above_bytes=None).streams()


def test_lmlab_train_reports_the_preparation(tmp_path, lmlab):
    from tests.conftest import FAST

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus)
    code, out = lmlab("train", "data=text", f"data.paths='{corpus}'", "data/tokenizer=byte", "data.block_size=16",
                      "eval=[perplexity]", *FAST)
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith("[lmlab] data: ")]
    assert lines[0].startswith("[lmlab] data: reading 3 files (.txt: one document per file)")
    assert any(ln.startswith("[lmlab] data: encoding and packing 3 documents") for ln in lines)
    assert "3 documents from 3 files" in lines[-1] and "train 1, validation 1, test 1" in lines[-1]


def test_memory_bench_script_runs():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_text_memory.py"
    done = subprocess.run([sys.executable, str(script), "--sizes", "0.2"], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [ln.split() for ln in done.stdout.splitlines()[1:]]
    assert [r[1] for r in rows] == ["in-memory", "streamed"] and all(float(r[4]) >= float(r[3]) for r in rows)


def test_the_streamed_path_names_the_fix_for_too_few_documents(tmp_path, monkeypatch):
    from lmlab.data import stream

    write_corpus(tmp_path, n_files=2)
    source = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=16)
    with monkeypatch.context() as m:  # refused before any reading
        m.setattr(stream, "read_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
        message = sentence(lambda: prepare_shards(source, tmp_path / "a"))
    assert "2 .txt files are 2 documents" in message and "data.documents=paragraph" in message
    write_corpus(tmp_path, n_files=3)  # three documents: by hash, some split is likely left empty
    source = TextSource(paths=str(tmp_path), tokenizer=Byte(), block_size=16, validation_fraction=0.01,
                        test_fraction=0.01)
    message = sentence(lambda: prepare_shards(source, tmp_path / "b"))
    assert "no document of the 3 from 3 files" in message and "data.documents=paragraph" in message


def test_large_documents_are_sampled_by_pieces_for_the_tokenizer(tmp_path):
    """Three large documents and a sample cap below each: the BPE still trains on pieces of the training ones."""
    from lmlab.data import stream
    from lmlab.data.stream import _pieces

    text = "".join(f"line {i} of prose\n" for i in range(10))
    assert _pieces(text, 40) == ["".join(f"line {i} of prose\n" for i in range(j, min(j + 3, 10)))
                                 for j in range(0, 10, 3)]
    assert _pieces("short", 40) == ["short"] and "".join(_pieces(text, 1)) == text
    rng = np.random.default_rng(1)
    for f in range(3):
        (tmp_path / f"big{f}.txt").write_text("\n\n".join(paragraph(f"F{f}P{p}x", p, rng) for p in range(150)))
    source = TextSource(paths=str(tmp_path), tokenizer=BPE(vocab_size=300), block_size=16,
                        validation_fraction=0, test_fraction=0)
    size = (tmp_path / "big0.txt").stat().st_size

    def sample(piece: int, out: str) -> dict:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(stream, "SAMPLE_PIECE_BYTES", piece)
            done = prepare_shards(source, tmp_path / out, tokenizer_sample_bytes=size // 2)
        return json.loads((done / INDEX).read_text())["prepared"]["tokenizer_sample"]

    assert sample(10 * size, "whole") == {"docs": 0, "bytes": 0}  # whole documents: none fits the cap
    pieces = sample(4096, "pieces")
    assert 0 < pieces["bytes"] <= size // 2 and pieces["docs"] > 3


def test_a_large_document_is_encoded_in_pieces_to_the_same_ids(monkeypatch):
    """Known answer: the pieces' ids, concatenated, are the whole document's (byte-level BPE and bytes)."""
    from lmlab.data import stream
    from lmlab.data.stream import encode_in_pieces, safe_cuts

    rng = np.random.default_rng(2)
    lines = []
    for i in range(400):
        indent = " " * int(rng.integers(0, 9))
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 8))))
        lines.append(indent + words + ("  " if i % 7 == 0 else "") + ("\r\n" if i % 11 == 0 else "\n"))
        if i % 13 == 0:
            lines.append("\n\n")
    doc = "".join(lines) + "def f(x):\n    return x\n"
    cuts = safe_cuts(doc, 50)
    assert "".join(cuts) == doc and len(cuts) > 20
    assert all(c.endswith("\n") for c in cuts[:-1])
    assert all(not nxt[0].isspace() for nxt in cuts[1:]) and all(not c[-2].isspace() for c in cuts[:-1])
    bpe = BPE(vocab_size=400)
    bpe.train([doc])
    monkeypatch.setattr(stream, "ENCODE_PIECE_CHARS", 50)
    for tok in (bpe, Byte()):
        whole_ids, whole_lengths = tok.encode_flat(["short one", doc, "", doc[:30]])
        ids, lengths = encode_in_pieces(tok, ["short one", doc, "", doc[:30]])
        np.testing.assert_array_equal(ids, whole_ids)
        np.testing.assert_array_equal(lengths, whole_lengths)
