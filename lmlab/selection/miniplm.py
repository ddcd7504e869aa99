"""MiniPLM difference sampling.

Gu, Zhou, Meng, Zhou, Huang, "MiniPLM: Knowledge Distillation for Pre-Training Language Models", ICLR 2025,
arXiv 2410.17215. Variant: the released code (``thu-coai/MiniPLM``,
``scripts/miniplm/difference_sampling``), whose score is the length-normalised log-ratio

    r(x) = NLL_ref(x) - NLL_teacher(x) = (1/|x|) sum_t [log p_teacher(x_t|x<t) - log p_ref(x_t|x<t)]

(per-row mean token NLL), keeping the top ``fraction`` by r deterministically (no sampling), kept rows in
corpus order. The paper's README writes log p(x) / log p_ref(x); we follow the code.

Models, scaled down for lmlab:

* TEACHER: ``teacher=<run dir>``, a finished lmlab run trained with ``objective=clm`` on the same
  vocabulary (its model loaded with ``lmlab.run_dir.load_backbone``), or ``teacher=null``: lmlab trains a larger
  transformer (``teacher_d_model``, ``teacher_layers``) on the target set. The paper's teacher is a large
  LM trained on the general corpus; a target-trained teacher makes r point at the target distribution.
* REFERENCE: a small transformer that lmlab trains on a random sample of the pool (``ref_rows``); the paper
  trains it on Pile shards disjoint from the scored data.

Chunked (``Selector.on_shards``): both models are fixed once trained, so the pool (a ``Dataset`` or shards) is
scored chunk by chunk (``lmlab.selection.base.chunk_scores``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selector, chunk_scores
from lmlab.selection.reference import AuxLM, load_reference, need_target, pool_sample, pool_vocab, row_nll
from lmlab.settings import NonNegative, Optional, Positive, PositiveFloat, PositiveFraction


def difference_scores(teacher_nll: np.ndarray, ref_nll: np.ndarray) -> np.ndarray:
    """r = NLL_ref - NLL_teacher (higher: the teacher explains the row better than the small reference)."""
    return np.asarray(ref_nll, dtype=np.float64) - np.asarray(teacher_nll, dtype=np.float64)


class MiniPLM(Selector):
    on_shards = "chunked"

    def __init__(self, fraction: PositiveFraction = 0.25, teacher: str | None = None, teacher_d_model: Positive = 96,
                 teacher_layers: Positive = 3, teacher_steps: NonNegative = 200, ref_rows: Optional[Positive] = 4000,
                 ref_d_model: Positive = 32, ref_layers: Positive = 1, ref_steps: NonNegative = 200,
                 batch_size: Positive = 64, lr: PositiveFloat = 3e-3, seed: NonNegative = 0) -> None:
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise UserError(f"selection.fraction is {fraction!r}; make it a number in (0, 1].")
        super().__init__(fraction=fraction, teacher=None if teacher is None else str(teacher),
                         teacher_d_model=teacher_d_model, teacher_layers=teacher_layers,
                         teacher_steps=teacher_steps, ref_rows=ref_rows, ref_d_model=ref_d_model,
                         ref_layers=ref_layers, ref_steps=ref_steps, batch_size=batch_size, lr=lr, seed=seed)
        if teacher is not None and not Path(str(teacher)).expanduser().is_dir():
            raise UserError(f"the teacher run {teacher} does not exist: set selection.teacher to a finished "
                            "lmlab run directory, or to null to train a teacher on the target.")
        self.fraction = fraction
        self.teacher_lm = AuxLM(d_model=teacher_d_model, n_layers=teacher_layers, steps=teacher_steps,
                                batch_size=batch_size, lr=lr)
        self.ref_lm = AuxLM(d_model=ref_d_model, n_layers=ref_layers, steps=ref_steps, batch_size=batch_size,
                            lr=lr)

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        c = self.config
        seed = int(c["seed"])
        if c["teacher"] is None:
            target_rows = need_target(target, "miniplm with teacher=null")
            vocab = pool_vocab(self.source, pool, target_rows)
            teacher = self.teacher_lm.train(target_rows, vocab, seed + 7)
        else:
            vocab = pool_vocab(self.source, pool)
            teacher = load_reference(c["teacher"], vocab, "teacher")
        ref = self.ref_lm.train(pool_sample(pool, c["ref_rows"], seed), vocab, seed)
        return chunk_scores(pool, lambda rows: difference_scores(row_nll(teacher, rows), row_nll(ref, rows)))
