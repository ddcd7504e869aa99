"""Probabilistic context-free grammar (PCFG) source, with exact optima and parse-based downstream labels.

After Liu, Xie, Li and Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language
Models", ICML 2023 (arXiv 2210.14199), whose synthetic PCFG data and tasks A/B/C this source reproduces.

Variant implemented here:

* The grammar (rules, rule files, random generation and sampling: ``lmlab/data/grammar.py``) is either
  read from a rule file in the format of the paper's released ``pcfg/rule_deep_mlm.txt`` (``grammar=<path>``),
  or generated from ``grammar_seed`` with the paper's layered shape (``grammar=None``; the shape settings are
  the fields of ``GrammarShape``).
* Sentences of a split are sampled all at once; each split has its own random stream
  ``default_rng([seed, split index])``, so resizing one split leaves the others unchanged.
* Labels (all splits): ``task_a`` = argmax over the start symbol's unary children ``S_i`` of the inside
  probability ``inside(S_i, 0, n)``, not weighted by ``P(S -> S_i)`` (the paper's code uses the inside
  probability, per the project's notes; not checked against that code here);
  ``task_b`` / ``task_c`` = argmax over all nonterminals (``S`` included, in the grammar's order) of
  ``inside(A, 0, 4)`` / ``inside(A, 0, 2)``. Every task is ``-1`` for sentences of 4 words or fewer (the
  paper's tasks use sentences of length > 4, task A included). A label is also ``-1`` if every candidate has inside
  probability zero. Ties go to the first nonterminal. Task B's label is a function of the sentence's first 4
  words and task C's of its first 2 (``task_prefix_words``), so a table from those words to a label solves
  them wherever it has seen the prefix (``eval=probe`` reports that table's accuracy, ``table_acc``).
* Exact optima: ``sequence_nll`` by the inside algorithm; ``single_mask_conditionals`` by
  inside-outside: the sentence probability Z is linear in each per-position emission vector
  e_t[A] = P(A -> x_t), so the outside score of the preterminal slot (A, t, t+1) is dZ/de_t[A], and
  p(x_t = w | x_-t) is proportional to sum_A dZ/de_t[A] P(A -> w). The gradient is the reverse pass of the
  batched inside pass written out by hand (same result as autograd, much less memory). All in float64;
  each position's emission vector is rescaled to max 1 so long sentences do not underflow. Unary
  nonterminal rules (``S -> S_i`` and any other) are handled by the closure ``(I - U)^-1``; terminal
  rules may sit at any level. Empty (epsilon) rules are not supported.
* Gold trees (``gold_spans``, read by ``eval=parse``): sentences are sampled without their derivations, so a
  row's gold tree is its most likely derivation under the grammar (Viterbi CKY, ``Grammar.viterbi_spans``),
  which can differ from the derivation that generated it where the sentence is ambiguous.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.grammar import GrammarShape, parse_grammar
from lmlab.data.source import SPLITS, Sampled, Source
from lmlab.errors import UserError
from lmlab.settings import NonNegative, Optional, declared
from lmlab.threads import one_thread
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL, word_ids

_CHUNK_ELEMENTS = 1e7  # rough budget of chart elements per inside batch
TASKS = ("task_a", "task_b", "task_c")
# the words a task's label is a function of: the first 4 (task B) or 2 (task C) words of the sentence
TASK_PREFIX_WORDS = {"task_b": 4, "task_c": 2}
FEATURES = Features({"input_ids": Sequence(Value("int64")), **{t: Value("int64") for t in TASKS}})


def to_rows(sentences: list[np.ndarray]) -> list[list[int]]:
    """Word-index sentences as token rows ``[BOS] w_1 .. w_n [EOS]``."""
    return [[BOS_ID, *(s + N_SPECIAL).tolist(), EOS_ID] for s in sentences]


class PCFGSource(Source):
    """Sentences of a PCFG (read from a rule file or generated), with exact optima and tasks A/B/C.

    ``vocab_size`` (constructor) is the number of words of a generated grammar; the ``vocab_size``
    property is ``N_SPECIAL`` + the number of words of the grammar in use.
    """

    @declared
    class Settings(Sampled, GrammarShape):
        """``grammar``: a rule file, or ``None`` to generate a grammar of the shape (the fields of
        ``lmlab.data.grammar.GrammarShape``: levels, nonterminals_per_level, vocab_size, ...) from
        ``grammar_seed``; ``seed`` draws the sentences; ``*_size``: sentences per split; ``train_labels``: label
        only the first that many train sentences (the rest get -1; null: all), since only a training objective
        that reads labels (the adversarial one) needs them and parsing a million sentences takes a while."""

        grammar: Optional[str] = None
        grammar_seed: NonNegative = 0
        train_labels: Optional[NonNegative] = None

    def setup(self) -> None:
        s = self.settings
        self.shape = GrammarShape(**{f.name: getattr(s, f.name) for f in fields(GrammarShape)})
        for split in SPLITS:
            size = getattr(s, f"{split}_size")
            if not isinstance(size, int) or size < 0:
                raise UserError(f"data.{split}_size is {size!r}; make it a non-negative integer.")
        self._file_digest = ""
        if s.grammar is not None:
            self.grammar = parse_grammar(s.grammar)
            self._file_digest = hashlib.sha256(Path(s.grammar).expanduser().read_bytes()).hexdigest()[:8]
        else:
            self.grammar = self.shape.generate(s.grammar_seed)
        self._prepare()
        g = self.grammar
        self.tasks = {"task_a": len(g.start_children), "task_b": g.n_nt, "task_c": g.n_nt}

    # ------------------------------------------------------------------ setup

    def _prepare(self) -> None:
        """The dense tensors of the inside algorithm."""
        g = self.grammar
        n_nt, n_w = g.n_nt, g.n_words
        # --- inside: emission matrix, unary closure, binary rules grouped by distinct child pair
        E = np.zeros((n_nt, n_w))
        np.add.at(E, (g.emit[:, 0], g.emit[:, 1]), g.emit_p)
        U = np.zeros((n_nt, n_nt))
        np.add.at(U, (g.unary[:, 0], g.unary[:, 1]), g.unary_p)
        self._has_unary = bool(U.any())
        K = np.eye(n_nt)
        if self._has_unary:
            rho = max(abs(np.linalg.eigvals(U))) if n_nt else 0.0
            if rho >= 1 - 1e-9:
                raise UserError(
                    "The grammar's unary nonterminal rules form a cycle taken with probability 1; "
                    "give the cycle a way out."
                )
            K = np.linalg.inv(np.eye(n_nt) - U)
        pairs, inv = np.unique(g.binary[:, 1:], axis=0, return_inverse=True)
        P = np.zeros((len(pairs), n_nt))
        np.add.at(P, (inv.reshape(-1), g.binary[:, 0]), g.binary_p)
        self._E = E
        self._t_Et = torch.tensor(E.T.copy())  # (n_words, n_nt)
        self._t_K = torch.tensor(K)
        self._t_Kt = torch.tensor(K.T.copy())
        self._t_left = torch.tensor(pairs[:, 0], dtype=torch.long)
        self._t_right = torch.tensor(pairs[:, 1], dtype=torch.long)
        self._t_P = torch.tensor(P)
        self._t_Pt = torch.tensor(P.T.copy())
        self._n_pairs = len(pairs)

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.grammar.n_words

    @property
    def task_prefix_words(self) -> dict[str, int]:
        """Task -> the number of leading words its label is a function of (tasks B and C)."""
        return dict(TASK_PREFIX_WORDS)

    def cache_key(self) -> str:
        key = super().cache_key()
        return f"{key}-{self._file_digest}" if self._file_digest else key

    # ------------------------------------------------------------------ sampling

    def sample(self, n_sentences: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``n_sentences`` sentences as arrays of word indices (0-based, without special tokens)."""
        return self.grammar.sample(n_sentences, rng)

    def labelled_split(self, n_sentences: int, rng: np.random.Generator, n_labelled: int | None = None) -> Dataset:
        """``n_sentences`` sampled sentences as rows ``[BOS] w.. [EOS]`` with their task A/B/C labels (only the
        first ``n_labelled``; the others -1)."""
        sentences = self.sample(n_sentences, rng)
        labels = self.labels(sentences[:n_labelled] if n_labelled is not None else sentences)
        if n_labelled is not None:
            labels = {t: np.concatenate([v, np.full(len(sentences) - len(v), -1, dtype=np.int64)])
                      for t, v in labels.items()}
        return Dataset.from_dict({"input_ids": to_rows(sentences), **{t: v.tolist() for t, v in labels.items()}},
                                 features=FEATURES)

    # ------------------------------------------------------------------ inside

    def _chunks(self, sentences: list[np.ndarray]):
        """Yield (indices, words (b, n)) batches of equal-length sentences, sized to a memory budget."""
        lengths = np.array([len(s) for s in sentences], dtype=np.int64)
        for n in np.unique(lengths):
            idx = np.flatnonzero(lengths == n)
            if n == 0:
                yield idx, np.zeros((len(idx), 0), dtype=np.int64)
                continue
            per = max(1, int(_CHUNK_ELEMENTS // (n * n * max(self._n_pairs, 1))))
            for s in range(0, len(idx), per):
                part = idx[s : s + per]
                yield part, np.stack([sentences[i] for i in part])

    def _batches(self, sentences: list[np.ndarray]):
        """Yield (indices, length n, emissions e, log scales) for the non-empty batches of ``_chunks``
        (``_emissions`` of each); call it under ``torch.no_grad()``."""
        for idx, words in self._chunks(sentences):
            if words.shape[1]:
                yield (idx, words.shape[1], *self._emissions(words))

    def _emissions(self, words: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position emission vectors e_t[A] = P(A -> x_t), rescaled to max 1, and log of the scales."""
        e = self._t_Et[torch.as_tensor(words, dtype=torch.long)]  # (b, n, n_nt)
        m = e.amax(dim=-1, keepdim=True)
        m = torch.where(m > 0, m, torch.ones_like(m))
        return e / m, torch.log(m).sum(dim=(1, 2))

    def _inside(self, e: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The inside chart: chart[l] (b, n-l+1, n_nt) = inside(A, i, i+l) for spans of length l (chart[0]
        is unused), and the same gathered on the left / right child of every distinct binary pair."""
        n = e.shape[1]
        chart: list[torch.Tensor] = [e, self._close(e)]
        lefts = [e, chart[1][..., self._t_left]]
        rights = [e, chart[1][..., self._t_right]]
        for span in range(2, n + 1):
            s = n - span + 1
            acc = lefts[1][:, :s] * rights[span - 1][:, 1 : 1 + s]
            for m in range(2, span):
                acc.addcmul_(lefts[m][:, :s], rights[span - m][:, m : m + s])
            cell = self._close(acc @ self._t_P)
            chart.append(cell)
            if span < n:
                lefts.append(cell[..., self._t_left])
                rights.append(cell[..., self._t_right])
        return chart, lefts, rights

    def _close(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unary closure: inside(A) = sum_B K[A, B] inside_without_unary(B)."""
        return x @ self._t_Kt if self._has_unary else x

    def _outside(self, n: int, lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> torch.Tensor:
        """dZ/de (b, n, n_nt) for Z = inside(S, 0, n): the reverse pass of ``_inside``, written out.

        Z is linear in each e_t, so dZ/de_t[A] is the outside score of the preterminal slot (A, t, t+1)."""
        b = lefts[0].shape[0]
        top = torch.zeros(b, 1, self.grammar.n_nt, dtype=torch.float64)
        top[:, 0, self.grammar.start] = 1.0
        g_left = [None] + [torch.zeros_like(x) for x in lefts[1:]]
        g_right = [None] + [torch.zeros_like(x) for x in rights[1:]]

        def ungather(span: int) -> torch.Tensor:
            g = torch.zeros(*g_left[span].shape[:2], self.grammar.n_nt, dtype=torch.float64)
            g.index_add_(-1, self._t_left, g_left[span])
            g.index_add_(-1, self._t_right, g_right[span])
            return g

        for span in range(n, 1, -1):
            g_cell = top if span == n else ungather(span)
            g_acc = self._unclose(g_cell) @ self._t_Pt
            s = n - span + 1
            for m in range(1, span):
                g_left[m][:, :s].addcmul_(g_acc, rights[span - m][:, m : m + s])
                g_right[span - m][:, m : m + s].addcmul_(g_acc, lefts[m][:, :s])
        return self._unclose(top if n == 1 else ungather(1))

    def _unclose(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self._t_K if self._has_unary else g

    @staticmethod
    def _argmax_or_minus1(values: torch.Tensor) -> np.ndarray:
        best = values.argmax(dim=-1).numpy()
        return np.where(values.amax(dim=-1).numpy() > 0, best, -1)

    def labels(self, sentences: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Tasks A/B/C for word-index sentences (see module docstring)."""
        g = self.grammar
        out = {t: np.full(len(sentences), -1, dtype=np.int64) for t in TASKS}
        children = torch.tensor(g.start_children, dtype=torch.long)
        with torch.no_grad(), one_thread():
            for idx, n, e, _ in self._batches(sentences):
                chart, _, _ = self._inside(e)
                if len(children) and n > 4:
                    out["task_a"][idx] = self._argmax_or_minus1(chart[n][:, 0, children])
                if n > 4:
                    out["task_b"][idx] = self._argmax_or_minus1(chart[4][:, 0])
                    out["task_c"][idx] = self._argmax_or_minus1(chart[2][:, 0])
        return out

    def _rows_to_words(self, rows: list[list[int]]) -> list[np.ndarray]:
        out = []
        for row in rows:
            w = np.asarray(word_ids(list(row)), dtype=np.int64) - N_SPECIAL
            if len(w) and w.max() >= self.grammar.n_words:
                raise ValueError(f"token id {int(w.max()) + N_SPECIAL} is outside the vocabulary ({self.vocab_size})")
            out.append(w)
        return out

    def gold_spans(self, rows: list[list[int]]) -> list[set[tuple[int, int]] | None]:
        """The constituent spans of each row's most likely derivation (``Grammar.viterbi_spans``: word
        positions, BOS and EOS not counted), ``None`` for a row the grammar cannot derive."""
        return [self.grammar.viterbi_spans(w) for w in self._rows_to_words(rows)]

    # ------------------------------------------------------------------ exact optima

    def sequence_nll(self, rows: list[list[int]]) -> np.ndarray:
        sentences = self._rows_to_words(rows)
        nll = np.full(len(sentences), np.inf)
        with torch.no_grad(), one_thread():
            for idx, n, e, log_scale in self._batches(sentences):
                z = self._inside(e)[0][n][:, 0, self.grammar.start]
                with np.errstate(divide="ignore"):
                    nll[idx] = -(np.log(z.numpy()) + log_scale.numpy())
        return nll

    def single_mask_conditionals(self, rows: list[list[int]]) -> list[np.ndarray]:
        sentences = self._rows_to_words(rows)
        out: list[np.ndarray] = [np.zeros((len(s), self.vocab_size)) for s in sentences]
        E = torch.tensor(self._E)
        with torch.no_grad(), one_thread():
            for idx, n, e, _ in self._batches(sentences):
                _, lefts, rights = self._inside(e)
                grad = self._outside(n, lefts, rights)
                scores = grad @ E  # (b, n, n_words): proportional to P(x_t = w, x_-t)
                total = scores.sum(dim=-1, keepdim=True)
                cond = (scores / torch.where(total > 0, total, torch.ones_like(total))).numpy()
                for j, i in enumerate(idx):
                    out[i][:, N_SPECIAL:] = cond[j]
        return out

    # ------------------------------------------------------------------ build

    def build(self) -> DatasetDict:
        seed = int(self.settings.seed)
        return DatasetDict({split: self.labelled_split(getattr(self.settings, f"{split}_size"),
                                                       np.random.default_rng([seed, k]),
                                                       self.train_labels if split == "train" else None)
                            for k, split in enumerate(SPLITS)})
