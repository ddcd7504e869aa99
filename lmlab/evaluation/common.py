"""What the downstream evaluators (probe, finetune) share: the labelled splits of a task, the summary of
accuracies over seeds (mean, standard deviation, t-interval, chance), and the calibration of a head's
predictions (expected calibration error, Guo et al. 2017, arXiv 1706.04599: ``lmlab.stats``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.tasks import labelled_rows, resolve_task
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import features, model_device, pad_rows
from lmlab.stats import expected_calibration_error, sample_std, t_interval


class DownstreamEvaluator(Evaluator):
    """An evaluator that trains on a source's downstream labels (probe, fine-tune)."""

    task: str | None = None

    def skip_reason(self, source, objective=None) -> str | None:
        if not getattr(source, "tasks", None) and self.task is None:
            return f"data {source.name} has no downstream labels"
        if isinstance(self.task, list):  # a list: the tasks of it that the data has, at least one
            present = [t for t in self.task if t in (getattr(source, "tasks", None) or {})]
            resolve_task(source, present[0] if present else self.task[0], self.name)
        else:
            resolve_task(source, self.task, self.name)  # raises on a task the data lacks
        return None

    def per_seed(self, module, datamodule) -> tuple[list, object]:
        """``self._run(model, attention kind, the labelled splits..., seed)`` for each of ``self.seeds`` on the
        trained model (unwrapped from ``torch.compile``), and the test labels."""
        original = getattr(module.model, "_orig_mod", module.model)
        kind = module.objective.attention
        _, train_rows, train_y, test_rows, test_y, n_classes, length = self.labelled_splits(datamodule)
        return [self._run(original, kind, train_rows, train_y, test_rows, test_y, n_classes, length, seed)
                for seed in range(self.seeds)], test_y

    def labelled_splits(self, datamodule, task: str | None = None):
        """``(task, train_rows, train_y, test_rows, test_y, n_classes, length)``: the labelled rows of the
        ``downstream`` split (to train on) and of the ``test`` split (to score) for ``task`` (default
        ``self.task``), the number of classes and the longest row."""
        task, n_classes = resolve_task(datamodule.source, task or self.task, self.name)
        train_rows, train_y = labelled_rows(datamodule.splits["downstream"], task, self.max_train)
        test_rows, test_y = labelled_rows(datamodule.splits["test"], task, self.max_test)
        check_nonempty(train_rows, "downstream", task, self.name)
        check_nonempty(test_rows, "test", task, self.name)
        n_classes = max(n_classes, int(train_y.max()) + 1, int(test_y.max()) + 1)
        length = max(len(r) for r in train_rows + test_rows)
        return task, train_rows, train_y, test_rows, test_y, n_classes, length


def summarize(prefix: str, accs: list[float], test_labels: np.ndarray) -> dict[str, float]:
    """``acc`` (mean over seeds), ``acc_std`` (sample std), ``acc_ci95`` (half-width of the 95% t-interval) and
    ``chance`` (the majority-class rate on the test labels), keys prefixed ``prefix/``. One seed has no spread
    and no interval: ``acc_std`` and ``acc_ci95`` are then NaN (the tables print n/a), never 0."""
    x = np.asarray(accs, dtype=np.float64)
    chance = float(np.bincount(test_labels).max() / len(test_labels)) if len(test_labels) else 0.0
    return {
        f"{prefix}/acc": float(x.mean()),
        f"{prefix}/acc_std": sample_std(x),
        f"{prefix}/acc_ci95": t_interval(x),
        f"{prefix}/chance": chance,
    }


def check_nonempty(rows: list, split: str, task: str, evaluator: str) -> None:
    if not rows:
        raise UserError(f"the {split} split has no rows labelled for {task}: give {evaluator} data "
                        "with labelled downstream and test rows.")


def head_calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """The expected calibration error (``lmlab.stats.expected_calibration_error``, equal-width bins) of a
    classifier's predictions on labelled rows: the prediction is ``logits.argmax(-1)``, its confidence the
    softmax probability of that class, correct where it equals the label."""
    logits = logits.detach().double()
    pred = logits.argmax(-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, pred[:, None]).squeeze(-1)
    correct = (pred == labels.to(pred.device)).double()
    return expected_calibration_error(conf.cpu().numpy(), correct.cpu().numpy(), n_bins)


def tune_and_score(model: nn.Module, head: nn.Module, params: list, kind: str, pooling: str, length: int,
                   train_rows, train_y, test_rows, test_y, *, epochs: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int) -> tuple[float, float]:
    """Train ``params`` (AdamW; the ``head`` on pooled features of ``model``) on the labelled training rows for
    ``epochs`` in ``seed``'s batch order, then score the test rows: ``(accuracy, expected calibration error)``.
    Shared by the evaluators that tune a copy of the backbone (fine-tuning, parameter-efficient tuning)."""
    device = model_device(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    g = torch.Generator().manual_seed(seed)
    y_train = torch.as_tensor(train_y)
    n = len(train_rows)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).tolist()
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                ids = pad_rows([train_rows[j] for j in idx])
                logits = head(features(model, ids, kind, pooling, length))
                loss = F.cross_entropy(logits.float(), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    correct, logits = 0, []
    with torch.no_grad():
        for i in range(0, len(test_rows), 256):
            out = head(features(model, pad_rows(test_rows[i : i + 256]), kind, pooling, length))
            correct += int((out.argmax(-1).cpu() == torch.as_tensor(test_y[i : i + 256])).sum())
            logits.append(out.float().cpu())
    return correct / len(test_rows), head_calibration(torch.cat(logits), torch.as_tensor(test_y))
