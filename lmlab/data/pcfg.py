"""Probabilistic context-free grammar (PCFG) source, with exact optima and parse-based downstream labels.

After Liu, Xie, Li and Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language
Models", ICML 2023 (arXiv 2210.14199), whose synthetic PCFG data and tasks A/B/C this source reproduces.

Variant implemented here:

* The grammar is either read from a rule file in the format of the paper's released
  ``pcfg/rule_deep_mlm.txt`` (``grammar=<path>``), or generated from ``grammar_seed`` with the same
  layered shape (``grammar=None``): ``S -> S_1 .. S_k`` (unary, Dirichlet probabilities), each ``S_i``
  has one fixed binary rule over level-1 nonterminals, levels ``1 .. L-1`` have ``rules_per_nonterminal``
  binary rules into pairs of next-level nonterminals plus one terminal rule, the last level emits
  ``words_per_preterminal`` words; every nonterminal's rule probabilities are Dirichlet(``alpha``).
* Rule files: duplicate rules sum; a nonterminal whose probabilities sum to 1 within 1e-3 is renormalised
  (one printed notice lists those off by more than 1e-6); word ids follow the sorted word strings.
* Sentences are sampled top-down, breadth-first, for all sentences of a split at once (numpy). Each split
  has its own random stream ``default_rng([seed, split index])``, so resizing one split leaves the others
  unchanged.
* Labels (all splits): ``task_a`` = argmax over the start symbol's unary children ``S_i`` of the inside
  probability ``inside(S_i, 0, n)``, not weighted by ``P(S -> S_i)`` (the paper's code uses the inside
  probability, per the project's notes; not checked against that code here);
  ``task_b`` / ``task_c`` = argmax over all nonterminals (``S`` included, in the grammar's order) of
  ``inside(A, 0, 4)`` / ``inside(A, 0, 2)``, and ``-1`` for sentences of 4 words or fewer (the paper's
  tasks use sentences of length > 4; applied to task C too). A label is also ``-1`` if every candidate has inside
  probability zero. Ties go to the first nonterminal.
* Exact optima: ``sequence_nll`` by the inside algorithm; ``single_mask_conditionals`` by
  inside-outside: the sentence probability Z is linear in each per-position emission vector
  e_t[A] = P(A -> x_t), so the outside score of the preterminal slot (A, t, t+1) is dZ/de_t[A], and
  p(x_t = w | x_-t) is proportional to sum_A dZ/de_t[A] P(A -> w). The gradient is the reverse pass of the
  batched inside pass written out by hand (same result as autograd, much less memory). All in float64;
  each position's emission vector is rescaled to max 1 so long sentences do not underflow. Unary
  nonterminal rules (``S -> S_i`` and any other) are handled by the closure ``(I - U)^-1``; terminal
  rules may sit at any level. Empty (epsilon) rules are not supported.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from lmlab.data.source import SPLITS, Source
from lmlab.errors import UserError
from lmlab.threads import one_thread
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL, word_ids

SUM_TOLERANCE = 1e-3  # a nonterminal's rule probabilities must sum to 1 within this
_RENORM_NOTICE_EPS = 1e-6  # sums off by more than float noise but within tolerance are reported
_MAX_EXPANSION_STEPS = 10_000
_MAX_FRONTIER = 50_000_000
_CHUNK_ELEMENTS = 1e7  # rough budget of chart elements per inside batch


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

    @property
    def n_nt(self) -> int:
        return len(self.nonterminals)

    @property
    def n_words(self) -> int:
        return len(self.words)


def _merge(keys: list[tuple], probs: list[float], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the probabilities of duplicate rules, keeping first-appearance order."""
    acc: dict[tuple, float] = {}
    for k, p in zip(keys, probs):
        acc[k] = acc.get(k, 0.0) + p
    arr = np.array(list(acc.keys()), dtype=np.int64).reshape(-1, width)
    return arr, np.array(list(acc.values()), dtype=np.float64)


def parse_grammar(path: str | Path) -> Grammar:
    """Read a rule file (``LHS RHS prob`` or ``LHS B C prob`` per line; see module docstring)."""
    path = Path(path).expanduser()
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

    bin_k, bin_p, un_k, un_p, em_k, em_p = [], [], [], [], [], []
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
            bin_k.append((a, nt_index[rhs[0]], nt_index[rhs[1]]))
            bin_p.append(prob)
        elif rhs[0] in nt_index:
            un_k.append((a, nt_index[rhs[0]]))
            un_p.append(prob)
        else:
            em_k.append((a, w_index[rhs[0]]))
            em_p.append(prob)

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

    binary, binary_p = _merge(bin_k, bin_p, 3)
    unary, unary_p = _merge(un_k, un_p, 2)
    emit, emit_p = _merge(em_k, em_p, 2)
    binary_p = binary_p / totals[binary[:, 0]] if len(binary) else binary_p
    unary_p = unary_p / totals[unary[:, 0]] if len(unary) else unary_p
    emit_p = emit_p / totals[emit[:, 0]] if len(emit) else emit_p
    start = nt_index["S"]
    children = [int(c) for a, c in unary if a == start]
    return Grammar(nonterminals, words, start, binary, binary_p, unary, unary_p, emit, emit_p, children)


def generate_grammar(
    levels: int,
    nonterminals_per_level: int,
    vocab_size: int,
    rules_per_nonterminal: int,
    start_symbols: int,
    words_per_preterminal: int,
    alpha: float,
    grammar_seed: int,
) -> Grammar:
    """A random layered grammar of the paper's shape (see module docstring)."""
    rng = np.random.default_rng(grammar_seed)
    n, k, L = nonterminals_per_level, start_symbols, levels
    names = ["S"] + [f"S{i + 1}" for i in range(k)]
    names += [f"A{lvl}_{j}" for lvl in range(1, L + 1) for j in range(n)]

    def nt(level: int, j: int) -> int:  # index of A{level}_{j}
        return 1 + k + (level - 1) * n + j

    bin_k, bin_p, un_k, un_p, em_k, em_p = [], [], [], [], [], []
    probs = rng.dirichlet(np.full(k, alpha))
    for i in range(k):
        un_k.append((0, 1 + i))
        un_p.append(probs[i])
    pairs = rng.choice(n * n, size=k, replace=False)  # distinct, so task A is well posed
    for i, pair in enumerate(pairs):
        bin_k.append((1 + i, nt(1, pair // n), nt(1, pair % n)))
        bin_p.append(1.0)
    for lvl in range(1, L):
        for j in range(n):
            pairs = rng.choice(n * n, size=rules_per_nonterminal, replace=False)
            word = int(rng.integers(vocab_size))
            probs = rng.dirichlet(np.full(rules_per_nonterminal + 1, alpha))
            for pair, p in zip(pairs, probs[:-1]):
                bin_k.append((nt(lvl, j), nt(lvl + 1, pair // n), nt(lvl + 1, pair % n)))
                bin_p.append(p)
            em_k.append((nt(lvl, j), word))
            em_p.append(probs[-1])
    for j in range(n):
        ws = rng.choice(vocab_size, size=words_per_preterminal, replace=False)
        probs = rng.dirichlet(np.full(words_per_preterminal, alpha))
        for w, p in zip(ws, probs):
            em_k.append((nt(L, j), int(w)))
            em_p.append(p)
    binary, binary_p = _merge(bin_k, bin_p, 3)
    unary, unary_p = _merge(un_k, un_p, 2)
    emit, emit_p = _merge(em_k, em_p, 2)
    words = [f"w{i}" for i in range(vocab_size)]
    return Grammar(names, words, 0, binary, binary_p, unary, unary_p, emit, emit_p, list(range(1, k + 1)))


class PCFGSource(Source):
    """Sentences of a PCFG (read from a rule file or generated), with exact optima and tasks A/B/C.

    ``vocab_size`` (constructor) is the number of words of a generated grammar; the ``vocab_size``
    property is ``N_SPECIAL`` + the number of words of the grammar in use.
    """

    def __init__(
        self,
        grammar: str | None = None,
        levels: int = 3,
        nonterminals_per_level: int = 4,
        vocab_size: int = 30,
        rules_per_nonterminal: int = 3,
        start_symbols: int = 3,
        words_per_preterminal: int = 10,
        alpha: float = 1.0,
        grammar_seed: int = 0,
        seed: int = 0,
        train_size: int = 20000,
        validation_size: int = 500,
        test_size: int = 1000,
        downstream_size: int = 2000,
    ) -> None:
        super().__init__(
            grammar=None if grammar is None else str(grammar),
            levels=levels,
            nonterminals_per_level=nonterminals_per_level,
            vocab_size=vocab_size,
            rules_per_nonterminal=rules_per_nonterminal,
            start_symbols=start_symbols,
            words_per_preterminal=words_per_preterminal,
            alpha=alpha,
            grammar_seed=grammar_seed,
            seed=seed,
            train_size=train_size,
            validation_size=validation_size,
            test_size=test_size,
            downstream_size=downstream_size,
        )
        for split in SPLITS:
            size = self.config[f"{split}_size"]
            if not isinstance(size, int) or size < 0:
                raise UserError(f"data.{split}_size is {size!r}; make it a non-negative integer.")
        self._file_digest = ""
        if grammar is not None:
            self.grammar = parse_grammar(grammar)
            self._file_digest = hashlib.sha256(Path(grammar).expanduser().read_bytes()).hexdigest()[:8]
        else:
            self._check_generator_args()
            self.grammar = generate_grammar(
                levels, nonterminals_per_level, vocab_size, rules_per_nonterminal, start_symbols,
                words_per_preterminal, float(alpha), grammar_seed,
            )
        self._prepare()
        g = self.grammar
        self.tasks = {"task_a": len(g.start_children), "task_b": g.n_nt, "task_c": g.n_nt}

    # ------------------------------------------------------------------ setup

    def _check_generator_args(self) -> None:
        c = self.config
        positive = ("levels", "nonterminals_per_level", "vocab_size", "rules_per_nonterminal", "start_symbols",
                    "words_per_preterminal")
        for key in positive:
            if not isinstance(c[key], int) or c[key] < 1:
                raise UserError(f"data.{key} is {c[key]!r}; make it a positive integer.")
        n = c["nonterminals_per_level"]
        if c["rules_per_nonterminal"] > n * n:
            raise UserError(
                f"data.rules_per_nonterminal is {c['rules_per_nonterminal']} but only {n * n} pairs of "
                f"next-level nonterminals exist; make it at most {n * n}."
            )
        if c["start_symbols"] > n * n:
            raise UserError(
                f"data.start_symbols is {c['start_symbols']} but only {n * n} distinct level-1 pairs exist; "
                f"make it at most {n * n}."
            )
        if c["words_per_preterminal"] > c["vocab_size"]:
            raise UserError(
                f"data.words_per_preterminal is {c['words_per_preterminal']}; make it at most "
                f"data.vocab_size ({c['vocab_size']})."
            )
        if not isinstance(c["alpha"], (int, float)) or not c["alpha"] > 0:
            raise UserError(f"data.alpha is {c['alpha']!r}; make it a positive number.")

    def _prepare(self) -> None:
        """Sampling tables and the dense tensors of the inside algorithm."""
        g = self.grammar
        n_nt, n_w = g.n_nt, g.n_words
        # --- sampling: one table of all rules sorted by lhs; symbol codes: nonterminal a, word n_nt + w
        lhs = np.concatenate([g.binary[:, 0], g.unary[:, 0], g.emit[:, 0]])
        r1 = np.concatenate([g.binary[:, 1], g.unary[:, 1], n_nt + g.emit[:, 1]])
        r2 = np.concatenate([g.binary[:, 2], np.full(len(g.unary) + len(g.emit), -1)])
        p = np.concatenate([g.binary_p, g.unary_p, g.emit_p])
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
        self._s_cum, self._s_ends = cum, ends
        self._s_r1, self._s_r2 = r1, r2
        self._s_arity = np.where(r2 >= 0, 2, 1)

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

    def cache_key(self) -> str:
        key = super().cache_key()
        return f"{key}-{self._file_digest}" if self._file_digest else key

    # ------------------------------------------------------------------ sampling

    def sample(self, n_sentences: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``n_sentences`` sentences as arrays of word indices (0-based, without special tokens)."""
        if n_sentences == 0:
            return []
        g = self.grammar
        n_nt = g.n_nt
        sym = np.full(n_sentences, g.start, dtype=np.int64)
        sid = np.arange(n_sentences)
        for _ in range(_MAX_EXPANSION_STEPS):
            is_nt = sym < n_nt
            if not is_nt.any():
                break
            a = sym[is_nt]
            u = rng.random(len(a))
            r = np.searchsorted(self._s_cum, a + u, side="right")
            r = np.minimum(r, self._s_ends[a] - 1)  # guards against a + u rounding up to a + 1
            out_len = np.ones(len(sym), dtype=np.int64)
            out_len[is_nt] = self._s_arity[r]
            pos = np.cumsum(out_len) - out_len
            new = np.empty(int(pos[-1] + out_len[-1]), dtype=np.int64)
            if len(new) > _MAX_FRONTIER:
                raise UserError("The grammar generates unboundedly long sentences; make its recursion subcritical.")
            new[pos[~is_nt]] = sym[~is_nt]
            at = pos[is_nt]
            new[at] = self._s_r1[r]
            two = self._s_arity[r] == 2
            new[at[two] + 1] = self._s_r2[r[two]]
            sid = np.repeat(sid, out_len)
            sym = new
        else:
            raise UserError("The grammar's derivations do not terminate; give every recursion a way out.")
        lengths = np.bincount(sid, minlength=n_sentences)
        return np.split(sym - n_nt, np.cumsum(lengths)[:-1])

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
        out = {t: np.full(len(sentences), -1, dtype=np.int64) for t in ("task_a", "task_b", "task_c")}
        children = torch.tensor(g.start_children, dtype=torch.long)
        with torch.no_grad(), one_thread():
            for idx, words in self._chunks(sentences):
                n = words.shape[1]
                if n == 0:
                    continue
                e, _ = self._emissions(words)
                chart, _, _ = self._inside(e)
                if len(children):
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

    # ------------------------------------------------------------------ exact optima

    def sequence_nll(self, rows: list[list[int]]) -> np.ndarray:
        sentences = self._rows_to_words(rows)
        nll = np.full(len(sentences), np.inf)
        with torch.no_grad(), one_thread():
            for idx, words in self._chunks(sentences):
                n = words.shape[1]
                if n == 0:
                    continue
                e, log_scale = self._emissions(words)
                z = self._inside(e)[0][n][:, 0, self.grammar.start]
                with np.errstate(divide="ignore"):
                    nll[idx] = -(np.log(z.numpy()) + log_scale.numpy())
        return nll

    def single_mask_conditionals(self, rows: list[list[int]]) -> list[np.ndarray]:
        sentences = self._rows_to_words(rows)
        out: list[np.ndarray] = [np.zeros((len(s), self.vocab_size)) for s in sentences]
        E = torch.tensor(self._E)
        with torch.no_grad(), one_thread():
            for idx, words in self._chunks(sentences):
                n = words.shape[1]
                if n == 0:
                    continue
                e, _ = self._emissions(words)
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
        features = Features(
            {
                "input_ids": Sequence(Value("int64")),
                "task_a": Value("int64"),
                "task_b": Value("int64"),
                "task_c": Value("int64"),
            }
        )
        splits = {}
        for k, split in enumerate(SPLITS):
            rng = np.random.default_rng([int(self.config["seed"]), k])
            sentences = self.sample(self.config[f"{split}_size"], rng)
            labels = self.labels(sentences)
            ids = [[BOS_ID, *(s + N_SPECIAL).tolist(), EOS_ID] for s in sentences]
            splits[split] = Dataset.from_dict(
                {"input_ids": ids, **{t: v.tolist() for t, v in labels.items()}}, features=features
            )
        return DatasetDict(splits)
