"""``eval=finetune``: fine-tune a copy of the backbone with a linear head on the downstream rows and
score it on the test rows (as BERT and GPT evaluate transfer: Devlin et al. 2019, arXiv 1810.04805;
Radford et al. 2018).

For each seed the backbone is deep-copied (the trained model is never modified, nor its mode), read
with the objective's attention pattern and a padding mask, pooled like the probe (``mean`` over real
tokens or ``concat`` of token states), and trained together with a fresh linear head with AdamW for
``epochs`` epochs of shuffled minibatches. Rows whose label is -1 are dropped.

Returns ``finetune/acc`` (mean over seeds), ``finetune/acc_std``, ``finetune/acc_ci95`` (95% t-interval
half-width over seeds; NaN for one seed) and ``finetune/chance`` (majority-class rate on test). With
``ece=true`` also ``finetune/ece``: the expected calibration error (Guo et al. 2017, arXiv
1706.04599; 15 equal-width bins, ``lmlab.stats.expected_calibration_error``) of the test predictions
(confidence: the softmax probability of the predicted class), averaged over seeds; it reads the fine-tuned
model's test logits only, so the other numbers are unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmlab.evaluation.common import DownstreamEvaluator, summarize, tune_and_score
from lmlab.readout import feature_dim, model_device
from lmlab.settings import NonNegativeFloat, Optional, Positive, PositiveFloat


class Finetune(DownstreamEvaluator):
    name = "finetune"

    def __init__(self, task: str | None = None, epochs: Positive = 3, lr: PositiveFloat = 1e-4,
                 batch_size: Positive = 64, seeds: Positive = 1, pooling: str = "mean",
                 max_train: Optional[Positive] = None, max_test: Optional[Positive] = None,
                 weight_decay: NonNegativeFloat = 0.0, ece: bool = False) -> None:
        self.task, self.epochs, self.lr, self.batch_size = task, epochs, lr, batch_size
        self.seeds, self.pooling = seeds, pooling
        self.max_train, self.max_test, self.weight_decay = max_train, max_test, weight_decay
        self.ece = ece

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        runs, test_y = self.per_seed(module, datamodule)
        out = summarize(self.name, [acc for acc, _ in runs], test_y)
        if self.ece:
            out[f"{self.name}/ece"] = float(sum(ece for _, ece in runs) / len(runs))
        return out

    def _run(self, original, kind, train_rows, train_y, test_rows, test_y, n_classes, length,
             seed) -> tuple[float, float]:
        """One fine-tuned copy (``seed``): its test accuracy and expected calibration error."""
        device = model_device(original)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout/init noise without touching global RNG
            torch.manual_seed(seed)
            model = copy.deepcopy(original)
            model.train()
            head = nn.Linear(feature_dim(model.d_model, self.pooling, length), n_classes).to(device)
            params = list(model.parameters()) + list(head.parameters())
            result = tune_and_score(model, head, params, kind, self.pooling, length, train_rows, train_y, test_rows,
                                    test_y, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                    weight_decay=self.weight_decay, seed=seed)
            del model, head
        return result
