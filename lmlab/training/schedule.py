"""Learning-rate schedules: a multiplier of the base learning rate as a function of the step.

Each is linear warmup over ``warmup`` (a fraction of the run's steps) followed by a decay.
Selected by ``schedule=cosine|linear|constant``; the config instantiates one of these with ``_partial_``.
"""

from __future__ import annotations

import math


def _warmup(step: int, total: int, warmup: float) -> float | None:
    n = int(warmup * total)
    return (step + 1) / n if step < n else None


def constant(step: int, total: int, warmup: float = 0.0) -> float:
    w = _warmup(step, total, warmup)
    return 1.0 if w is None else w


def cosine(step: int, total: int, warmup: float = 0.05, min_ratio: float = 0.1) -> float:
    w = _warmup(step, total, warmup)
    if w is not None:
        return w
    n = int(warmup * total)
    progress = min(1.0, (step - n) / max(1, total - n))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear(step: int, total: int, warmup: float = 0.05, min_ratio: float = 0.0) -> float:
    w = _warmup(step, total, warmup)
    if w is not None:
        return w
    n = int(warmup * total)
    progress = min(1.0, (step - n) / max(1, total - n))
    return 1.0 - (1 - min_ratio) * progress
