"""Warmup-stable-decay (``schedule=wsd``): its multiplier step by step against the formula, and its refusals."""

from __future__ import annotations

import math

import pytest

from lmlab import schedule
from lmlab.errors import UserError
from tests.conftest import FAST, TINY


def test_wsd_warmup_stable_and_each_decay_shape():
    # 100 steps: warmup 10 steps (1/10 .. 10/10), stable to step 79, decay over steps 80..99 (progress i / 20)
    for shape, f in (("linear", lambda p: 1 - p), ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
                     ("1-sqrt", lambda p: 1 - math.sqrt(p))):
        lr = [schedule.wsd(s, 100, warmup=0.1, decay=0.2, shape=shape, min_ratio=0.1) for s in range(101)]
        assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert lr[10:80] == [1.0] * 70
        assert lr[80:] == pytest.approx([0.1 + 0.9 * f(i / 20) for i in range(21)])
        assert lr[100] == pytest.approx(0.1)  # the step after the last: the decay's end
    # the shapes differ where they should: at a quarter of the decay
    at = {shape: schedule.wsd(85, 100, 0.1, 0.2, shape, 0.0) for shape in schedule.DECAY_SHAPES}
    assert at == pytest.approx({"linear": 0.75, "cosine": 0.5 * (1 + math.cos(math.pi / 4)), "1-sqrt": 0.5})


def test_wsd_without_warmup_or_decay_is_constant():
    assert [schedule.wsd(s, 50, warmup=0.0, decay=0.0) for s in range(50)] == [1.0] * 50
    # a run too short for one decay step (int(0.2 * 4) = 0) trains at the base rate; the step after it is the end
    assert [schedule.wsd(s, 4, warmup=0.0, decay=0.2, min_ratio=0.1) for s in range(5)] == [1.0] * 4 + [0.1]


def test_wsd_refuses_a_warmup_and_decay_longer_than_the_run_and_an_unknown_shape():
    with pytest.raises(UserError, match="warmup \\+ decay <= 1"):
        schedule.wsd(0, 100, warmup=0.5, decay=0.6)
    with pytest.raises(UserError, match="not a decay shape"):
        schedule.wsd(0, 100, shape="sqrt")
    with pytest.raises(UserError, match="add up to more than the run's 100 steps"):
        schedule.wsd(0, 100, warmup_steps=30, decay_steps=71)


def test_wsd_steps_in_absolute_numbers_win_over_the_fractions():
    # a branch of 60 steps decaying over its last 20, warmed up over 10 as its parent was
    lr = [schedule.wsd(s, 60, warmup=0.5, decay=0.5, shape="linear", warmup_steps=10, decay_steps=20)
          for s in range(61)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr[10:40] == [1.0] * 30
    assert lr[40:] == pytest.approx([1 - i / 20 for i in range(21)])


def test_wsd_from_the_command_line_ends_at_min_ratio(lmlab):
    from tests.test_schedule import _last_lr

    args = [a for a in FAST if not a.startswith(("max_steps=", "checkpoint_every="))]
    code, out = lmlab("train", *TINY, *args, "max_steps=10", "checkpoint_every=10", "eval=[perplexity]",
                      "schedule=wsd", "schedule.warmup=0.0", "schedule.decay=0.5", "schedule.min_ratio=0.25",
                      "optim.lr=1e-3")
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    assert _last_lr(run) == pytest.approx(0.25e-3, rel=1e-9)  # after step 10 of 10: min_ratio x lr


def test_wsd_bad_settings_are_refused_before_training(lmlab):
    code, out = lmlab("train", *TINY, *FAST, "schedule=wsd", "schedule.warmup=0.5", "schedule.decay=0.6")
    assert code == 2 and "warmup + decay <= 1" in out, out
    code, out = lmlab("train", *TINY, *FAST, "schedule=wsd", "schedule.shape=sqrt")
    assert code == 2, out
    assert not list(lmlab.runs.rglob("DONE"))
