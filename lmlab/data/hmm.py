"""A random hidden Markov model as a pre-training source, with its exact optima.

Liu, Xie, Li, Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language
Models", ICML 2023, arXiv 2210.14199 — the HMM setting. The paper gives no code for it; this is our
variant, scaled down so that a small encoder can approach the optimum on a CPU:

* ``hidden_states`` states, ``vocab_size`` words, every sentence exactly ``length`` words long.
* Parameters drawn once from ``hmm_seed``: the initial distribution and every row of the transition
  matrix from a symmetric Dirichlet(``alpha_transition``), every row of the emission matrix from a
  symmetric Dirichlet(``alpha_emission``). (The paper does not say how its initial distribution is
  drawn; we use the transition prior.)
* Sentences drawn from ``seed``, each split from its own stream, so resizing one split leaves the others
  unchanged.
* Downstream task ``task_z``: the hidden state ``z_k`` that generated word ``k = label_position``,
  1-based (word 1 is the first word after BOS), so the default ``label_position=6`` is the paper's z_6.
  The label is the *sampled* state, so even the Bayes-optimal classifier (``posterior``) errs.

Defaults (conf/data/hmm.yaml): 10 states, 30 words, length 12, alpha_transition 0.1, alpha_emission 0.2:
single-mask optimum ~2.65 nats, Bayes accuracy of z_6 ~0.87 (chance 0.25). Flatter priors (0.3-0.5) push the
optimum to ~3.0-3.2 nats (log 30 = 3.40) and the Bayes accuracy to 0.5-0.7; 0.1/0.1 makes it ~0.93.

Token ids: word ``w`` (0-based) is token ``N_SPECIAL + w``; rows are ``[BOS] x_1 .. x_L [EOS]``.
The exact optima come from forward-backward in float64 with per-step scaling:
``sequence_nll`` (-log P(x_1..x_L); the EOS after a fixed length has probability 1 and adds 0),
``single_mask_conditionals`` (p(x_t | x_-t)) and ``posterior`` (p(z_k | x)).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.source import SPLITS, Sampled, Source
from lmlab.errors import UserError
from lmlab.settings import NonNegative, Positive, PositiveFloat, declared
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL, word_ids


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise UserError(f"data.{name} must be a positive integer, got {value!r}: set data.{name}=1 or more.")
    return int(value)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) or value <= 0:
        raise UserError(f"data.{name} must be a positive number, got {value!r}: set data.{name} above 0.")
    return float(value)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (n, k), all rows at once, by inverting the cumulative sums."""
    cum = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cum[:, -1]
    return np.minimum((u[:, None] >= cum).sum(axis=1), probs.shape[1] - 1)


class HMMSource(Source):
    """Sentences of a random HMM with the hidden state at ``label_position`` as the downstream label."""

    @declared
    class Settings(Sampled):
        hidden_states: Positive = 10
        vocab_size: Positive = 30
        length: Positive = 12
        alpha_transition: PositiveFloat = 0.4
        alpha_emission: PositiveFloat = 0.4
        hmm_seed: NonNegative = 0
        label_position: NonNegative = 6

    def setup(self) -> None:
        s = self.settings
        self.hidden_states = _positive_int("hidden_states", s.hidden_states)
        self.n_words = _positive_int("vocab_size", s.vocab_size)
        self.length = _positive_int("length", s.length)
        self.alpha_transition = _positive_float("alpha_transition", s.alpha_transition)
        self.alpha_emission = _positive_float("alpha_emission", s.alpha_emission)
        for name, value in (("hmm_seed", s.hmm_seed), ("seed", s.seed)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise UserError(f"data.{name} must be a non-negative integer, got {value!r}: set data.{name}=0.")
        self.hmm_seed, self.seed = int(s.hmm_seed), int(s.seed)
        position = s.label_position
        if isinstance(position, bool) or not isinstance(position, Integral) or not 1 <= position <= self.length:
            raise UserError(f"data.label_position must be a word position of the sentence, got "
                            f"{position!r}: set it between 1 and data.length={self.length}.")
        self.label_position = int(position)
        self.sizes = {split: _positive_int(f"{split}_size", size) for split, size in
                      zip(SPLITS, (s.train_size, s.validation_size, s.test_size, s.downstream_size))}
        self.tasks = {"task_z": self.hidden_states}

        rng = np.random.default_rng(self.hmm_seed)
        h = self.hidden_states
        self.initial = rng.dirichlet(np.full(h, self.alpha_transition))  # pi, (H,)
        self.transition = rng.dirichlet(np.full(h, self.alpha_transition), size=h)  # A[z, z'], (H, H)
        self.emission = rng.dirichlet(np.full(self.n_words, self.alpha_emission), size=h)  # B[z, w], (H, V)

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_words

    # ----- sampling -----

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sentences at once: words (n, L) 0-based and hidden states (n, L)."""
        words = np.empty((n, self.length), dtype=np.int64)
        states = np.empty((n, self.length), dtype=np.int64)
        z = _categorical(rng, np.broadcast_to(self.initial, (n, self.hidden_states)))
        for t in range(self.length):
            if t > 0:
                z = _categorical(rng, self.transition[z])
            states[:, t] = z
            words[:, t] = _categorical(rng, self.emission[z])
        return words, states

    def build(self) -> DatasetDict:
        features = Features({"input_ids": Sequence(Value("int32")), "task_z": Value("int64")})
        out = {}
        for index, split in enumerate(SPLITS):
            rng = np.random.default_rng([self.seed, index])
            words, states = self.sample(self.sizes[split], rng)
            n = words.shape[0]
            ids = np.concatenate([np.full((n, 1), BOS_ID), words + N_SPECIAL, np.full((n, 1), EOS_ID)], axis=1)
            out[split] = Dataset.from_dict(
                {"input_ids": ids.tolist(), "task_z": states[:, self.label_position - 1].tolist()},
                features=features)
        return DatasetDict(out)

    # ----- exact inference -----

    def _words(self, rows: list[list[int]]) -> list[np.ndarray]:
        out = []
        for row in rows:
            w = np.asarray(word_ids(list(row)), dtype=np.int64) - N_SPECIAL
            if w.size and w.max() >= self.n_words:
                raise ValueError(f"token id {int(w.max()) + N_SPECIAL} is outside this HMM's vocabulary")
            out.append(w)
        return out

    def _forward_backward(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scaled forward-backward for sentences of one length, words (N, T).

        Returns ``prior`` (N, T, H) = P(z_t | x_<t), ``alpha`` (N, T, H) = P(z_t | x_<=t),
        ``beta`` (N, T, H) = P(x_>t | z_t) / P(x_>t | x_<=t), and ``scale`` (N, T) = P(x_t | x_<t),
        so that log P(x) = sum_t log scale_t and P(z_t | x) = alpha_t * beta_t. Impossible prefixes
        give scale 0 and all-zero ``prior`` and ``alpha`` rows after them. In a sentence of probability 0,
        ``beta`` is P(x_>t | z_t) up to a positive factor per row and position (where x_<=t+1 is impossible it is
        normalised by its own sum over z, zero where x_>t is impossible from every state), so the single-mask
        conditionals at an impossible word's own position, which read x_>t, stay exact.
        """
        n, length = words.shape
        h = self.hidden_states
        prior = np.empty((n, length, h))
        alpha = np.empty((n, length, h))
        beta = np.ones((n, length, h))
        scale = np.empty((n, length))
        emit = self.emission.T[words]  # (N, T, H): B[z, x_t]
        with np.errstate(divide="ignore", invalid="ignore"):
            for t in range(length):
                prior[:, t] = self.initial if t == 0 else alpha[:, t - 1] @ self.transition
                joint = prior[:, t] * emit[:, t]
                scale[:, t] = joint.sum(axis=1)
                alpha[:, t] = np.where(scale[:, t, None] > 0, joint / scale[:, t, None], 0.0)
            for t in range(length - 2, -1, -1):
                back = (emit[:, t + 1] * beta[:, t + 1]) @ self.transition.T
                norm = np.where(scale[:, t + 1] > 0, scale[:, t + 1], back.sum(axis=1))
                beta[:, t] = np.where(norm[:, None] > 0, back / norm[:, None], 0.0)
        return prior, alpha, beta, scale

    def _by_length(self, rows: list[list[int]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Row indices and word arrays grouped by sentence length (batched inference per group)."""
        words = self._words(rows)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(words):
            groups.setdefault(len(w), []).append(i)
        return {n: (np.asarray(idx), np.stack([words[i] for i in idx]) if n else np.empty((len(idx), 0),
                                                                                         dtype=np.int64))
                for n, idx in groups.items()}

    def sequence_nll(self, rows: list[list[int]]) -> np.ndarray:
        """-log P(x_1..x_L) per row, in nats; ``inf`` for rows of another length (probability 0)."""
        out = np.full(len(rows), np.inf)
        for n, (idx, words) in self._by_length(rows).items():
            if n != self.length:
                continue
            scale = self._forward_backward(words)[3]
            with np.errstate(divide="ignore"):
                out[idx] = -np.log(scale).sum(axis=1)
        return out

    def single_mask_conditionals(self, rows: list[list[int]]) -> list[np.ndarray]:
        """Per row an (n_words, vocab_size) array: p(x_t = w | x_-t), zero on special-token columns.

        p(x_t = w | x_-t) is proportional to sum_z P(z_t = z | x_<t) P(x_>t | z_t = z) B[z, w]. Rows of
        another length than ``length`` get the conditionals of the same HMM cut to their length."""
        out: list[np.ndarray | None] = [None] * len(rows)
        for n, (idx, words) in self._by_length(rows).items():
            cond = np.zeros((len(idx), n, self.vocab_size))
            if n:
                prior, _, beta, _ = self._forward_backward(words)
                weight = prior * beta  # (N, T, H), proportional to P(z_t = z | x_-t)
                probs = weight @ self.emission  # (N, T, V)
                total = probs.sum(axis=-1, keepdims=True)
                with np.errstate(divide="ignore", invalid="ignore"):
                    cond[:, :, N_SPECIAL:] = np.where(total > 0, probs / total, 0.0)
            for j, i in enumerate(idx):
                out[i] = cond[j]
        return out  # type: ignore[return-value]

    def posterior(self, rows: list[list[int]], position: int | None = None) -> np.ndarray:
        """(N, hidden_states): p(z_position | x_1..x_L), position 1-based (default ``label_position``).

        The Bayes-optimal predictor of the ``task_z`` label (its argmax gives the Bayes accuracy)."""
        position = self.label_position if position is None else position
        out = np.zeros((len(rows), self.hidden_states))
        for n, (idx, words) in self._by_length(rows).items():
            if not 1 <= position <= n:
                raise ValueError(f"position {position} is outside a sentence of {n} words")
            _, alpha, beta, _ = self._forward_backward(words)
            out[idx] = alpha[:, position - 1] * beta[:, position - 1]
        return out
