"""Heuristic quality filters in the style of Gopher and Dolma, adapted to token rows.

Sources: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher"
(arXiv 2112.11446), appendix A.1.1 "MassiveWeb" quality and repetition filters; Soldaini et al. 2024, "Dolma"
(arXiv 2402.00159), whose ``gopher`` tagger implements the same rules. Variant implemented here:

Token rules (every source; a row's *words* are its token ids >= N_SPECIAL, specials ignored):

* ``min_tokens`` / ``max_tokens``: word count bounds (Gopher: 50..100,000 words; our rows are sentences or
  packed blocks, so the default lower bound is 1 and there is no upper bound).
* ``max_top_token_fraction``: share of the row taken by its most common token (a token analogue of
  Gopher's "most common word" signals; not a Gopher rule).
* ``max_top_ngram_fraction`` {n: max}: share of the row's tokens covered by occurrences of its most common
  n-gram, counted only when that n-gram occurs more than once (Gopher: 2: 0.20, 3: 0.18, 4: 0.16, on characters;
  here on tokens).
* ``max_dup_ngram_fraction`` {n: max}: share of the row's tokens covered by n-grams that occur more than once
  (each token counted once; Gopher: 5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10).
* ``min_unique_token_ratio``: distinct tokens / tokens (not a Gopher rule).

Text rules (only when the data source can ``decode`` tokens to text, i.e. text sources; the row is decoded,
words are whitespace-separated):

* ``min_mean_word_length`` / ``max_mean_word_length``: mean word length in characters (Gopher: 3..10).
* ``max_symbol_word_ratio``: ("#" + "..." + "…") occurrences per word (Gopher: 0.1).
* ``max_bullet_line_fraction``: lines starting with a bullet (Gopher: 0.9).
* ``max_ellipsis_line_fraction``: lines ending in "..." or "…" (Gopher: 0.3).
* ``min_alpha_word_fraction``: words with at least one alphabetic character (Gopher: 0.8).
* ``min_stop_words``: occurrences of the, be, to, of, and, that, have, with (Gopher: 2).

A rule set to ``null`` is off (the n-gram maps default to ``gopher``, the values above). Text rules are
skipped for DNA/protein character sources and with ``text_rules: false``.

A row is removed when it fails any rule; ``report`` counts, per rule, the rows that fail it (a row can
fail several), plus ``pool_rows``, ``kept_rows`` and ``removed``. The saved scores are 1 for kept
rows and 0 for removed ones.

Chunked (``Selector.on_shards``): every rule looks at one row, so the pool (a ``Dataset`` or shards) is read
chunk by chunk (``lmlab.selection.base.pool_chunks``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from lmlab.errors import UserError
from lmlab.selection.base import Selection, Selector, pool_chunks
from lmlab.settings import Fraction, NonNegative, NonNegativeFloat, Optional, Positive, PositiveFloat, declared
from lmlab.vocab import N_SPECIAL

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "‣", "⁃")
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


# ----- token statistics -----

def _ngrams(words: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def top_token_fraction(words: list[int]) -> float:
    return Counter(words).most_common(1)[0][1] / len(words) if words else 0.0


def top_ngram_fraction(words: list[int], n: int) -> float:
    """Tokens in the occurrences of the most common n-gram / tokens (0 when no n-gram repeats)."""
    grams = _ngrams(words, n)
    if not grams:
        return 0.0
    count = Counter(grams).most_common(1)[0][1]
    return 0.0 if count == 1 else min(1.0, count * n / len(words))


def dup_ngram_fraction(words: list[int], n: int) -> float:
    """Tokens covered by n-grams that occur more than once / tokens (each token counted once)."""
    grams = _ngrams(words, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = np.zeros(len(words), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = True
    return float(covered.mean())


def unique_token_ratio(words: list[int]) -> float:
    return len(set(words)) / len(words) if words else 0.0


# ----- text statistics -----

def text_stats(text: str) -> dict[str, float]:
    words = text.split()
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [text.strip()]
    n = max(len(words), 1)
    symbols = text.count("#") + text.count("...") + text.count("…")
    return {
        "mean_word_length": float(np.mean([len(w) for w in words])) if words else 0.0,
        "symbol_word_ratio": symbols / n,
        "bullet_line_fraction": sum(line.startswith(BULLETS) for line in lines) / len(lines),
        "ellipsis_line_fraction": sum(line.endswith(("...", "…")) for line in lines) / len(lines),
        "alpha_word_fraction": sum(bool(re.search(r"[^\W\d_]", w)) for w in words) / n,
        "stop_words": float(sum(w.lower().strip(string.punctuation) in STOP_WORDS for w in words)),
    }


def _thresholds(value: Any, name: str) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"selection.{name} must map n-gram sizes to fractions (e.g. {{2: 0.2}}) or be null: "
                        f"fix selection.{name}.")
    return {int(k): float(v) for k, v in value.items() if v is not None}


class Quality(Selector):
    """Removes rows that fail any enabled Gopher/Dolma-style rule (see the module docstring)."""

    on_shards = "chunked"

    @declared
    class Settings(Selector.Settings):
        min_tokens: Optional[NonNegative] = 1
        max_tokens: Optional[Positive] = None
        max_top_token_fraction: Optional[Fraction] = 0.5
        max_top_ngram_fraction: Mapping | str | None = "gopher"
        max_dup_ngram_fraction: Mapping | str | None = "gopher"
        min_unique_token_ratio: Optional[Fraction] = 0.2
        min_mean_word_length: Optional[NonNegativeFloat] = 3.0
        max_mean_word_length: Optional[PositiveFloat] = 10.0
        max_symbol_word_ratio: Optional[NonNegativeFloat] = 0.1
        max_bullet_line_fraction: Optional[Fraction] = 0.9
        max_ellipsis_line_fraction: Optional[Fraction] = 0.3
        min_alpha_word_fraction: Optional[Fraction] = 0.8
        min_stop_words: Optional[NonNegative] = 2
        text_rules: bool = True

    def setup(self) -> None:
        s = self.settings
        self.top = GOPHER_TOP_NGRAM if s.max_top_ngram_fraction == "gopher" else \
            _thresholds(s.max_top_ngram_fraction, "max_top_ngram_fraction")
        self.dup = GOPHER_DUP_NGRAM if s.max_dup_ngram_fraction == "gopher" else \
            _thresholds(s.max_dup_ngram_fraction, "max_dup_ngram_fraction")
        # the scalar rules, each a threshold or null (the n-gram rules map n to a threshold)
        self.rules = {f.name: getattr(s, f.name) for f in fields(s)
                      if f.name not in ("max_top_ngram_fraction", "max_dup_ngram_fraction", "text_rules")}
        for name, value in self.rules.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"selection.{name} must be a number or null, got {value!r}: fix selection.{name}.")
        self.text_rules = bool(s.text_rules)

    def token_failures(self, row: list[int]) -> list[str]:
        """The names of the token rules this row fails."""
        r, words, out = self.rules, [t for t in row if t >= N_SPECIAL], []
        if r["min_tokens"] is not None and len(words) < r["min_tokens"]:
            out.append("min_tokens")
        if r["max_tokens"] is not None and len(words) > r["max_tokens"]:
            out.append("max_tokens")
        if r["max_top_token_fraction"] is not None and top_token_fraction(words) > r["max_top_token_fraction"]:
            out.append("max_top_token_fraction")
        out += [f"max_top_{n}gram_fraction" for n, m in self.top.items() if top_ngram_fraction(words, n) > m]
        out += [f"max_dup_{n}gram_fraction" for n, m in self.dup.items() if dup_ngram_fraction(words, n) > m]
        if r["min_unique_token_ratio"] is not None and words and \
                unique_token_ratio(words) < r["min_unique_token_ratio"]:
            out.append("min_unique_token_ratio")
        return out

    def text_failures(self, text: str) -> list[str]:
        """The names of the text rules this decoded row fails."""
        r, s = self.rules, text_stats(text)
        checks = [("min_mean_word_length", s["mean_word_length"], -1),
                  ("max_mean_word_length", s["mean_word_length"], 1),
                  ("max_symbol_word_ratio", s["symbol_word_ratio"], 1),
                  ("max_bullet_line_fraction", s["bullet_line_fraction"], 1),
                  ("max_ellipsis_line_fraction", s["ellipsis_line_fraction"], 1),
                  ("min_alpha_word_fraction", s["alpha_word_fraction"], -1), ("min_stop_words", s["stop_words"], -1)]
        return [name for name, value, sign in checks
                if r[name] is not None and (value > r[name] if sign > 0 else value < r[name])]

    def select(self, pool: Dataset, target: Dataset | None, workdir: Path) -> Selection:
        decode = getattr(self.source, "decode", None) if self.text_rules else None
        if getattr(self.source, "tokenizer_kind", None) in ("dna", "protein"):
            decode = None  # sequences, not prose: the text rules do not apply
        failed: Counter[str] = Counter()
        keep = np.ones(len(pool), dtype=bool)
        for start, rows in pool_chunks(pool):
            for i, row in enumerate(rows, start):
                fails = self.token_failures(row)
                if callable(decode):
                    fails += self.text_failures(decode(row))
                failed.update(fails)
                keep[i] = not fails
        report = {"pool_rows": len(pool), "kept_rows": int(keep.sum()), "removed": int((~keep).sum()),
                  "text_rules": bool(callable(decode)), **{f"failed_{k}": v for k, v in sorted(failed.items())}}
        if not keep.any():
            worst = ", ".join(f"{k} ({v})" for k, v in failed.most_common(3))
            raise UserError(f"selection=quality removed all {len(pool)} rows (most failed: {worst}): loosen or "
                            "disable those rules (set them to null).")
        return Selection(pool.select(np.flatnonzero(keep)), keep.astype(np.float64), report)
