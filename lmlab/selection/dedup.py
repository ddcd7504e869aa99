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
  Rows that share a band bucket are candidates.
* Candidates are confirmed with the **exact** Jaccard similarity of their shingle sets (``>= threshold``),
  so MinHash only decides which pairs are compared; confirmed pairs are joined with union-find and each
  cluster keeps its first row (pool order).

Exact duplicates (identical token sequences, specials included) are removed first, keeping the first
occurrence; near-duplicate search runs on the rows that remain. ``report`` holds ``pool_rows``,
``kept_rows``, ``removed_exact`` and ``removed_near``; the saved scores are 1 for kept rows, 0 for removed.

Over memory-mapped shards it materialises the pool (``Selector.on_shards``): the exact-Jaccard check needs
every row's shingles at hand, so ``Selector.run`` loads a shard pool of at most ``MATERIALISE_ROWS`` rows and
refuses a larger one. (Filling the LSH buckets chunk by chunk and re-reading candidate rows from the shards
would lift that limit; it is not implemented.)
"""

from __future__ import annotations

import hashlib
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selection, Selector
from lmlab.settings import NonNegative
from lmlab.vocab import N_SPECIAL

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)


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


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index is the root, so each cluster keeps its first row
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicates(rows: list[list[int]], threshold: float, num_perm: int, ngram: int, seed: int = 1,
                    recall_weight: float = 0.99) -> np.ndarray:
    """A bool mask: True for rows that are near duplicates of an earlier row (cluster's first row kept)."""
    n = len(rows)
    shingles = [shingle_hashes(r, ngram) for r in rows]
    sig = minhash_signatures(shingles, num_perm, seed)
    bands, r = lsh_params(threshold, num_perm, recall_weight)
    uf = _UnionFind(n)
    checked: set[tuple[int, int]] = set()
    has = np.array([len(s) > 0 for s in shingles])
    for band in range(bands):
        part = np.ascontiguousarray(sig[:, band * r:(band + 1) * r])
        keys = part.view(np.dtype((np.void, part.dtype.itemsize * r))).ravel()
        _, inverse = np.unique(keys, return_inverse=True)
        inverse = np.where(has, inverse.ravel(), -1)  # rows without shingles join no bucket
        order = np.argsort(inverse, kind="stable")
        cuts = np.flatnonzero(np.diff(inverse[order])) + 1
        for members in np.split(order, cuts):
            if len(members) < 2 or inverse[members[0]] < 0:
                continue
            # every pair in small buckets; the star around the first member in big ones
            pairs = ([(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))]
                     if len(members) <= 32 else [(members[0], m) for m in members[1:]])
            for i, j in pairs:
                if (i, j) in checked or uf.find(i) == uf.find(j):
                    continue
                checked.add((i, j))
                if jaccard(shingles[i], shingles[j]) >= threshold:
                    uf.union(int(i), int(j))
    roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    return roots != np.arange(n)


def exact_duplicates(rows: list[list[int]]) -> np.ndarray:
    """A bool mask: True for rows whose token sequence equals an earlier row's."""
    seen: set[bytes] = set()
    out = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        key = hashlib.blake2b(np.asarray(row, dtype=np.int64).tobytes(), digest_size=16).digest()
        out[i] = key in seen
        seen.add(key)
    return out


class Dedup(Selector):
    """Removes exact duplicates, then near duplicates (MinHash + LSH, exact Jaccard >= ``threshold``)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3, exact: bool = True,
                 near: bool = True, recall_weight: float = 0.99, seed: NonNegative = 1) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 < threshold <= 1:
            raise UserError(f"selection.threshold must lie in (0, 1], got {threshold!r}: e.g. selection.threshold=0.8.")
        for name, value in (("num_perm", num_perm), ("ngram", ngram)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise UserError(f"selection.{name} must be a positive integer, got {value!r}: fix selection.{name}.")
        if isinstance(recall_weight, bool) or not isinstance(recall_weight, Real) or not 0 < recall_weight < 1:
            raise UserError(f"selection.recall_weight must lie in (0, 1), got {recall_weight!r}: e.g. 0.99.")
        if not exact and not near:
            raise UserError("selection=dedup with exact=false and near=false removes nothing: enable one of them.")
        super().__init__(threshold=float(threshold), num_perm=int(num_perm), ngram=int(ngram), exact=bool(exact),
                         near=bool(near), recall_weight=float(recall_weight), seed=int(seed))
        self.threshold, self.num_perm, self.ngram = float(threshold), int(num_perm), int(ngram)
        self.exact, self.near, self.seed = bool(exact), bool(near), int(seed)
        self.recall_weight = float(recall_weight)

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        rows = pool.with_format(None)["input_ids"]
        exact = exact_duplicates(rows) if self.exact else np.zeros(len(rows), dtype=bool)
        near = np.zeros(len(rows), dtype=bool)
        if self.near:
            rest = np.flatnonzero(~exact)
            near[rest] = near_duplicates([rows[i] for i in rest], self.threshold, self.num_perm, self.ngram,
                                         self.seed, self.recall_weight)
        keep = ~(exact | near)
        report = {"pool_rows": len(rows), "kept_rows": int(keep.sum()), "removed_exact": int(exact.sum()),
                  "removed_near": int(near.sum())}
        return Selection(pool.select(np.flatnonzero(keep)), keep.astype(np.float64), report)
