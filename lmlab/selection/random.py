"""Random selection: keep a uniformly random fraction of the pool (the baseline every method must beat).

Chunked (``Selector.on_shards``): the scores are drawn from the pool's length alone, no row is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selector
from lmlab.settings import NonNegative, PositiveFraction, declared


class RandomSelection(Selector):
    on_shards = "chunked"

    @declared
    class Settings(Selector.Settings):
        fraction: PositiveFraction = 0.5
        seed: NonNegative = 0

    def setup(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"selection.fraction must lie in (0, 1], got {self.fraction}: set e.g. "
                            "selection.fraction=0.5.")

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(pool))
