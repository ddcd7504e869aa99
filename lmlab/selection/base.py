"""The selection stage: pick the rows of the candidate pool that training will use.

A selector scores the pool (``score``) and keeps rows by their scores. ``run`` caches the selected
dataset and the per-row scores on disk under a key derived from the data and the selector's config,
so every job of a sweep selects once. Methods that need a target set or reference models (CoLoR-Filter,
PreSelect, ...) receive the target set (``lmlab.pipeline.selection_target``: the data's ``target`` split,
else its validation split) and a work directory.

``select`` may return any dataset with the pool's columns, not only a subset of the pool (augmentation
such as ``rephrase`` adds new rows). A selector may set ``self.report`` (a JSON-able dict of counts, e.g.
rows removed by each rule) in ``select``: ``run`` saves it as ``selection_report.json`` in the cache entry
and restores it on a cache hit, so ``selector.report`` is set after every ``run``. ``run`` also receives the
data source (``self.source``; ``None`` when the caller does not pass it) for selectors that decode tokens.

``run`` also writes ``selection.json`` (``STATS``) in the cache entry: pool and selection sizes and, where
the pool has an ``origin`` column (planted-structure data, ``lmlab.data.planted``: 0 = target), the
selection's ``precision`` (share of origin 0) against the pool's; ``self.stats`` holds the same after every
``run`` (the pipeline adds it to the results as ``selection/*``). A selector that acts during training (a
curriculum) returns its Lightning callbacks from ``training_callbacks(datamodule)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk

from lmlab.errors import UserError
from lmlab.io import config_hash, write_json

REPORT = "selection_report.json"
STATS = "selection.json"


class Selector:
    """Keeps every row. Subclasses override ``score`` (higher is better) and set ``fraction``."""

    fraction: float = 1.0
    fraction_fix: str = "raise selection.fraction"  # the fix named when ``select`` would keep no rows
    report: dict[str, Any] | None = None  # set by ``select`` (or restored by ``run``): what it removed/added
    source: Any = None  # the data source, set by ``run`` when the caller passes it
    stats: dict[str, float] = {}  # set by ``run``: sizes and, on planted data, precision (``STATS``)
    cache_path: Path | None = None  # set by ``run``: the cache entry (selected/, scores.npy, STATS)

    def __init__(self, **config: Any) -> None:
        self.config = config

    @property
    def passes_through(self) -> bool:
        """True when the selector keeps the pool as it is (it overrides neither ``score`` nor ``select``)."""
        return type(self).score is Selector.score and type(self).select is Selector.select

    def training_callbacks(self, datamodule) -> list:
        """Lightning callbacks that the selection needs during training (none by default)."""
        return []

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray | None:
        """One score per pool row (higher = keep first), or ``None`` to keep the pool as it is."""
        return None

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> tuple[Dataset, np.ndarray | None]:
        scores = self.score(pool, target, workdir)
        if scores is None:
            return pool, None
        keep = top_fraction(scores, self.fraction)
        if len(keep) == 0:
            raise UserError(f"selection {type(self).__name__} keeps no rows of the {len(pool)}-row pool: "
                            f"{self.fraction_fix}.")
        return pool.select(keep), scores

    def run(self, pool: Dataset, target: Dataset | None, cache_dir: str | os.PathLike, data_key: str,
            source: Any = None) -> Dataset:
        """``select``, cached under ``cache_dir/selection/<data key>-<selector key>`` with its scores
        (``scores.npy``) and report (``selection_report.json``)."""
        if source is not None:
            self.source = source
        if self.passes_through:
            self.stats = selection_stats(pool, pool)
            return pool
        if not isinstance(pool, Dataset):
            raise UserError(f"selection {type(self).__name__} needs the pool as a dataset, not memory-mapped "
                            "shards: use selection=none with data=shards, or write the selected data to shards.")
        key = f"{data_key}-{type(self).__name__}-{config_hash(self.config)}"
        path = Path(cache_dir) / "selection" / key
        self.cache_path = path
        if (path / "selected" / "dataset_info.json").exists():
            if (path / STATS).exists():
                self.stats = json.loads((path / STATS).read_text())
            if (path / REPORT).exists():
                self.report = json.loads((path / REPORT).read_text())
            return load_from_disk(str(path / "selected"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            selected, scores = self.select(pool, target, tmp)
            if len(selected) == 0:
                raise UserError(f"selection {type(self).__name__} kept no rows of the {len(pool)}-row pool: "
                                "raise its fraction or check its target.")
            selected.save_to_disk(str(tmp / "selected"))
            self.stats = selection_stats(pool, selected)
            write_json(tmp / STATS, self.stats)
            if scores is not None:
                np.save(tmp / "scores.npy", scores)
            if self.report is not None:
                write_json(tmp / REPORT, self.report)
            try:
                os.replace(tmp, path)
            except OSError:  # a concurrent job selected first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(path / "selected"))


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``round(fraction * n)`` highest scores (ties: earlier rows first), in corpus order."""
    keep = int(round(fraction * len(scores)))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:keep])


def selection_stats(pool: Dataset, selected: Dataset) -> dict[str, float]:
    """Sizes and, where the pool has an ``origin`` column, the share of each origin in the selection:
    ``precision`` = share of origin 0 (the target), ``pool_precision`` = the pool's target share."""
    if not isinstance(pool, Dataset) or not isinstance(selected, Dataset):
        return {}
    stats: dict[str, float] = {"pool_rows": len(pool), "rows": len(selected)}
    if "origin" in pool.column_names and "origin" in selected.column_names and len(selected):
        from lmlab.data.planted import ORIGINS

        picked = np.asarray(selected.with_format(None)["origin"])
        stats["pool_precision"] = float(np.mean(np.asarray(pool.with_format(None)["origin"]) == 0))
        stats["precision"] = float(np.mean(picked == 0))
        for code, name in ORIGINS.items():
            if code:
                stats[f"share_{name}"] = float(np.mean(picked == code))
    return stats
