"""The LightningModule: composes a backbone, an objective and an optimiser. Nothing recipe-specific."""

from __future__ import annotations

import time
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmlab.io import torch_save
from lmlab.models.base import Backbone
from lmlab.objectives.base import Objective


class LMModule(L.LightningModule):
    """``objective`` may be an ``nn.Module`` with parameters of its own: they are trained and checkpointed
    with the model's."""

    def __init__(self, model: Backbone, objective: Objective, optimizer: Callable, schedule: Callable,
                 max_steps: int, compile: bool = False) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.make_optimizer, self.schedule, self.max_steps = optimizer, schedule, max_steps
        self.forward_model = torch.compile(model) if compile else model
        self._tokens, self._t0 = 0, None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prepared = self.objective.prepare(batch)
        loss, metrics = self.objective.loss(self.forward_model, prepared)
        if self.model.aux_loss is not None:
            metrics = {**metrics, "aux_loss": self.model.aux_loss.detach()}
            loss = loss + self.model.aux_loss
        self._tokens += int(prepared.attention.padding.sum()) if prepared.attention.padding is not None \
            else prepared.inputs.numel()
        if self._t0 is None:
            self._t0 = time.perf_counter()
        elapsed = time.perf_counter() - self._t0
        log = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in metrics.items()}}
        if elapsed > 0:
            log["train/tokens_per_s"] = self._tokens / elapsed
        self.log_dict(log, prog_bar=False, on_step=True, batch_size=prepared.inputs.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prepared = self.objective.prepare(batch)
        loss, _ = self.objective.loss(self.forward_model, prepared)
        self.log("val/loss", loss, prog_bar=True, batch_size=prepared.inputs.shape[0])

    def configure_optimizers(self):
        decay, no_decay = [], []
        # the model's parameters, and the objective's where it has its own (an extra head, say)
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.make_optimizer(groups)
        total = self.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place: a crash mid-write leaves
    the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        torch_save(checkpoint, path)
