"""CoLoR-Filter: conditional loss reduction filtering.

Brandfonbrener, Zhang, Kirsch, Schwarz, Kakade, "CoLoR-Filter: Conditional Loss Reduction Filtering for
Targeted Language Model Pre-training", 2024, arXiv 2406.10670. Variant: the released code
(``color-filter-olmo``: ``scripts/select_index_np.py``, ``olmo/score.py``), scaled down:

* the PRIOR model is a small lmlab transformer (``lmlab.selection.reference.AuxLM``) trained by lmlab on a
  random sample of the candidate pool (``prior_rows``; the paper trains it on a generic corpus such as C4);
* the CONDITIONAL model is the prior fine-tuned on the target set (``finetune_steps``; the paper fine-tunes
  for one epoch on downstream train splits); the target here is the target set the pipeline passes
  (``lmlab.pipeline.selection_target``: the data's ``target`` split, else its validation split);
* score(x) = L_prior(x) - L_cond(x), with L the per-row mean token NLL (the code's ``loss.mean(-1)``);
* keep the top n = N / tau of the N-row pool, taken at once (the code's ``argsort(scores)[-k:]``), kept rows
  in corpus order.

Chunked (``Selector.on_shards``): the two models are fixed once trained, so the pool (a ``Dataset`` or shards)
is scored chunk by chunk (``lmlab.selection.base.chunk_scores``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from annotated_types import Ge
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selector, chunk_scores
from lmlab.selection.reference import AuxLM, Reference, need_target, pool_sample, pool_vocab, row_nll
from lmlab.settings import NonNegative, Optional, Positive, PositiveFloat, declared


def color_scores(prior_nll: np.ndarray, cond_nll: np.ndarray) -> np.ndarray:
    """The conditional loss reduction: prior loss minus conditional loss (higher = more target-like)."""
    return np.asarray(prior_nll, dtype=np.float64) - np.asarray(cond_nll, dtype=np.float64)


class ColorFilter(Selector):
    on_shards = "chunked"
    fraction_fix = "lower selection.tau"  # it keeps 1 / tau of the pool

    @declared
    class Settings(Reference):
        tau: Annotated[float, Ge(1)] = 4.0
        prior_rows: Optional[Positive] = 4000
        prior_steps: NonNegative = 300
        finetune_steps: NonNegative = 150
        finetune_lr: PositiveFloat = 1e-3
        n_heads: Positive = 4

    def setup(self) -> None:
        s = self.settings
        if not isinstance(s.tau, (int, float)) or s.tau < 1:
            raise UserError(f"selection.tau is {s.tau!r}; make it a number >= 1 (keep 1/tau of the pool).")
        self.fraction = 1.0 / s.tau
        self.prior = AuxLM(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, steps=s.prior_steps,
                           batch_size=s.batch_size, lr=s.lr)
        self.finetune = AuxLM(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, steps=s.finetune_steps,
                              batch_size=s.batch_size, lr=s.finetune_lr, warmup=0.1)

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        target_rows = need_target(target, "color_filter")
        vocab = pool_vocab(self.source, pool, target_rows)
        seed = int(self.seed)
        prior = self.prior.train(pool_sample(pool, self.prior_rows, seed), vocab, seed)
        cond = self.finetune.train(target_rows, vocab, seed + 1, init=prior)
        return chunk_scores(pool, lambda rows: color_scores(row_nll(prior, rows), row_nll(cond, rows)))
