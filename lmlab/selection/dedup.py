"""Exact and near-duplicate removal: a hash of the token sequence, then MinHash + LSH over token n-grams.

Near-duplicate detection follows Broder, "On the resemblance and containment of documents" (1997) for
MinHash and the banding scheme of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets* ch. 3 for LSH,
as used for web-corpus deduplication (Lee et al. 2022, "Deduplicating Training Data Makes Language Models
Better", arXiv 2107.06499; Dolma, Soldaini et al. 2024, arXiv 2402.00159). Variant implemented here — our own
MinHash in numpy, no ``datasketch`` dependency:

* Each row's words (token ids >= N_SPECIAL; BOS/EOS/PAD ignored) are cut into ``ngram``-token shingles; a row
  shorter than ``ngram`` words is a single shingle. Each shingle is hashed to 32 bits (splitmix64 of a
  polynomial hash of its tokens).
* ``num_perm`` universal hash functions ``h_i(x) = ((a_i x + b_i) mod (2^61 - 1)) mod 2^32`` (as in
  ``datasketch``; products wrap modulo 2^64) give the signature ``min_x h_i(x)`` over the row's shingles.
* LSH: the signature is cut into ``b`` bands of ``r`` rows, ``(b, r)`` minimising the weighted
  false-positive and false-negative areas of the S-curve ``1 - (1 - s^r)^b`` around ``threshold`` (the rule
  of ``datasketch.MinHashLSH``, which weighs both 0.5; we weigh false negatives ``recall_weight = 0.99`` by
  default, since every candidate is verified exactly and a missed pair is never recovered: at threshold 0.8
  and 128 permutations this gives 18 bands of 7, P(candidate) = 0.986 at s = 0.8, 0.999 at s = 0.85, 0.13 at
  s = 0.5). MinHash/LSH is probabilistic: a pair just above the threshold is missed with that small chance.
  Each band's ``r`` values are hashed to one 64-bit key; rows with the same key in a band (a bucket) are
  candidates (a key collision only adds a candidate, which the exact check rejects). Rows without shingles
  join no bucket. A bucket of at most 32 rows gives all its pairs, a larger one the pairs of its first row
  with each other row.
* Candidates are confirmed with the **exact** Jaccard similarity of their shingle sets (``>= threshold``),
  so MinHash only decides which pairs are compared; confirmed pairs are joined with union-find and each
  cluster keeps its first row (pool order).

Exact duplicates (identical token sequences, specials included) are removed first, keeping the first
occurrence; near-duplicate search runs on the rows that remain. ``report`` holds ``pool_rows``,
``kept_rows``, ``removed_exact`` and ``removed_near``; the saved scores are 1 for kept rows, 0 for removed.

The pool, an in-memory ``Dataset`` or memory-mapped shards alike, is read once in chunks of ``CHUNK_ROWS``
rows (``lmlab.selection.base.pool_chunks``; ``on_shards = "chunked"``). Per row it keeps, in numpy arrays in
memory (no Python object a row), a 16-byte blake2b digest of the tokens, the band keys (8 bytes a band: 144
bytes at threshold 0.8 and 128 permutations), an 8-byte union-find parent and two flags: about 170 bytes a row
at the defaults, plus about 100 bytes a row while one band's buckets are sorted (peak memory grows by about
350 bytes a row in all, measured on 64-token rows), plus one chunk's rows and signatures, and a set of the
candidate pairs the exact check rejected. The exact check reads the rows of the candidate pairs again from the
pool, ``PAIR_BATCH`` pairs at a time. Over shards the selection is an index (a ``ShardRows`` view).
"""

from __future__ import annotations

import hashlib
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selection, Selector, pool_chunks
from lmlab.settings import Fraction, NonNegative, Positive, PositiveFraction, declared
from lmlab.vocab import N_SPECIAL

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
SMALL_BUCKET = 32  # larger LSH buckets give only the pairs of their first row
PAIR_BATCH = 4096  # candidate pairs whose rows are read from the pool at once


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(row: list[int] | np.ndarray, ngram: int) -> np.ndarray:
    """The sorted distinct 32-bit hashes of the row's word ``ngram``-shingles (uint64 array)."""
    words = np.asarray(row, dtype=np.int64)
    words = words[words >= N_SPECIAL].astype(np.uint64)
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(ngram, len(words))
    windows = np.lib.stride_tricks.sliding_window_view(words, n)
    h = np.zeros(len(windows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial hash of the n tokens, mixed per step
            h = _splitmix64(h * np.uint64(1_000_003) + windows[:, j])
    return np.unique(h & MAX_HASH)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` coefficients of the ``num_perm`` universal hash functions."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(MERSENNE), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE), size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(shingles: list[np.ndarray], num_perm: int, seed: int = 1,
                       chunk: int = 1 << 16) -> np.ndarray:
    """(n_rows, num_perm) uint64 MinHash signatures; a row without shingles gets MAX_HASH everywhere."""
    a, b = permutations(num_perm, seed)
    sig = np.full((len(shingles), num_perm), MAX_HASH, dtype=np.uint64)
    lengths = np.array([len(s) for s in shingles], dtype=np.int64)
    nonempty = np.flatnonzero(lengths)
    if len(nonempty) == 0:
        return sig
    start = 0
    while start < len(nonempty):  # rows in groups of about ``chunk`` shingles
        stop = start + 1
        total = lengths[nonempty[start]]
        while stop < len(nonempty) and total + lengths[nonempty[stop]] <= chunk:
            total += lengths[nonempty[stop]]
            stop += 1
        rows = nonempty[start:stop]
        flat = np.concatenate([shingles[i] for i in rows])
        with np.errstate(over="ignore"):
            hashed = ((flat[None, :] * a[:, None] + b[:, None]) % MERSENNE) & MAX_HASH
        offsets = np.concatenate([[0], np.cumsum(lengths[rows])[:-1]])
        sig[rows] = np.minimum.reduceat(hashed, offsets, axis=1).T
        start = stop
    return sig


def lsh_params(threshold: float, num_perm: int, recall_weight: float = 0.5, grid: int = 201) -> tuple[int, int]:
    """Bands ``b`` and rows per band ``r`` (``b * r <= num_perm``) minimising ``(1 - recall_weight)`` times
    the false-positive area (``s < threshold``) plus ``recall_weight`` times the false-negative area
    (``s >= threshold``) of the candidate probability ``P(s) = 1 - (1 - s^r)^b``."""
    best, best_err = (1, num_perm), np.inf
    lo = np.linspace(0.0, threshold, grid)
    hi = np.linspace(threshold, 1.0, grid)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            err = (1 - recall_weight) * fp + recall_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted distinct hash arrays."""
    if len(x) == 0 and len(y) == 0:
        return 1.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


def band_keys(signatures: np.ndarray, bands: int, r: int) -> np.ndarray:
    """(bands, n_rows) uint64: per band, a 64-bit hash of each row's ``r`` signature values."""
    parts = signatures[:, :bands * r].reshape(len(signatures), bands, r)
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(r):
            keys = _splitmix64(keys * np.uint64(1_000_003) + parts[:, :, j])
    return np.ascontiguousarray(keys.T)


def bucket_pairs(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(k, 2) candidate pairs ``(i, j)``, ``i < j``, of ``rows`` (ascending) sharing a key: every pair of a
    bucket of at most ``SMALL_BUCKET`` rows, the pairs of its first row with each other row in a larger one."""
    order = np.argsort(keys, kind="stable")
    members, sorted_keys = rows[order], keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        group = members[start:start + size]
        if size <= SMALL_BUCKET:
            i, j = np.triu_indices(size, 1)
            pairs.append(np.stack([group[i], group[j]], axis=1))
        else:
            pairs.append(np.stack([np.full(size - 1, group[0]), group[1:]], axis=1))
    return np.concatenate(pairs)


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return int(root)


def _confirm(pool, pairs: np.ndarray, parent: np.ndarray, rejected: set, threshold: float, ngram: int) -> None:
    """Join the pairs whose rows' exact Jaccard is at least ``threshold`` (the smaller root wins, so a cluster's
    root is its first row); the rows of the pairs not yet joined are read from the pool in one batch."""
    todo = [(i, j) for i, j in pairs.tolist() if (i, j) not in rejected and _find(parent, i) != _find(parent, j)]
    if not todo:
        return
    need = sorted({k for pair in todo for k in pair})
    shingles = dict(zip(need, (shingle_hashes(row, ngram) for row in pool.with_format(None)[need]["input_ids"])))
    for i, j in todo:
        ri, rj = _find(parent, i), _find(parent, j)
        if ri == rj:
            continue
        if jaccard(shingles[i], shingles[j]) >= threshold:
            parent[max(ri, rj)] = min(ri, rj)
        else:
            rejected.add((i, j))


def duplicates(pool, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3, seed: int = 1,
               recall_weight: float = 0.99, exact: bool = True, near: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Bool masks ``(exact, near)`` over the rows of ``pool`` (a ``Dataset`` or shards, read in chunks): True
    where a row's tokens equal an earlier row's, and where a remaining row is a near duplicate of an earlier
    one (its cluster's first row is kept)."""
    n = len(pool)
    bands, r = lsh_params(threshold, num_perm, recall_weight)
    digests = np.zeros((n if exact else 0, 2), dtype=np.uint64)
    keys = np.zeros((bands, n if near else 0), dtype=np.uint64)
    has_shingles = np.zeros(n, dtype=bool)
    for start, rows in pool_chunks(pool):
        stop = start + len(rows)
        if exact:
            digests[start:stop] = np.frombuffer(b"".join(
                hashlib.blake2b(np.asarray(row, dtype=np.int64).tobytes(), digest_size=16).digest() for row in rows),
                dtype=np.uint64).reshape(-1, 2)
        if near:
            shingles = [shingle_hashes(row, ngram) for row in rows]
            has_shingles[start:stop] = [len(x) > 0 for x in shingles]
            keys[:, start:stop] = band_keys(minhash_signatures(shingles, num_perm, seed), bands, r)
    is_exact = np.zeros(n, dtype=bool)
    if exact and n:
        is_exact[:] = True
        _, first = np.unique(digests.view(np.dtype((np.void, 16))).ravel(), return_index=True)
        is_exact[first] = False
    del digests
    parent = np.arange(n)
    if near:
        candidates = np.flatnonzero(has_shingles & ~is_exact)
        rejected: set[tuple[int, int]] = set()
        for band in range(bands):
            pairs = bucket_pairs(candidates, keys[band, candidates])
            for first in range(0, len(pairs), PAIR_BATCH):
                _confirm(pool, pairs[first:first + PAIR_BATCH], parent, rejected, threshold, ngram)
    while True:  # every row to its root
        up = parent[parent]
        if (up == parent).all():
            break
        parent = up
    return is_exact, parent != np.arange(n)


class Dedup(Selector):
    """Removes exact duplicates, then near duplicates (MinHash + LSH, exact Jaccard >= ``threshold``)."""

    on_shards = "chunked"

    @declared
    class Settings(Selector.Settings):
        threshold: PositiveFraction = 0.8
        num_perm: Positive = 128
        ngram: Positive = 3
        exact: bool = True
        near: bool = True
        recall_weight: Fraction = 0.99
        seed: NonNegative = 1

    def setup(self) -> None:
        threshold, recall_weight = self.threshold, self.recall_weight
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 < threshold <= 1:
            raise UserError(f"selection.threshold must lie in (0, 1], got {threshold!r}: e.g. selection.threshold=0.8.")
        for name in ("num_perm", "ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise UserError(f"selection.{name} must be a positive integer, got {value!r}: fix selection.{name}.")
        if isinstance(recall_weight, bool) or not isinstance(recall_weight, Real) or not 0 < recall_weight < 1:
            raise UserError(f"selection.recall_weight must lie in (0, 1), got {recall_weight!r}: e.g. 0.99.")
        if not self.exact and not self.near:
            raise UserError("selection=dedup with exact=false and near=false removes nothing: enable one of them.")
        self.threshold, self.num_perm, self.ngram = float(threshold), int(self.num_perm), int(self.ngram)
        self.exact, self.near, self.seed = bool(self.exact), bool(self.near), int(self.seed)
        self.recall_weight = float(recall_weight)

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        exact, near = duplicates(pool, self.threshold, self.num_perm, self.ngram, self.seed, self.recall_weight,
                                 self.exact, self.near)
        keep = ~(exact | near)
        report = {"pool_rows": len(pool), "kept_rows": int(keep.sum()), "removed_exact": int(exact.sum()),
                  "removed_near": int(near.sum())}
        return Selection(pool.select(np.flatnonzero(keep)), keep.astype(np.float64), report)
