"""Helpers shared by the downstream evaluators (probe, finetune): task and label selection, reading rows
through a backbone with the objective's attention, feature pooling, and the t-interval over seeds."""

from __future__ import annotations

import numpy as np
import torch

from lmlab.attention import PREFIX, Attention
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.objectives.clm import model_device
from lmlab.stats import t_interval
from lmlab.vocab import PAD_ID


class DownstreamEvaluator(Evaluator):
    """An evaluator that trains on a source's downstream labels (probe, fine-tune)."""

    task: str | None = None

    def skip_reason(self, source) -> str | None:
        if not getattr(source, "tasks", None) and self.task is None:
            return f"data {source.name} has no downstream labels"
        resolve_task(source, self.task, self.name)  # raises on a task the data lacks
        return None

    def labelled_splits(self, datamodule):
        """``(task, train_rows, train_y, test_rows, test_y, n_classes, length)``: the labelled rows of the
        ``downstream`` split (to train on) and of the ``test`` split (to score), the number of classes and
        the longest row."""
        task, n_classes = resolve_task(datamodule.source, self.task, self.name)
        train_rows, train_y = labelled_rows(datamodule.splits["downstream"], task, self.max_train)
        test_rows, test_y = labelled_rows(datamodule.splits["test"], task, self.max_test)
        check_nonempty(train_rows, "downstream", task, self.name)
        check_nonempty(test_rows, "test", task, self.name)
        n_classes = max(n_classes, int(train_y.max()) + 1, int(test_y.max()) + 1)
        length = max(len(r) for r in train_rows + test_rows)
        return task, train_rows, train_y, test_rows, test_y, n_classes, length


def resolve_task(source, task: str | None, evaluator: str) -> tuple[str, int]:
    """The label column to evaluate (default: the source's first task) and its number of classes."""
    tasks = dict(getattr(source, "tasks", {}) or {})
    name = getattr(source, "name", type(source).__name__)
    if not tasks:
        raise UserError(f"data {name} has no downstream labels: drop {evaluator} from eval or choose "
                        "data with labels.")
    if task is None:
        task = next(iter(tasks))
    if task not in tasks:
        raise UserError(f"data {name} has no task {task!r}: set eval.{evaluator}.task to one of "
                        f"{', '.join(tasks)}.")
    return task, int(tasks[task])


def labelled_rows(split, task: str, limit: int | None = None) -> tuple[list[list[int]], np.ndarray]:
    """The rows of ``split`` whose ``task`` label is not -1 (the first ``limit`` of them), and labels."""
    data = split.with_format(None)[:]  # plain lists (column access per row is slow in datasets)
    ids, labels = data["input_ids"], np.asarray(data[task], dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    if limit is not None:
        keep = keep[:limit]
    return [list(ids[i]) for i in keep], labels[keep]


def pad_rows(rows: list[list[int]], length: int | None = None) -> torch.Tensor:
    """(n, length) long tensor of ``rows`` right-padded with PAD (``length``: the longest row)."""
    length = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r[:length], dtype=torch.long)
    return ids


def reading_attention(kind: str, ids: torch.Tensor) -> Attention:
    """How a backbone reads whole unmasked rows for features: the objective's attention pattern with a
    padding mask; for prefix attention the whole row is the prefix."""
    padding = ids != PAD_ID
    prefix_len = padding.sum(1) if kind == PREFIX else None
    return Attention(kind, padding=None if bool(padding.all()) else padding, prefix_len=prefix_len)


def pool(hidden: torch.Tensor, ids: torch.Tensor, pooling: str, length: int) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, F) features: ``mean`` over real (non-PAD) tokens (F = d), or
    ``concat`` of the token states, zero-padded to ``length`` positions (F = length * d)."""
    real = (ids != PAD_ID).unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
    if pooling == "concat":
        h = hidden * real
        B, T, d = h.shape
        if T < length:
            h = torch.cat([h, h.new_zeros(B, length - T, d)], dim=1)
        return h[:, :length].reshape(B, length * d)
    raise UserError(f"unknown pooling {pooling!r}: choose mean or concat.")


def feature_dim(d_model: int, pooling: str, length: int) -> int:
    return d_model * (length if pooling == "concat" else 1)


def features(model, ids: torch.Tensor, kind: str, pooling: str, length: int) -> torch.Tensor:
    """Pooled features of a batch of padded ids (gradients flow if enabled)."""
    ids = ids.to(model_device(model))
    return pool(model(ids, reading_attention(kind, ids)), ids, pooling, length)


def summarize(prefix: str, accs: list[float], test_labels: np.ndarray) -> dict[str, float]:
    """``acc`` (mean over seeds), ``acc_std`` (sample std, 0 for one seed), ``acc_ci95`` and
    ``chance`` (the majority-class rate on the test labels), keys prefixed ``prefix/``."""
    x = np.asarray(accs, dtype=np.float64)
    chance = float(np.bincount(test_labels).max() / len(test_labels)) if len(test_labels) else 0.0
    return {
        f"{prefix}/acc": float(x.mean()),
        f"{prefix}/acc_std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        f"{prefix}/acc_ci95": t_interval(x),
        f"{prefix}/chance": chance,
    }


def check_nonempty(rows: list, split: str, task: str, evaluator: str) -> None:
    if not rows:
        raise UserError(f"the {split} split has no rows labelled for {task}: give {evaluator} data "
                        "with labelled downstream and test rows.")
