"""Callbacks of the training loop: the progress bar, and evaluations along the way."""

from __future__ import annotations

import sys
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def progress_bar(refresh_rate: int = 50) -> L.Callback:
    """A rich progress bar on a terminal; a plain one that prints every ``refresh_rate`` steps otherwise (logs)."""
    return RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=refresh_rate)


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
