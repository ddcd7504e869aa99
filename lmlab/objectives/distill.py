"""Knowledge distillation from a teacher run (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", arXiv 1503.02531), the soft-target loss mixed with the hard-label loss.

The teacher is a finished lmlab run directory (``teacher``) whose model alone is built for the student's
attention pattern (``lmlab.run_dir.load_backbone``); it may be another architecture as long as it has the
same tokenizer (same vocabulary size, else a ``UserError``) and can honour that pattern. It is frozen (eval
mode, no gradients) and is not part of the student's parameters or checkpoint. The student's task is
``base`` (an objective config, default next-token ``CLM``): its ``prepare`` gives inputs, targets and the
positions that count, and the teacher reads the same inputs. At those positions, with temperature ``tau``::

    loss = alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE(s, targets)

(the ``tau^2`` keeps the soft-target gradients on the scale of the hard ones, as in the paper). Metrics:
``kd`` (the KL term, before ``alpha * tau^2``) and ``ce``.

Evaluation: ``base.evaluate`` (the student is trained for the base task; e.g. CLM's exact NLL).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.errors import UserError
from lmlab.objectives.base import Objective, Prepared
from lmlab.objectives.clm import CLM
from lmlab.readout import model_device
from lmlab.run_dir import load_backbone, model_args
from lmlab.settings import Fraction, PositiveFloat


def frozen_backbone(run_dir: str | Path | None, vocab_size: int, role: str, key: str,
                    attention: str | None = None):
    """The trained backbone of a finished lmlab run (frozen, eval mode, on the CPU; built for ``attention``,
    default the pattern it was trained with) and the attention kind its objective trained with; refuses a run
    with another vocabulary."""
    if not run_dir:
        raise UserError(f"the {role} run is not set: set objective.{key} to a finished lmlab run directory.")
    args = model_args(run_dir)
    if args["vocab_size"] != vocab_size:
        raise UserError(f"the {role} run {run_dir} has a vocabulary of {args['vocab_size']} tokens but the data "
                        f"has {vocab_size}: use a {role} trained with the same tokenizer.")
    model = load_backbone(run_dir, attention)
    model.eval().requires_grad_(False)
    return model, args["attention"]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 alpha: float, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd, ce)`` for logits (N, V) at the counted positions (see the module docstring)."""
    s, t = student_logits.float(), teacher_logits.float()
    log_p_t = F.log_softmax(t / tau, dim=-1)
    kd = F.kl_div(F.log_softmax(s / tau, dim=-1), log_p_t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s, targets)
    return alpha * tau * tau * kd + (1 - alpha) * ce, kd, ce


class Distill(Objective):
    """Distillation of a teacher run into the model, on the task of ``base``."""

    def __init__(self, teacher: str | None = None, base: Objective | None = None, alpha: Fraction = 0.5,
                 temperature: PositiveFloat = 2.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"objective.alpha={alpha} is not in [0, 1]: set the weight of the soft loss in [0, 1].")
        if temperature <= 0:
            raise UserError(f"objective.temperature={temperature} is not positive: set a temperature > 0.")
        self.teacher_dir, self.base = teacher, base if base is not None else CLM()
        self.alpha, self.tau = alpha, temperature
        self.attention = self.base.attention
        self._teacher: list = []  # a list, so the teacher is never registered as the student's submodule

    def bind(self, source, splits) -> None:
        self.base.bind(source, splits)
        model, _ = frozen_backbone(self.teacher_dir, source.vocab_size, "teacher", "teacher", self.attention)
        self._teacher = [model]

    @property
    def teacher(self):
        if not self._teacher:
            raise UserError("the distillation teacher is not loaded: set objective.teacher to a finished lmlab run.")
        return self._teacher[0]

    def prepare(self, batch: dict) -> Prepared:
        return self.base.prepare(batch)

    def extra_flops_per_token(self, seq_len: int) -> float:
        """The teacher's forward pass: a third of its forward + backward count (2N of 6N)."""
        return self.teacher.flops_per_token(seq_len) / 3

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model(prepared.inputs, prepared.attention)
        student = model.logits(hidden[prepared.loss_mask])
        teacher = self.teacher.to(model_device(model))
        with torch.no_grad():
            t_hidden = teacher(prepared.inputs, prepared.attention)
            t_logits = teacher.logits(t_hidden[prepared.loss_mask])
        loss, kd, ce = distill_loss(student, t_logits, prepared.targets[prepared.loss_mask], self.alpha, self.tau)
        return loss, {"kd": float(kd.detach()), "ce": float(ce.detach())}

    def evaluate(self, model, rows: list[list[int]], source, batch_size: int = 64) -> dict[str, float]:
        return self.base.evaluate(model, rows, source, batch_size)
