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
from lmlab.selection.reference import AuxLM, Trained, load_reference, need_target, pool_sample, pool_vocab, row_nll
from lmlab.settings import NonNegative, Optional, Positive, PositiveFraction, declared


def difference_scores(teacher_nll: np.ndarray, ref_nll: np.ndarray) -> np.ndarray:
    """r = NLL_ref - NLL_teacher (higher: the teacher explains the row better than the small reference)."""
    return np.asarray(ref_nll, dtype=np.float64) - np.asarray(teacher_nll, dtype=np.float64)


class MiniPLM(Selector):
    on_shards = "chunked"

    @declared
    class Settings(Trained):
        fraction: PositiveFraction = 0.25
        teacher: Optional[str] = None
        teacher_d_model: Positive = 96
        teacher_layers: Positive = 3
        teacher_steps: NonNegative = 200
        ref_rows: Optional[Positive] = 4000
        ref_d_model: Positive = 32
        ref_layers: Positive = 1
        ref_steps: NonNegative = 200

    def setup(self) -> None:
        s = self.settings
        if not isinstance(s.fraction, (int, float)) or not 0 < s.fraction <= 1:
            raise UserError(f"selection.fraction is {s.fraction!r}; make it a number in (0, 1].")
        self.teacher = None if s.teacher is None else str(s.teacher)
        if self.teacher is not None and not Path(self.teacher).expanduser().is_dir():
            raise UserError(f"the teacher run {self.teacher} does not exist: set selection.teacher to a finished "
                            "lmlab run directory, or to null to train a teacher on the target.")
        self.teacher_lm = AuxLM(d_model=s.teacher_d_model, n_layers=s.teacher_layers, steps=s.teacher_steps,
                                batch_size=s.batch_size, lr=s.lr)
        self.ref_lm = AuxLM(d_model=s.ref_d_model, n_layers=s.ref_layers, steps=s.ref_steps, batch_size=s.batch_size,
                            lr=s.lr)

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        seed = int(self.seed)
        if self.teacher is None:
            target_rows = need_target(target, "miniplm with teacher=null")
            vocab = pool_vocab(self.source, pool, target_rows)
            teacher = self.teacher_lm.train(target_rows, vocab, seed + 7)
        else:
            vocab = pool_vocab(self.source, pool)
            teacher = load_reference(self.teacher, vocab, "teacher")
        ref = self.ref_lm.train(pool_sample(pool, self.ref_rows, seed), vocab, seed)
        return chunk_scores(pool, lambda rows: difference_scores(row_nll(teacher, rows), row_nll(ref, rows)))
