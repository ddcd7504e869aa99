"""Local text files as a pre-training source: read through ``datasets``, tokenized, packed into blocks.

* ``paths``: a file, a directory (its .txt/.jsonl/.json/.parquet files), a glob, or a list of these;
  ``null`` means the small sample corpus bundled with lmlab (``lmlab/data/sample/tiny_corpus.txt``).
  The format follows the extension: ``.jsonl``/``.json`` and ``.parquet`` hold one document per record in the
  column ``text_field``; a ``.txt`` file is one document (``documents: file``, the default), one per
  paragraph (``paragraph``: blank-line separated) or one per line (``line``), newlines kept inside a document
  (``lmlab.data.corpus``). The bundled sample corpora (``paths: null``) hold one document per line and are
  read so unless ``documents`` is set. Blank documents are dropped.
* Documents (not blocks) are split into train/validation/test by a permutation drawn from ``seed``: every
  block of a document lies in the document's split. Each of validation and test gets
  ``max(1, round(fraction * n_documents))`` documents (none at fraction 0) and train the rest, so a corpus
  needs at least three documents for the default fractions; with fewer, ``build`` stops with one sentence
  naming the fixes (more files, ``documents: paragraph`` or ``line``, or a fraction of 0).
* Preparation prints progress lines (reading, training the tokenizer, encoding and packing) and then one line:
  how many documents from how many files, how many went to each split, and the number of tokens.
* ``tokenizer``: a tokenizer object of ``lmlab/data/tokenizers.py`` (the config group ``data/tokenizer``:
  ``bpe``, trained on the training documents only; ``byte``; ``dna``; ``protein``; ``file``, a fixed
  ``tokenizer.json`` or a finished run's tokenizer). A character tokenizer's
  default corpus (``paths: null``) is its own sample (``sample/dna.txt`` / ``sample/protein.txt``), and FASTA
  files (.fasta/.fa/.faa/.fna) hold one document per ``>`` record.
* Packing, per split: the stream ``d_1 [EOS] d_2 [EOS] ...`` is cut into pieces of ``block_size - 1`` tokens
  and each block is ``[BOS] + piece`` (exactly ``block_size`` tokens); the remainder is dropped.
* Labels: with ``labels_csv`` (a CSV with a header ``text,label``), each CSV line becomes a row
  ``[BOS] text [EOS]`` cut to ``block_size`` tokens (the final EOS kept), with a ``label`` column holding the
  labels mapped to 0..K-1 in sorted order (numeric order when every label is an integer). A seeded
  ``labels_test_fraction`` of these rows is appended to ``test`` (the probes and fine-tuning heads are
  scored there), the rest form ``downstream`` (they are trained there); packed blocks get ``label = -1``.
  Without a CSV, ``downstream`` is empty and there are no tasks.

* Streaming: with ``stream_above_bytes`` set and the input files larger than that in all, ``load`` does not
  build in memory: it streams the files into shards in the cache directory (``lmlab.data.stream``: bounded
  memory, documents split by a keyed hash of their text instead of the permutation, BPE trained on at most
  ``tokenizer_sample_bytes`` of training text, resumable) and serves them as ``data=shards`` does. Neither
  setting enters the in-memory cache key. ``python -m lmlab.data.prepare OUT_DIR data=text ...`` always streams.
  ``stream_above_bytes`` defaults to ``STREAM_ABOVE_BYTES`` (32 MiB): the in-memory path's peak resident memory
  is many times the input's size (measured in ``docs/benchmarks.md``), so larger corpora stream.

The packing is shared with the shard writer: ``pack_stream``.

The trained tokenizer is saved as ``tokenizer.json`` inside the cached dataset directory; the cache key
covers the config (the tokenizer's settings included) and the size and modification time of every input file.
"""

from __future__ import annotations

import csv
import glob
import itertools
import os
import tempfile
from collections.abc import Sequence as SequenceABC
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Sequence,
    Value,
    concatenate_datasets,
    load_dataset,
)

from lmlab.data.corpus import DOCUMENTS, FORMATS, pack_stream, read_fasta, read_txt, say, summary
from lmlab.data.source import Source
from lmlab.data.tokenizers import BPE, TOKENIZER_FILE, File, Tokenizer
from lmlab.errors import UserError
from lmlab.io import config_hash
from lmlab.settings import Fraction, NonNegative, Optional, Positive, declared, keyless
from lmlab.vocab import BOS_ID, EOS_ID

SAMPLE_CORPUS = Tokenizer.sample  # lmlab/data/sample/tiny_corpus.txt
STREAM_ABOVE_BYTES = 32 * 2 ** 20  # default data.stream_above_bytes (module docstring)


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """``tokenizer`` itself, a new ``BPE()`` for ``None``; anything else is a UserError naming the fix."""
    if tokenizer is None:
        return BPE()
    if not isinstance(tokenizer, Tokenizer):
        raise UserError(f"data.tokenizer is {tokenizer!r}, not a tokenizer: choose one with data/tokenizer=<name>, "
                        "e.g. data/tokenizer=byte (lmlab --help lists them).")
    if isinstance(tokenizer, File) and tokenizer.run is not None:  # a finished run's tokenizer
        tokenizer.read(*run_tokenizer_file(tokenizer.run))
    return tokenizer


def run_tokenizer_file(run_dir: str | os.PathLike) -> tuple[Path, int | None]:
    """The ``tokenizer.json`` of a finished run's trained BPE and the run's ``vocab_size``: in the run's data cache
    entry (``cache_dir`` of its config; the streamed shard directory when its data were streamed); for a run that
    itself read a tokenizer file (``data/tokenizer=file``), that file. A fixed vocabulary (byte, dna, protein)
    or data without a text tokenizer is a UserError naming the option to use instead."""
    from hydra.utils import instantiate

    from lmlab.run_dir import read_config

    cfg = read_config(run_dir)
    data = cfg.get("data")
    node = data.get("tokenizer") if data is not None else None
    target = str(node.get("_target_", "")) if node is not None else ""
    if target == f"{File.__module__}.{File.__qualname__}":
        path, declared = File.resolve(node.get("path"))
        if path.is_dir():  # that run read another run's tokenizer
            path, declared = run_tokenizer_file(path)
        return path, node.get("vocab_size") or declared
    if target != f"{BPE.__module__}.{BPE.__qualname__}":
        fixed = target.rsplit(".", 1)[-1].lower() if target.startswith("lmlab.data.tokenizers.") else None
        hint = f"use data/tokenizer={fixed} instead" if fixed else "point at a run trained on text with a BPE"
        raise UserError(f"the run {run_dir} has no trained tokenizer to share ({target or 'no text tokenizer'}): "
                        f"{hint}.")
    if not str(data.get("_target_", "")).startswith("lmlab.data."):
        raise UserError(f"the run {run_dir} read its data with {data.get('_target_')!r}, not an lmlab source: "
                        "give data.tokenizer.path its tokenizer.json instead.")
    source = instantiate(data)
    cache = Path(str(cfg.get("cache_dir"))).expanduser()
    if isinstance(source, TextSource) and source.streams():
        from lmlab.data.stream import stream_directory

        entry = stream_directory(source, cache)[0]
    else:
        entry = cache / source.cache_key()
    if not (entry / TOKENIZER_FILE).is_file():
        raise UserError(f"the trained tokenizer of the run {run_dir} is not in its data cache ({entry} holds no "
                        f"{TOKENIZER_FILE}): rerun the run's command to rebuild it, or give data.tokenizer.path a "
                        f"{TOKENIZER_FILE}.")
    return (entry / TOKENIZER_FILE).resolve(), int(node.get("vocab_size"))


def _resolve(entries: list[str]) -> list[Path]:
    """Files named by ``data.paths`` entries (files, directories, globs), in order, without repeats."""
    files: list[Path] = []
    for entry in entries:
        expanded = os.path.expanduser(entry)
        if glob.has_magic(expanded):
            found = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
            if not found:
                raise UserError(f"no files match {entry!r}: check data.paths.")
        elif os.path.isdir(expanded):
            found = [p for p in sorted(Path(expanded).iterdir()) if p.is_file() and p.suffix.lower() in FORMATS]
            if not found:
                raise UserError(f"the directory {entry!r} holds no .txt, .jsonl, .json or .parquet files: "
                                "check data.paths.")
        elif os.path.isfile(expanded):
            found = [Path(expanded)]
        else:
            raise UserError(f"the data file {entry!r} does not exist: check data.paths.")
        for path in found:
            if path.suffix.lower() not in FORMATS:
                raise UserError(f"cannot read {str(path)!r} (unknown extension {path.suffix!r}): give data.paths "
                                ".txt, .jsonl, .json or .parquet files.")
            if path.stat().st_size == 0:
                raise UserError(f"the data file {str(path)!r} is empty: remove it from data.paths or add text.")
        files.extend(p.resolve() for p in found)
    return list(dict.fromkeys(files))


def _fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


@declared
class Packing(Source.Settings):
    """The settings of every tokenized, packed text source (``data=text``, ``data=hf``): see the module
    docstring."""

    text_field: str = "text"
    tokenizer: Optional[Tokenizer] = None
    block_size: Positive = 64
    validation_fraction: Fraction = 0.05
    test_fraction: Fraction = 0.05
    seed: NonNegative = 0
    labels_csv: Optional[str] = None
    labels_test_fraction: Fraction = 0.2


class TextSource(Source):
    """Local text files, tokenized (``lmlab.data.tokenizers``) and packed into fixed-length blocks."""

    @declared
    class Settings(Packing):
        paths: str | list[str] | None = None
        documents: Optional[Literal["file", "paragraph", "line"]] = None
        # streaming (lmlab.data.stream): whether and how the files are streamed into shards, not what the rows
        # are; the prepared shards' own key (``stream_key``) holds the tokenizer sample
        tokenizer_sample_bytes: Positive = keyless(100_000_000)
        stream_above_bytes: Optional[NonNegative] = keyless(STREAM_ABOVE_BYTES)

    def setup(self) -> None:
        s = self.settings
        paths, documents = s.paths, s.documents
        if paths is None:
            entries = None
        elif isinstance(paths, (str, os.PathLike)):
            entries = [os.fspath(paths)]
        elif isinstance(paths, SequenceABC) or hasattr(paths, "__iter__"):
            entries = [os.fspath(p) for p in paths]
        else:
            raise UserError(f"data.paths must be a path, a glob or a list of them, got {paths!r}: fix data.paths.")
        if entries == []:
            raise UserError("data.paths is an empty list: name at least one file, or null for the sample corpus.")
        if documents is not None and documents not in DOCUMENTS:
            raise UserError(f"data.documents must be one of {', '.join(DOCUMENTS)} (or null), got {documents!r}: "
                            "fix data.documents.")
        # a .txt file is one document unless set; the bundled samples hold one document per line
        self.documents = documents or ("line" if entries is None else "file")
        self.setup_packing()
        for name, least in (("tokenizer_sample_bytes", 1), ("stream_above_bytes", 0)):
            value = getattr(s, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < least):
                raise UserError(f"data.{name} must be an integer of at least {least}, got {value!r}: "
                                f"fix data.{name}.")
        if s.tokenizer_sample_bytes is None:
            raise UserError("data.tokenizer_sample_bytes must be an integer of at least 1, got None: "
                            "fix data.tokenizer_sample_bytes.")
        self.tokenizer_sample_bytes = int(s.tokenizer_sample_bytes)
        self.stream_above_bytes = None if s.stream_above_bytes is None else int(s.stream_above_bytes)

        self.files = _resolve([str(self.tokenizer.sample)] if entries is None else entries)
        txt = any(FORMATS[p.suffix.lower()] == "text" for p in self.files)
        if documents is not None and not txt:
            raise UserError(f"data.documents={documents} applies to .txt files and data.paths holds none (each "
                            "record of the other formats is one document): drop data.documents.")
        self.setup_labels()

    def setup_packing(self) -> None:
        """Check and derive the ``Packing`` settings, all but the labels (``setup_labels``)."""
        s = self.settings
        self.tokenizer = as_tokenizer(s.tokenizer)  # trained (bpe) by build() or load()
        block_size = s.block_size
        if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 2:
            raise UserError(f"data.block_size must be an integer of at least 2, got {block_size!r}: "
                            "fix data.block_size.")
        self.block_size = int(block_size)
        for name in ("validation_fraction", "test_fraction", "labels_test_fraction"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
                raise UserError(f"data.{name} must lie in [0, 1), got {value!r}: fix data.{name}.")
        if s.validation_fraction + s.test_fraction >= 1:
            raise UserError("data.validation_fraction + data.test_fraction leave no training documents: "
                            "make their sum smaller than 1.")
        self.fractions = {"validation": float(s.validation_fraction), "test": float(s.test_fraction)}
        self.labels_test_fraction = float(s.labels_test_fraction)
        seed = s.seed
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise UserError(f"data.seed must be a non-negative integer, got {seed!r}: fix data.seed.")
        self.seed = int(seed)
        if not isinstance(s.text_field, str) or not s.text_field:
            raise UserError(f"data.text_field must be a column name, got {s.text_field!r}: fix data.text_field.")

    def setup_labels(self) -> None:
        """Read the labels CSV (``labels_csv``), if any: the ``label`` task and its names."""
        labels = None if self.settings.labels_csv is None else os.fspath(self.settings.labels_csv)
        self.labels_csv = None
        if labels is not None:
            path = Path(os.path.expanduser(labels))
            if not path.is_file():
                raise UserError(f"the labels file {labels!r} does not exist: check data.labels_csv.")
            self.labels_csv = path.resolve()
        self.tasks: dict[str, int] = {}
        self.label_names: list[str] = []  # label_names[i] is the CSV label mapped to class i
        if self.labels_csv is not None:
            labels = self._read_labels()[1]
            try:
                self.label_names = sorted(set(labels), key=int)
            except ValueError:
                self.label_names = sorted(set(labels))
            self.tasks = {"label": len(self.label_names)}
            self._n_labelled_test(len(labels))
        self.doc_splits: dict[str, np.ndarray] = {}  # document indices of each split, after build()
        self.label_splits: dict[str, np.ndarray] = {}  # CSV row indices of test and downstream, after build()

    @property
    def config(self) -> dict[str, Any]:
        """The settings, the tokenizer as its own config (``Tokenizer.config``: a default tokenizer included)."""
        return {**super().config, "tokenizer": self.tokenizer.config}

    def _n_labelled_test(self, n: int) -> int:
        """How many of the ``n`` labelled rows go to ``test`` (at least one when the fraction is positive)."""
        n_test = max(1, round(self.labels_test_fraction * n)) if self.labels_test_fraction > 0 else 0
        if n - n_test < 1:
            raise UserError(f"the labels file holds {n} rows, too few for both downstream and test: add "
                            "labelled rows or lower data.labels_test_fraction.")
        return n_test

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def tokenizer_kind(self) -> str:
        """The tokenizer's short name (bpe, byte, dna, protein, file)."""
        return self.tokenizer.name

    def cache_key(self) -> str:
        files = [_fingerprint(p) for p in self.files]
        labels = None if self.labels_csv is None else _fingerprint(self.labels_csv)
        digest = config_hash({"config": self.config, "files": files, "labels": labels})
        return f"{type(self).__module__}.{type(self).__name__}-{digest}"

    def streams(self) -> bool:
        """Whether ``load`` prepares shards by streaming (the input files exceed ``stream_above_bytes``)."""
        if self.stream_above_bytes is None:
            return False
        return sum(p.stat().st_size for p in self.files) > self.stream_above_bytes

    def load(self, cache_dir: str | os.PathLike) -> DatasetDict:
        """The splits: built in memory and cached (``Source.load``), or, above ``stream_above_bytes``, streamed
        into shards under ``cache_dir`` (``lmlab.data.stream``) and served from them like ``data=shards``."""
        if not self.streams():
            return super().load(cache_dir)
        from lmlab.data.stream import prepare_locked

        if self.labels_csv is not None:
            raise UserError(f"the input files exceed data.stream_above_bytes={self.stream_above_bytes} and are "
                            "streamed into shards, which hold no labelled rows: drop data.labels_csv or raise "
                            "data.stream_above_bytes.")
        return prepare_locked(self, Path(cache_dir))

    # ----- reading -----

    def read_documents(self) -> list[str]:
        """Every non-blank document of ``self.files``, in file order."""
        docs: list[str] = []
        for fmt, group in itertools.groupby(self.files, key=lambda p: FORMATS[p.suffix.lower()]):
            files = [str(p) for p in group]
            if fmt == "fasta":
                docs.extend(d for f in files for d in read_fasta(f))
                continue
            if fmt == "text":
                docs.extend(d for f in files for d in read_txt(f, self.documents))
                continue
            quiet = datasets.are_progress_bars_disabled()
            datasets.disable_progress_bars()
            with tempfile.TemporaryDirectory(prefix="lmlab-text-") as scratch:
                try:
                    table = load_dataset(fmt, data_files=files, split="train", cache_dir=scratch)
                except Exception as error:  # any parse failure is a problem with the file
                    cause = error.__cause__ or error
                    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                    raise UserError(f"cannot read {', '.join(files)} as {fmt} ({detail}): fix the file or "
                                    "its extension.") from error
                finally:
                    if not quiet:
                        datasets.enable_progress_bars()
                field = self.text_field
                if field not in table.column_names:
                    raise UserError(f"{', '.join(files)} have no field {field!r} (fields: "
                                    f"{', '.join(table.column_names)}): set data.text_field.")
                if table.features[field] not in (Value("string"), Value("large_string")):
                    raise UserError(f"the field {field!r} of {', '.join(files)} is not text: set "
                                    "data.text_field to a text column.")
                docs.extend(d for d in table[field] if d is not None and d.strip())
        if not docs:
            raise UserError("data.paths hold no text (only blank documents): point data.paths at some text.")
        return docs

    def split_documents(self, n_docs: int) -> dict[str, np.ndarray]:
        """Document indices of train/validation/test (sorted within each split), by a seeded permutation."""
        perm = np.random.default_rng(self.seed).permutation(n_docs)
        counts = {s: (max(1, round(f * n_docs)) if f > 0 else 0) for s, f in self.fractions.items()}
        n_train = n_docs - counts["validation"] - counts["test"]
        if n_train < 1:
            raise UserError(f"{n_docs} documents from {self.origin} are too few for train, validation and test (a "
                            "document goes whole to one split): add documents, read .txt files by paragraph or "
                            "line (data.documents=paragraph), or set data.validation_fraction=0 or "
                            "data.test_fraction=0.")
        cut = np.cumsum([n_train, counts["validation"]])
        parts = np.split(perm, cut)
        return {s: np.sort(p) for s, p in zip(("train", "validation", "test"), parts)}

    # ----- tokenizing -----

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        return self.tokenizer.encode(texts)

    def pack(self, docs: list[str]) -> np.ndarray:
        """(n_blocks, block_size) int32: ``[BOS]`` + the next block_size-1 tokens of ``d_1 EOS d_2 EOS ..``."""
        ids, lengths = self.tokenizer.encode_flat(docs)
        return pack_stream(ids, lengths, self.block_size)

    def decode(self, ids: list[int]) -> str:
        """The text of a list of token ids; special tokens are dropped."""
        return self.tokenizer.decode(ids)

    # ----- building -----

    def _read_labels(self) -> tuple[list[str], list[str]]:
        with open(self.labels_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                raise UserError(f"the labels file {str(self.labels_csv)!r} needs a header row with the columns "
                                "text,label: fix data.labels_csv.")
            rows = [(r["text"] or "", r["label"]) for r in reader]
        if not rows:
            raise UserError(f"the labels file {str(self.labels_csv)!r} has no rows: add labelled texts to it.")
        if any(label is None or label.strip() == "" for _, label in rows):
            raise UserError(f"the labels file {str(self.labels_csv)!r} has rows without a label: fill in "
                            "every label.")
        return [t for t, _ in rows], [label.strip() for _, label in rows]

    def _downstream(self) -> tuple[list[list[int]], list[int]]:
        """Labelled rows ``[BOS] text [EOS]`` (cut to block_size, EOS kept) and their label ids."""
        texts, labels = self._read_labels()
        index = {c: i for i, c in enumerate(self.label_names)}
        keep = self.block_size - 2
        rows = [[BOS_ID, *ids[:keep], EOS_ID] for ids in self.encode(texts)]
        return rows, [index[c] for c in labels]

    def build(self) -> DatasetDict:
        size = sum(p.stat().st_size for p in self.files)
        say(f"reading {self.origin}" + (f", {size / 1e6:,.1f} MB" if self.files else ""))
        docs = self.read_documents()
        self.doc_splits = self.split_documents(len(docs))
        split_docs = {s: [docs[i] for i in idx] for s, idx in self.doc_splits.items()}
        if not self.tokenizer.trained:
            say(f"training the {self.tokenizer.name} tokenizer (vocabulary {self.tokenizer.vocab_size:,}) on "
                f"{len(split_docs['train']):,} training documents")
        self.tokenizer.train(split_docs["train"])
        say(f"encoding and packing {len(docs):,} documents into blocks of {self.block_size} tokens")

        labelled = self.labels_csv is not None
        features = {"input_ids": Sequence(Value("int32"))}
        if labelled:
            features["label"] = Value("int64")
        features = Features(features)
        out: dict[str, Dataset] = {}
        tokens = 0
        for split, texts in split_docs.items():
            ids, lengths = self.tokenizer.encode_flat(texts)
            tokens += int(lengths.sum())
            blocks = pack_stream(ids, lengths, self.block_size)
            if len(blocks) == 0 and (split == "train" or self.fractions[split] > 0):
                hint = ("lower data.block_size or add text" if split == "train" else
                        f"raise data.{split}_fraction or lower data.block_size")
                raise UserError(f"the {split} documents hold fewer tokens than one block of "
                                f"data.block_size={self.block_size}: {hint}.")
            offsets = np.arange(0, blocks.size + 1, self.block_size, dtype=np.int32)
            columns: dict[str, Any] = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets),
                                                                              pa.array(blocks.ravel()))}
            if labelled:
                columns["label"] = np.full(len(blocks), -1, dtype=np.int64)
            out[split] = Dataset.from_dict(columns, features=features)
        if labelled:
            rows, labels = self._downstream()
            n = len(rows)
            n_test = self._n_labelled_test(n)
            perm = np.random.default_rng([self.seed, 1]).permutation(n)
            parts = {"test": np.sort(perm[:n_test]), "downstream": np.sort(perm[n_test:])}
            self.label_splits = parts
            held = {k: Dataset.from_dict({"input_ids": [rows[i] for i in idx], "label": [labels[i] for i in idx]},
                                         features=features) for k, idx in parts.items()}
            out["test"] = concatenate_datasets([out["test"], held["test"]])
            out["downstream"] = held["downstream"]
        else:
            out["downstream"] = Dataset.from_dict({"input_ids": []}, features=features)
        print(summary(len(docs), self.origin, {s: len(t) for s, t in split_docs.items()}, tokens,
                      f"seeded permutation, seed {self.seed}"), flush=True)
        return DatasetDict(out)

    @property
    def origin(self) -> str:
        """Where the documents come from, for the preparation's summary line."""
        n = len(self.files)
        txt = any(FORMATS[p.suffix.lower()] == "text" for p in self.files)
        return f"{n} file{'s' if n != 1 else ''}" + (f" (.txt: one document per {self.documents})" if txt else "")

    def save_state(self, directory: Path) -> None:
        """The trained tokenizer, saved beside the splits (atomically, together)."""
        self.tokenizer.save(directory)

    def restore_state(self, path: Path) -> None:
        self.tokenizer.load(path)
