"""Streaming preparation of local text files into memory-mapped shards, in memory bounded by the batch size.

``prepare_shards(source, out_dir)`` takes a ``TextSource`` (``data=text``: its files, ``text_field``, tokenizer,
``block_size``, split fractions and seed) and writes the shard directory ``ShardSource`` (``data=shards``)
reads (the layout of ``lmlab/data/shards.py``), without ever holding the corpus in memory:

* Reading: the files are read in order as a stream of batches of about ``batch_bytes`` of input. A ``.txt``
  file's documents are those of ``TextSource`` (``data.documents``, ``lmlab.data.corpus``): with ``file`` each
  file is read whole as one document (memory bounded by the largest file), with ``paragraph`` a batch ends
  at a blank line, with ``line`` at a line end; ``.jsonl`` holds one JSON record per line (the document in
  ``text_field``); ``.parquet`` is read through ``pyarrow`` record batches. A ``.json`` file that is
  not JSON lines (one array of records, or an object of columns) and FASTA files cannot be streamed: each is
  read whole (memory bounded by that one file). Blank documents are dropped, as in ``TextSource``.
* Splits: each document goes to validation, test or train by a keyed hash of its text: the first 8 bytes of
  ``blake2b(text, key=f"lmlab-{seed}")`` as a number u in [0, 1), validation when u < validation_fraction,
  test when u < validation_fraction + test_fraction, train otherwise. No permutation of the corpus is needed,
  a document keeps its split when the corpus grows, and duplicate documents share a split. (The in-memory
  ``TextSource`` splits by a seeded permutation instead, so the two paths split differently.) Fewer ``.txt``
  files read whole (``documents: file``) than splits to fill is refused before any reading; a split with a
  positive fraction that no document fell into is refused at the end, naming ``data.documents``.
* Tokenizer: a tokenizer that learns (``BPE``) is trained on a sample of at most ``tokenizer_sample_bytes``
  bytes of training documents, spread over the corpus: a training document is in the sample when the next 8
  bytes of its hash, as a number in [0, 1), fall below ``tokenizer_sample_bytes / total input bytes`` (a
  first, reading-only pass that stops once the sample is full). A training document longer than
  ``SAMPLE_PIECE_BYTES`` characters (a whole ``.txt`` file, say) is sampled by pieces of whole lines of about that
  size, each by the same rule on the hash of its own text, so that a few large documents still give a sample
  spread over the corpus. The tokenizer is saved as ``tokenizer.json``.
  A fixed tokenizer (byte, dna, protein, file) is used as it is.
* Encoding: each batch's documents are encoded by one ``Tokenizer.encode_flat`` call (for BPE, the
  ``tokenizers`` library's ``encode_batch_fast``, which uses its own threads); a document longer than
  ``ENCODE_PIECE_CHARS`` (a whole ``.txt`` file) is encoded in pieces cut only after a lone newline
  (``safe_cuts``), where byte-level BPE never joins characters, so its ids are those of the whole document.
* Packing, per split, exactly as ``lmlab.data.corpus.pack_stream`` over the split's documents in file order:
  the stream ``d_1 [EOS] d_2 [EOS] ...`` cut into pieces of ``block_size - 1`` tokens, each row ``[BOS] +
  piece``; the tokens that do not yet fill a piece are carried to the next batch, and the final remainder
  of each split is dropped.
* Writing: rows are appended to ``{split}-{i:05d}.bin`` files of ``rows_per_shard`` rows (the last one
  shorter), ``downstream`` is empty; ``index.json`` (the ``lmlab-shards/1`` index, plus a ``"prepared"``
  entry recording the key, the settings and the sample actually used) is written last, atomically.
* Resuming: after each batch the shards are flushed (fsync) and ``progress.json`` records the input
  position (file index, and byte offset for line formats or record index for the others), the rows written
  to each shard and each split's carried tokens. A preparation that was interrupted resumes from the last
  such checkpoint (shard files are cut back to it, the saved tokenizer is reused) and writes byte-identical
  files to an uninterrupted run; ``progress.json`` is removed once ``index.json`` is written.
* Already prepared: the key hashes the source's config, every input file's path, size and modification time,
  ``tokenizer_sample_bytes`` and ``rows_per_shard``. A directory whose index holds the same key is returned as
  is; a directory holding another key (a changed corpus or setting) is prepared again. ``batch_bytes`` does
  not change the output and is not part of the key.

``progress=True`` shows a ``rich`` progress bar with input bytes/s and tokens/s; without it, ``say`` prints a
line when each stage starts (tokenizer sample, encoding) and one every ``SAY_EVERY_SECONDS``. A finished
preparation prints the summary line of ``lmlab.data.corpus.summary`` (documents, files, documents per split,
tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.corpus import decode_utf8, line_of, paragraphs, say, summary
from lmlab.data.shards import FORMAT, INDEX, _dtype
from lmlab.data.tokenizers import TOKENIZER_FILE, Tokenizer
from lmlab.errors import UserError
from lmlab.io import config_hash, write_json
from lmlab.vocab import BOS_ID, EOS_ID

STREAM_FORMAT = "lmlab-stream/1"
PROGRESS = "progress.json"
SPLIT_NAMES = ("train", "validation", "test")
LINE_FORMATS = {".txt", ".jsonl"}
DEFAULT_SAMPLE_BYTES = 100_000_000
DEFAULT_BATCH_BYTES = 1 << 22
DEFAULT_SHARD_BYTES = 1 << 27
SAY_EVERY_SECONDS = 10.0
ENCODE_PIECE_CHARS = 1 << 20  # a document longer than this is encoded in pieces (encode_in_pieces)
SAMPLE_PIECE_BYTES = 1 << 16  # a training document longer than this is sampled by pieces (module docstring)


# ----- reading -----

def _json_lines(path: Path) -> bool:
    """Whether a .json file is JSON lines (its first non-blank line is one whole JSON record)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict) and len(line.strip()) < path.stat().st_size - 1
                except ValueError:
                    return False
    return True


def _doc_of(record: Any, field: str, path: Path) -> str | None:
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{str(path)!r} has a record without the field {field!r}: set data.text_field.")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"the field {field!r} of {str(path)!r} is not text: set data.text_field to a text column.")
    return value


def _line_batches(path: Path, fmt: str, field: str, start: int, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    """(documents, byte offset after them) for a .txt/.jsonl file, in batches of whole lines from ``start``."""
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        while True:
            data = f.read(batch_bytes)
            if not data:
                return
            while not data.endswith(b"\n"):  # complete the last line (a line longer than a batch is read whole)
                more = f.read(batch_bytes)
                if not more:
                    break
                cut = more.find(b"\n")
                if cut >= 0:
                    data += more[:cut + 1]
                    break
                data += more
            position += len(data)
            f.seek(position)
            text = decode_utf8(data, path, position - len(data))
            if fmt == ".txt":
                docs = [d for d in text.splitlines() if d.strip()]
            else:
                docs = []
                for line in text.split("\n"):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError as error:
                            raise UserError(f"cannot read {str(path)!r} as JSON lines ({error}): "
                                            "fix the file.") from None
                        doc = _doc_of(record, field, path)
                        if doc is not None and doc.strip():
                            docs.append(doc)
            yield docs, position


def _paragraph_batches(path: Path, start: int, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    """(paragraphs, byte offset after them) for a .txt file read by paragraph, from ``start``; a batch ends after
    the blank line that closes a paragraph, once it holds ``batch_bytes``, or at the end of the file."""
    with open(path, "rb") as f:
        f.seek(start)
        position, size, lines, docs = start, 0, [], []
        for raw in f:
            line = line_of(decode_utf8(raw, path, position))
            position += len(raw)
            if line.strip():
                lines.append(line)
                size += len(raw)
            elif lines:
                docs.extend(paragraphs(lines))
                lines = []
                if size >= batch_bytes:
                    yield docs, position
                    docs, size = [], 0
        docs.extend(paragraphs(lines))
        if docs or position > start:
            yield docs, position


def _file_batch(path: Path, start: int) -> Iterator[tuple[list[str], int]]:
    """The whole .txt file as one document (none when blank), and its size; nothing when ``start`` is past it."""
    size = path.stat().st_size
    if start < size:
        text = decode_utf8(path.read_bytes(), path)
        yield ([text] if text.strip() else []), size


def _record_batches(records: Iterator[str | None], start: int, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    """(documents, record index after them) from an iterator of records that begins at record ``start``."""
    docs, size, position = [], 0, start
    for doc in records:
        position += 1
        if doc is not None and doc.strip():
            docs.append(doc)
            size += len(doc)
        if size >= batch_bytes:
            yield docs, position
            docs, size = [], 0
    if docs or position > start:
        yield docs, position


def _parquet_records(path: Path, field: str, start: int) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise UserError(f"{str(path)!r} has no field {field!r} (fields: {', '.join(pf.schema_arrow.names)}): "
                        "set data.text_field.")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"the field {field!r} of {str(path)!r} is not text: set data.text_field to a text column.")
    first = 0
    for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if first + rows <= start:
            first += rows
            continue
        skip = max(0, start - first)
        for batch in pf.iter_batches(batch_size=8192, row_groups=[group], columns=[field]):
            column = batch.column(0)
            if skip:
                cut = min(skip, len(column))
                column, skip = column.slice(cut), skip - cut
            yield from column.to_pylist()
        first += rows


def _whole_records(path: Path, fmt: str, field: str) -> list[str | None]:
    """The documents of a file that cannot be streamed (a .json array/object of columns, FASTA)."""
    if fmt == "fasta":
        from lmlab.data.corpus import read_fasta

        return list(read_fasta(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"cannot read {str(path)!r} as JSON ({error}): fix the file or its extension.") from None
    if isinstance(data, dict) and isinstance(data.get(field), list):
        return [_doc_of({field: v}, field, path) for v in data[field]]
    if isinstance(data, dict):  # one record
        return [_doc_of(data, field, path)]
    if isinstance(data, list):
        return [_doc_of(r, field, path) for r in data]
    raise UserError(f"{str(path)!r} is neither JSON lines, a list of records nor an object with a list "
                    f"{field!r}: fix the file or data.text_field.")


def read_batches(path: Path, field: str, start: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 documents: str = "line") -> Iterator[tuple[list[str], int]]:
    """Batches of non-blank documents of one file, from input position ``start``: (documents, position after
    them), the position being a byte offset (.txt, .jsonl, JSON-lines .json) or a record index (others);
    ``documents`` is what a document of a .txt file is (``file``, ``paragraph``, ``line``)."""
    from lmlab.data.corpus import FORMATS

    suffix = path.suffix.lower()
    fmt = FORMATS[suffix]
    if fmt == "text" and documents == "file":
        yield from _file_batch(path, start)
    elif fmt == "text" and documents == "paragraph":
        yield from _paragraph_batches(path, start, batch_bytes)
    elif suffix in LINE_FORMATS or (suffix == ".json" and _json_lines(path)):
        yield from _line_batches(path, ".txt" if fmt == "text" else ".jsonl", field, start, batch_bytes)
    elif fmt == "parquet":
        yield from _record_batches(_parquet_records(path, field, start), start, batch_bytes)
    else:
        yield from _record_batches(iter(_whole_records(path, fmt, field)[start:]), start, batch_bytes)


def _fraction_done(path: Path, position: int) -> float:
    """How far into ``path`` an input position lies, for the progress bar (records: of all records)."""
    suffix = path.suffix.lower()
    if suffix in LINE_FORMATS or suffix == ".json":
        size = path.stat().st_size
        return min(1.0, position / size) if size else 1.0
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        return min(1.0, position / rows) if rows else 1.0
    return 1.0


def _seen(files: list[Path], f: int, position: int) -> float:
    """Input bytes before position ``position`` of file ``f`` (for the progress bar)."""
    done = sum(p.stat().st_size for p in files[:f])
    if f < len(files):
        done += _fraction_done(files[f], position) * files[f].stat().st_size
    return done


# ----- splitting -----

def hash_units(docs: list[str], seed: int) -> np.ndarray:
    """(n, 2) float64 in [0, 1): per document, the split number and the tokenizer-sample number."""
    key = f"lmlab-{seed}".encode()
    out = np.empty((len(docs), 2), dtype=np.float64)
    for i, doc in enumerate(docs):
        digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=16, key=key).digest()
        out[i, 0] = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        out[i, 1] = int.from_bytes(digest[8:], "big") / 2.0 ** 64
    return out


def assign_splits(units: np.ndarray, validation: float, test: float) -> np.ndarray:
    """int8 split of each document: 0 train, 1 validation, 2 test (indices into ``SPLIT_NAMES``)."""
    u = units[:, 0]
    return np.where(u < validation, 1, np.where(u < validation + test, 2, 0)).astype(np.int8)


# ----- writing -----

class _SplitWriter:
    """Packs one split's token stream into rows and appends them to fixed-size shard files."""

    def __init__(self, out: Path, split: str, width: int, dtype: np.dtype, rows_per_shard: int,
                 on_shard: Callable[[str, int], None] | None) -> None:
        self.out, self.split, self.width, self.dtype = out, split, width, dtype
        self.rows_per_shard, self.on_shard = rows_per_shard, on_shard
        self.shards: list[int] = []  # rows written to each shard file
        self.carry = np.zeros(0, dtype=np.int32)  # stream tokens not yet in a row
        self.handle = None

    def name(self, i: int) -> str:
        return f"{self.split}-{i:05d}.bin"

    def restore(self, state: dict) -> None:
        """Cut the shard files back to a checkpoint ``state`` and reopen the last one for appending."""
        self.shards, self.carry = list(state["shards"]), np.asarray(state["carry"], dtype=np.int32)
        row_bytes = self.width * self.dtype.itemsize
        for i, rows in enumerate(self.shards):
            path = self.out / self.name(i)
            if not path.is_file() or path.stat().st_size < rows * row_bytes:
                raise UserError(f"the shard {str(path)!r} is shorter than its checkpoint: delete {str(self.out)!r} "
                                "and prepare again.")
            if path.stat().st_size != rows * row_bytes:
                os.truncate(path, rows * row_bytes)
        i = len(self.shards)
        while (self.out / self.name(i)).exists():  # shards begun after the checkpoint
            (self.out / self.name(i)).unlink()
            i += 1
        if self.shards and self.shards[-1] < self.rows_per_shard:
            self.handle = open(self.out / self.name(len(self.shards) - 1), "ab")

    def state(self) -> dict:
        return {"shards": list(self.shards), "carry": self.carry.tolist()}

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> int:
        """Append the documents (concatenated ``ids`` of the given ``lengths``); the number of rows written."""
        if not len(lengths):
            return 0
        stream = np.concatenate([self.carry, np.insert(ids, np.cumsum(lengths), EOS_ID)])
        piece = self.width - 1
        n = len(stream) // piece
        self.carry = stream[n * piece:].copy()
        if n:
            rows = np.empty((n, self.width), dtype=self.dtype)
            rows[:, 0] = BOS_ID
            rows[:, 1:] = stream[: n * piece].reshape(n, piece)
            self._write(rows)
        return n

    def _write(self, rows: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if self.handle is None:
                self.shards.append(0)
                self.handle = open(self.out / self.name(len(self.shards) - 1), "wb")
            take = min(self.rows_per_shard - self.shards[-1], len(rows) - start)
            rows[start:start + take].tofile(self.handle)
            self.shards[-1] += take
            start += take
            if self.shards[-1] == self.rows_per_shard:
                self.handle.close()
                self.handle = None
                if self.on_shard is not None:
                    self.on_shard(self.split, len(self.shards) - 1)

    def sync(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def entry(self) -> dict:
        return {"rows": int(sum(self.shards)), "width": self.width,
                "shards": [{"file": self.name(i), "rows": r} for i, r in enumerate(self.shards)],
                "lengths": None, "labels": {}}


# ----- preparing -----

def _fingerprints(files: list[Path]) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def stream_key(source: Any, tokenizer_sample_bytes: int, rows_per_shard: int) -> str:
    """What determines a prepared directory: the source's config, the input files, the streaming settings."""
    return config_hash({"format": STREAM_FORMAT, "config": source.config, "files": _fingerprints(source.files),
                        "tokenizer_sample_bytes": tokenizer_sample_bytes, "rows_per_shard": rows_per_shard})


def _learns(tokenizer: Tokenizer) -> bool:
    return type(tokenizer).train is not Tokenizer.train


def _sample(source: Any, cap: int, batch_bytes: int, stats: dict) -> Iterator[str]:
    """Training documents spread over the corpus, at most ``cap`` bytes in all (see the module docstring)."""
    total = sum(p.stat().st_size for p in source.files)
    rate = min(1.0, cap / total) if total else 1.0
    used = 0
    for path in source.files:
        for docs, _ in read_batches(path, source.text_field, 0, batch_bytes, source.documents):
            units = hash_units(docs, source.seed)
            split = assign_splits(units, source.fractions["validation"], source.fractions["test"])
            for doc, u, s in zip(docs, units[:, 1], split):
                if s != 0:
                    continue
                pieces = _pieces(doc, SAMPLE_PIECE_BYTES)
                chosen = [u] if len(pieces) == 1 else hash_units(pieces, source.seed)[:, 1]
                for piece, v in zip(pieces, chosen):
                    if v < rate:
                        size = len(piece.encode("utf-8"))
                        if used + size > cap:
                            return
                        used += size
                        stats["docs"] += 1
                        stats["bytes"] = used
                        yield piece


def safe_cuts(doc: str, size: int) -> list[str]:
    """``doc`` cut into consecutive pieces of about ``size`` characters or more, only after a lone ``"\n"``
    (non-whitespace before and after it): byte-level BPE's pre-tokenizer (GPT-2's pattern) makes that newline a
    pre-token of its own, in the whole document as at the end of a piece, and joins nothing across it, so the
    pieces' tokens, concatenated, are the whole document's."""
    if len(doc) <= size:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > size:
        cut = start + size
        while cut < len(doc) and not (doc[cut - 1] == "\n" and not doc[cut].isspace() and cut >= 2
                                      and not doc[cut - 2].isspace()):
            cut = doc.find("\n", cut) + 1 or len(doc)
        pieces.append(doc[start:cut])
        start = cut
    if start < len(doc):
        pieces.append(doc[start:])
    return pieces


def encode_in_pieces(tokenizer: Tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizer.encode_flat(docs)``, a document longer than ``ENCODE_PIECE_CHARS`` being encoded by its
    ``safe_cuts`` (bounded memory for a large document, the same ids)."""
    if all(len(d) <= ENCODE_PIECE_CHARS for d in docs):
        return tokenizer.encode_flat(docs)
    pieces, owner = [], []
    for i, doc in enumerate(docs):
        cut = safe_cuts(doc, ENCODE_PIECE_CHARS)
        pieces.extend(cut)
        owner.extend([i] * len(cut))
    ids, piece_lengths = tokenizer.encode_flat(pieces)
    return ids, np.bincount(np.asarray(owner, dtype=np.int64), weights=piece_lengths,
                            minlength=len(docs)).astype(np.int64)


def _pieces(doc: str, size: int) -> list[str]:
    """``doc`` itself when it has at most ``size`` characters, else its consecutive runs of whole lines of about
    ``size`` characters (a line longer than that is one piece)."""
    if len(doc) <= size:
        return [doc]
    pieces, current, length = [], [], 0
    for line in doc.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            pieces.append("".join(current))
            current, length = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def _clear(out: Path, index: dict | None) -> None:
    """Remove a previous streamed preparation's files from ``out`` (one with a progress file, or an index that
    records a preparation); refuse a directory holding anything else."""
    entries = list(out.iterdir())
    if not entries:
        return
    prepared = (out / PROGRESS).is_file() or (isinstance(index, dict) and "prepared" in index)
    ours = [p for p in entries if prepared and (p.name in (INDEX, PROGRESS, TOKENIZER_FILE) or p.suffix == ".bin")]
    others = [p.name for p in entries if p not in ours]
    if others:
        raise UserError(f"the shard directory {str(out)!r} holds other files ({', '.join(sorted(others)[:3])}): "
                        "choose a new or empty directory.")
    for p in ours:
        p.unlink()


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TextColumn("{task.fields[tokens]:,} tokens, {task.fields[rate]:,.0f} tokens/s"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def _json_or_none(path: Path) -> Any:
    """The JSON in ``path``; None where the file is missing or not JSON (a preparation killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def prepare_shards(source: Any, out_dir: str | os.PathLike, *, rows_per_shard: int | None = None,
                   tokenizer_sample_bytes: int | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES,
                   progress: bool = False, on_shard: Callable[[str, int], None] | None = None) -> Path:
    """Stream ``source`` (a ``TextSource``) into a shard directory ``out_dir`` (see the module docstring);
    returns ``out_dir``. ``rows_per_shard`` defaults to about 128 MiB of rows; ``tokenizer_sample_bytes`` to
    the source's setting. ``on_shard(split, i)`` is called after each shard file is complete."""
    if getattr(source, "labels_csv", None) is not None:
        raise UserError("streaming preparation does not write labelled rows (data.labels_csv): prepare this "
                        "source in memory, or drop data.labels_csv.")
    needed = 1 + sum(f > 0 for f in source.fractions.values())
    if source.documents == "file" and all(p.suffix.lower() == ".txt" for p in source.files) \
            and len(source.files) < needed:
        raise UserError(f"{len(source.files)} .txt files are {len(source.files)} documents (data.documents=file), too "
                        f"few for {needed} splits (a document goes whole to one split): add files, or read them by "
                        "paragraph or line (data.documents=paragraph).")
    tokenizer: Tokenizer = source.tokenizer
    if tokenizer_sample_bytes is None:
        tokenizer_sample_bytes = int(getattr(source, "tokenizer_sample_bytes", DEFAULT_SAMPLE_BYTES))
    if isinstance(tokenizer_sample_bytes, bool) or not isinstance(tokenizer_sample_bytes, int) \
            or tokenizer_sample_bytes < 1:
        raise UserError(f"tokenizer_sample_bytes must be a positive integer, got {tokenizer_sample_bytes!r}.")
    dtype = _dtype(tokenizer.vocab_size)
    width = source.block_size
    if rows_per_shard is None:
        rows_per_shard = max(1, DEFAULT_SHARD_BYTES // (width * dtype.itemsize))
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}.")
    batch_bytes = max(1, int(batch_bytes))
    key = stream_key(source, tokenizer_sample_bytes, rows_per_shard)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = _json_or_none(out / INDEX)
    if isinstance(index, dict) and index.get("prepared", {}).get("key") == key:
        if _learns(tokenizer):
            tokenizer.load(out)
        return out
    state = _json_or_none(out / PROGRESS)
    if not isinstance(state, dict) or state.get("key") != key:
        state = None
    if state is None:
        _clear(out, index)

    writers = {s: _SplitWriter(out, s, width, dtype, rows_per_shard, on_shard) for s in SPLIT_NAMES}
    if state is None:
        sample = {"docs": 0, "bytes": 0}
        if _learns(tokenizer):
            if not progress:
                say(f"training the {tokenizer.name} tokenizer (vocabulary {tokenizer.vocab_size:,}) on at most "
                    f"{tokenizer_sample_bytes:,} bytes of training documents")
            tokenizer.train(_sample(source, tokenizer_sample_bytes, batch_bytes, sample))
            say(f"the {tokenizer.name} tokenizer was trained on {sample['docs']:,} training documents or pieces, "
                f"{sample['bytes']:,} bytes")
        tokenizer.save(out)
        state = {"key": key, "file": 0, "position": 0, "tokens": 0, "docs": 0, "sample": sample,
                 "split_docs": {s: 0 for s in SPLIT_NAMES},
                 "splits": {s: w.state() for s, w in writers.items()}}
        write_json(out / PROGRESS, state)
    else:
        if _learns(tokenizer):
            tokenizer.load(out)
        for s, w in writers.items():
            w.restore(state["splits"][s])

    files = source.files
    total = sum(p.stat().st_size for p in files)
    val, test = source.fractions["validation"], source.fractions["test"]
    started, tokens_now = time.perf_counter(), 0
    said = started
    if not progress:
        say(f"encoding and packing {len(files):,} file{'s' if len(files) != 1 else ''} ({total / 1e6:,.1f} MB) "
            f"into blocks of {width} tokens, streamed into {out}")
    try:
        with _progress_bar(progress) as bar:
            task = bar.add_task("preparing shards", total=total, completed=_seen(files, state["file"],
                                state["position"]), tokens=state["tokens"], rate=0.0)
            for f in range(state["file"], len(files)):
                path = files[f]
                start = state["position"] if f == state["file"] else 0
                for docs, position in read_batches(path, source.text_field, start, batch_bytes, source.documents):
                    if docs:
                        split = assign_splits(hash_units(docs, source.seed), val, test)
                        ids, lengths = encode_in_pieces(tokenizer, docs)
                        token_split = np.repeat(split, lengths)
                        for k, s in enumerate(SPLIT_NAMES):
                            mine = split == k
                            if mine.any():
                                writers[s].add(ids[token_split == k], lengths[mine])
                                state["split_docs"][s] += int(mine.sum())
                        state["tokens"] += int(lengths.sum())
                        state["docs"] += len(docs)
                        tokens_now += int(lengths.sum())
                    for w in writers.values():
                        w.sync()
                    state.update(file=f, position=position, splits={s: w.state() for s, w in writers.items()})
                    write_json(out / PROGRESS, state)
                    seen = _seen(files, f, position)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(task, completed=seen, tokens=state["tokens"], rate=tokens_now / elapsed)
                    if not progress and time.perf_counter() - said >= SAY_EVERY_SECONDS:
                        said = time.perf_counter()
                        say(f"{seen / 1e6:,.1f} of {total / 1e6:,.1f} MB, {state['docs']:,} documents, "
                            f"{state['tokens']:,} tokens")
                state.update(file=f + 1, position=0)
                write_json(out / PROGRESS, state)
    finally:
        for w in writers.values():
            w.close()

    for s, w in writers.items():
        if not state["split_docs"][s] and (s == "train" or source.fractions[s] > 0):
            raise UserError(f"no document of the {state['docs']} from {source.origin} fell into the {s} split (split "
                            "by a hash of each document): add documents, read .txt files by paragraph or line "
                            f"(data.documents=paragraph), or raise data.{s}_fraction.")
        if not sum(w.shards) and (s == "train" or source.fractions[s] > 0):
            hint = ("lower data.block_size or add text" if s == "train" else
                    f"raise data.{s}_fraction or lower data.block_size")
            raise UserError(f"the {s} documents hold fewer tokens than one block of data.block_size={width}: "
                            f"{hint}.")
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": int(tokenizer.vocab_size), "tasks": {},
             "splits": {**{s: w.entry() for s, w in writers.items()},
                        "downstream": {"rows": 0, "width": 0, "shards": [], "lengths": None, "labels": {}}},
             "prepared": {"format": STREAM_FORMAT, "key": key, "config": source.config,
                          "files": _fingerprints(files), "tokenizer_sample_bytes": tokenizer_sample_bytes,
                          "tokenizer_sample": state["sample"], "rows_per_shard": rows_per_shard,
                          "split": "blake2b", "documents": state["docs"], "split_documents": state["split_docs"],
                          "tokens": state["tokens"],
                          "tokenizer_file": TOKENIZER_FILE}}
    write_json(out / INDEX, index)  # last: a directory without an index is an unfinished preparation
    (out / PROGRESS).unlink()
    print(summary(state["docs"], source.origin, state["split_docs"], state["tokens"], "keyed hash of the text, "
                  f"seed {source.seed}"), flush=True)
    return out


def prepare_locked(source: Any, cache_dir: Path) -> Any:
    """``data=text`` above ``stream_above_bytes``: prepare (or resume, or reuse) the shards of ``source`` in
    ``cache_dir/lmlab.data.stream-<key>`` under a file lock (jobs of a sweep share one preparation), and
    return their splits as ``ShardSource`` serves them."""
    import fcntl
    import sys

    from lmlab.data.shards import ShardSource

    directory, rows_per_shard = stream_directory(source, cache_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_shards(source, directory, rows_per_shard=rows_per_shard, progress=sys.stderr.isatty())
    return ShardSource(path=str(directory)).load(None)


def stream_directory(source: Any, cache_dir: str | os.PathLike) -> tuple[Path, int]:
    """Where ``prepare_locked`` prepares ``source`` under ``cache_dir``, and the rows per shard it uses."""
    rows_per_shard = max(1, DEFAULT_SHARD_BYTES // (source.block_size * _dtype(source.tokenizer.vocab_size).itemsize))
    key = stream_key(source, source.tokenizer_sample_bytes, rows_per_shard)
    return Path(cache_dir) / f"lmlab.data.stream-{key}", rows_per_shard
