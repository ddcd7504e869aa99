"""What the text paths share (``lmlab.data.text``'s in-memory source, ``lmlab.data.stream``'s streaming preparation
and ``lmlab.data.shards``' writer): the file formats a corpus may come in, what a document of a ``.txt`` file is,
FASTA reading, the packing of documents into fixed-length blocks (``[BOS]`` then the stream
``d_1 [EOS] d_2 [EOS] ...`` cut into pieces of ``block_size - 1`` tokens, the remainder dropped), and the one line
a preparation prints about its documents.

Documents of a ``.txt`` file (``data.documents``):

* ``file``: the whole file is one document, its text exactly as written (newlines included, so they are
  modelled like any other character);
* ``paragraph``: each run of non-blank lines is one document (its lines joined by ``"\n"``); blank or
  whitespace-only lines separate documents;
* ``line``: each non-blank line is one document (lines as ``str.splitlines`` cuts them).

A line is what ends at ``"\n"`` (a ``"\r"`` before it is dropped) in ``paragraph`` mode. Blank documents are
dropped in every mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".fna": "fasta"}


DOCUMENTS = ("file", "paragraph", "line")  # what a document of a .txt file is (module docstring)


def decode_utf8(data: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """``data`` (read from ``path`` at byte ``offset``) as text; invalid UTF-8 is a UserError naming the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{str(path)!r} is not UTF-8 text near byte {offset + error.start}: fix the file's "
                        "encoding.") from None


def paragraphs(lines: Iterable[str]) -> list[str]:
    """The runs of non-blank lines (without their line ends), each joined by ``"\n"``."""
    out: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def line_of(raw: str) -> str:
    """A line without its ending (``"\n"``, and a ``"\r"`` before it)."""
    return raw.removesuffix("\n").removesuffix("\r")


def text_documents(text: str, documents: str) -> list[str]:
    """The non-blank documents of a ``.txt`` file's ``text`` under ``documents`` (module docstring)."""
    if documents == "file":
        return [text] if text.strip() else []
    if documents == "paragraph":
        return paragraphs(line_of(raw) for raw in text.split("\n"))
    return [d for d in text.splitlines() if d.strip()]


def read_txt(path: str | os.PathLike, documents: str) -> list[str]:
    """The non-blank documents of a ``.txt`` file (module docstring)."""
    return text_documents(decode_utf8(Path(path).read_bytes(), path), documents)


def say(message: str) -> None:
    """One progress line of a preparation, printed at once."""
    print(f"[lmlab] data: {message}", flush=True)


def summary(n_docs: int, origin: str, split_docs: dict[str, int], tokens: int, how: str) -> str:
    """The line a preparation prints: documents, where from, how they were split, and the token count."""
    parts = ", ".join(f"{name} {n:,}" for name, n in split_docs.items())
    return (f"[lmlab] data: {n_docs:,} documents from {origin}, split by document ({how}) into {parts}; "
            f"{tokens:,} tokens")


def pack_stream(ids: np.ndarray, lengths: np.ndarray, block_size: int) -> np.ndarray:
    """(n_blocks, block_size) int32: ``[BOS]`` + the next block_size-1 tokens of ``d_1 EOS d_2 EOS ..``,
    the documents being the consecutive pieces of ``ids`` of the given ``lengths``; the remainder is dropped."""
    stream = np.insert(np.asarray(ids, dtype=np.int32), np.cumsum(lengths), EOS_ID)  # one EOS after each document
    piece = block_size - 1
    n_blocks = len(stream) // piece
    body = stream[: n_blocks * piece].reshape(n_blocks, piece)
    return np.concatenate([np.full((n_blocks, 1), BOS_ID, dtype=np.int32), body], axis=1)


def read_fasta(path: str | os.PathLike) -> list[str]:
    """The sequences of a FASTA file, one per ``>`` record (lines joined); a file without headers is read as
    one sequence per line."""
    records: list[list[str]] = []
    headers = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                headers = True
                records.append([])
            elif line and not line.startswith(";"):
                if headers:
                    if not records:
                        records.append([])
                    records[-1].append(line)
                else:
                    records.append([line])
    return [s for s in ("".join(r) for r in records) if s]
