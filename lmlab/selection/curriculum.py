"""TinyHelen-style curriculum: order the data by difficulty, release it in stages on validation plateaus.

Yang et al., "TinyHelen's First Curriculum: Training and Evaluating Tiny Language Models in a Simpler
Language Environment", 2025, arXiv 2501.00522. Variant: the released trainer's iterative schedule
(``EmpathYang/TinyHelen``, ``trainer.py``: ``_maybe_update_train_dataset_on_step_end`` /
``check_iterative_metric_value``):

* a static difficulty key per row, sorted ascending (easy first; ``reverse=true`` flips it):
  ``length`` (tokens per row), ``reference_loss`` (mean token NLL under a small lmlab transformer that the
  selector trains, ``lmlab.selection.reference.AuxLM``; on the target set by default, ``reference_data=pool``
  for a model of the pool itself as in TinyHelen's precomputed ``lm_loss``), or ``random``; the code's
  self-loss key (re-sorted at every update by the current model) is not implemented;
* training starts on the easiest ``start`` share (5%); every time the validation loss (the objective's loss
  on the validation split, as in ``val/loss``, computed by the callback every ``every`` steps: 20 in
  conf/selection/curriculum.yaml, TinyHelen's evaluation interval; ``null`` = the run's ``val_every``)
  fails to improve on the best so far by more than ``threshold`` for ``patience`` validations, the next
  ``step`` share (5%) is released (a cumulative prefix); the best loss is not reset after a growth; growth
  stops at 100%.

Where the pool has an ``origin`` column (``data=planted``), the selection's ``precision`` is that of all kept
rows, which says little about a curriculum that never releases most of them; the callback therefore also
reports ``served_precision`` (in ``selection/*``): the target share of the rows the training batches drew
from, averaged over steps (each step weighs the target share of the prefix released at that step).

``select`` returns the kept rows (the easiest ``fraction``; all by default) in difficulty order; the stage
release is a Lightning callback (``CurriculumCallback``) over ``DataModule.use_stages`` (see
``lmlab.data.datamodule.Stages``): the batch order is a function of (seed, step, stage record) and the
record, the best loss and the plateau count are saved in the checkpoint, so a resumed run draws the same
batches. The callback computes its own validation loss in ``on_train_batch_end`` (one extra pass over the
validation split per check) rather than reading Lightning's ``val/loss``: Lightning saves a step's
checkpoint before that step's validation runs, so a decision taken at validation time would be missing
from the checkpoint and a resumed run would release its stages later than the uninterrupted one.

Chunked (``Selector.on_shards``): every key is a per-row score (length, a fixed reference model's loss, a
random draw), computed chunk by chunk (``lmlab.selection.base.chunk_scores``); the sort is over the scores
(8 bytes a row), and over shards the kept rows are an index in difficulty order, so the stage prefixes are
the same rows as for the pool in memory.

Not per source (``data.select_per_source``): the stages are prefixes of one difficulty order over the whole
pool, and groups ordered apart and joined would release one source's rows before the next one's; ``run``
refuses ``by`` (``Selector.per_group``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selection, Selector, chunk_scores, column
from lmlab.selection.reference import AuxLM, Reference, need_target, pool_sample, pool_vocab, row_nll
from lmlab.settings import NonNegative, NonNegativeFloat, Optional, Positive, PositiveFraction, declared

KEYS = ("length", "reference_loss", "random")


class Plateau:
    """TinyHelen's growth rule: ``update(loss)`` is True when the loss has not improved on the best by more
    than ``threshold`` for ``patience`` consecutive validations (the counter restarts after a growth)."""

    def __init__(self, patience: int = 1, threshold: float = 0.0) -> None:
        self.patience, self.threshold = patience, threshold
        self.best, self.bad = math.inf, 0

    def update(self, loss: float) -> bool:
        if loss < self.best - self.threshold:
            self.best, self.bad = loss, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.bad = 0
            return True
        return False


def served_precision(history: list[tuple[int, int]], is_target: np.ndarray, steps: int) -> float:
    """Mean over steps ``0 .. steps-1`` of the target share of the prefix in effect at each step (stage
    ``history`` = [(first step, rows), ...]); the rows are in release order."""
    share = np.cumsum(is_target) / np.arange(1, len(is_target) + 1)
    total = 0.0
    for k, (start, rows) in enumerate(history):
        end = min(history[k + 1][0], steps) if k + 1 < len(history) else steps
        total += max(end - start, 0) * share[rows - 1]
    return float(total / max(steps, 1))


def stage_rows(n_rows: int, share: float) -> int:
    return max(1, min(n_rows, int(math.ceil(share * n_rows - 1e-9))))


class CurriculumCallback(L.Callback):
    """Grows the released prefix on validation plateaus (see module docstring); checkpointed."""

    def __init__(self, stages, datamodule, n_rows: int, step: float, patience: int, threshold: float,
                 every: int | None, report: dict | None = None) -> None:
        self.stages, self.dm, self.n_rows, self.step, self.every = stages, datamodule, n_rows, step, every
        self.plateau = Plateau(patience, threshold)
        self.report = report  # where ``served_precision`` goes at the end of training (planted data)

    def share(self) -> float:
        return self.stages.rows / self.n_rows

    @torch.no_grad()
    def validation_loss(self, pl_module) -> float:
        """The objective's mean batch loss on the validation split (what ``validation_step`` logs)."""
        was_training = pl_module.training
        pl_module.eval()
        losses, sizes = [], []
        try:
            for batch in self.dm.val_dataloader():
                batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                prepared = pl_module.objective.prepare(batch)
                loss, _ = pl_module.objective.loss(pl_module.forward_model, prepared)
                losses.append(float(loss))
                sizes.append(prepared.inputs.shape[0])
        finally:
            pl_module.train(was_training)
        return float(np.average(losses, weights=sizes)) if losses else math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every or int(trainer.val_check_interval)
        if trainer.global_step % max(every, 1):
            return
        if self.plateau.update(self.validation_loss(pl_module)) and self.stages.rows < self.n_rows:
            grown = self.stages.rows + stage_rows(self.n_rows, self.step)
            self.stages.release(trainer.global_step, min(self.n_rows, grown))
        if trainer.logger:
            trainer.logger.log_metrics({"curriculum/released": self.share()}, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        train = self.dm.splits["train"]
        if self.report is not None and "origin" in train.column_names:
            target = column(train, "origin") == 0
            self.report["served_precision"] = served_precision(self.stages.history, target, trainer.global_step)
            self.report["served_rows"] = float(self.stages.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.stages.state_dict(), "best": self.plateau.best, "bad": self.plateau.bad}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stages.load_state_dict(state_dict["stages"])
        self.plateau.best, self.plateau.bad = float(state_dict["best"]), int(state_dict["bad"])


class Curriculum(Selector):
    on_shards = "chunked"
    per_group = False  # the stages are prefixes of one order over the whole pool

    @declared
    class Settings(Reference):
        key: str = "reference_loss"
        reverse: bool = False
        start: PositiveFraction = 0.05
        step: PositiveFraction = 0.05
        patience: NonNegative = 1
        threshold: NonNegativeFloat = 0.0
        every: Optional[Positive] = None
        fraction: PositiveFraction = 1.0
        reference_data: str = "target"
        reference_rows: Optional[Positive] = 4000
        reference_steps: NonNegative = 200

    def setup(self) -> None:
        s = self.settings
        if s.key not in KEYS:
            raise UserError(f"selection.key is {s.key!r}; choose one of {', '.join(KEYS)}.")
        if s.reference_data not in ("target", "pool"):
            raise UserError(f"selection.reference_data is {s.reference_data!r}; choose target or pool.")
        for name in ("start", "step", "fraction"):
            value = getattr(s, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise UserError(f"selection.{name} is {value!r}; make it a number in (0, 1].")
        if not isinstance(s.patience, int) or s.patience < 1:
            raise UserError(f"selection.patience is {s.patience!r}; make it a positive whole number.")
        if s.every is not None and (not isinstance(s.every, int) or s.every < 1):
            raise UserError(f"selection.every is {s.every!r}; make it a positive whole number or null.")
        self.reference = AuxLM(d_model=s.d_model, n_layers=s.n_layers, steps=s.reference_steps,
                               batch_size=s.batch_size, lr=s.lr)

    def difficulty(self, pool: Dataset, target: Dataset | None) -> np.ndarray:
        c = self.settings
        if c.key == "length":
            return chunk_scores(pool, lambda rows: [len(r) for r in rows])
        if c.key == "random":
            return np.random.default_rng(c.seed).random(len(pool))
        seed = int(c.seed)
        if c.reference_data == "target":
            train = need_target(target, "curriculum with key=reference_loss and reference_data=target")
        else:
            train = pool_sample(pool, c.reference_rows, seed)
        model = self.reference.train(train, pool_vocab(self.source, pool, train), seed)
        return chunk_scores(pool, lambda rows: row_nll(model, rows))

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        """Higher = easier (released first)."""
        d = self.difficulty(pool, target)
        return d if self.reverse else -d

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        scores = self.score(pool, target, workdir)
        keep = int(round(self.fraction * len(pool)))
        if keep < 1:
            raise UserError(f"selection curriculum keeps no rows of the {len(pool)}-row pool: raise "
                            "selection.fraction.")
        order = np.argsort(-scores, kind="stable")[:keep]  # easiest first
        first = order[: stage_rows(keep, self.start)]
        report = None
        if "origin" in pool.column_names:
            origin = column(pool, "origin")
            report = {"first_stage_precision": float(np.mean(origin[first] == 0))}
        return Selection(pool.select(order), scores, report)

    def training_callbacks(self, datamodule, selection: Selection | None = None) -> list:
        """The stage release; it adds ``served_precision`` and ``served_rows`` to ``selection.report``."""
        n = len(datamodule.splits["train"])
        c = self.settings
        stages = datamodule.use_stages(stage_rows(n, c.start))
        report: dict = {}
        if selection is not None:
            if selection.report is None:
                selection.report = report
            report = selection.report
        return [CurriculumCallback(stages, datamodule, n, c.step, c.patience, c.threshold, c.every,
                                   report=report)]
