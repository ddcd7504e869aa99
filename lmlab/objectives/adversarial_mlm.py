"""Adversarial MLM: masked language modelling that *hurts* a downstream task at (nearly) the same loss.

Liu, Xie, Li, Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models",
ICML 2023, arXiv 2210.14199, Section 4.3 ("the adversarial algorithm"): minimise the MLM loss minus
lambda times the loss of a downstream head fitted online on a labelled held-out split, so the encoder
reaches the pre-training optimum while its features become worse for the task. The paper gives the
objective; this is our variant of its implementation (its public code does not include it):

* The head is a linear classifier on the pooled final hidden states (``pooling`` mean or concat, as in
  ``eval=probe``; use the probe's pooling) of *unmasked* rows read with bidirectional attention. Its
  parameters live in this objective (an ``nn.Module``), so the LightningModule trains them with the same
  optimiser and checkpoints them with the model. The head is created in ``bind``, when the task's number
  of classes (and, for concat, the longest row) is known.
* Labelled rows come from the ``train`` split (``bind(source, splits)``: its rows carry the task labels
  for PCFG and HMM), which is disjoint from the probe's ``downstream`` (fit) and ``test`` (score) rows.
  Each step draws ``head_batch_size`` of them with ``numpy.random.default_rng([batch seed, 1])``, so a
  resumed run draws the same rows again.
* Two-player update from one backward pass, without a gradient-reversal layer: with features ``f`` and
  head loss ``h(W, f) = CE(head_W(f), y)``,

      total = MLM - lam * h(W.detach(), f)  +  (h(W, f.detach()) - h(W, f.detach()).detach())

  so d total / d encoder = d MLM / d encoder - lam * d h / d encoder (the encoder *maximises* the head's
  loss), and d total / d W = + d h / d W (the head minimises it); the value of ``total`` is exactly
  ``MLM - lam * h``. ``lam`` scales only the encoder's adversarial term; the head learns at the optimiser's
  rate.
* ``bound`` (our addition, off by default): the encoder's term becomes ``min(h, log C)`` (C classes), so
  the encoder stops pushing once the head is no better than chance (``log C`` is the loss of a uniform
  prediction); unbounded, ``-lam * h`` has no floor and a large ``lam`` drives the MLM loss away from
  the matched level. The head's own update is unchanged.
* ``evaluate`` is MLM's single-mask evaluation (inherited), so the gap to the optimum is measured on the
  plain MLM loss. Logged metrics: ``mlm_loss``, ``head_loss``, ``head_acc`` (on the head batch).
* ``held_out``: after training, the head's accuracy and loss on the ``test`` split's labelled rows (the
  first ``HELD_OUT_ROWS``, those no longer than the longest training row, which the head's input fits): how
  well the adversary itself reads the task from the features it shaped, recorded as ``objective/head_acc``
  and ``objective/head_loss`` beside the probes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.attention import BIDIRECTIONAL
from lmlab.data.tasks import labelled_rows, resolve_task
from lmlab.errors import UserError
from lmlab.objectives.base import Objective, Prepared
from lmlab.objectives.mlm import MLM
from lmlab.readout import features, pad_rows
from lmlab.settings import Fraction, NonNegativeFloat, Optional, Positive

HELD_OUT_ROWS = 10_000  # the test rows ``held_out`` scores the head on (the probe's ``max_test`` default)


class AdversarialMLM(MLM, nn.Module):
    """MLM minus ``lam`` times the online downstream head's loss (see the module docstring).

    Args: ``lam`` (the adversarial weight), ``bound`` (cap the encoder's term at chance, ``log C``),
    ``task`` (label column; null = the source's first task),
    ``head_batch_size`` (labelled rows per step), ``pooling`` (mean | concat), ``d_model`` (the
    backbone's width, passed by the pipeline as models receive ``vocab_size``), and MLM's masking arguments.
    """

    def __init__(self, d_model: Optional[Positive] = None, lam: NonNegativeFloat = 1.0, task: str | None = None,
                 head_batch_size: Positive = 64,
                 pooling: str = "mean", mask_prob: Fraction = 0.15, mask_token_frac: Fraction = 0.8,
                 random_token_frac: Fraction = 0.1, vocab_size: int | None = None, bound: bool = False) -> None:
        nn.Module.__init__(self)
        MLM.__init__(self, mask_prob=mask_prob, mask_token_frac=mask_token_frac,
                     random_token_frac=random_token_frac, vocab_size=vocab_size)
        if d_model is None:
            raise UserError("adversarial_mlm needs the model's width: the pipeline passes it as objective.d_model; "
                            "set it when building the objective by hand.")
        if pooling not in ("mean", "concat"):
            raise UserError(f"unknown objective.pooling {pooling!r}: choose mean or concat.")
        if int(head_batch_size) < 1:
            raise UserError(f"objective.head_batch_size must be at least 1, got {head_batch_size}: raise it.")
        self.d_model, self.lam, self.task, self.bound = int(d_model), float(lam), task, bool(bound)
        self.head_batch_size, self.pooling = int(head_batch_size), pooling
        self.head: nn.Linear | None = None
        self.length = 0
        self._ids: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None  # the test split's labelled rows
        self._seed = 0  # the seed of the last prepared batch (``prepare`` then ``loss``, as the module calls them)

    def bind(self, source, splits) -> None:
        super().bind(source, splits)
        task, n_classes = resolve_task(source, self.task, "objective adversarial_mlm")
        rows, labels = labelled_rows(splits["train"], task)
        if not rows:
            raise UserError(f"the train split has no rows labelled for {task}: use data with labelled "
                            "training rows for objective=adversarial_mlm.")
        n_classes = max(n_classes, int(labels.max()) + 1)
        self.task, self.length = task, max(len(r) for r in rows)
        self._ids, self._labels = pad_rows(rows, self.length), torch.as_tensor(labels)
        self._test = None
        if "test" in splits:  # the rows the head's input fits (the longest training row's length)
            test_rows, test_labels = labelled_rows(splits["test"], task, HELD_OUT_ROWS)
            fits = [i for i, r in enumerate(test_rows) if len(r) <= self.length]
            if fits:
                self._test = (pad_rows([test_rows[i] for i in fits], self.length), torch.as_tensor(test_labels[fits]))
        dim = self.d_model * (self.length if self.pooling == "concat" else 1)
        if self.head is None or self.head.in_features != dim or self.head.out_features != n_classes:
            g = torch.Generator().manual_seed(0)
            self.head = nn.Linear(dim, n_classes)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(n_classes, dim, generator=g) / math.sqrt(dim))
                self.head.bias.zero_()

    def head_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled rows (padded ids, labels) of the head for the batch with ``seed``."""
        if self._ids is None:
            raise RuntimeError("AdversarialMLM.bind(source, splits) must be called before training")
        rng = np.random.default_rng([int(seed), 1])
        n = len(self._ids)
        idx = torch.as_tensor(rng.choice(n, size=min(self.head_batch_size, n), replace=False))
        return self._ids[idx], self._labels[idx]

    def head_losses(self, model, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder's term h(W.detach(), f), head's term h(W, f.detach()), accuracy) on the head batch."""
        ids, y = self.head_batch(seed)
        head = self.head
        device = head.weight.device
        f = features(model, ids.to(device), BIDIRECTIONAL, self.pooling, self.length).float()
        y = y.to(device)
        enc = F.cross_entropy(F.linear(f, head.weight.detach(), head.bias.detach()), y)
        logits = head(f.detach())
        own = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return enc, own, acc

    @torch.no_grad()
    def held_out(self, model, batch_size: int = 512) -> dict[str, float]:
        """The head's accuracy and mean cross-entropy on the test split's labelled rows (none without them)."""
        if self._test is None or self.head is None:
            return {}
        ids, labels = self._test
        was_training = model.training
        model.eval()
        correct, nll = 0, 0.0
        for start in range(0, len(ids), batch_size):
            y = labels[start:start + batch_size].to(self.head.weight.device)
            f = features(model, ids[start:start + batch_size], BIDIRECTIONAL, self.pooling, self.length).float()
            logits = self.head(f)
            correct += int((logits.argmax(-1) == y).sum())
            nll += float(F.cross_entropy(logits, y, reduction="sum"))
        model.train(was_training)
        return {"head_acc": correct / len(ids), "head_loss": nll / len(ids)}

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        mlm, _ = Objective.loss(self, model, prepared)
        enc, own, acc = self.head_losses(model, self._seed)
        if self.bound:  # no gradient to the encoder once the head is at chance or worse
            enc = enc.clamp(max=math.log(self.head.out_features))
        total = mlm - self.lam * enc + (own - own.detach())
        return total, {"mlm_loss": float(mlm.detach()), "head_loss": float(own.detach()),
                       "head_acc": float(acc)}

    def prepare(self, batch: dict) -> Prepared:
        # the head's rows are drawn from the same batch seed as the masks (remembered for ``loss``)
        self._seed = int(batch.get("seed", 0))
        return super().prepare(batch)
