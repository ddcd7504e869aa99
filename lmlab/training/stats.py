"""Training statistics (``callbacks=stats``): per-layer weight, gradient and update RMS, activation RMS and
kurtosis, attention entropy and maximum attention logit every ``every`` steps, and a loss-spike detector
that records each spike and, with ``skip=true``, skips the update of the batch that spiked.

What is measured, per block ``i`` of the model's ``blocks`` (keys ``stats/layer<i>/<name>``):

- ``weight_rms``, ``grad_rms``, ``update_rms``: the root mean square over all of the block's parameters of
  the weights after the step, of their gradients (before clipping: Lightning calls
  ``on_before_optimizer_step`` first) and of the change the optimiser step made;
- ``act_rms``, ``act_kurtosis``: over every entry of the block's output (the residual stream), the RMS and
  Pearson's kurtosis ``m4 / m2^2`` of the centred entries (3 for a Gaussian; large when a few features carry
  outliers, the measure of He et al. 2024, "Understanding and Minimising Outlier Features in Transformer
  Training", arXiv 2405.19279);
- ``attn_entropy``, ``attn_max_logit``: the entropy of each query's attention distribution (nats, mean over
  batch, heads and queries) and the largest pre-softmax logit ``q.k / sqrt(d_head)`` among the allowed
  pairs; the collapse of the first and the growth of the second precede instabilities (Zhai et al. 2023,
  "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", arXiv 2303.06296; Wortsman et
  al. 2023, "Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322).
  Only blocks with softmax attention (``lmlab.models.transformer.SelfAttention``: the transformer and the
  models built on it) have these two keys; recurrent, convolutional and linear-attention models have none.
  The scores are recomputed from the queries and keys the attention hands over (``SelfAttention.inspect``)
  on the recorded steps only, so the fused attention kernel runs unchanged.

The statistics of a step are gathered on the device and read back once; nothing is hooked between recorded
steps. They go to the run's logger (``logs/metrics.csv``: the training curves).

The loss-spike detector follows the practice of skipping the batches around a spike (PaLM, Chowdhery et al.
2022, arXiv 2204.02311, restarts before a spike and skips the batches it saw): the z-score of each step's
training loss against the mean and sample standard deviation of the ``window`` steps before it (spikes left
out of the window, and none judged before the window is full); ``z > threshold`` is a spike. Each spike
``{step, loss, z, skipped}`` is logged (``stats/spike_z``) and kept in ``spikes.json`` in the run directory
(``TrainingStats.spikes``). Spikes stay out of the window, so a spike that lasts several steps is flagged at
each; after ``patience`` in a row the window starts again from the new level, so that a lasting shift (which
skipped updates cannot undo) does not stop training. A non-finite loss is never a spike: the divergence guard
stops the run. Without ``skip`` the losses are read back every ``every`` steps (no device sync per step);
with ``skip=true`` each step's loss is read back before its backward pass, and a spiking batch returns no
loss from ``training_step`` (``LMModule.skip_update``): Lightning then runs neither its backward pass nor an optimiser
update, so the weights and the optimiser's moments stay as they were; the step count and the learning-rate
schedule move on. Skipping needs one process without gradient accumulation (refused otherwise).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.io import write_json
from lmlab.models.transformer import SelfAttention
from lmlab.settings import Positive, PositiveFloat

SPIKES = "spikes.json"  # in the run directory: the loss spikes the detector found


def rms(t: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(t^2)) over every entry, in float32 (a 0-d tensor on t's device)."""
    return t.detach().float().pow(2).mean().sqrt()


def kurtosis(t: torch.Tensor) -> torch.Tensor:
    """Pearson's kurtosis of t's entries: ``mean(d^4) / mean(d^2)^2`` with ``d = t - mean(t)`` (3 for a
    Gaussian, 1 for a symmetric two-point distribution)."""
    d = t.detach().float().flatten()
    d = d - d.mean()
    m2 = d.pow(2).mean()
    return d.pow(4).mean() / m2.pow(2)


def attention_stats(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean entropy of the attention distributions in nats, largest allowed logit) for queries and keys of
    shape (B, H, T, d_head), under ``F.scaled_dot_product_attention``'s conventions: ``mask`` a bool
    (B or 1, 1, T, T) tensor (True: allowed) or ``None``, ``is_causal`` the causal pattern."""
    q, k = q.detach().float(), k.detach().float()
    T = q.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None:
        allowed = allowed & mask
    logits = logits.masked_fill(~allowed, float("-inf"))
    logp = logits.log_softmax(-1)
    entropy = -torch.where(allowed, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
    return entropy.mean(), logits.amax()


class SpikeDetector:
    """The z-score of each loss against the ``window`` accepted losses before it; ``z > threshold`` is a spike
    and is left out of the window. After ``patience`` spikes in a row the loss has moved to a new level (a
    skipped update cannot bring it back): the window starts again from there, judging nothing until it is
    full. ``observe(step, loss)`` returns the spike record or ``None``."""

    def __init__(self, window: int, threshold: float, patience: int = 5) -> None:
        self.threshold, self.patience = threshold, patience
        self.window: deque[float] = deque(maxlen=window)
        self.spikes: list[dict[str, Any]] = []
        self.in_a_row = 0

    def observe(self, step: int, loss: float, skipped: bool = False) -> dict[str, Any] | None:
        if not math.isfinite(loss):
            return None  # the divergence guard's business
        if len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (len(self.window) - 1))
            z = (loss - mean) / std if std > 0 else 0.0  # a window without spread judges nothing
            if z > self.threshold:
                spike = {"step": step, "loss": loss, "z": z, "skipped": skipped}
                self.spikes.append(spike)
                self.in_a_row += 1
                if self.in_a_row >= self.patience:
                    self.window.clear()
                    self.in_a_row = 0
                return spike
        self.in_a_row = 0
        self.window.append(loss)
        return None


class TrainingStats(L.Callback):
    """Per-layer statistics every ``every`` steps and the loss-spike detector (see the module docstring).

    Args: ``every`` (steps between recorded statistics, and between reading the losses back without
    ``skip``), ``window`` (losses the z-score is taken over), ``threshold`` (the z-score above which a loss
    is a spike), ``patience`` (spikes in a row after which the window starts again at the new level),
    ``skip`` (skip the update of a spiking batch)."""

    def __init__(self, every: Positive = 50, window: Positive = 50, threshold: PositiveFloat = 5.0,
                 patience: Positive = 5, skip: bool = False) -> None:
        if window < 2:
            raise UserError(f"callbacks.stats.window={window} leaves no spread to take a z-score over: set it to 2 "
                            "or more.")
        self.every, self.skip = every, skip
        self.detector = SpikeDetector(window, threshold, patience)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not read back yet
        self._handles: list[Any] = []
        self._layers: list[nn.Module] = []
        self._values: dict[str, torch.Tensor] = {}
        self._before: list[list[torch.Tensor]] | None = None
        self._trainer: L.Trainer | None = None

    @property
    def spikes(self) -> list[dict[str, Any]]:
        return self.detector.spikes

    # ----- set-up -----

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        blocks = getattr(pl_module.model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise UserError(f"model {type(pl_module.model).__name__} has no list of blocks for callbacks.stats to "
                            "measure layer by layer: drop callbacks=stats for this model.")
        if pl_module.forward_model is not pl_module.model or pl_module.compiled_loss is not None:
            raise UserError("callbacks.stats reads the blocks through hooks that a compiled model does not run: set "
                            "compile=false, or drop callbacks=stats.")
        self._layers = list(blocks)
        self._trainer = trainer
        if self.skip:
            if trainer.world_size > 1 or trainer.accumulate_grad_batches > 1:
                raise UserError("callbacks.stats.skip=true skips a batch in one process without gradient "
                                "accumulation: set skip=false, or train on one device with accumulate_grad_batches=1.")
            pl_module.skip_update = self._check
            warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "skip_update", None) == self._check:
            pl_module.skip_update = None
        self._unhook()

    # ----- the loss-spike detector -----

    def _check(self, loss: torch.Tensor) -> bool:
        """``LMModule.skip_update``: called in the training step with the step's loss; True skips it."""
        step = self._trainer.global_step + 1
        spike = self._record(self.detector.observe(step, float(loss), skipped=True))
        if spike is not None:
            self._write_spikes()
        return spike is not None

    def _record(self, spike: dict[str, Any] | None) -> dict[str, Any] | None:
        logger = self._trainer.logger if self._trainer is not None else None
        if spike is not None and logger is not None and self._trainer.is_global_zero:
            logger.log_metrics({"stats/spike_z": spike["z"], "stats/spike_loss": spike["loss"]},
                                     step=spike["step"])
        return spike

    def _flush(self) -> None:
        """Read the pending losses back (one transfer) and judge them in order."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        values = torch.stack([v for _, v in self._pending]).tolist()
        self._pending.clear()
        found = [self._record(self.detector.observe(s, v)) for s, v in zip(steps, values)]
        if any(found):
            self._write_spikes()

    def _write_spikes(self) -> None:
        if self._trainer is not None and self._trainer.is_global_zero:
            record = {"spikes": self.spikes, "window": self.detector.window.maxlen,
                      "threshold": self.detector.threshold, "skip": self.skip}
            write_json(Path(self._trainer.default_root_dir) / SPIKES, record)

    # ----- the hooks of a recorded step -----

    def _recording(self, trainer) -> bool:
        return (trainer.global_step + 1) % self.every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._recording(trainer):
            return
        self._values = {}
        self._before = [[p.detach().clone() for p in layer.parameters()] for layer in self._layers]
        for i, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_hook(partial(self._activation, i)))
            for m in layer.modules():
                if isinstance(m, SelfAttention):
                    m.inspect = partial(self._attention, i)
                    self._handles.append(m)

    def _activation(self, i: int, module, inputs, output) -> None:
        x = output[0] if isinstance(output, (tuple, list)) else output
        self._values[f"stats/layer{i}/act_rms"] = rms(x)
        self._values[f"stats/layer{i}/act_kurtosis"] = kurtosis(x)

    def _attention(self, i: int, q, k, mask, is_causal) -> None:
        entropy, top = attention_stats(q, k, mask, is_causal)
        self._values[f"stats/layer{i}/attn_entropy"] = entropy
        self._values[f"stats/layer{i}/attn_max_logit"] = top

    def _unhook(self) -> None:
        for h in self._handles:
            if isinstance(h, SelfAttention):
                h.inspect = None
            else:
                h.remove()
        self._handles.clear()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._recording(trainer):
            return
        for i, layer in enumerate(self._layers):
            grads = [p.grad for p in layer.parameters() if p.grad is not None]
            if grads:  # none on a skipped step
                self._values[f"stats/layer{i}/grad_rms"] = _joint_rms(grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.skip and isinstance(outputs, dict) and outputs.get("loss") is not None:
            self._pending.append((step, outputs["loss"].detach().float()))
            if len(self._pending) >= self.every:
                self._flush()
        if self._before is None:
            return
        self._unhook()
        for i, (layer, before) in enumerate(zip(self._layers, self._before)):
            params = [p.detach() for p in layer.parameters()]
            self._values[f"stats/layer{i}/weight_rms"] = _joint_rms(params)
            self._values[f"stats/layer{i}/update_rms"] = _joint_rms([p - b for p, b in zip(params, before)])
        self._before = None
        names = list(self._values)
        numbers = torch.stack([self._values[n].float().cpu() for n in names]).tolist()
        self._values = {}
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(dict(zip(names, numbers)), step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush()
        self._write_spikes()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run that stops (diverged, interrupted) keeps the spikes seen up to then."""
        self._flush()
        self._write_spikes()

    # ----- resuming -----

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"spikes": self.spikes, "window": list(self.detector.window), "in_a_row": self.detector.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.spikes = list(state_dict.get("spikes", []))
        self.detector.window.clear()
        self.detector.window.extend(state_dict.get("window", []))
        self.detector.in_a_row = int(state_dict.get("in_a_row", 0))


def _joint_rms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The RMS over every entry of several tensors together."""
    total = torch.stack([t.float().pow(2).sum() for t in tensors]).sum()
    return (total / sum(t.numel() for t in tensors)).sqrt()
