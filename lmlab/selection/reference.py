"""Auxiliary language models for model-based selection (CoLoR-Filter, MiniPLM, PreSelect, curriculum).

One place for what those methods share:

* ``AuxLM``: the size and training settings of a small causal LM that a selector trains itself. It is
  lmlab's own ``Transformer`` backbone trained with lmlab's ``CLM`` objective (``prepare`` / ``loss``) by a
  plain AdamW loop (cosine schedule of ``lmlab.schedule``); batches come from
  ``lmlab.data.datamodule.StepBatches`` and ``collate``, so a model is a pure function of (rows, settings, seed).
  ``AuxLM.train(rows, init=model)`` continues from a copy of ``model`` (a fine-tune).
* ``row_nll``: per-row negative log-likelihood (mean per target token, or the total), in nats.
* ``load_reference``: a finished lmlab run directory as a scoring model (``lmlab.run_dir.load_backbone``).
* ``sample_rows`` / ``rows_of``: plain row lists from a ``Dataset``; ``pool_sample``: the same draw from a
  pool (a ``Dataset`` or memory-mapped shards) without reading the rest of it; ``pool_vocab``: the vocabulary
  size, the pool read chunk by chunk where the source does not say it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from lmlab.attention import CAUSAL
from lmlab.data.datamodule import StepBatches, collate
from lmlab.errors import UserError
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.optim import decay_groups, scale_lr
from lmlab.readout import model_device
from lmlab.run_dir import DONE, MODEL, holds_model, load_backbone, model_args
from lmlab.schedule import cosine
from lmlab.settings import Configured, NonNegative, Positive, PositiveFloat, declared
from lmlab.threads import one_thread


def rows_of(split: Dataset) -> list[list[int]]:
    return [list(r) for r in split.with_format(None)["input_ids"]]


def sample_indices(n_rows: int, n: int | None, seed: int) -> np.ndarray:
    """``n`` of ``n_rows`` row indices drawn without replacement, sorted (all of them when ``n`` is None or
    not smaller)."""
    if n is None or n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n, replace=False))


def sample_rows(rows: list[list[int]], n: int | None, seed: int) -> list[list[int]]:
    """``n`` rows drawn without replacement (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i] for i in sample_indices(len(rows), n, seed)]


def pool_sample(pool, n: int | None, seed: int) -> list[list[int]]:
    """``sample_rows`` of the pool's rows, reading only the drawn rows (``n=None``: the whole pool)."""
    idx = sample_indices(len(pool), n, seed)
    return [list(r) for r in pool.with_format(None)[idx.tolist()]["input_ids"]]


def pool_vocab(source, pool, *row_lists: list[list[int]]) -> int:
    """``vocab_of`` with the pool among the rows, the pool read chunk by chunk when the source does not
    give the vocabulary size."""
    if source is not None and hasattr(source, "vocab_size"):
        return int(source.vocab_size)
    from lmlab.selection.base import pool_chunks

    tops = [max((max(r) for r in rows if r), default=None) for rows in
            [*(rows for _, rows in pool_chunks(pool)), *row_lists]]  # one per chunk: bounded memory
    return 1 + max((t for t in tops if t is not None), default=3)


@declared
class Trained(Configured.Settings):
    """The settings of a selector that trains small causal transformers (``AuxLM``): their batch size and learning
    rate, and the seed of their data and initialisation."""

    batch_size: Positive = 64
    lr: PositiveFloat = 3e-3
    seed: NonNegative = 0


@declared
class Reference(Trained):
    """``Trained`` with one width and depth for every model the selector trains."""

    d_model: Positive = 64
    n_layers: Positive = 2


@dataclass
class AuxLM:
    """A small causal transformer trained by a selector (see module docstring)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05

    def build(self, vocab_size: int, seed: int) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(vocab_size, attention=CAUSAL, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads)

    def train(self, rows: list[list[int]], vocab_size: int, seed: int, init: torch.nn.Module | None = None,
              steps: int | None = None, checkpoints: tuple[int, ...] = ()) -> torch.nn.Module | list:
        """Train on ``rows`` (from ``init`` copied, else from scratch). With ``checkpoints``, returns copies
        of the model after each of those step counts (0 = before training) instead of the final model."""
        if not rows:
            raise UserError("a selection reference model has no rows to train on: give the selection a "
                            "non-empty pool and target.")
        steps = self.steps if steps is None else steps
        model = copy.deepcopy(init) if init is not None else self.build(vocab_size, seed)
        model.train()
        objective = CLM()
        opt = scale_lr(torch.optim.AdamW(decay_groups(model), lr=self.lr, betas=(0.9, 0.95),
                                         weight_decay=self.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, max(steps, 1), warmup=self.warmup))
        order = StepBatches(len(rows), self.batch_size, seed)
        saved = []
        with one_thread():
            self._loop(model, objective, rows, order, opt, sched, steps, checkpoints, saved)
        model.eval()
        return saved if checkpoints else model

    def _loop(self, model, objective, rows, order, opt, sched, steps, checkpoints, saved) -> None:
        for step in range(steps + 1):
            if step in checkpoints:
                saved.append(copy.deepcopy(model).eval())
            if step == steps:
                break
            batch = collate([{"input_ids": rows[i]} for i in order.batch(step)], seed=step)
            loss, _ = objective.loss(model, objective.prepare(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()


@torch.no_grad()
def row_nll(model: torch.nn.Module, rows: list[list[int]], batch_size: int = 512, reduce: str = "mean") -> np.ndarray:
    """Per-row causal NLL in nats: ``mean`` over the row's target tokens (every token after the first),
    or the ``sum``. Rows are batched by length so that padding costs nothing."""
    if reduce not in ("mean", "sum"):
        raise ValueError(reduce)
    was_training = model.training
    model.eval()
    device = model_device(model)
    objective = CLM()
    out = np.zeros(len(rows))
    order = np.argsort([len(r) for r in rows], kind="stable")
    with one_thread():
        _score(model, objective, rows, order, out, batch_size, reduce, device)
    model.train(was_training)
    return out


def _score(model, objective, rows, order, out, batch_size, reduce, device) -> None:
    for s in range(0, len(rows), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([{"input_ids": rows[i]} for i in idx])
        batch["input_ids"] = batch["input_ids"].to(device)
        p = objective.prepare(batch)
        logits = model.logits(model(p.inputs, p.attention)).float()
        nll = F.cross_entropy(logits.transpose(1, 2), p.targets, reduction="none") * p.loss_mask
        total = nll.sum(1).double()
        if reduce == "mean":
            total = total / p.loss_mask.sum(1).clamp_min(1)
        out[idx] = total.cpu().numpy()


def load_reference(run_dir: str | Path, vocab_size: int, what: str) -> torch.nn.Module:
    """The backbone of the finished lmlab run ``run_dir`` (``lmlab.run_dir.load_backbone``: the model alone),
    checked to be a causal LM over ``vocab_size`` ids."""
    path = Path(str(run_dir)).expanduser()
    if not holds_model(path):
        raise UserError(f"the {what} run {path} does not exist or is not finished (no {MODEL}): "
                        f"point it at a run directory that holds {DONE}.")
    args = model_args(path)
    if args["vocab_size"] != vocab_size:
        raise UserError(f"the {what} run {path} has a vocabulary of {args['vocab_size']} ids but the data has "
                        f"{vocab_size}: train the {what} on the same data.")
    if args["attention"] != CAUSAL:
        raise UserError(f"the {what} run {path} was not trained with a causal objective: train it with "
                        "objective=clm.")
    return load_backbone(path)


def need_target(target: Dataset | None, method: str) -> list[list[int]]:
    """The target rows, or one sentence saying the method needs them."""
    if target is None or len(target) == 0:
        raise UserError(f"selection {method} needs a target set and got none: use data with a non-empty "
                        "target split (or, without one, validation split), or a selection that needs no target.")
    return rows_of(target)


def vocab_of(source, *row_lists: list[list[int]]) -> int:
    """The source's vocabulary size, else one more than the largest id in the rows."""
    if source is not None and hasattr(source, "vocab_size"):
        return int(source.vocab_size)
    return 1 + max((max(r) for rows in row_lists for r in rows if r), default=3)
