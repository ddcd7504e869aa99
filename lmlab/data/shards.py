"""Memory-mapped token shards: corpora larger than memory, written once and read without loading them.

Layout of a shard directory (``write_shards``)::

    index.json                 {"format": "lmlab-shards/1", "dtype": "uint16", "vocab_size": V, "tasks": {...},
                                "splits": {"train": {"rows": N, "width": T, "shards": [{"file", "rows"}, ...],
                                                     "lengths": null | "train-lengths.npy",
                                                     "labels": {"label": "train-label.npy"}}, ...}}
    train-00000.bin ...        raw row-major (rows, T) arrays of token ids (uint16 when V <= 65536, else uint32)

Every row of a split is stored in ``T`` = its longest row's tokens, right-padded with PAD; ``lengths`` (only
when rows differ in length) gives each row's true length, and rows are served without their padding. Label
columns (one int per row) are small ``.npy`` files.

``ShardSource`` (``data=shards``) reads such a directory: the ``train`` split is a ``ShardRows`` object that
opens the shards with ``numpy.memmap`` (lazily, per process: it pickles without its maps, so DataLoader
workers reopen them) and reads only the rows a batch asks for; the DataModule samples it like a dataset
(``len``, ``rows[indices] -> {"input_ids": [...], <labels>}``, ``with_format(None)``). The evaluation splits
(validation, test, downstream, and the selection's ``target`` split where one was written) are small by design
and are loaded into memory as ``datasets.Dataset``.

A selection over shards is an index over them: ``rows.select(indices)`` (``datasets.Dataset``'s name for it) is
a ``ShardRows`` view of those rows in that order, holding only the integer index (8 bytes a row), and serves
like any pool; ``rows["label"]`` is a label column as an array; ``rows.to_dataset()`` materialises the view.
How each selection method reads a shard pool is ``lmlab.selection.base``'s business (``Selector.on_shards``).

Writing: ``write_shards(data, out_dir)`` where ``data`` is a ``Source`` (its cached splits), a mapping
``split -> rows`` (a ``Dataset``, a list of token lists, or a 2-D array), or a list of texts (packed into
``block_size`` blocks into ``train`` with a tokenizer of ``lmlab.data.tokenizers``: ``Byte()``, ``DNA()``,
``Protein()`` or a trained ``BPE``). From the shell:
``python -m lmlab.data.prepare OUT_DIR data=text data.paths=...`` (any ``lmlab train`` data overrides).
There, ``data=text`` (without ``labels_csv``) is prepared by streaming (``lmlab.data.stream.prepare_shards``:
bounded memory, documents split by hash, BPE trained on ``data.tokenizer_sample_bytes``, resumable: rerun the
same command after an interruption; an OUT_DIR already prepared from the same files and settings is kept);
every other source is built in memory and written by ``write_shards``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.source import SPLITS, TARGET_SPLIT, Source
from lmlab.data.tokenizers import Byte, Tokenizer
from lmlab.errors import UserError
from lmlab.io import config_hash, write_json
from lmlab.settings import Optional, declared
from lmlab.vocab import PAD_ID

FORMAT = "lmlab-shards/1"
INDEX = "index.json"


# ----- writing -----

def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _chunks(rows: Any, size: int):
    """(input_ids lists, {label: array}) in chunks of ``size`` rows."""
    if isinstance(rows, Dataset):
        rows = rows.with_format(None)
        labels = [c for c in rows.column_names if c != "input_ids"]
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            yield part["input_ids"], {c: np.asarray(part[c], dtype=np.int64) for c in labels}
    else:
        for start in range(0, len(rows), size):
            yield [list(r) for r in rows[start:start + size]], {}


def _lengths(rows: Any) -> np.ndarray:
    if isinstance(rows, Dataset):
        return pc.list_value_length(rows.data.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    if isinstance(rows, np.ndarray):
        return np.full(len(rows), rows.shape[1] if rows.ndim == 2 else 0, dtype=np.int64)
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def write_split(rows: Any, out_dir: Path, split: str, dtype: np.dtype, rows_per_shard: int) -> dict:
    """Write one split's shards (and its lengths/labels files) into ``out_dir``; its index entry."""
    lengths = _lengths(rows)
    width = int(lengths.max()) if len(lengths) else 0
    entry: dict[str, Any] = {"rows": len(lengths), "width": width, "shards": [], "lengths": None, "labels": {}}
    labels: dict[str, list[np.ndarray]] = {}
    shard, in_shard, handle = -1, rows_per_shard, None
    try:
        for ids, lab in _chunks(rows, min(rows_per_shard, 8192)):
            block = np.full((len(ids), width), PAD_ID, dtype=dtype)
            for i, r in enumerate(ids):
                block[i, :len(r)] = r
            for name, values in lab.items():
                labels.setdefault(name, []).append(values)
            start = 0
            while start < len(block):
                if in_shard == rows_per_shard:
                    if handle is not None:
                        handle.close()
                    shard, in_shard = shard + 1, 0
                    name = f"{split}-{shard:05d}.bin"
                    handle = open(out_dir / name, "wb")
                    entry["shards"].append({"file": name, "rows": 0})
                take = min(rows_per_shard - in_shard, len(block) - start)
                block[start:start + take].tofile(handle)
                entry["shards"][-1]["rows"] += take
                in_shard += take
                start += take
    finally:
        if handle is not None:
            handle.close()
    if len(lengths) and (lengths != width).any():
        entry["lengths"] = f"{split}-lengths.npy"
        np.save(out_dir / entry["lengths"], lengths.astype(np.uint32))
    for name, parts in labels.items():
        entry["labels"][name] = f"{split}-{name}.npy"
        np.save(out_dir / entry["labels"][name], np.concatenate(parts))
    return entry


def write_shards(data: Any, out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 rows_per_shard: int = 1 << 20, vocab_size: int | None = None, tasks: dict | None = None,
                 tokenizer: Tokenizer | None = None, block_size: int = 64) -> Path:
    """Write ``data`` (a Source, a mapping split -> rows, or a list of texts) as memory-mapped shards into
    ``out_dir`` (created; must be empty or absent). Texts are packed with ``tokenizer`` (``Byte()`` when
    ``None``; a BPE model must be trained). Returns ``out_dir``."""
    from lmlab.data.corpus import pack_stream

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"the shard directory {str(out)!r} is not empty: choose a new directory.")
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}.")
    if isinstance(data, Source):
        cache = cache_dir or os.environ.get("LMLAB_CACHE") or Path.home() / ".cache" / "lmlab"
        splits: Mapping = data.load(cache)
        vocab_size, tasks = data.vocab_size, dict(data.tasks)
    elif isinstance(data, Mapping):
        splits = data
    elif isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        tokenizer = Byte() if tokenizer is None else tokenizer
        if not isinstance(tokenizer, Tokenizer) or not tokenizer.trained:
            raise UserError(f"write_shards packs raw texts with a ready tokenizer (Byte(), DNA(), Protein() or a "
                            f"trained BPE), not {tokenizer!r}: pass one, or a Source (data=text or data=hf).")
        ids, lengths = tokenizer.encode_flat(list(data))
        splits = {"train": pack_stream(ids, lengths, block_size)}
        vocab_size = tokenizer.vocab_size
    else:
        raise UserError("write_shards needs a Source, a mapping split -> rows, or a list of texts.")
    if vocab_size is None:  # rows without a source: the largest id + 1
        vocab_size = 1 + max((max((max(r, default=0) for r in ids), default=0)
                              for rows in splits.values() for ids, _ in _chunks(rows, 8192)), default=0)
    dtype = _dtype(int(vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": int(vocab_size), "tasks": dict(tasks or {}),
             "splits": {}}
    for split, rows in splits.items():
        index["splits"][split] = write_split(rows, out, split, dtype, rows_per_shard)
    write_json(out / INDEX, index)  # last: a directory without an index is an unfinished write
    return out


# ----- reading -----

class ShardRows:
    """The rows of one split, memory-mapped: ``len``, ``rows[i]`` (one row as a dict) and ``rows[indices]``
    (a dict of columns, like ``datasets.Dataset``), without reading the shards into memory. With ``index`` (an
    integer array of split rows, see ``select``) it is the view of those rows in that order."""

    def __init__(self, directory: str | os.PathLike, entry: dict, dtype: str,
                 index: np.ndarray | None = None) -> None:
        self.directory, self.entry, self.dtype = Path(directory), entry, np.dtype(dtype)
        self.width = int(entry["width"])
        self.offsets = np.cumsum([0] + [s["rows"] for s in entry["shards"]])
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        if self.index is not None and len(self.index) and not (
                0 <= self.index.min() and self.index.max() < int(entry["rows"])):
            raise IndexError(f"a shard index holds rows outside 0..{int(entry['rows']) - 1}")
        self._maps: list[np.memmap] | None = None
        self._lengths = None
        self._labels: dict[str, np.ndarray] | None = None

    def select(self, indices) -> ShardRows:
        """The view of rows ``indices`` of this view, in that order (``datasets.Dataset.select``'s contract):
        the index alone, composed with this view's, never the rows."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and not (-len(self) <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"row indices outside 0..{len(self) - 1}")
        indices = indices % max(len(self), 1)
        return ShardRows(self.directory, self.entry, self.dtype.name,
                         indices if self.index is None else self.index[indices])

    def physical(self, indices) -> np.ndarray:
        """The split rows behind rows ``indices`` of this view."""
        indices = np.asarray(indices, dtype=np.int64)
        return indices if self.index is None else self.index[indices]

    def to_dataset(self) -> Dataset:
        """This view's rows and labels as an in-memory ``datasets.Dataset`` (reads them all)."""
        return Dataset.from_dict(self[:], features=_features(self.column_names))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_lengths": None, "_labels": None}

    def _open(self) -> None:
        self._maps = [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r",
                                shape=(s["rows"], self.width)) for s in self.entry["shards"]]
        if self.entry.get("lengths"):
            self._lengths = np.load(self.directory / self.entry["lengths"], mmap_mode="r")
        self._labels = {k: np.load(self.directory / f, mmap_mode="r") for k, f in self.entry["labels"].items()}

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._open()
        return self._maps

    @property
    def column_names(self) -> list[str]:
        return ["input_ids", *self.entry["labels"]]

    def __len__(self) -> int:
        return int(self.entry["rows"]) if self.index is None else len(self.index)

    def with_format(self, *args, **kwargs) -> ShardRows:
        return self

    def row(self, i: int) -> list[int]:
        """Row ``i`` of the split (a physical row: views map their indices first)."""
        if not -int(self.entry["rows"]) <= i < int(self.entry["rows"]):
            raise IndexError(i)
        i %= int(self.entry["rows"])
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        values = self.maps[shard][i - self.offsets[shard]]
        n = self.width if self._lengths is None else int(self._lengths[i])
        return values[:n].astype(np.int64).tolist()

    def __getitem__(self, key):
        if self._maps is None:  # open the maps (and the labels) on first use in this process
            self._open()
        if isinstance(key, str):  # a label column, like ``Dataset[name]``
            if key not in self._labels:
                raise KeyError(f"{key!r} is not a label column of these shards ({', '.join(self._labels) or 'none'})")
            values = self._labels[key]
            return np.asarray(values if self.index is None else values[self.index], dtype=np.int64)
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= int(key) < len(self):
                raise IndexError(key)
            i = int(self.physical(int(key) % len(self)))
            out = {"input_ids": self.row(i)}
            out.update({k: int(v[i]) for k, v in self._labels.items()})
            return out
        logical = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        indices = [int(i) for i in self.physical(logical)]
        cols: dict[str, list] = {"input_ids": [self.row(i) for i in indices]}
        for k, v in self._labels.items():
            cols[k] = [int(v[i]) for i in indices]
        return cols

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _features(columns: list[str]) -> Features:
    return Features({c: Sequence(Value("int32")) if c == "input_ids" else Value("int64") for c in columns})


class ShardSource(Source):
    """A directory written by ``write_shards``: train memory-mapped, the small splits in memory."""

    @declared
    class Settings(Source.Settings):
        path: Optional[str] = None

    def setup(self) -> None:
        path = self.settings.path
        if path is None:
            raise UserError("data=shards needs data.path, a directory written by lmlab.data.shards.write_shards "
                            "(python -m lmlab.data.prepare OUT_DIR data=...).")
        directory = Path(os.path.expanduser(os.fspath(path)))
        if not (directory / INDEX).is_file():
            raise UserError(f"{str(directory)!r} holds no shard index ({INDEX}): point data.path at a directory "
                            "written by write_shards.")
        self.index = json.loads((directory / INDEX).read_text())
        if self.index.get("format") != FORMAT:
            raise UserError(f"{str(directory / INDEX)!r} is not an lmlab shard index ({FORMAT}): rewrite the "
                            "shards with write_shards.")
        if not self.index["splits"].get("train", {}).get("rows"):
            raise UserError(f"the shards in {str(directory)!r} hold no train rows: write a train split.")
        for entry in self.index["splits"].values():
            for s in entry["shards"]:
                file = directory / s["file"]
                expected = s["rows"] * entry["width"] * np.dtype(self.index["dtype"]).itemsize
                if not file.is_file() or file.stat().st_size != expected:
                    raise UserError(f"the shard {str(file)!r} is missing or truncated: rewrite the shards.")
        self.directory = directory.resolve()
        self.tasks = {k: int(v) for k, v in self.index.get("tasks", {}).items()}

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def cache_key(self) -> str:
        stat = (self.directory / INDEX).stat()
        digest = config_hash({"config": self.config, "directory": str(self.directory),
                              "index": [stat.st_size, stat.st_mtime_ns]})
        return f"{type(self).__module__}.{type(self).__name__}-{digest}"

    def build(self) -> DatasetDict:
        return self.load(None)

    def load(self, cache_dir: str | os.PathLike | None) -> DatasetDict:
        """The splits, straight from the shards (nothing is copied into the cache); ``target`` where written."""
        dtype, out = self.index["dtype"], {}
        for split in (*SPLITS, TARGET_SPLIT):
            entry = self.index["splits"].get(split)
            if entry is None and split == TARGET_SPLIT:
                continue
            if entry is None:
                out[split] = Dataset.from_dict({c: [] for c in ["input_ids", *self.tasks]},
                                               features=_features(["input_ids", *self.tasks]))
                continue
            rows = ShardRows(self.directory, entry, dtype)
            out[split] = rows if split == "train" else Dataset.from_dict(rows[:], features=_features(rows.column_names))
        return DatasetDict(out)
