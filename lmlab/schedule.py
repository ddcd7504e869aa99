"""Learning-rate schedules: a multiplier of the base learning rate as a function of the step.

Each is linear warmup over ``warmup`` (a fraction of the run's steps) followed by a decay over the rest.
Selected by ``schedule=cosine|linear|constant``; the config instantiates one of these with ``_partial_``,
and the training module calls it with the trainer's ``max_steps`` as ``total``.
"""

from __future__ import annotations

import math

from lmlab.settings import Fraction


def _phase(step: int, total: int, warmup: float) -> tuple[float | None, float]:
    """``(warmup multiplier or None after the warmup, progress through the decay in [0, 1])``."""
    n = int(warmup * total)
    if step < n:
        return (step + 1) / n, 0.0
    return None, min(1.0, (step - n) / max(1, total - n))


def constant(step: int, total: int, warmup: Fraction = 0.0) -> float:
    w, _ = _phase(step, total, warmup)
    return 1.0 if w is None else w


def cosine(step: int, total: int, warmup: Fraction = 0.05, min_ratio: Fraction = 0.1) -> float:
    w, progress = _phase(step, total, warmup)
    return w if w is not None else min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def linear(step: int, total: int, warmup: Fraction = 0.05, min_ratio: Fraction = 0.0) -> float:
    w, progress = _phase(step, total, warmup)
    return w if w is not None else 1.0 - (1 - min_ratio) * progress
