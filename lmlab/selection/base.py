"""The selection stage: pick the rows of the candidate pool that training will use.

A selector scores the pool (``score``) and keeps rows by their scores. ``run`` caches the selected
dataset and the per-row scores on disk under a key derived from the data and the selector's config,
so every job of a sweep selects once. Methods that need a target set or reference models (CoLoR-Filter,
PreSelect, ...) receive the target split and a work directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk

from lmlab.data.source import config_hash
from lmlab.errors import UserError


class Selector:
    """Keeps every row. Subclasses override ``score`` (higher is better) and set ``fraction``."""

    fraction: float = 1.0

    def __init__(self, **config: Any) -> None:
        self.config = config

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray | None:
        """One score per pool row (higher = keep first), or ``None`` to keep the pool as it is."""
        return None

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> tuple[Dataset, np.ndarray | None]:
        scores = self.score(pool, target, workdir)
        if scores is None:
            return pool, None
        keep = int(round(self.fraction * len(pool)))
        if keep < 1:
            raise UserError(
                f"selection keeps no rows of the {len(pool)}-row pool: raise selection.fraction."
            )
        order = np.argsort(-scores, kind="stable")[:keep]
        return pool.select(np.sort(order)), scores

    def run(self, pool: Dataset, target: Dataset | None, cache_dir: str | os.PathLike, data_key: str) -> Dataset:
        """``select``, cached under ``cache_dir/selection/<data key>-<selector key>`` with its scores."""
        if type(self).score is Selector.score:
            return pool
        key = f"{data_key}-{type(self).__name__}-{config_hash(self.config)}"
        path = Path(cache_dir) / "selection" / key
        if (path / "selected" / "dataset_info.json").exists():
            return load_from_disk(str(path / "selected"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            selected, scores = self.select(pool, target, tmp)
            selected.save_to_disk(str(tmp / "selected"))
            if scores is not None:
                np.save(tmp / "scores.npy", scores)
            try:
                os.replace(tmp, path)
            except OSError:  # a concurrent job selected first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(path / "selected"))
