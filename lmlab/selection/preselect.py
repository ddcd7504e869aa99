"""PreSelect: predictive data selection.

Shum, Huang, Zeng, Liu, He, "Predictive Data Selection: The Data That Predicts Is the Data That Teaches",
2025, arXiv 2503.00808. Variant: the released code (``hkust-nlp/PreSelect``: ``data_processing/bpc``,
``data_processing/fasttext``), scaled down:

* A FAMILY of N models with known downstream scores s_1..s_N. Either ``runs=[dir, ...]``: finished lmlab
  runs (``objective=clm``, same vocabulary), each scored by ``metric`` from its ``results.json`` (e.g.
  ``probe/acc``); or ``runs=null``: lmlab trains its own family, a small LM trained on a pool sample
  (``prior_steps``) and then fine-tuned on half of the target set, taken at the steps in ``family_steps``
  (N members of increasing target skill), each scored by its negative mean token NLL on the other half of
  the target set, and cut after the member with the best such score (early stopping: later checkpoints
  overfit the tuning half, and their order by held-out score then reflects memorisation rather than
  target skill; at least two members are kept). (The paper's family is six public LLMs scored on
  benchmarks, of increasing size and training, none of them overfit.)
* Each member's loss on ``score_rows`` pool rows: the total NLL of the row (the paper's ``total_loss``;
  within one row every model sees the same characters, so ranks by total NLL equal ranks by BPC).
* Predictive strength S(d) = (1/Z) sum_{i<j} 1[(s_i > s_j and l_i(d) < l_j(d)) or (s_i < s_j and
  l_i(d) > l_j(d))], Z = N(N-1)/2; ties (in s or in l) are not concordant.
* fastText (``fasttext-numpy2``) trained on positives = rows with S = 1 (or, where fewer than
  ``min_positives`` rows reach 1, the ``min_positives`` highest) and as many lowest-S rows as negatives;
  text = the row's token ids as words (``t5 t17 ...``), labels ``__label__1`` / ``__label__0``,
  ``lr`` and ``wordNgrams`` as in the paper (0.1, 2), ``epoch`` 10 (the paper's 3 underfits a training set
  of a few hundred short rows; see conf/selection/preselect.yaml).
* The pool is scored with P(``__label__1``) and the top rows are kept until their tokens reach ``fraction``
  of the pool's tokens (the code's ``find_threshold``: the threshold is the score of the row at which the
  cumulative length first reaches the target, inclusive).

Chunked (``Selector.on_shards``): the family trains on a pool sample and the target, the strengths are
computed on the ``score_rows`` sample, and the fixed classifier then scores the pool (a ``Dataset`` or shards)
chunk by chunk (``lmlab.selection.base.chunk_scores``), as are the rows' lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.run_dir import RESULTS, read_results
from lmlab.selection.base import Selection, Selector, chunk_scores
from lmlab.selection.reference import (
    AuxLM,
    Reference,
    load_reference,
    need_target,
    pool_sample,
    pool_vocab,
    row_nll,
    rows_of,
)
from lmlab.settings import NonNegative, Optional, Positive, PositiveFloat, PositiveFraction, declared


def predictive_strength(losses: np.ndarray, bench: np.ndarray) -> np.ndarray:
    """S per document from ``losses`` (N_models, N_docs) and ``bench`` (N_models,): the share of model
    pairs whose loss order is the reverse of their benchmark order (lower loss for the better model)."""
    losses, bench = np.asarray(losses, dtype=np.float64), np.asarray(bench, dtype=np.float64)
    n = len(bench)
    if n < 2:
        raise UserError("PreSelect needs a family of at least two models: add runs or family_steps.")
    i, j = np.triu_indices(n, k=1)
    ds = np.sign(bench[i] - bench[j])[:, None]  # (pairs, 1)
    dl = np.sign(losses[i] - losses[j])  # (pairs, docs)
    return ((ds * dl) < 0).sum(0) / len(i)


def token_budget_keep(scores: np.ndarray, lengths: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (corpus order) of the highest-scoring rows, fewest first, whose lengths reach ``fraction`` of
    the total length (ties in score: earlier rows first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    cum = np.cumsum(np.asarray(lengths, dtype=np.float64)[order])
    target = fraction * cum[-1] if len(cum) else 0.0
    n = int(np.searchsorted(cum, target - 1e-9, side="left")) + 1
    return np.sort(order[: min(n, len(order))])


def as_words(row) -> str:
    return " ".join(f"t{int(t)}" for t in row)


def train_classifier(texts: list[str], labels: list[int], workdir: Path, epoch: int, lr: float,
                     word_ngrams: int, seed: int):
    try:
        import fasttext
    except ImportError:
        raise UserError("selection=preselect needs fastText: pip install fasttext-numpy2.") from None
    path = Path(workdir) / "fasttext_train.txt"
    path.write_text("".join(f"__label__{y} {t}\n" for t, y in zip(texts, labels)))
    return fasttext.train_supervised(str(path), epoch=epoch, lr=lr, wordNgrams=word_ngrams, thread=1,
                                     seed=seed, verbose=0)


def positive_probability(model, texts: list[str]) -> np.ndarray:
    labels, probs = model.predict(texts, k=2)
    out = np.zeros(len(texts))
    for n, (ls, ps) in enumerate(zip(labels, probs)):
        for label, p in zip(ls, ps):
            if label == "__label__1":
                out[n] = p
    return out


class PreSelect(Selector):
    on_shards = "chunked"

    @declared
    class Settings(Reference):
        fraction: PositiveFraction = 0.25
        runs: Optional[list[str]] = None
        metric: str = "probe/acc"
        score_rows: Positive = 6000
        min_positives: Positive = 200
        prior_rows: Optional[Positive] = 4000
        prior_steps: NonNegative = 200
        family_steps: list[NonNegative] = (0, 5, 10, 20, 40, 80, 160)
        finetune_lr: PositiveFloat = 1e-3
        epoch: Positive = 10
        classifier_lr: PositiveFloat = 0.1
        word_ngrams: Positive = 2

    def setup(self) -> None:
        s = self.settings
        if not isinstance(s.fraction, (int, float)) or not 0 < s.fraction <= 1:
            raise UserError(f"selection.fraction is {s.fraction!r}; make it a number in (0, 1].")
        self.runs = None if s.runs is None else [str(r) for r in s.runs]
        self.family_steps = sorted({int(step) for step in s.family_steps})
        for run in self.runs or []:
            if not (Path(run).expanduser() / RESULTS).exists():
                raise UserError(f"the PreSelect family run {run} does not exist or is not finished (no "
                                f"{RESULTS}): list finished lmlab run directories in selection.runs.")
        self.prior = AuxLM(d_model=s.d_model, n_layers=s.n_layers, steps=s.prior_steps, batch_size=s.batch_size,
                           lr=s.lr)
        self.tune = AuxLM(d_model=s.d_model, n_layers=s.n_layers, batch_size=s.batch_size, lr=s.finetune_lr,
                          warmup=0.0)

    def family(self, pool, target: Dataset | None, vocab: int) -> tuple[list, np.ndarray, dict]:
        """The models, their downstream scores (see module docstring) and what to report about them."""
        if self.runs is not None:
            models, bench = [], []
            for run in self.runs:
                metrics = read_results(Path(run).expanduser()).get("metrics", {})
                if self.metric not in metrics:
                    raise UserError(f"the PreSelect family run {run} has no metric {self.metric!r}: set "
                                    "selection.metric to a metric all runs report.")
                models.append(load_reference(run, vocab, "PreSelect family"))
                bench.append(float(metrics[self.metric]))
            return models, np.asarray(bench), {}
        target_rows = need_target(target, "preselect with runs=null")
        if len(target_rows) < 2:
            raise UserError("selection preselect needs at least two target rows: enlarge the target split.")
        perm = np.random.default_rng(self.seed).permutation(len(target_rows))
        half = len(perm) // 2
        tune_rows = [target_rows[i] for i in perm[:half]]
        held = [target_rows[i] for i in perm[half:]]
        seed = int(self.seed)
        prior = self.prior.train(pool_sample(pool, self.prior_rows, seed), vocab, seed)
        steps = self.family_steps
        models = self.tune.train(tune_rows, vocab, seed + 1, init=prior, steps=max(steps),
                                 checkpoints=tuple(steps)) if max(steps) > 0 else [prior]
        bench = np.asarray([-row_nll(m, held).mean() for m in models])
        keep = max(int(np.argmax(bench)), 1) + 1  # early stopping: members up to the best held-out score
        return models[:keep], bench[:keep], {"family_members": keep, "family_best_step": steps[keep - 1]}

    def score(self, pool: Dataset, target: Dataset | None, workdir: Path) -> np.ndarray:
        return self.scored(pool, target, workdir)[0]

    def scored(self, pool: Dataset, target: Dataset | None, workdir: Path) -> tuple[np.ndarray, dict]:
        """The classifier's score of every pool row, and the report (family, positives, mean strength)."""
        c = self.settings
        vocab = pool_vocab(self.source, pool, rows_of(target) if target is not None else [])
        models, bench, report = self.family(pool, target, vocab)
        sample = np.sort(np.random.default_rng([c.seed, 1]).permutation(len(pool))[: c.score_rows])
        docs = [list(r) for r in pool.with_format(None)[sample.tolist()]["input_ids"]]
        losses = np.stack([row_nll(m, docs, reduce="sum") for m in models])
        strength = predictive_strength(losses, bench)
        order = np.argsort(-strength, kind="stable")
        n_pos = max(int((strength >= 1.0).sum()), min(int(c.min_positives), len(docs) // 2))
        pos, neg = order[:n_pos], order[::-1][:n_pos]
        if n_pos == 0 or strength.max() <= strength.min():
            raise UserError("PreSelect found no rows whose losses predict the family's scores better than "
                            "others: use a more varied family (runs or family_steps) or more score_rows.")
        texts = [as_words(docs[i]) for i in np.concatenate([pos, neg])]
        labels = [1] * len(pos) + [0] * len(neg)
        classifier = train_classifier(texts, labels, workdir, int(c.epoch), float(c.classifier_lr),
                                      int(c.word_ngrams), int(c.seed))
        report = {**report, "family_scores": bench.tolist(), "positives": int(len(pos)),
                  "strength_mean": float(strength.mean())}
        return chunk_scores(pool, lambda rows: positive_probability(classifier, [as_words(r) for r in rows])), report

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        scores, report = self.scored(pool, target, workdir)
        lengths = chunk_scores(pool, lambda rows: [len(r) for r in rows])
        keep = token_budget_keep(scores, lengths, self.fraction)
        if len(keep) == 0:
            raise UserError(f"selection preselect keeps no rows of the {len(pool)}-row pool: raise "
                            "selection.fraction.")
        return Selection(pool.select(keep), scores, report)
