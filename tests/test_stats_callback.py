"""``callbacks=stats``: per-layer statistics against hand formulas, the attention statistics against the
probabilities of the attention kernel itself, and the loss-spike detector on an injected learning-rate spike,
with and without skipping."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sps

from lmlab.attention import BIDIRECTIONAL, Attention
from lmlab.models.transformer import SelfAttention, Transformer
from lmlab.training.callbacks import DivergenceGuard
from lmlab.training.stats import SPIKES, SpikeDetector, attention_stats, kurtosis, rms
from tests.conftest import TINY


def test_rms_and_kurtosis_of_fixed_tensors_match_the_hand_formulas():
    x = torch.tensor([0.0, 0.0, 0.0, 2.0])
    assert float(rms(x)) == pytest.approx(1.0)  # sqrt(4 / 4)
    # mean 0.5, deviations (-.5, -.5, -.5, 1.5): m2 = 0.75, m4 = 1.3125, m4 / m2^2 = 7/3
    assert float(kurtosis(x)) == pytest.approx(7 / 3)
    assert float(kurtosis(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))) == pytest.approx(1.0)
    g = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    assert float(kurtosis(g)) == pytest.approx(sps.kurtosis(g.flatten().numpy(), fisher=False), rel=1e-5)
    assert float(rms(g)) == pytest.approx(float(g.pow(2).mean().sqrt()), rel=1e-6)


def test_uniform_attention_has_entropy_log_n_and_zero_logits():
    B, H, T, d = 2, 3, 7, 4
    q, k = torch.zeros(B, H, T, d), torch.randn(B, H, T, d)
    entropy, top = attention_stats(q, k, None, is_causal=False)
    assert float(entropy) == pytest.approx(math.log(T), rel=1e-6) and float(top) == 0.0
    entropy, _ = attention_stats(q, k, None, is_causal=True)  # query i sees i + 1 keys
    assert float(entropy) == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T, rel=1e-6)
    mask = torch.zeros(1, 1, T, T, dtype=torch.bool)
    mask[..., :2] = True  # every query sees the first two keys only
    entropy, _ = attention_stats(q, k, mask, is_causal=False)
    assert float(entropy) == pytest.approx(math.log(2), rel=1e-6)


def test_attention_statistics_match_the_probabilities_of_the_attention_kernel():
    """The queries and keys the transformer hands over, with its padding mask, give the entropy and the
    maximum logit of the probabilities that ``scaled_dot_product_attention`` itself computes (read off
    with the identity as values)."""
    torch.manual_seed(0)
    model = Transformer(20, BIDIRECTIONAL, d_model=16, n_layers=1, n_heads=2).eval()
    ids = torch.randint(4, 20, (3, 6))
    ids[1, 4:] = 0  # padding
    seen = {}
    attn = next(m for m in model.modules() if isinstance(m, SelfAttention))
    attn.inspect = lambda q, k, mask, is_causal: seen.update(q=q, k=k, mask=mask, is_causal=is_causal)
    with torch.no_grad():
        model(ids, Attention(BIDIRECTIONAL, padding=ids != 0))
    assert seen["mask"] is not None
    eye = torch.eye(6).expand(3, 2, 6, 6)
    p = F.scaled_dot_product_attention(seen["q"], seen["k"], eye, attn_mask=seen["mask"])
    expected = -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum(-1).mean()
    entropy, top = attention_stats(seen["q"], seen["k"], seen["mask"], seen["is_causal"])
    assert float(entropy) == pytest.approx(float(expected), abs=1e-5)
    logits = seen["q"] @ seen["k"].transpose(-1, -2) / math.sqrt(seen["q"].shape[-1])
    assert float(top) == pytest.approx(float(logits.masked_fill(~seen["mask"], -1e9).max()), rel=1e-6)


def test_detector_flags_a_jump_keeps_it_out_of_the_window_and_starts_again_after_patience():
    d = SpikeDetector(window=4, threshold=3.0, patience=3)
    for step, loss in enumerate([1.0, 1.1, 0.9, 1.0]):
        assert d.observe(step, loss) is None  # nothing judged before the window is full
    spike = d.observe(4, 2.0)  # mean 1.0, sample std sqrt(0.02 / 3): z = 1 / 0.0816 = 12.2
    assert spike["step"] == 4 and spike["z"] == pytest.approx(1 / math.sqrt(0.02 / 3))
    assert list(d.window) == [1.0, 1.1, 0.9, 1.0]
    assert d.observe(5, 1.05) is None and d.observe(6, float("nan")) is None
    assert d.observe(7, 2.0) and d.observe(8, 2.0) and d.observe(9, 2.0)  # three in a row: a new level
    assert len(d.window) == 0 and d.observe(10, 2.0) is None


def test_divergence_guard_passes_a_skipped_update():
    """A skipped update has no loss (Lightning hands ``{}`` to ``on_train_batch_end``)."""
    guard = DivergenceGuard(every=1)
    trainer = type("T", (), {"global_step": 5, "max_steps": 10})()
    guard.on_train_batch_end(trainer, torch.nn.Linear(2, 2), {}, None, 0)


class ForceSkip(L.Callback):
    """Skips the update of step ``step`` through ``LMModule.skip_update`` and records the weights and the
    optimiser state around it (``ForceSkip.seen``)."""

    seen: dict = {}

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.skip_update = lambda loss: trainer.global_step + 1 == self.step

    def _state(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        moments = [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return [p.detach().clone() for p in pl_module.parameters()], moments

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ForceSkip.seen[trainer.global_step + 1, "before"] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ForceSkip.seen[trainer.global_step, "after"] = self._state(trainer, pl_module)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_skipped_update_leaves_weights_and_adam_moments_unchanged(lmlab):
    ForceSkip.seen.clear()
    code, out = lmlab("train", *TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[]", "max_steps=6",
                      "val_every=6", "checkpoint_every=6",
                      "+callbacks.force={_target_: tests.test_stats_callback.ForceSkip, step: 4}")
    assert code == 0, out
    seen = ForceSkip.seen
    assert all(_same(a, b) for a, b in zip(seen[4, "before"], seen[4, "after"]))  # step 4: skipped
    for step in (3, 5):  # the steps around it do update weights and moments
        assert not any(_same(a, b) for a, b in zip(seen[step, "before"], seen[step, "after"]))


class LRSpike(L.Callback):
    """Multiplies the learning rate by ``factor`` for ``steps`` steps from global step ``at`` (the schedule
    sets it back at the next step)."""

    def __init__(self, at: int, factor: float = 30.0, steps: int = 3) -> None:
        self.at, self.factor, self.steps = at, factor, steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at <= trainer.global_step < self.at + self.steps:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor


def _run(lmlab, name: str, *overrides: str) -> tuple[float, list[dict]]:
    code, out = lmlab("train", f"name={name}", *TINY, "batch_size=16", "model.d_model=32", "logger=none",
                      "eval=[perplexity]", "max_steps=200", "val_every=200", "checkpoint_every=200",
                      "callbacks=stats", "callbacks.stats.threshold=4", *overrides)
    assert code == 0, out
    (run,) = (lmlab.runs / name).glob("*/results.json")
    spikes = json.loads((run.parent / SPIKES).read_text())["spikes"]
    return json.loads(run.read_text())["metrics"]["perplexity/loss"], spikes


def test_a_learning_rate_spike_is_flagged_and_skipping_it_recovers_the_clean_loss(lmlab):
    inject = "+callbacks.inject={_target_: tests.test_stats_callback.LRSpike, at: 100}"
    clean, clean_spikes = _run(lmlab, "clean")
    spiked, spikes = _run(lmlab, "spiked", inject)
    skipped, skip_spikes = _run(lmlab, "skipped", inject, "callbacks.stats.skip=true")
    assert clean_spikes == []
    # the first update at 30x is step 101; its effect shows in the loss of step 102
    assert spikes and 101 <= spikes[0]["step"] <= 105 and not spikes[0]["skipped"]
    assert skip_spikes and 101 <= skip_spikes[0]["step"] <= 105 and all(s["skipped"] for s in skip_spikes)
    assert spiked - clean > 0.02  # the spike does harm when the updates are taken
    assert abs(skipped - clean) < 0.01


def test_statistics_reach_the_training_curves_attention_keys_only_for_attention_models(lmlab):
    for model in ("transformer", "hyena"):
        code, out = lmlab("train", f"name={model}", f"model={model}", *TINY, "batch_size=16", "model.d_model=32",
                          "eval=[]", "max_steps=4", "val_every=4", "checkpoint_every=4", "callbacks=stats",
                          "callbacks.stats.every=2")
        assert code == 0, out
        (metrics,) = (lmlab.runs / model).glob("*/logs/metrics.csv")
        rows = [r for r in csv.DictReader(metrics.open()) if r.get("stats/layer1/weight_rms")]
        assert [int(r["step"]) for r in rows] == [2, 4]
        for r in rows:
            for key in ("weight_rms", "grad_rms", "update_rms", "act_rms", "act_kurtosis"):
                assert float(r[f"stats/layer1/{key}"]) > 0
        attn = [k for k in rows[0] if "attn_" in k]
        if model == "transformer":
            assert sorted(attn) == [f"stats/layer{i}/attn_{n}" for i in (0, 1) for n in ("entropy", "max_logit")]
            assert all(0 < float(r["stats/layer0/attn_entropy"]) < math.log(64) for r in rows)
        else:
            assert attn == []


@pytest.mark.parametrize("override, reason", [("model=lstm", "no list of blocks"), ("compile=true", "compiled")])
def test_stats_refuses_what_it_cannot_measure(lmlab, override, reason):
    code, out = lmlab("train", override, *TINY, "batch_size=16", "eval=[]", "max_steps=2", "logger=none",
                      "callbacks=stats")
    assert code == 2 and reason in out, out
