"""Activation checkpointing (``model.activation_checkpointing``, ``Backbone.run_blocks``) for every model:
the same loss, auxiliary loss and gradients as without it, and each block really recomputed in backward."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmlab.objectives.clm import CLM
from lmlab.vocab import PAD_ID
from tests.conftest import FAST, TINY

MODELS = sorted(p.stem for p in (Path(__file__).parents[1] / "lmlab" / "conf" / "model").glob("*.yaml"))
# the block modules of each model (hat: encoder, word backbone and decoder blocks); lstm's blocks are the
# layers of its one nn.LSTM, which are not modules of their own
BLOCK = re.compile(r"^(blocks|encoder|backbone|decoder)\.\d+$")


def _build(name: str, *overrides: str):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model, vocab_size=260, attention="causal")  # 260: hat reads bytes


def _batch() -> dict:
    ids = torch.randint(4, 260, (3, 14), generator=torch.Generator().manual_seed(1))
    ids[1, 9:] = PAD_ID  # one right-padded row: the padding paths are recomputed too
    return {"input_ids": ids}


def _step(model, batch: dict, seed: int = 0):
    """One training step's loss (CLM + the model's aux loss), aux loss, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    objective = CLM()
    torch.manual_seed(seed)
    loss, _ = objective.loss(model, objective.prepare(batch))
    aux = model.aux_loss
    if aux is not None:
        loss = loss + aux
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.item(), (None if aux is None else aux.item()), grads


def _inputs(batch: dict):
    p = CLM().prepare(batch)
    return p.inputs, p.attention


@pytest.fixture
def runs(monkeypatch):
    """Every function ``run_blocks`` checkpoints, with how often it ran (forward, then recomputation)."""
    import lmlab.models.base as base

    record, real = [], base.checkpoint

    def counting(fn, *args, **kwargs):
        entry = [fn, 0]
        record.append(entry)

        def counted(*a, **k):
            entry[1] += 1
            return fn(*a, **k)

        return real(counted, *args, **kwargs)

    monkeypatch.setattr(base, "checkpoint", counting)
    return record


def _count_calls(model) -> dict[str, int]:
    """Forward (pre-)calls of each block, counted as they happen. Pre-hooks: a recomputation may stop
    once it has rebuilt every saved tensor, before the block returns."""
    counts = {n: 0 for n, m in model.named_modules() if BLOCK.match(n)}

    def hook(name):
        def pre(module, args):
            counts[name] += 1
        return pre

    for n, m in model.named_modules():
        if n in counts:
            m.register_forward_pre_hook(hook(n))
    return counts


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gives_the_same_loss_and_gradients(name, runs):
    plain = _build(name).train()
    ckpt = _build(name, "model.activation_checkpointing=true").train()
    ckpt.load_state_dict(plain.state_dict())
    assert not plain.activation_checkpointing and ckpt.activation_checkpointing
    plain_calls, ckpt_calls = _count_calls(plain), _count_calls(ckpt)
    assert ckpt_calls.keys() == plain_calls.keys() and (ckpt_calls or name == "lstm"), ckpt_calls
    n_blocks = ckpt.n_layers if name == "lstm" else len(ckpt_calls)

    batch = _batch()
    loss0, aux0, grads0 = _step(plain, batch)
    assert not runs  # checkpointing off: nothing is checkpointed
    loss1, aux1, grads1 = _step(ckpt, batch)
    # each block checkpointed once, and run twice: in forward, then again in backward
    assert [count for _, count in runs] == [2] * n_blocks, runs
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert (aux0 is None) == (aux1 is None) and (aux0 is None or aux1 == pytest.approx(aux0, abs=1e-6))
    assert name not in ("moe", "mom") or aux0 > 0  # the models with a balancing loss do report one
    for n, g in grads0.items():
        assert (g is None) == (grads1[n] is None), n
        if g is not None:
            assert torch.allclose(grads1[n], g, atol=1e-6, rtol=0), (name, n, (grads1[n] - g).abs().max())

    # the block modules too: once without checkpointing, twice with it
    assert set(plain_calls.values()) <= {1} and set(ckpt_calls.values()) <= {2}, (plain_calls, ckpt_calls)
    # no checkpoint where no backward can follow: under no_grad, or in eval mode
    runs.clear()
    with torch.no_grad():
        ckpt(*_inputs(batch))
    ckpt.eval()
    ckpt(*_inputs(batch))
    assert not runs


def test_checkpointing_repeats_dropout():
    """The recomputation restores the RNG state: with dropout the gradients are still those of the forward."""
    plain = _build("hyena", "model.dropout=0.3").train()
    ckpt = _build("hyena", "model.dropout=0.3", "model.activation_checkpointing=true").train()
    ckpt.load_state_dict(plain.state_dict())
    loss0, _, grads0 = _step(plain, _batch(), seed=5)
    loss1, _, grads1 = _step(ckpt, _batch(), seed=5)
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    _, _, other = _step(plain, _batch(), seed=6)  # the dropout does bite: another seed, other gradients
    assert not torch.allclose(other["embed.weight"], grads0["embed.weight"], atol=1e-6)
    for n, g in grads0.items():
        assert torch.allclose(grads1[n], g, atol=1e-6, rtol=0), n


def test_bidirectional_lstm_checkpointing_packs_and_drops_out_as_the_fused_stack(runs):
    """The layer-by-layer path of the LSTM (packed rows of a padded bidirectional batch, dropout between
    layers) gives the fused nn.LSTM's outputs and gradients."""
    from lmlab.attention import BIDIRECTIONAL, Attention
    from lmlab.models.lstm import LSTM

    torch.manual_seed(0)
    plain = LSTM(40, BIDIRECTIONAL, d_model=16, n_layers=3, dropout=0.3).train()
    ckpt = LSTM(40, BIDIRECTIONAL, d_model=16, n_layers=3, dropout=0.3, activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(4, 40, (4, 9), generator=torch.Generator().manual_seed(2))
    ids[0, 5:], ids[2, 1:] = PAD_ID, PAD_ID
    attention = Attention(BIDIRECTIONAL, padding=ids != PAD_ID)
    weight = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(3))
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(7)
        hidden = model(ids, attention)
        (hidden * weight).sum().backward()
        outs.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert [count for _, count in runs] == [2, 2, 2]
    assert torch.allclose(outs[1][0], outs[0][0], atol=1e-6, rtol=0)
    assert outs[0][0][2, 1:].abs().max() == 0  # padded positions stay zero (packed, never read)
    for n, g in outs[0][1].items():
        assert torch.allclose(outs[1][1][n], g, atol=1e-6, rtol=0), n


def test_cli_trains_mom_with_activation_checkpointing(lmlab, runs):
    """``model.activation_checkpointing=true`` through the real CLI, on a model with an auxiliary loss:
    the training steps go through ``torch.utils.checkpoint``, once per block."""
    code, out = lmlab("train", "model=mom", "model.activation_checkpointing=true", *FAST, *TINY)
    assert code == 0, out
    assert any(lmlab.runs.rglob("DONE"))
    # 4 training steps x 2 blocks, each run twice (validation and evaluation run without grad: no checkpoint)
    assert [count for _, count in runs] == [2] * (4 * 2), runs
