"""``eval.probe.layer``: the probe at every layer of a backbone, read with hooks on its block list."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmlab.attention import Attention
from lmlab.data.datamodule import DataModule
from lmlab.errors import UserError
from lmlab.evaluation.probe import Probe, layer_states
from lmlab.models.lstm import LSTM
from lmlab.models.mamba import Mamba
from lmlab.models.transformer import Transformer
from lmlab.objectives.mlm import MLM
from lmlab.readout import pad_rows
from lmlab.stats import t_quantile
from tests.test_evaluators import KeySource


def _setup(n_layers: int = 4):
    source = KeySource()
    dm = DataModule(source, source.build(), batch_size=16, seed=0)
    objective = MLM()
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, objective.attention, d_model=32, n_layers=n_layers, n_heads=2,
                        positions="learned", max_len=16)
    return SimpleNamespace(model=model, objective=objective), dm


def test_layer_states_are_the_blocks_applied_by_hand():
    module, dm = _setup()
    model = module.model.eval()
    rows = [[1, 5, 6, 7, 2], [1, 8, 9, 2]]
    ids = pad_rows(rows)
    states = layer_states(model, ids, "bidirectional")
    assert len(states) == 5
    attention = Attention("bidirectional", padding=ids != 0)
    mask = attention.mask(ids.shape[1], ids.device)
    with torch.no_grad():
        x = model.embed(ids) + model.pos_embed.weight[: ids.shape[1]]
        expected = [x]
        for block in model.blocks:
            x = block(x, mask, False)
            expected.append(x)
        expected[-1] = model.norm(x)
        assert torch.equal(states[-1], model(ids, attention))
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.blocks)  # hooks removed


def test_every_layer_has_an_interval_and_the_last_equals_the_default_probe():
    module, dm = _setup()
    kwargs = dict(pooling="concat", seeds=3, epochs=8, max_train=400, max_test=200)
    every = Probe(layer="all", **kwargs)(module, dm, None)
    default = Probe(**kwargs)(module, dm, None)
    for i in range(5):
        acc, std, ci = (every[f"probe/layer{i}/{k}"] for k in ("acc", "acc_std", "acc_ci95"))
        assert 0.0 <= acc <= 1.0 and std > 0.0  # heads stopped early: the seeds disagree at every layer
        assert ci == pytest.approx(t_quantile(0.975, 2) * std / math.sqrt(3), rel=1e-12)
    assert "probe/layer5/acc" not in every
    for k in ("acc", "acc_std", "acc_ci95"):
        assert every[f"probe/layer4/{k}"] == default[f"probe/{k}"]
    assert {k: v for k, v in every.items() if "/layer" not in k} == default


def test_a_layer_number_probes_that_layer_of_the_curve():
    module, dm = _setup(n_layers=2)
    kwargs = dict(pooling="concat", seeds=2, epochs=4, max_train=200, max_test=100)
    every = Probe(layer="all", **kwargs)(module, dm, None)
    one = Probe(layer=1, **kwargs)(module, dm, None)
    assert one["probe/acc"] == every["probe/layer1/acc"] and one["probe/acc_ci95"] == every["probe/layer1/acc_ci95"]
    with pytest.raises(UserError, match="layers 0..2"):
        Probe(layer=3, **kwargs)(module, dm, None)


def test_other_backbones_are_read_by_their_blocks_and_one_without_is_refused():
    ids = pad_rows([[1, 5, 6, 7, 2]])
    torch.manual_seed(0)
    mamba = Mamba(20, "causal", d_model=16, n_layers=3).eval()
    with torch.no_grad():
        states = layer_states(mamba, ids, "causal")
        assert len(states) == 4 and torch.equal(states[0], mamba.embed(ids))
        assert torch.equal(states[-1], mamba(ids, Attention("causal")))
    with pytest.raises(UserError, match="no block list"):
        layer_states(LSTM(20, "causal", d_model=16), ids, "causal")
    for bad in ("first", -1, True):
        with pytest.raises(UserError, match="eval.probe.layer"):
            Probe(layer=bad)


def test_a_list_of_tasks_names_each_task_curve():
    module, dm = _setup(n_layers=1)
    kwargs = dict(pooling="concat", seeds=2, epochs=3, max_train=100, max_test=50)
    listed = Probe(task=["key"], layer="all", **kwargs)(module, dm, None)
    alone = Probe(task="key", layer="all", **kwargs)(module, dm, None)
    for i in range(2):
        assert listed[f"probe/key/layer{i}/acc"] == alone[f"probe/layer{i}/acc"]
        assert listed[f"probe/key/layer{i}/acc_ci95"] == alone[f"probe/layer{i}/acc_ci95"]
