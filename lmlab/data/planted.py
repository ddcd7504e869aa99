"""A candidate pool with planted structure, to validate data selection against a known answer.

The validation set-up of the data-selection methods (CoLoR-Filter, Brandfonbrener et al. 2024, arXiv
2406.10670; PreSelect, Shum et al. 2025, arXiv 2503.00808; MiniPLM, Gu et al. 2024, arXiv 2410.17215 all
select a pool towards a target): the ``train`` split is a candidate pool that mixes

* sentences of a TARGET grammar (``origin`` 0),
* sentences of DISTRACTOR grammars: the same generator (``lmlab.data.grammar``) with other grammar seeds and
  the same number of words, so their token ids overlap the target's (``origin`` 1),
* exact duplicates: a few rows of the pool repeated many times (``origin`` 2),
* junk rows: uniformly random tokens, or one token / a two-token pattern repeated (``origin`` 3),

shuffled together. ``validation``, ``test`` and ``downstream`` come from the target grammar only, so
``eval=probe`` measures transfer to the target's tasks and the exact optima (``sequence_nll``,
``single_mask_conditionals``) are the target's. The selection's target set is a fifth split, ``target``
(``target_size`` more target-grammar sentences, labelled like the evaluation splits), drawn from its own
random stream (``lmlab.data.source.TARGET_STREAM``): an independent sample, so selectors are not fitted to
the rows that ``eval=perplexity`` scores (it is not de-duplicated against them: short sentences recur in
any sample of the grammar, pool rows included).
The ``origin`` column on the pool lets the selection stage report its precision (share of origin 0).
Pool rows carry the task columns with ``-1`` (no labels are computed for the pool).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.grammar import GrammarShape
from lmlab.data.pcfg import PCFGSource, to_rows
from lmlab.data.source import SPLITS, TARGET_SPLIT, TARGET_STREAM, Sampled, Source
from lmlab.errors import UserError
from lmlab.settings import Fraction, NonNegative, declared

TARGET, DISTRACTOR, DUPLICATE, JUNK = 0, 1, 2, 3
ORIGINS = {TARGET: "target", DISTRACTOR: "distractor", DUPLICATE: "duplicate", JUNK: "junk"}


class PlantedSource(Source):
    """Target-grammar sentences planted in a pool of distractor-grammar sentences, duplicates and junk."""

    @declared
    class Settings(Sampled, GrammarShape):
        """The grammar shape of target and distractors (the fields of ``lmlab.data.grammar.GrammarShape``);
        ``grammar_seed`` draws the target grammar, each of ``distractor_seeds`` one distractor grammar; the shares
        and sizes: see the module docstring."""

        grammar_seed: NonNegative = 0
        distractor_seeds: tuple[NonNegative, ...] = (1, 2)
        target_share: Fraction = 0.25
        duplicate_share: Fraction = 0.1
        junk_share: Fraction = 0.15
        duplicate_sources: NonNegative = 20
        target_size: NonNegative = 500

    def setup(self) -> None:
        s = self.settings
        grammar_seed, target_size = s.grammar_seed, s.target_size
        distractor_seeds = [int(d) for d in s.distractor_seeds]
        shape = {f.name: getattr(s, f.name) for f in fields(GrammarShape)}
        shares = {"target_share": s.target_share, "duplicate_share": s.duplicate_share, "junk_share": s.junk_share}
        for key, value in shares.items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise UserError(f"data.{key} is {value!r}; make it a number in [0, 1].")
        if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 0:
            raise UserError(f"data.target_size is {target_size!r}; make it a whole number >= 0.")
        if sum(shares.values()) > 1 + 1e-9:
            raise UserError("data.target_share + duplicate_share + junk_share exceed 1; lower one of them.")
        if grammar_seed in distractor_seeds:
            raise UserError(f"data.distractor_seeds holds the target's grammar_seed {grammar_seed}; "
                            "use other seeds for the distractors.")
        if not distractor_seeds and sum(shares.values()) < 1 - 1e-9:
            raise UserError("data.distractor_seeds is empty but the shares leave room for distractors; "
                            "add a distractor seed or make the shares sum to 1.")
        self.target = PCFGSource(**shape, grammar_seed=grammar_seed, seed=s.seed, train_size=0,
                                 validation_size=s.validation_size, test_size=s.test_size,
                                 downstream_size=s.downstream_size)
        self.distractors = [self.target.shape.generate(d) for d in distractor_seeds]  # grammars
        self.tasks = dict(self.target.tasks)

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    # the target grammar's exact optima: every evaluation split is target-only
    def sequence_nll(self, rows):
        return self.target.sequence_nll(rows)

    def single_mask_conditionals(self, rows):
        return self.target.single_mask_conditionals(rows)

    def pool_counts(self, n: int) -> dict[int, int]:
        """How many pool rows of each origin a pool of ``n`` rows holds (distractors take the rest)."""
        s = self.settings
        counts = {TARGET: int(round(s.target_share * n)), DUPLICATE: int(round(s.duplicate_share * n)),
                  JUNK: int(round(s.junk_share * n))}
        counts[DISTRACTOR] = n - sum(counts.values())
        if counts[DISTRACTOR] < 0:  # rounding: take it from the junk
            counts[JUNK] += counts[DISTRACTOR]
            counts[DISTRACTOR] = 0
        return counts

    def pool(self, n: int, rng: np.random.Generator) -> tuple[list[list[int]], np.ndarray]:
        """The candidate pool: rows ``[BOS] w.. [EOS]`` and their origins, shuffled."""
        counts = self.pool_counts(n)
        rows: list[list[int]] = []
        origin: list[int] = []

        def add(sentences, code):
            rows.extend(to_rows(sentences))
            origin.extend([code] * len(sentences))

        add(self.target.sample(counts[TARGET], rng), TARGET)
        if self.distractors:
            per = np.bincount(rng.integers(len(self.distractors), size=counts[DISTRACTOR]),
                              minlength=len(self.distractors))
            for grammar, k in zip(self.distractors, per):
                add(grammar.sample(int(k), rng), DISTRACTOR)
        lengths = [len(r) - 2 for r in rows] or [8]
        n_words = self.target.grammar.n_words
        junk = []
        for _ in range(counts[JUNK]):
            length = int(max(2, rng.choice(lengths)))
            kind = rng.integers(3)
            if kind == 0:  # random tokens
                words = rng.integers(n_words, size=length)
            elif kind == 1:  # one token repeated
                words = np.full(length, rng.integers(n_words))
            else:  # a two-token pattern repeated
                words = np.resize(rng.integers(n_words, size=2), length)
            junk.append(words)
        add(junk, JUNK)
        if counts[DUPLICATE]:
            if not rows:
                raise UserError("data.duplicate_share needs other pool rows to copy: lower it.")
            sources = rng.choice(len(rows), size=min(int(self.settings.duplicate_sources), len(rows)),
                                 replace=False)
            picks = sources[rng.integers(len(sources), size=counts[DUPLICATE])]
            rows.extend(list(rows[i]) for i in picks)
            origin.extend([DUPLICATE] * len(picks))
        order = rng.permutation(len(rows))
        return [rows[i] for i in order], np.asarray(origin, dtype=np.int64)[order]

    def build(self) -> DatasetDict:
        splits = self.target.build()  # validation / test / downstream of the target (train is empty)
        rng = np.random.default_rng([int(self.settings.seed), len(SPLITS)])  # its own stream
        rows, origin = self.pool(int(self.settings.train_size), rng)
        features = Features({"input_ids": Sequence(Value("int64")), **{t: Value("int64") for t in self.tasks},
                             "origin": Value("int64")})
        minus = [-1] * len(rows)
        splits["train"] = Dataset.from_dict(
            {"input_ids": rows, **{t: minus for t in self.tasks}, "origin": origin.tolist()}, features=features)
        splits[TARGET_SPLIT] = self.target_split()
        return DatasetDict({k: splits[k] for k in (*SPLITS, TARGET_SPLIT)})

    def target_split(self) -> Dataset:
        """``target_size`` target-grammar sentences from their own stream, labelled (see module docstring)."""
        rng = np.random.default_rng([int(self.settings.seed), TARGET_STREAM])
        return self.target.labelled_split(int(self.settings.target_size), rng)
