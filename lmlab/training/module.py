"""The LightningModule: composes a backbone, an objective and an optimiser. Nothing recipe-specific."""

from __future__ import annotations

import inspect
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmlab.errors import UserError
from lmlab.io import torch_save
from lmlab.models.base import Backbone
from lmlab.models.sparsity import check_sparsity, densify, is_sparse, sparsify
from lmlab.objectives.base import Objective
from lmlab.optim import decay_groups, scale_lr
from lmlab.run_dir import previous_checkpoint
from lmlab.training.throughput import Throughput, matmul_precision, peak_flops
from lmlab.vocab import PAD_ID


def fast_optimizer_kwargs(factory: Callable, params: list[torch.Tensor], precision: str | None = None) -> dict:
    """``fused=True`` where the optimiser takes ``fused`` (AdamW, Adam, SGD in PyTorch >= 2.4: on CUDA, and on
    the CPU), unless the config sets it; nothing otherwise. fp16 mixed precision keeps the unfused kernel:
    Lightning's gradient scaler cannot clip the gradients of an optimiser that unscales them itself."""
    try:
        accepts = "fused" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    preset = "fused" in (getattr(factory, "keywords", None) or {})
    floating = bool(params) and all(p.is_floating_point() for p in params)
    fp16 = str(precision or "").startswith("16")
    return {"fused": True} if accepts and floating and not preset and not fp16 else {}


def make_optimizer(factory: Callable, groups: list[dict], precision: str | None = None):
    """``factory(groups)`` with the fast kernel where this PyTorch has one for these parameters' device, each
    group's learning rate times its ``lr_mult`` (``lmlab.optim.scale_lr``)."""
    kwargs = fast_optimizer_kwargs(factory, [p for g in groups for p in g["params"]], precision)
    if kwargs:
        try:
            return scale_lr(factory(groups, **kwargs))
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
            pass
    return scale_lr(factory(groups))


class LMModule(L.LightningModule):
    """``objective`` may be an ``nn.Module`` with parameters of its own: they are trained and checkpointed
    with the model's.

    With ``sparsity`` > 0 (``lmlab train sparsity=...``; SPDF, ``lmlab.models.sparsity``) the model trains under
    fixed masks on its ``sparse_targets()``: they are
    put on in ``configure_model`` (before Lightning restores a checkpoint, which then brings back the run's own
    masks, and before the optimiser is built) and taken off in ``on_fit_end``, so that what follows training
    (``model.pt``, the evaluations, ``eval=finetune``'s copies) sees a plain dense model with zeros in place.
    MFU counts the FLOPs the dense kernels execute (``flops_per_token``: the zeros are multiplied too); the
    sparse-ideal count is logged beside it as ``train/sparse_flops_per_token``."""

    def __init__(self, model: Backbone, objective: Objective, optimizer: Callable, schedule: Callable,
                 compile: bool = False, sparsity: float = 0.0) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.sparsity = check_sparsity(model, sparsity)
        self.make_optimizer, self.schedule = optimizer, schedule
        self.forward_model = torch.compile(model) if compile else model
        # objectives with a dense loss (next-token prediction) are pure tensor code from the batch to the loss:
        # the whole of it is compiled, so the LM head and the cross-entropy fuse too; others (masks that
        # change the shapes, sampling) compile the model alone
        self.compiled_loss = torch.compile(objective.loss) if compile and objective.dense_loss else None
        self.throughput: Throughput | None = None
        self._batch_tokens, self._seq_len = 0, 0
        # set by a callback (``lmlab.training.stats``): given the step's loss, True skips the batch's update
        self.skip_update: Callable[[torch.Tensor], bool] | None = None

    def on_fit_start(self) -> None:
        precision = matmul_precision(getattr(self.trainer, "precision", None))
        self.throughput = Throughput(self.flops_per_token, peak_flops(self.device, precision),
                                     world=self.trainer.world_size)

    def flops_per_token(self, seq_len: int) -> float:
        """The model's training FLOPs per token plus the objective's own (a teacher, a generator): the FLOPs the
        kernels execute, which MFU divides by the device's dense peak. A sparse model on dense kernels executes
        its dense count (its step takes as long as the dense model's); counting only the sparse-ideal FLOPs
        there would lower MFU by the sparsity without the device working any less."""
        return self.model.flops_per_token(seq_len) + self.objective.extra_flops_per_token(seq_len)

    def sparse_flops_per_token(self, seq_len: int) -> float:
        """As ``flops_per_token`` with the masked weights' FLOPs left out (``Backbone.sparse_flops_per_token``):
        the pretraining budget as SPDF counts it."""
        return self.model.sparse_flops_per_token(seq_len, self.sparsity) + self.objective.extra_flops_per_token(seq_len)

    def configure_model(self) -> None:
        """Put on the sparsity masks (``sparsity`` > 0), drawn from the run's seed; a checkpoint being resumed then
        replaces them with its own."""
        if self.sparsity and not is_sparse(self.model):
            sparsify(self.model, self.sparsity, seed=torch.initial_seed())

    def on_fit_end(self) -> None:
        """Take the masks off: a plain dense model, zeros in place, for ``model.pt`` and the evaluations."""
        densify(self.model)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # tokens counted on the host, before the batch moves to the device: no device sync per step
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict) and "input_ids" in batch:
            self._batch_tokens = int((batch["input_ids"] != PAD_ID).sum())
        return batch

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.throughput is not None:
            metrics = self.throughput.step(self._batch_tokens, self._seq_len)
            if metrics and self.sparsity:
                metrics["train/sparse_flops_per_token"] = self.sparse_flops_per_token(self._seq_len)
            if metrics and self._logs_this_step():
                self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's metrics (every ``log_every_n_steps``, and the last
        step, so that the final values reach the results). ``self.log`` costs 1-2 ms per key on the CPU
        (Lightning moves its result store at every call), several times a small model's step, so the
        training step logs only on the steps that are written."""
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is None:  # not under a Trainer (or a Lightning without it): log every step
            return True
        return bool(connector.should_update_logs) or self.global_step + 1 >= self.trainer.max_steps

    def loss(self, prepared) -> tuple[torch.Tensor, dict]:
        """The objective's loss on a prepared batch, through what ``compile=true`` compiled."""
        if self.compiled_loss is not None:
            return self.compiled_loss(self.model, prepared)
        return self.objective.loss(self.forward_model, prepared)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        prepared = self.objective.prepare(batch)
        loss, metrics = self.loss(prepared)
        if self.model.aux_loss is not None:
            metrics = {**metrics, "aux_loss": self.model.aux_loss.detach()}
            loss = loss + self.model.aux_loss
        self._seq_len = prepared.inputs.shape[1]
        if self._logs_this_step():
            log = {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in metrics.items()}}
            self.log_dict(log, prog_bar=False, on_step=True, batch_size=prepared.inputs.shape[0])
            self.log("loss", loss.detach(), prog_bar=True, logger=False)
        if self.skip_update is not None and self.skip_update(loss.detach()):
            return None  # Lightning then runs no backward pass and no optimiser update for this batch
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prepared = self.objective.prepare(batch)
        loss, _ = self.loss(prepared)
        self.log("val/loss", loss, prog_bar=True, batch_size=prepared.inputs.shape[0])

    def configure_optimizers(self):
        groups = decay_groups(self)  # the model's parameters, and the objective's where it has its own
        precision = getattr(self.trainer, "precision", None) if self._trainer is not None else None
        optimizer = make_optimizer(self.make_optimizer, groups, precision)
        total = self.trainer.max_steps  # the schedule spans the steps the trainer runs: one source for both
        if total is None or total < 1:
            raise UserError(f"the learning-rate schedule needs a step budget and trainer.max_steps is {total}: "
                            "set max_steps to a positive number of steps.")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val``, applied where Lightning's precision plugins would refuse it:

        - FSDP: the norm over every shard, by the wrapped root's ``clip_grad_norm_`` (Lightning's FSDP plugin
          refuses norm clipping, since ``torch.nn.utils.clip_grad_norm_`` would see one rank's shard only);
        - bf16 autocast with a fused optimiser: Lightning's mixed-precision plugin refuses to clip for any
          optimiser that could unscale gradients itself, but bf16 has no gradient scaler, so clipping before
          the step is exact (``trainer=gpu`` would otherwise stop at its first step).
        fp16, which has a scaler, keeps Lightning's own path (and the unfused optimiser, ``make_optimizer``)."""
        if not gradient_clip_val:
            return
        by_value = gradient_clip_algorithm == "value"
        root = self.trainer.strategy.model
        if not by_value and hasattr(root, "clip_grad_norm_"):
            root.clip_grad_norm_(gradient_clip_val)
        elif getattr(self.trainer.precision_plugin, "scaler", None) is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if by_value:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, keeping the one it replaces
    (``lmlab.run_dir.previous_checkpoint``): a crash mid-write, or a damaged file, leaves a checkpoint to resume
    from. Reads them back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        torch_save(checkpoint, path, previous=previous_checkpoint(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Tensors and plain containers only (``weights_only``): loading a checkpoint never runs code from it."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
