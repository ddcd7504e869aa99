"""Callbacks of the training loop: the progress bar, the divergence guard, the training loss over the last
steps, and evaluations along the way."""

from __future__ import annotations

import sys
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException


def progress_bar(refresh_rate: int = 50) -> L.Callback:
    """A rich progress bar on a terminal; a plain one that prints every ``refresh_rate`` steps otherwise (logs)."""
    return RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=refresh_rate)


class Diverged(Exception):
    """Training produced a non-finite loss at ``step``; raised from the training loop by ``DivergenceGuard``."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training diverged at step {step} (loss {loss})")
        self.step, self.loss = step, loss


class DivergenceGuard(L.Callback):
    """Stops training at the first non-finite training loss it sees, by raising ``Diverged``.

    The loss is read back from the device only on the steps where it matters (every ``every`` steps and the
    last step), not on every step. On the steps a checkpoint is written the weights are checked too (one
    reduction): Lightning runs checkpoint callbacks after the others, so the guard stops the run before a
    checkpoint with non-finite weights is written, and the last checkpoint on disk is a finite one."""

    def __init__(self, every: int, checkpoint_every: int | None = None) -> None:
        self.every, self.checkpoint_every = max(1, every), checkpoint_every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        checkpoint = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
        if not (checkpoint or step % self.every == 0 or step >= (trainer.max_steps or 0)):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # none: a skipped update
        finite = [] if loss is None else [torch.isfinite(loss.detach()).all()]
        if checkpoint:
            finite += [torch.isfinite(p.detach()).all() for p in pl_module.parameters()]
        if finite and not bool(torch.stack(finite).all()):
            raise Diverged(step, float("nan") if loss is None else float(loss.detach().float().mean()))


LOSS_WINDOW = 50  # steps: ``train/loss`` is the mean batch loss of the last LOSS_WINDOW training steps


class LossWindow(L.Callback):
    """The mean of the batch losses of the last ``window`` training steps (``train/loss`` of the results; one
    batch's loss is noisy). Each step's loss is copied into a ring on the loss's device (no host sync per step);
    the ring is part of the checkpoint, so a resumed run reports the mean an uninterrupted one does."""

    def __init__(self, window: int = LOSS_WINDOW) -> None:
        self.window = max(1, int(window))
        self.losses = torch.full((self.window,), float("nan"))
        self.count = 0  # steps seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped update (``callbacks.stats.skip``) is left out of the window
            return
        loss = loss.detach().float().mean()
        if self.losses.device != loss.device:
            self.losses = self.losses.to(loss.device)
        self.losses[self.count % self.window] = loss
        self.count += 1

    def steps(self) -> int:
        """How many steps the mean covers: ``window``, or every step of a shorter run."""
        return min(self.count, self.window)

    def mean(self) -> float:
        """The mean loss of the last ``steps()`` steps (NaN before the first step)."""
        return float(self.losses[: self.steps()].double().mean()) if self.count else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.detach().cpu(), "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        losses = state_dict.get("losses")
        if losses is not None and len(losses) == self.window:
            self.losses, self.count = losses.clone(), int(state_dict.get("count", 0))


class LastValidation(L.Callback):
    """The step and ``val/loss`` of the last validation during fit, so that a validation at the last step is
    not run twice."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss = float("nan")

    def on_validation_end(self, trainer, pl_module) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and "val/loss" in trainer.callback_metrics:
            self.step, self.loss = trainer.global_step, float(trainer.callback_metrics["val/loss"])


class SaveOnTerm(L.Callback):
    """On a termination signal (SIGTERM: a preempted or cancelled job; Lightning finishes the current step and
    raises ``SIGTERMException``), save the resumable checkpoint at the current step to ``path``, so that
    rerunning the job resumes where it stopped."""

    def __init__(self, path) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


class EvaluateEvery(L.Callback):
    """Runs the evaluations every ``every`` steps (on rank 0), logs their metrics and keeps a history
    (``[{"step": s, metric: value, ...}]``) that survives a resume through the checkpoint.

    ``evaluate(module) -> {metric: value}`` runs the configured evaluators on the module's model."""

    def __init__(self, evaluate: Callable[[Any], dict[str, float]], every: int) -> None:
        self.run, self.every = evaluate, every
        self.history: list[dict[str, Any]] = []

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or any(h["step"] == step for h in self.history):
            return
        was_training = pl_module.model.training
        metrics = self.run(pl_module)
        pl_module.model.train(was_training)
        self.history.append({"step": step, **metrics})
        if trainer.logger:
            trainer.logger.log_metrics({f"along/{k}": v for k, v in metrics.items()}, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every == 0:  # step 0: the starting point (a parent's weights, say)
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
