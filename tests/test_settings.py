"""Every setting's range is declared once beside it (``lmlab.settings``) and checked before any work: a bad value
ends in one sentence, exit 2, no traceback and no run directory."""

from __future__ import annotations

from typing import Annotated

import pytest
from annotated_types import Ge, Le

from lmlab.errors import UserError
from lmlab.settings import Fraction, Positive, check_node

BAD = [  # (overrides, the key the sentence names)
    (["batch_size=0"], "batch_size"),
    (["max_steps=-3"], "max_steps"),
    (["val_every=0"], "val_every"),
    (["checkpoint_every=-1"], "checkpoint_every"),
    (["seed=-1"], "seed"),
    (["eval_every=0"], "eval_every"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim=sgd", "optim.momentum=-0.5"], "optim.momentum"),
    (["schedule.warmup=-0.1"], "schedule.warmup"),
    (["schedule.min_ratio=1.5"], "schedule.min_ratio"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["model.d_model=0"], "model.d_model"),
    (["model.n_layers=0"], "model.n_layers"),
    (["model.n_heads=-2"], "model.n_heads"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.max_len=0"], "model.max_len"),
    (["model.norm=batchnorm"], "model.norm"),
    (["model=hyena", "model.mlp=relu"], "model.mlp"),
    (["model=mamba", "model.d_state=0"], "model.d_state"),
    (["model=lstm", "model.n_layers=0"], "model.n_layers"),
    (["data.train_size=0"], "data.train_size"),
    (["data.validation_size=0"], "data.validation_size"),
    (["data.test_size=-5"], "data.test_size"),
    (["data=hmm", "data.hidden_states=0"], "data.hidden_states"),
    (["data=hmm", "data.length=0"], "data.length"),
    (["data=text", "data.block_size=0"], "data.block_size"),
    (["data=text", "data.validation_fraction=1.5"], "data.validation_fraction"),
    (["data=text", "data.test_fraction=-0.1"], "data.test_fraction"),
    (["objective=mlm", "objective.mask_prob=2"], "objective.mask_prob"),
    (["objective=mlm", "objective.mask_token_frac=-0.2"], "objective.mask_token_frac"),
    (["objective=span", "objective.noise_density=1.2"], "objective.noise_density"),
    (["objective=ngram_mlm", "objective.max_n=0"], "objective.max_n"),
    (["selection=random", "selection.seed=-1"], "selection.seed"),
]


@pytest.mark.parametrize("args,key", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_is_one_sentence_before_any_work(lmlab, args, key):
    extra = [] if any(a.startswith("max_steps") for a in args) else ["max_steps=2"]
    code, out = lmlab("train", *args, *extra)
    assert code == 2, out
    assert out.startswith(f"lmlab: error: {key} must be"), out
    assert out.count("\n") == 1 and "Traceback" not in out
    assert not lmlab.runs.exists() or not any(lmlab.runs.rglob("config_resolved.yaml"))


def test_distinct_settings_checked():
    assert len({key for _, key in BAD}) >= 30


def test_hydra_append_and_group_overrides_pass_through(lmlab):
    code, out = lmlab("train", "+trainer.accumulate_grad_batches=2", "~logger", "max_steps=2", "val_every=2",
                      "checkpoint_every=2", "eval=[perplexity]", "data.train_size=200", "data.validation_size=20",
                      "data.test_size=20", "data.downstream_size=20")
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    resolved = (run / "config_resolved.yaml").read_text()
    assert "accumulate_grad_batches: 2" in resolved and "\nlogger:" not in resolved
    code, out = lmlab("train", "--cfg", "job", "hydra/sweeper=basic")
    assert code == 0, out


def test_check_node_messages():
    def f(steps: Positive = 10, share: Fraction = 0.5, pair: tuple[Annotated[float, Ge(0)], Annotated[float, Le(1)]]
          = (0.0, 1.0)) -> None: ...

    globals()["_f"] = f
    f.__module__ = __name__
    target = f"{__name__}._f"
    check_node("x", target, {"steps": 3, "share": 1.0, "pair": [0.5, 0.5]})
    with pytest.raises(UserError, match=r"^x.steps must be greater than 0, got 0: pass e.g. x.steps=10\.$"):
        check_node("x", target, {"steps": 0}, {"steps": 10})
    with pytest.raises(UserError, match=r"^x.share must be at most 1.0, got 2: set x.share to a value at most 1.0\.$"):
        check_node("x", target, {"share": 2})
    with pytest.raises(UserError, match="x.steps must be a whole number"):
        check_node("x", target, {"steps": 1.5})
    check_node("x", target, {"unknown": -1, "steps": "${oc.env:X}"})  # undeclared keys and interpolations: skipped
