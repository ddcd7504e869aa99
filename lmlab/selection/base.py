"""The selection stage: pick the rows of the candidate pool that training will use.

A selector scores the pool (``score``) and keeps rows by their scores. ``run`` caches the selected
dataset and the per-row scores on disk under a key derived from the data and the selector's config,
so every job of a sweep selects once. Methods that need a target set or reference models (CoLoR-Filter,
PreSelect, ...) receive the target set (``lmlab.pipeline.selection_target``: the data's ``target`` split,
else its validation split) and a work directory.

``select`` returns a ``Selection``: the selected dataset (any dataset with the pool's columns, not only a
subset of the pool: augmentation such as ``rephrase`` adds new rows), its per-row scores where the method
scores, and its ``report`` (a JSON-able dict of counts, e.g. rows removed by each rule, or ``None``). ``run``
saves the report as ``selection_report.json`` in the cache entry and reads it back on a cache hit. ``run``
also receives the data source (``self.source``; ``None`` when the caller does not pass it) for selectors that
decode tokens.

``run`` also writes ``selection.json`` (``STATS``) in the cache entry: pool and selection sizes and, where
the pool has an ``origin`` column (planted-structure data, ``lmlab.data.planted``: 0 = target), the
selection's ``precision`` (share of origin 0) against the pool's. The ``Selection`` that ``run`` returns
holds the same (``stats``; the pipeline adds it to the results as ``selection/*``) and its cache entry
(``cache_path``). A selector that acts during training (a curriculum) returns its Lightning callbacks from
``training_callbacks(datamodule, selection)``; they may add what they measure to ``selection.report``.

Per-group selection (``run(..., by=<column>)``; ``data=mixture`` with ``select_per_source: true`` passes
``by="source"``): ``select`` runs on each group of pool rows sharing a value of that column, separately, so each
group keeps its own ``fraction`` (a mixture's proportions survive the selection); the groups' selections are
joined (``select_by``) and the cache key names the column. A selector that orders the whole pool (the
curriculum: ``per_group = False``) refuses it.

Pools of memory-mapped shards (``data=shards``: ``lmlab.data.shards.ShardRows``). A selection of such a pool
is an index over it (``pool.select(keep)``: a ``ShardRows`` view restricted to, and ordered by, the kept
rows), saved in the cache entry as ``indices.npy`` instead of ``selected/`` and read back as a view of the
same pool, so the DataModule serves it like any pool and memory holds 8 bytes a kept row. How a selector
reads such a pool is its ``on_shards``:

* ``"chunked"``: its ``select`` reads the pool in chunks of ``CHUNK_ROWS`` rows (``pool_chunks``), fitting
  its models or statistics on samples of the pool and the target first, then scoring chunk by chunk and
  keeping rows from the concatenated scores (dedup keeps a few numpy values a row from each chunk and reads
  candidate rows again by index); it runs the same code on an in-memory ``Dataset`` pool, so both select the
  same rows (random, quality, color_filter, miniplm, preselect, curriculum, dedup).
* ``"materialise"`` (the default): the method needs the whole pool at once (rephrase's new rows); ``run``
  loads a shard pool as a ``Dataset`` when it has at most ``MATERIALISE_ROWS`` rows (environment
  ``LMLAB_SELECT_MAX_ROWS``) and refuses a larger one with one sentence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets, load_from_disk

from lmlab.errors import UserError
from lmlab.io import atomic_dir, config_hash, discard_if_damaged, write_json
from lmlab.settings import Configured

REPORT = "selection_report.json"
STATS = "selection.json"
SCORES = "scores.npy"
SELECTED = "selected"
INDICES = "indices.npy"
CHUNK_ROWS = 50_000  # rows a chunked selector holds at once
MATERIALISE_ROWS = 2_000_000  # largest shard pool a materialising selector loads into memory


def is_shards(data: Any) -> bool:
    from lmlab.data.shards import ShardRows

    return isinstance(data, ShardRows)


def pool_chunks(pool: Any, size: int | None = None):
    """``(start, rows)`` over the pool in order, ``rows`` the plain token lists of at most ``size`` rows
    (``CHUNK_ROWS``): the one way chunked selectors read a pool, a ``Dataset`` or shards alike."""
    size = size or CHUNK_ROWS
    data = pool.with_format(None)
    for start in range(0, len(data), size):
        yield start, [list(r) for r in data[start:start + size]["input_ids"]]


def chunk_scores(pool: Any, score_rows) -> np.ndarray:
    """``score_rows(rows) -> one score per row`` over the pool chunk by chunk (``pool_chunks``), concatenated:
    the scores of a per-row scorer in bounded memory."""
    parts = [np.asarray(score_rows(rows), dtype=np.float64) for _, rows in pool_chunks(pool)]
    return np.concatenate(parts) if parts else np.zeros(0)


def column(data: Any, name: str) -> np.ndarray:
    """A label column (e.g. ``origin``) of a ``Dataset`` or of shards, as an array."""
    return np.asarray(data.with_format(None)[name])


@dataclass
class Selection:
    """What a selection produced: the ``dataset`` training uses, one score per pool row (``scores``, or
    ``None`` where the method does not score), the method's ``report`` (JSON-able, or ``None``), and, from
    ``Selector.run``, the sizes and precision (``stats``, see ``selection_stats``) and the cache entry that
    holds them (``cache_path``; ``None`` when the pool passed through)."""

    dataset: Dataset
    scores: np.ndarray | None = None
    report: dict[str, Any] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    cache_path: Path | None = None


class Selector(Configured):
    """Keeps every row. Subclasses declare their ``Settings`` (``lmlab.settings.Configured``: the constructor,
    the ranges and the cache key), override ``score`` (higher is better) and set ``fraction``."""

    fraction: float = 1.0
    on_shards: str = "materialise"  # how ``run`` reads a shard pool: "chunked" or "materialise" (module docstring)
    fraction_fix: str = "raise selection.fraction"  # the fix named when ``select`` would keep no rows
    source: Any = None  # the data source, set by ``run`` when the caller passes it
    per_group: bool = True  # False: the method orders the whole pool and refuses ``run(by=...)``

    @property
    def passes_through(self) -> bool:
        """True when the selector keeps the pool as it is (it overrides neither ``score`` nor ``select``)."""
        return type(self).score is Selector.score and type(self).select is Selector.select

    def training_callbacks(self, datamodule, selection: Selection | None = None) -> list:
        """Lightning callbacks that the selection needs during training (none by default). They may add what
        they measure to ``selection.report`` by the end of training."""
        return []

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray | None:
        """One score per pool row (higher = keep first), or ``None`` to keep the pool as it is."""
        return None

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        scores = self.score(pool, target, workdir)
        if scores is None:
            return Selection(pool)
        keep = top_fraction(scores, self.fraction)
        if len(keep) == 0:
            raise UserError(f"selection {type(self).__name__} keeps no rows of the {len(pool)}-row pool: "
                            f"{self.fraction_fix}.")
        return Selection(pool.select(keep), scores)

    def run(self, pool: Dataset, target: Dataset | None, cache_dir: str | os.PathLike, data_key: str,
            source: Any = None, by: str | None = None) -> Selection:
        """``select``, cached under ``cache_dir/selection/<data key>-<selector key>`` (``selected/``, its
        ``scores.npy``, its stats ``selection.json`` and its report ``selection_report.json``), the entry built
        in a temporary folder and renamed (``lmlab.io.atomic_dir``: a concurrent job's entry wins). The
        returned ``Selection`` is read from the entry, whether this call built it or found it. With ``by`` (a
        column of the pool), the selection runs within each group of rows separately (``select_by``)."""
        if source is not None:
            self.source = source
        if self.passes_through:
            return Selection(pool, stats=selection_stats(pool, pool))
        path = Path(cache_dir) / "selection" / self.cache_key(data_key, by)
        discard_if_damaged(path, f"selection of {type(self).__name__}")
        if not ((path / SELECTED / "dataset_info.json").exists() or (path / INDICES).exists()):
            with atomic_dir(path) as tmp:
                readable = self.readable(pool)
                out = self.select_by(readable, target, tmp, by) if by else self.select(readable, target, tmp)
                if len(out.dataset) == 0:
                    raise UserError(f"selection {type(self).__name__} kept no rows of the {len(pool)}-row pool: "
                                    "raise its fraction or check its target.")
                save_dataset(out.dataset, tmp)
                write_json(tmp / STATS, selection_stats(pool, out.dataset))
                if out.scores is not None:
                    np.save(tmp / SCORES, out.scores)
                if out.report is not None:
                    write_json(tmp / REPORT, out.report)
        return read_selection(path, pool)

    def cache_key(self, data_key: str, by: str | None = None) -> str:
        """The name of the selection's cache entry: the data's key, the method and its settings (``config``), and
        the column it selects within."""
        return f"{data_key}-{type(self).__name__}-{config_hash(self.config)}" + (f"-by_{by}" if by else "")

    def select_by(self, pool: Any, target: Dataset | None, workdir: Path, by: str) -> Selection:
        """``select`` within each group of rows sharing a value of the column ``by`` (in sorted order of the
        values, each with the same target and its own work directory ``workdir/<value>``), the groups' selections
        joined in that order: one ``Dataset``, or one view of the shards; the scores at the rows' pool positions
        when every group scores; the report ``{"per_<by>": {value: report}}`` plus the integer counts summed."""
        if not self.per_group:
            raise UserError(f"selection {type(self).__name__} orders the whole pool and cannot select within each "
                            f"{by}: set data.select_per_{by}=false.")
        if by not in pool.column_names:
            raise UserError(f"the pool has no {by!r} column to select within: set data.select_per_{by}=false.")
        values = column(pool, by)
        parts, scores, reports = [], np.zeros(len(pool)), {}
        for value in np.unique(values):
            rows = np.flatnonzero(values == value)
            (workdir / str(value)).mkdir(parents=True, exist_ok=True)
            out = self.select(pool.select(rows), target, workdir / str(value))
            parts.append(out.dataset)
            if scores is not None and out.scores is not None and len(out.scores) == len(rows):
                scores[rows] = out.scores
            else:
                scores = None
            reports[str(value)] = out.report
        if all(is_shards(p) for p in parts):
            from lmlab.data.shards import ShardRows

            dataset = ShardRows(pool.directory, pool.entry, pool.dtype.name,
                                np.concatenate([p.physical(np.arange(len(p))) for p in parts]))
        else:
            dataset = concatenate_datasets(parts)
        totals: dict[str, int] = {}
        for report in reports.values():
            for k, v in (report or {}).items():
                if isinstance(v, int) and not isinstance(v, bool):
                    totals[k] = totals.get(k, 0) + v
        return Selection(dataset, scores, {f"per_{by}": reports, **totals})

    def readable(self, pool: Any) -> Any:
        """The pool as ``select`` takes it: as it is, except a shard pool for a materialising selector, loaded
        as a ``Dataset`` when it has at most ``MATERIALISE_ROWS`` rows and refused above that."""
        if not is_shards(pool) or self.on_shards == "chunked":
            return pool
        limit = int(os.environ.get("LMLAB_SELECT_MAX_ROWS", MATERIALISE_ROWS))
        if len(pool) > limit:
            raise UserError(f"selection {type(self).__name__} needs the whole pool in memory and this shard pool "
                            f"has {len(pool):,} rows, above the limit of {limit:,}: select on a smaller pool "
                            "(write fewer rows to shards), use a chunked method (random, quality, color_filter, "
                            "miniplm, preselect, curriculum, dedup), or raise LMLAB_SELECT_MAX_ROWS if memory "
                            "allows.")
        return pool.to_dataset()


def save_dataset(dataset: Any, directory: Path) -> None:
    """Write a selection's rows into ``directory``: a view of shards as its index (``indices.npy``), any other
    dataset with ``save_to_disk`` (``selected/``)."""
    if is_shards(dataset):
        np.save(directory / INDICES, dataset.physical(np.arange(len(dataset))))
    else:
        dataset.save_to_disk(str(directory / SELECTED))


def read_selection(path: Path, pool: Any = None) -> Selection:
    """The ``Selection`` held by the cache entry ``path`` (see ``Selector.run``); an index (``indices.npy``)
    is read as a view of ``pool``, the shards it was selected from."""
    def read(name: str):
        return json.loads((path / name).read_text()) if (path / name).exists() else None

    scores = np.load(path / SCORES) if (path / SCORES).exists() else None
    if (path / INDICES).exists():
        if not is_shards(pool):
            raise UserError(f"the selection in {path} is an index over shards: read it with its shard pool.")
        from lmlab.data.shards import ShardRows

        dataset = ShardRows(pool.directory, pool.entry, pool.dtype.name, np.load(path / INDICES))
    else:
        dataset = load_from_disk(str(path / SELECTED))
    return Selection(dataset, scores, read(REPORT), read(STATS) or {}, path)


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``round(fraction * n)`` highest scores (ties: earlier rows first), in corpus order."""
    keep = int(round(fraction * len(scores)))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:keep])


def selection_stats(pool: Any, selected: Any) -> dict[str, float]:
    """Sizes and, where the pool has an ``origin`` column, the share of each origin in the selection:
    ``precision`` = share of origin 0 (the target), ``pool_precision`` = the pool's target share; where it has a
    ``source`` column (``data=mixture``), ``kept_<source>`` = the share of that source's pool rows the selection
    kept, so a selection over a mixture says what it did to each source. The pool and the selection are
    ``Dataset``s or shards."""
    if not all(isinstance(d, Dataset) or is_shards(d) for d in (pool, selected)):
        return {}
    stats: dict[str, float] = {"pool_rows": len(pool), "rows": len(selected)}
    if "origin" in pool.column_names and "origin" in selected.column_names and len(selected):
        from lmlab.data.planted import ORIGINS

        picked = column(selected, "origin")
        stats["pool_precision"] = float(np.mean(column(pool, "origin") == 0))
        stats["precision"] = float(np.mean(picked == 0))
        for code, name in ORIGINS.items():
            if code:
                stats[f"share_{name}"] = float(np.mean(picked == code))
    if "source" in pool.column_names and "source" in selected.column_names:
        names, pool_counts = np.unique(column(pool, "source"), return_counts=True)
        kept = dict(zip(*np.unique(column(selected, "source"), return_counts=True)))
        for name, n in zip(names, pool_counts):
            stats[f"kept_{name}"] = float(kept.get(name, 0) / n)
    return stats
