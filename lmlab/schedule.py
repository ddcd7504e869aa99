"""Learning-rate schedules: a multiplier of the base learning rate as a function of the step.

Each is linear warmup over ``warmup`` (a fraction of the run's steps) followed by a decay over the rest;
``wsd`` (warmup-stable-decay: Hu et al., "MiniCPM", arXiv 2404.06395; the 1-sqrt cooldown of Hägele et al.,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", arXiv 2405.18392) holds the base
rate after the warmup and decays only over the last ``decay`` fraction of the steps.
Selected by ``schedule=cosine|linear|constant|wsd``; the config instantiates one of these with ``_partial_``,
and the training module calls it with the trainer's ``max_steps`` as ``total``.
"""

from __future__ import annotations

import math
from typing import Optional

from lmlab.errors import UserError
from lmlab.settings import Fraction, Literal, NonNegative


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


DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
DecayShape = Literal[DECAY_SHAPES]  # the ``shape`` setting of ``wsd``


def decay_shape(progress: float, shape: str, min_ratio: float) -> float:
    """The multiplier at ``progress`` in [0, 1] through a decay from 1 to ``min_ratio``: linear 1 - p, cosine
    (1 + cos(pi p)) / 2 or 1-sqrt 1 - sqrt(p), scaled into [min_ratio, 1]."""
    if shape == "linear":
        f = 1.0 - progress
    elif shape == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * progress))
    elif shape == "1-sqrt":
        f = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay shape {shape!r}")
    return min_ratio + (1 - min_ratio) * f


def wsd(step: int, total: int, warmup: Fraction = 0.01, decay: Fraction = 0.2,
        shape: DecayShape = "1-sqrt", min_ratio: Fraction = 0.0, warmup_steps: Optional[NonNegative] = None,
        decay_steps: Optional[NonNegative] = None) -> float:
    """Warmup-stable-decay: linear warmup over the first n_warmup steps, the base rate, then a decay of ``shape``
    to ``min_ratio`` over the last n_decay steps (the multiplier at step total - n_decay + i is the shape at
    progress i / n_decay). n_warmup = ``warmup_steps``, else int(warmup * total); n_decay = ``decay_steps``,
    else int(decay * total). Steps in absolute numbers keep a cooldown branch, whose total is its branching
    step plus its decay, on its parent's warmup."""
    if shape not in DECAY_SHAPES:
        raise UserError(f"schedule.shape={shape!r} is not a decay shape: use one of {', '.join(DECAY_SHAPES)}.")
    if warmup + decay > 1:
        raise UserError(f"schedule.warmup={warmup} and schedule.decay={decay} add up to more than the run: lower "
                        "one so that warmup + decay <= 1.")
    n_warm = int(warmup * total) if warmup_steps is None else int(warmup_steps)
    n_decay = int(decay * total) if decay_steps is None else int(decay_steps)
    if n_warm + n_decay > total:
        raise UserError(f"the schedule's warmup ({n_warm} steps) and decay ({n_decay} steps) add up to more than the "
                        f"run's {total} steps: lower schedule.warmup_steps or schedule.decay_steps, or raise "
                        "max_steps.")
    if step < n_warm:
        return (step + 1) / n_warm
    start = total - n_decay
    if step < start:
        return 1.0
    return decay_shape(min(1.0, (step - start) / n_decay) if n_decay else 1.0, shape, min_ratio)
