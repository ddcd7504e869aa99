"""data=hf on local datasets, memory-mapped token shards, DNA/protein character tokenizers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from lmlab.data.corpus import pack_stream, read_fasta
from lmlab.data.datamodule import DataModule
from lmlab.data.hf import HFSource
from lmlab.data.pcfg import PCFGSource
from lmlab.data.shards import INDEX, ShardRows, ShardSource, write_shards
from lmlab.data.text import TextSource
from lmlab.data.tokenizers import BPE, DNA, Byte, Protein
from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
from tests.conftest import FAST

TEXTS = [f"document {i} says the cat sat on the mat with {'a hat' if i % 2 else 'the dog'}" for i in range(120)]


def local_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(TEXTS)) + "\n")
    return path


# ----- data=hf -----

def test_hf_source_matches_text_source_on_the_same_documents(tmp_path):
    jsonl = local_jsonl(tmp_path)
    hf = HFSource(name="json", data_files=str(jsonl), tokenizer=Byte(), block_size=32)
    text = TextSource(paths=str(jsonl), tokenizer=Byte(), block_size=32)
    assert hf.read_documents() == text.read_documents() == TEXTS
    a, b = hf.load(tmp_path / "cache"), text.load(tmp_path / "cache")
    assert a["train"]["input_ids"] == b["train"]["input_ids"]  # the same splitting, tokenizing and packing
    assert hf.cache_key() != text.cache_key()


def test_hf_source_saved_dataset_streaming_and_first_n(tmp_path):
    DatasetDict({"train": Dataset.from_dict({"body": TEXTS}),
                 "other": Dataset.from_dict({"body": ["x"]})}).save_to_disk(str(tmp_path / "saved"))
    full = HFSource(name=str(tmp_path / "saved"), text_field="body", tokenizer=BPE(vocab_size=300))
    assert full.read_documents() == TEXTS
    first = HFSource(name=str(tmp_path / "saved"), text_field="body", streaming=True, max_documents=7)
    assert first.read_documents() == TEXTS[:7]
    jsonl = local_jsonl(tmp_path)
    streamed = HFSource(name="json", data_files=str(jsonl), streaming=True, max_documents=5)
    assert streamed.read_documents() == TEXTS[:5]
    splits = full.load(tmp_path / "cache")
    assert len(splits["train"]) > 0 and full.decode(splits["train"][0]["input_ids"]).strip()


def test_hf_source_errors_are_one_sentence(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    jsonl = local_jsonl(tmp_path)
    cases = [
        (dict(name="json", data_files=str(jsonl), text_field="body"), "no field 'body'"),
        (dict(name="json", data_files=str(jsonl), text_field="n"), "is not text"),
        (dict(name="json", data_files=str(tmp_path / "missing.jsonl")), "does not exist"),
        (dict(name="json", data_files=str(jsonl), split="validation"), "cannot load"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as info:
            HFSource(tokenizer=Byte(), **kwargs).read_documents()
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="needs data.name"):
        HFSource()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail fast, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load the Hugging Face dataset 'nobody/no-such-dataset'"):
        HFSource(name="nobody/no-such-dataset", tokenizer=Byte()).read_documents()


# ----- shards -----

def test_shards_round_trip_pcfg_with_labels(tmp_path):
    source = PCFGSource(train_size=500, validation_size=30, test_size=40, downstream_size=50)
    out = write_shards(source, tmp_path / "shards", cache_dir=tmp_path / "cache", rows_per_shard=128)
    index = json.loads((out / INDEX).read_text())
    assert index["dtype"] == "uint16" and [s["rows"] for s in index["splits"]["train"]["shards"]] == [128] * 3 + [116]
    shards = ShardSource(path=str(out))
    assert shards.vocab_size == source.vocab_size and shards.tasks == source.tasks
    got, ref = shards.load(None), source.load(tmp_path / "cache")
    rows = got["train"]
    assert isinstance(rows, ShardRows) and all(isinstance(m, np.memmap) for m in rows.maps)
    expected = ref["train"].with_format(None)[:]
    assert rows[list(range(len(rows)))] == expected  # variable-length rows come back without padding
    assert rows[7] == ref["train"][7] and rows[-1]["input_ids"] == expected["input_ids"][-1]
    assert pickle.loads(pickle.dumps(rows))[[3, 200]]["input_ids"] == [expected["input_ids"][i] for i in (3, 200)]
    for split in ("validation", "test", "downstream"):
        assert got[split].with_format(None)[:] == ref[split].with_format(None)[:]
    # the DataModule samples memory-mapped rows like a dataset
    dm = DataModule(shards, got, batch_size=8, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and set(source.tasks) <= set(batch)
    with pytest.raises(UserError, match="not empty"):
        write_shards(source, out, cache_dir=tmp_path / "cache")


def test_shards_from_texts_and_errors(tmp_path):
    out = write_shards(["ACGT" * 10, "GGCC" * 5], tmp_path / "dna", tokenizer=DNA(), block_size=9)
    rows = ShardSource(path=str(out)).load(None)["train"]
    ids, lengths = DNA().encode_flat(["ACGT" * 10, "GGCC" * 5])
    assert rows[:]["input_ids"] == pack_stream(ids, lengths, 9).tolist()
    assert json.loads((out / INDEX).read_text())["splits"]["train"]["lengths"] is None  # fixed-size blocks
    big = write_shards({"train": [[1, 70000, 2]]}, tmp_path / "big")
    assert json.loads((big / INDEX).read_text())["dtype"] == "uint32"
    assert ShardSource(path=str(big)).load(None)["train"][0]["input_ids"] == [1, 70000, 2]
    (tmp_path / "big" / "train-00000.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="truncated"):
        ShardSource(path=str(big))
    with pytest.raises(UserError, match="no shard index"):
        ShardSource(path=str(tmp_path))
    with pytest.raises(UserError, match="data.path"):
        ShardSource()


def test_shards_train_through_the_cli(lmlab, tmp_path):
    source = PCFGSource(train_size=300, validation_size=30, test_size=40, downstream_size=50)
    out = write_shards(source, tmp_path / "shards", cache_dir=tmp_path / "cache")
    code, output = lmlab("train", "data=shards", f"data.path='{out}'", "eval=[perplexity,probe]",
                         "eval.probe.seeds=1", *FAST)
    assert code == 0, output
    results = json.loads(next(lmlab.runs.rglob("results.json")).read_text())
    assert results["metrics"]["train/steps"] == 4 and results["metrics"]["train/rows"] == 300
    code, output = lmlab("train", "data=shards", "selection=random", f"data.path='{out}'", *FAST)
    assert code == 0, output  # a selection over shards is an index (tests/test_selection_shards.py)
    results = [json.loads(p.read_text()) for p in lmlab.runs.rglob("results.json")]
    assert sorted(r["metrics"]["train/rows"] for r in results) == [150, 300]


# ----- character tokenizers -----

@pytest.mark.parametrize("kind,text", [(DNA, "ACGTNACGT"), (Protein, "MKTAYIAKQRQISFVKSHFSRQX")])
def test_char_tokenizers_round_trip(kind, text):
    tok = kind()
    ids, lengths = tok.encode_flat([text, text.lower()])
    assert lengths.tolist() == [len(text)] * 2 and ids.min() >= N_SPECIAL and ids.max() < tok.vocab_size
    assert tok.decode(ids[: len(text)]) == text and tok.decode(ids[len(text):]) == text
    assert ids[0] == N_SPECIAL + tok.alphabet.index(text[0])


def test_char_tokenizer_unknowns_and_fasta(tmp_path):
    ids, _ = DNA().encode_flat(["AC GT\nRY-*12"])
    assert DNA().decode(ids) == "ACGTNN"  # whitespace, gaps, stops, digits dropped; IUPAC -> N
    ids, _ = Protein().encode_flat(["MBZUO"])
    assert Protein().decode(ids) == "MXXXX"
    assert DNA().vocab_size == 9 and Protein().vocab_size == 25
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(">one\nACGT\nAC\n>two desc\nGGG\n>empty\n")
    assert read_fasta(fasta) == ["ACGTAC", "GGG"]
    fasta.write_text("\n".join(["ACGT" * 20, "GGCA" * 20, "TTAC" * 20, "CAGT" * 20]) + "\n")
    lines = tmp_path / "seqs.fa"
    lines.write_text(">a\n" + "ACGT" * 20 + "\n>b\n" + "GGCA" * 20 + "\n>c\n" + "TTAC" * 20 + "\n")
    src = TextSource(paths=str(lines), tokenizer=DNA(), block_size=16, validation_fraction=0.3, test_fraction=0.3)
    splits = src.load(tmp_path / "cache")
    assert src.vocab_size == 9 and src.read_documents() == ["ACGT" * 20, "GGCA" * 20, "TTAC" * 20]
    row = splits["train"][0]["input_ids"]
    assert row[0] == BOS_ID and all(t == EOS_ID or N_SPECIAL <= t < 9 for t in row[1:])


def test_char_sources_use_their_sample_corpus(tmp_path):
    for kind, tok in (("dna", DNA()), ("protein", Protein())):
        src = TextSource(tokenizer=tok, block_size=32)
        assert src.files == [Path(__file__).resolve().parents[1] / "lmlab" / "data" / "sample" / f"{kind}.txt"]
        splits = src.load(tmp_path / "cache")
        assert len(splits["train"]) > 10
        assert set(src.decode(splits["train"][0]["input_ids"])) <= set(tok.alphabet)
