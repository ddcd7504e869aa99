"""Callbacks of the training loop: evaluations along the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


class EvaluateEvery(L.Callback):
    """Runs the configured evaluators every ``every`` steps (on rank 0), logs their metrics and keeps a
    history (``[{"step": s, metric: value, ...}]``) that survives a resume through the checkpoint."""

    def __init__(self, evaluators: dict, datamodule, run_dir: Path, every: int) -> None:
        self.evaluators, self.dm, self.run_dir, self.every = evaluators, datamodule, run_dir, every
        self.history: list[dict[str, Any]] = []

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or any(h["step"] == step for h in self.history):
            return
        from lmlab.pipeline import run_evaluations

        was_training = pl_module.model.training
        metrics = run_evaluations(self.evaluators, pl_module, self.dm, self.run_dir)
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
