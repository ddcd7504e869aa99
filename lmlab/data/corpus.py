"""What the text paths share (``lmlab.data.text``'s in-memory source, ``lmlab.data.stream``'s streaming preparation
and ``lmlab.data.shards``' writer): the file formats a corpus may come in, FASTA reading, and the packing of
documents into fixed-length blocks (``[BOS]`` then the stream ``d_1 [EOS] d_2 [EOS] ...`` cut into pieces of
``block_size - 1`` tokens, the remainder dropped)."""

from __future__ import annotations

import os

import numpy as np

from lmlab.vocab import BOS_ID, EOS_ID

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".fna": "fasta"}


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
