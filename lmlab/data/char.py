"""Character tokenizers for biological sequences: DNA and protein, one token per residue.

Single-character tokenization of nucleotides follows HyenaDNA (Nguyen et al. 2023, "HyenaDNA: Long-Range
Genomic Sequence Modeling at Single Nucleotide Resolution", arXiv 2306.15794: characters A, C, G, T, N); one token
per amino acid follows the protein LMs used for peptides: PepMLM (Chen et al. 2023, "PepMLM: Target
Sequence-Conditioned Generation of Peptide Binders via Masked Language Modeling", arXiv 2310.03842, on ESM-2's
residue vocabulary) and the RiPP substrate models of Clark, Mi, Mitchell & Shukla 2024, "Substrate Prediction
for RiPP Biosynthetic Enzymes via Masked Language Modeling and Transfer Learning" (arXiv 2402.15181).

Alphabets (ids from ``N_SPECIAL``, in this order):

* ``dna``: ``A C G T N`` (vocabulary 4 + 5 = 9). Lower case is upper-cased; every other IUPAC code
  (R, Y, K, M, S, W, B, D, H, V) and any other letter becomes ``N``.
* ``protein``: the 20 standard amino acids ``A C D E F G H I K L M N P Q R S T V W Y`` and ``X``
  (vocabulary 4 + 21 = 25). Lower case is upper-cased; B, Z, J, U, O and any other letter become ``X``.

Whitespace and digits inside a sequence are dropped (FASTA line breaks, GenBank-style numbering); a ``*``
(stop codon) or ``-`` (gap) is dropped too. ``read_fasta`` reads ``>header`` records, one document per record.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmlab.vocab import N_SPECIAL

ALPHABETS = {"dna": "ACGTN", "protein": "ACDEFGHIKLMNPQRSTVWYX"}
UNKNOWN = {"dna": "N", "protein": "X"}
SAMPLES = {"dna": Path(__file__).resolve().parent / "sample" / "dna.txt",
           "protein": Path(__file__).resolve().parent / "sample" / "protein.txt"}


def vocab_size(kind: str) -> int:
    return N_SPECIAL + len(ALPHABETS[kind])


def _table(kind: str) -> np.ndarray:
    """Byte value -> token id (-1 = drop)."""
    table = np.full(256, -1, dtype=np.int32)
    unknown = N_SPECIAL + ALPHABETS[kind].index(UNKNOWN[kind])
    for c in range(256):
        ch = chr(c)
        if ch.isascii() and ch.isalpha():
            table[c] = unknown
    for i, ch in enumerate(ALPHABETS[kind]):
        table[ord(ch)] = table[ord(ch.lower())] = N_SPECIAL + i
    return table


_TABLES = {kind: _table(kind) for kind in ALPHABETS}


def encode_flat(kind: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text as residue ids: the concatenated ids (int32) and each text's length."""
    table = _TABLES[kind]
    encoded = []
    for text in texts:
        raw = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
        ids = table[raw]
        encoded.append(ids[ids >= 0])
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.concatenate(encoded).astype(np.int32) if encoded else np.zeros(0, dtype=np.int32)
    return ids, lengths


def decode(kind: str, ids) -> str:
    """The residue string of a list of ids; special tokens are dropped."""
    alphabet = ALPHABETS[kind]
    return "".join(alphabet[i - N_SPECIAL] for i in map(int, ids) if N_SPECIAL <= i < N_SPECIAL + len(alphabet))


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
