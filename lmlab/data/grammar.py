"""A probabilistic context-free grammar: its rules, reading a rule file, generating one at random, sampling.

The grammars of Liu, Xie, Li and Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for
Language Models", ICML 2023 (arXiv 2210.14199). Used by the PCFG source (``lmlab/data/pcfg.py``, which adds
the exact optima and the downstream labels) and the planted pool (``lmlab/data/planted.py``).

* ``Grammar``: the rules in index form (nonterminals ``0..n_nt-1``, words ``0..n_words-1``): binary rules
  ``A -> B C``, unary rules ``A -> B`` and terminal rules ``A -> w``, each with its probability.
* ``parse_grammar(path)``: a rule file in the format of the paper's released ``pcfg/rule_deep_mlm.txt``
  (``LHS RHS prob`` or ``LHS B C prob`` per line, ``#`` comments). Duplicate rules sum; a nonterminal whose
  probabilities sum to 1 within 1e-3 is renormalised (one printed notice lists those off by more than 1e-6);
  word ids follow the sorted word strings; the start symbol is ``S``.
* ``GrammarShape(...).generate(seed)``: a random grammar of the paper's layered shape: ``S -> S_1 .. S_k``
  (unary, Dirichlet probabilities), each ``S_i`` has one fixed binary rule over level-1 nonterminals (distinct
  pairs, so task A is well posed), levels ``1 .. L-1`` have ``rules_per_nonterminal`` binary rules into pairs
  of next-level nonterminals plus one terminal rule, the last level emits ``words_per_preterminal`` words;
  every nonterminal's rule probabilities are Dirichlet(``alpha``).
* ``Grammar.sample(n, rng)``: ``n`` sentences sampled top-down, breadth-first, all at once (numpy), as arrays
  of word indices.
* ``Grammar.viterbi_spans(words)``: the constituent spans of a sentence's most likely derivation (Viterbi
  CKY, max-product over the rules, unary chains closed per cell): the gold trees of ``eval=parse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from lmlab.errors import UserError

SUM_TOLERANCE = 1e-3  # a nonterminal's rule probabilities must sum to 1 within this
_RENORM_NOTICE_EPS = 1e-6  # sums off by more than float noise but within tolerance are reported
_MAX_EXPANSION_STEPS = 10_000
_MAX_FRONTIER = 50_000_000


@dataclass
class Grammar:
    """A PCFG in index form. Symbols: nonterminals ``0..n_nt-1`` (``start`` is S), words ``0..n_words-1``."""

    nonterminals: list[str]
    words: list[str]
    start: int
    binary: np.ndarray  # (r, 3) int: lhs, left, right
    binary_p: np.ndarray  # (r,)
    unary: np.ndarray  # (u, 2) int: lhs, child
    unary_p: np.ndarray
    emit: np.ndarray  # (e, 2) int: lhs, word
    emit_p: np.ndarray
    start_children: list[int] = field(default_factory=list)

    @classmethod
    def from_rules(cls, nonterminals: list[str], words: list[str], start: int, rules: RuleLists,
                   start_children: list[int], totals: np.ndarray | None = None) -> Grammar:
        """The grammar of collected rules (duplicates summed; divided by ``totals`` per lhs when given)."""
        tables = []
        for keys, probs, width in ((rules.bin_k, rules.bin_p, 3), (rules.un_k, rules.un_p, 2),
                                   (rules.em_k, rules.em_p, 2)):
            arr, p = _merge(keys, probs, width)
            if totals is not None and len(arr):
                p = p / totals[arr[:, 0]]
            tables += [arr, p]
        return cls(nonterminals, words, start, *tables, start_children)

    @property
    def n_nt(self) -> int:
        return len(self.nonterminals)

    @property
    def n_words(self) -> int:
        return len(self.words)

    @cached_property
    def _sampling_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All rules sorted by lhs (symbol codes: nonterminal a, word n_nt + w): the cumulative probabilities
        offset by the lhs (``a + cdf``), the end of each lhs's rules, first/second child, arity."""
        n_nt = self.n_nt
        lhs = np.concatenate([self.binary[:, 0], self.unary[:, 0], self.emit[:, 0]])
        r1 = np.concatenate([self.binary[:, 1], self.unary[:, 1], n_nt + self.emit[:, 1]])
        r2 = np.concatenate([self.binary[:, 2], np.full(len(self.unary) + len(self.emit), -1)])
        p = np.concatenate([self.binary_p, self.unary_p, self.emit_p])
        keep = p > 0
        lhs, r1, r2, p = lhs[keep], r1[keep], r2[keep], p[keep]
        order = np.lexsort((np.arange(len(lhs)), lhs))
        lhs, r1, r2, p = lhs[order], r1[order], r2[order], p[order]
        counts = np.bincount(lhs, minlength=n_nt)
        ends = np.cumsum(counts)
        starts = ends - counts
        cum = np.empty(len(p))
        for a in range(n_nt):
            s, e = starts[a], ends[a]
            c = np.cumsum(p[s:e])
            c = c / c[-1]
            c[-1] = 1.0
            cum[s:e] = a + c
        return cum, ends, r1, r2, np.where(r2 >= 0, 2, 1)

    def sample(self, n_sentences: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``n_sentences`` sentences as arrays of word indices (0-based, without special tokens)."""
        if n_sentences == 0:
            return []
        cum, ends, first, second, arity = self._sampling_table
        n_nt = self.n_nt
        sym = np.full(n_sentences, self.start, dtype=np.int64)
        sid = np.arange(n_sentences)
        for _ in range(_MAX_EXPANSION_STEPS):
            is_nt = sym < n_nt
            if not is_nt.any():
                break
            a = sym[is_nt]
            u = rng.random(len(a))
            r = np.searchsorted(cum, a + u, side="right")
            r = np.minimum(r, ends[a] - 1)  # guards against a + u rounding up to a + 1
            out_len = np.ones(len(sym), dtype=np.int64)
            out_len[is_nt] = arity[r]
            pos = np.cumsum(out_len) - out_len
            new = np.empty(int(pos[-1] + out_len[-1]), dtype=np.int64)
            if len(new) > _MAX_FRONTIER:
                raise UserError("The grammar generates unboundedly long sentences; make its recursion subcritical.")
            new[pos[~is_nt]] = sym[~is_nt]
            at = pos[is_nt]
            new[at] = first[r]
            two = arity[r] == 2
            new[at[two] + 1] = second[r[two]]
            sid = np.repeat(sid, out_len)
            sym = new
        else:
            raise UserError("The grammar's derivations do not terminate; give every recursion a way out.")
        lengths = np.bincount(sid, minlength=n_sentences)
        return np.split(sym - n_nt, np.cumsum(lengths)[:-1])

    @cached_property
    def _viterbi_table(self) -> tuple[np.ndarray, ...]:
        """Log probabilities of the binary and unary rules, and 0 / -inf masks (n_nt, rules) selecting each
        nonterminal's rules."""
        with np.errstate(divide="ignore"):
            bin_lp, un_lp, emit_lp = np.log(self.binary_p), np.log(self.unary_p), np.log(self.emit_p)
        rows = np.arange(self.n_nt)[:, None]
        bin_mask = np.where(self.binary[:, 0][None, :] == rows, 0.0, -np.inf)
        un_mask = np.where(self.unary[:, 0][None, :] == rows, 0.0, -np.inf)
        return bin_lp, un_lp, emit_lp, bin_mask, un_mask

    def viterbi_spans(self, words) -> set[tuple[int, int]] | None:
        """The spans ``(i, j)`` (words ``i .. j-1``, 0-based) of every constituent of two or more words of the
        most likely derivation of ``words`` (word indices) from the start symbol, the whole sentence included;
        ``None`` if the grammar cannot derive it. Ties go to the rule listed first, then the leftmost split."""
        words = [int(w) for w in words]
        n = len(words)
        if n == 0:
            return None
        bin_lp, un_lp, emit_lp, bin_mask, un_mask = self._viterbi_table
        left, right = self.binary[:, 1], self.binary[:, 2]
        best = np.full((n + 1, n + 1, self.n_nt), -np.inf)
        split = np.full((n + 1, n + 1, self.n_nt), -1, dtype=np.int64)  # binary: split point; -1 unary or word
        child = np.full((n + 1, n + 1, self.n_nt), -1, dtype=np.int64)  # unary: the child; binary: the rule
        for i, w in enumerate(words):
            at = self.emit[:, 1] == w
            np.maximum.at(best[i, i + 1], self.emit[at, 0], emit_lp[at])
            self._close_unary(best, child, split, i, i + 1, un_lp, un_mask)
        for span in range(2, n + 1):
            for i in range(n - span + 1):
                j = i + span
                scores = bin_lp + best[i, i + 1 : j][:, left] + best[i + 1 : j, j][:, right]  # (splits, rules)
                at_split = scores.argmax(0)
                per_rule = scores[at_split, np.arange(len(bin_lp))]
                cand = per_rule[None, :] + bin_mask  # (n_nt, rules)
                rule = cand.argmax(1)
                best[i, j] = cand[np.arange(self.n_nt), rule]
                child[i, j] = rule
                split[i, j] = i + 1 + at_split[rule]
                self._close_unary(best, child, split, i, j, un_lp, un_mask)
        if not np.isfinite(best[0, n, self.start]):
            return None
        spans: set[tuple[int, int]] = set()
        stack = [(0, n, self.start)]
        while stack:
            i, j, a = stack.pop()
            if j - i == 1 and split[i, j, a] < 0 and child[i, j, a] < 0:
                continue  # a word
            if split[i, j, a] < 0:  # a unary rule: same span
                stack.append((i, j, int(child[i, j, a])))
                continue
            k, r = int(split[i, j, a]), int(child[i, j, a])
            spans.add((i, j))
            stack += [(i, k, int(left[r])), (k, j, int(right[r]))]
        return spans

    def _close_unary(self, best, child, split, i: int, j: int, un_lp, un_mask) -> None:
        """Max-product closure of cell (i, j) under the unary rules: each nonterminal takes its best chain
        ``A -> B -> ..`` when that beats its own best; a chain never repeats a nonterminal, so at most
        ``n_nt`` rounds."""
        if not len(un_lp):
            return
        cell = best[i, j]
        for _ in range(self.n_nt):
            cand = un_lp[None, :] + cell[self.unary[:, 1]][None, :] + un_mask  # (n_nt, unary rules)
            rule = cand.argmax(1)
            value = cand[np.arange(self.n_nt), rule]
            better = value > cell
            if not better.any():
                return
            cell[better] = value[better]
            child[i, j, better] = self.unary[rule[better], 1]
            split[i, j, better] = -1


@dataclass
class RuleLists:
    """Rules as they are collected: (lhs, children) / (lhs, word) keys and their probabilities."""

    bin_k: list[tuple] = field(default_factory=list)
    bin_p: list[float] = field(default_factory=list)
    un_k: list[tuple] = field(default_factory=list)
    un_p: list[float] = field(default_factory=list)
    em_k: list[tuple] = field(default_factory=list)
    em_p: list[float] = field(default_factory=list)


def _merge(keys: list[tuple], probs: list[float], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the probabilities of duplicate rules, keeping first-appearance order."""
    acc: dict[tuple, float] = {}
    for k, p in zip(keys, probs):
        acc[k] = acc.get(k, 0.0) + p
    arr = np.array(list(acc.keys()), dtype=np.int64).reshape(-1, width)
    return arr, np.array(list(acc.values()), dtype=np.float64)


def _read_rules(path: Path) -> list[tuple[int, str, list[str], float]]:
    """(line number, lhs, rhs symbols, probability) of every rule line of a rule file."""
    if not path.is_file():
        raise UserError(
            f"Grammar file {path} does not exist; set data.grammar to a rule file, or to null to generate one."
        )
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"Grammar file {path} could not be read ({err}); point data.grammar to a readable text file."
        ) from None
    rules: list[tuple[int, str, list[str], float]] = []
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) not in (3, 4):
            raise UserError(
                f"Line {lineno} of grammar file {path} has {len(fields)} fields; write each rule as "
                "'LHS RHS prob' or 'LHS B C prob'."
            )
        try:
            prob = float(fields[-1])
        except ValueError:
            prob = math.nan
        if not math.isfinite(prob) or prob < 0:
            raise UserError(
                f"Line {lineno} of grammar file {path} has probability {fields[-1]!r}; "
                "make it a non-negative number."
            )
        rules.append((lineno, fields[0], fields[1:-1], prob))
    if not rules:
        raise UserError(f"Grammar file {path} contains no rules; add lines 'LHS RHS prob' or 'LHS B C prob'.")
    return rules


def parse_grammar(path: str | Path) -> Grammar:
    """Read a rule file (``LHS RHS prob`` or ``LHS B C prob`` per line; see module docstring)."""
    path = Path(path).expanduser()
    rules = _read_rules(path)
    nonterminals: list[str] = []
    nt_index: dict[str, int] = {}
    for _, lhs, _, _ in rules:
        if lhs not in nt_index:
            nt_index[lhs] = len(nonterminals)
            nonterminals.append(lhs)
    if "S" not in nt_index:
        raise UserError(f"Grammar file {path} has no rule for the start symbol S; add rules 'S ... prob'.")
    words = sorted({rhs[0] for _, _, rhs, _ in rules if len(rhs) == 1 and rhs[0] not in nt_index})
    w_index = {w: i for i, w in enumerate(words)}

    collected = RuleLists()
    totals = np.zeros(len(nonterminals))
    for lineno, lhs, rhs, prob in rules:
        a = nt_index[lhs]
        totals[a] += prob
        if len(rhs) == 2:
            for child in rhs:
                if child not in nt_index:
                    raise UserError(
                        f"Line {lineno} of grammar file {path} has binary child {child!r} that is not a "
                        "nonterminal; give it rules of its own or fix the name."
                    )
            collected.bin_k.append((a, nt_index[rhs[0]], nt_index[rhs[1]]))
            collected.bin_p.append(prob)
        elif rhs[0] in nt_index:
            collected.un_k.append((a, nt_index[rhs[0]]))
            collected.un_p.append(prob)
        else:
            collected.em_k.append((a, w_index[rhs[0]]))
            collected.em_p.append(prob)

    bad = [nonterminals[a] for a in range(len(nonterminals)) if abs(totals[a] - 1.0) > SUM_TOLERANCE]
    if bad:
        a = nt_index[bad[0]]
        raise UserError(
            f"In grammar file {path} the rule probabilities of {bad[0]} sum to {totals[a]:.6g}; "
            f"make every nonterminal's rules sum to 1 (within {SUM_TOLERANCE:g})."
        )
    off = [
        f"{nonterminals[a]} ({totals[a] - 1:+.2e})"
        for a in range(len(nonterminals))
        if abs(totals[a] - 1.0) > _RENORM_NOTICE_EPS
    ]
    if off:
        print(f"[lmlab] grammar {path}: renormalised rule probabilities of {', '.join(off)}.")

    start = nt_index["S"]
    grammar = Grammar.from_rules(nonterminals, words, start, collected, [], totals)
    grammar.start_children = [int(c) for a, c in grammar.unary if a == start]
    return grammar


@dataclass(frozen=True)
class GrammarShape:
    """The shape of a generated grammar (the ``data.*`` settings of ``data=pcfg`` and ``data=planted``)."""

    levels: int = 3  # layers of nonterminals below S_1..S_k (sentence length 2 .. 2^levels)
    nonterminals_per_level: int = 4
    vocab_size: int = 30  # number of words
    rules_per_nonterminal: int = 3  # binary rules of each non-last-layer nonterminal (plus one terminal rule)
    start_symbols: int = 3  # children S_i of S (the classes of task A)
    words_per_preterminal: int = 10  # words emitted by each last-layer nonterminal
    alpha: float = 1.0  # Dirichlet concentration of every nonterminal's rule probabilities

    def check(self) -> None:
        """Raise a UserError naming the ``data.*`` setting that cannot make a grammar."""
        positive = ("levels", "nonterminals_per_level", "vocab_size", "rules_per_nonterminal", "start_symbols",
                    "words_per_preterminal")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"data.{key} is {value!r}; make it a positive integer.")
        n = self.nonterminals_per_level
        if self.rules_per_nonterminal > n * n:
            raise UserError(
                f"data.rules_per_nonterminal is {self.rules_per_nonterminal} but only {n * n} pairs of "
                f"next-level nonterminals exist; make it at most {n * n}."
            )
        if self.start_symbols > n * n:
            raise UserError(
                f"data.start_symbols is {self.start_symbols} but only {n * n} distinct level-1 pairs exist; "
                f"make it at most {n * n}."
            )
        if self.words_per_preterminal > self.vocab_size:
            raise UserError(
                f"data.words_per_preterminal is {self.words_per_preterminal}; make it at most "
                f"data.vocab_size ({self.vocab_size})."
            )
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(f"data.alpha is {self.alpha!r}; make it a positive number.")

    def generate(self, seed: int) -> Grammar:
        """A random layered grammar of this shape, drawn from ``seed`` (see module docstring)."""
        self.check()
        rng = np.random.default_rng(seed)
        n, k, L, alpha = self.nonterminals_per_level, self.start_symbols, self.levels, float(self.alpha)
        vocab_size, rules_per_nt = self.vocab_size, self.rules_per_nonterminal
        words_per_pt = self.words_per_preterminal
        names = ["S"] + [f"S{i + 1}" for i in range(k)]
        names += [f"A{lvl}_{j}" for lvl in range(1, L + 1) for j in range(n)]

        def nt(level: int, j: int) -> int:  # index of A{level}_{j}
            return 1 + k + (level - 1) * n + j

        rules = RuleLists()
        probs = rng.dirichlet(np.full(k, alpha))
        for i in range(k):
            rules.un_k.append((0, 1 + i))
            rules.un_p.append(probs[i])
        pairs = rng.choice(n * n, size=k, replace=False)  # distinct, so task A is well posed
        for i, pair in enumerate(pairs):
            rules.bin_k.append((1 + i, nt(1, pair // n), nt(1, pair % n)))
            rules.bin_p.append(1.0)
        for lvl in range(1, L):
            for j in range(n):
                pairs = rng.choice(n * n, size=rules_per_nt, replace=False)
                word = int(rng.integers(vocab_size))
                probs = rng.dirichlet(np.full(rules_per_nt + 1, alpha))
                for pair, p in zip(pairs, probs[:-1]):
                    rules.bin_k.append((nt(lvl, j), nt(lvl + 1, pair // n), nt(lvl + 1, pair % n)))
                    rules.bin_p.append(p)
                rules.em_k.append((nt(lvl, j), word))
                rules.em_p.append(probs[-1])
        for j in range(n):
            ws = rng.choice(vocab_size, size=words_per_pt, replace=False)
            probs = rng.dirichlet(np.full(words_per_pt, alpha))
            for w, p in zip(ws, probs):
                rules.em_k.append((nt(L, j), int(w)))
                rules.em_p.append(p)
        words = [f"w{i}" for i in range(vocab_size)]
        return Grammar.from_rules(names, words, 0, rules, list(range(1, k + 1)))
