"""``eval=zeroshot``: multiple choice by log-likelihood, with exact ceilings on the synthetic sources.

An item is a context and k choices; the model scores each choice, and the item counts as right when the
gold choice has the highest score. No parameter is trained.

Scoring (how the model is read follows the objective it was trained with):

* causal and prefix models (CLM, prefix LM, EMO, a distillation into one): the log-likelihood of the
  choice's tokens given ``[BOS] + context``, sum_t log q(c_t | context, c_<t), read with the CLM shift. A
  prefix model reads the context as its bidirectional prefix; with the context ``[BOS]`` alone this is the
  causal reading of ``eval=perplexity``.
* masked models (an objective with single-mask conditionals: MLM and its variants, span corruption, a
  distillation into one; or any bidirectional model): the pseudo-log-likelihood (PLL) of Salazar, Liang,
  Nguyen & Kirchhoff 2020, "Masked Language Model Scoring" (arXiv 1910.14659): each word token of the choice
  is replaced by MASK in turn, everything else visible, and log q(c_t | rest) is summed. The objective's own
  ``masked_log_probs`` asks the question (a span-corruption decoder reads it as a one-token span).

Metrics, per task, keys ``zeroshot/<task>/...``:

* ``acc``: the mean over items of the credit 1/m when the gold choice is among the m choices of highest
  score, else 0 (a tie, scores equal to a relative 1e-9, splits the credit: two tied choices score 1/2).
* ``acc_norm``: the same with each score divided by the choice's length: its scored tokens on the synthetic
  tasks (where every choice of an item has as many, so ``acc_norm = acc``), its UTF-8 bytes on text.
* ``acc_ci95``: half-width of the 95% Student-t interval of ``acc`` over items (``lmlab.stats.t_interval``
  on the per-item credits; for n in the hundreds it is the normal interval): the noise of the drawn items,
  the model fixed.
* ``chance``: 1/k (the mean of 1/k over items when k varies); on text, where every item offers the same
  choices (a fixed label set), the rate of the most frequent gold choice.
* ``n``: the number of items.
* ``ece``: the expected calibration error (Guo, Pleiss, Sun & Weinberger 2017, arXiv 1706.04599;
  ``ece_bins`` equal-width bins, ``lmlab.stats.expected_calibration_error``) of the confidence softmax over
  the choices' log-likelihoods (the un-normalised scores) gives the top choice, against its credit.
* ``ceiling`` (synthetic data): ``acc`` of the exact-probability rule, which picks the choice of highest
  true probability (same tie rule): the Bayes rule on these items, the best accuracy a model can expect.
* ``bayes`` (synthetic data): the mean over items of max_j P_j / sum_j P_j, the Bayes rule's expected
  accuracy given each item's choices (same expectation as ``ceiling``, less noise).
* ``pll_ceiling`` (synthetic data, masked models): ``acc`` of the PLL rule computed with the source's exact
  single-mask conditionals (``single_mask_conditionals``), what a perfect masked model scores read by PLL.

Tasks of the synthetic sources (PCFG, HMM, the planted pool's target grammar): P_j = P(context + choice_j)
comes from the source's exact ``sequence_nll`` (inside algorithm for a PCFG, forward algorithm for an HMM).

* ``minimal_pairs`` (BLiMP-style minimal pairs, Warstadt et al. 2020, arXiv 1912.00582): a sentence x of
  the test split against x' = x with the word at one uniformly random position replaced by a uniformly
  random other word of the vocabulary, in random order; the context is ``[BOS]``, the choices the two
  sentences with their EOS. The corruption is symmetric (x is a corruption of x' with the same probability
  1 / (n (V - 1))), so given the pair the posterior that x is the original is P(x) / (P(x) + P(x')): the
  Bayes rule picks the more probable sentence, and ``bayes`` = mean of max(P(x), P(x')) / (P(x) + P(x')).
  A corruption exactly as probable as the original is a tie worth 1/2. Chance 1/2. Read by PLL, the rule
  sums the conditionals of every position, which is not the Bayes rule even for exact conditionals (the
  positions other than the replaced one differ too); the task is kept for masked models, as Salazar et al.
  keep BLiMP, and ``pll_ceiling`` says what that rule reaches.
* ``cloze`` (the last word): the context is ``[BOS] w_1 .. w_{n-1}`` of a test sentence, the choices its
  true last word w_n and ``choices - 1`` other words (distinct, uniformly random, in random order), each
  followed by the row's EOS. The gold word is drawn from P(w_n | w_<n, n words) and the others uniformly, so
  the posterior of choice c is proportional to P(w_1 .. w_{n-1} c EOS): exact and cheap (one
  ``sequence_nll`` per choice). Chance 1/choices. Read by PLL the only masked token is c, with the rest of
  the sentence and EOS visible, and the rule with exact conditionals is the Bayes rule
  (``pll_ceiling = ceiling``).

Text (``data=text`` / ``hf``): the items of each jsonl file of ``path`` (one line per item:
``{"context": str, "choices": [str, ...], "gold": int}``; the task is named after the file's stem). The
context is read as ``[BOS]`` + its tokens and each choice is tokenized on its own, so the space between the
two belongs at the start of the choice (``" Paris"``). No ceiling.

Items: ``n_items`` per task (``null``: all), drawn without replacement from the test split's sentences (or
the file's lines) by ``np.random.default_rng([seed, crc32(task)])`` (which also draws the corruptions and
the orders), so a task's items do not depend on which other tasks run.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge

from lmlab.attention import BIDIRECTIONAL, PREFIX, Attention, padding_of
from lmlab.data.source import Source
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import model_device, pad_rows
from lmlab.settings import NonNegative, Optional, Positive
from lmlab.stats import expected_calibration_error, t_interval
from lmlab.vocab import BOS_ID, MASK_ID, N_SPECIAL

MINIMAL_PAIRS, CLOZE = "minimal_pairs", "cloze"
SYNTHETIC_TASKS = (MINIMAL_PAIRS, CLOZE)
TIE = 1e-9  # scores equal to this relative tolerance are tied
ITEM_FORMAT = '{"context": str, "choices": [str, ...], "gold": int}'


@dataclass
class Item:
    """One multiple-choice question in token ids: the model reads ``context + choices[j]``."""

    context: list[int]
    choices: list[list[int]]
    gold: int
    lengths: list[int] | None = None  # what acc_norm divides each score by (None: the scored tokens)


# ----------------------------------------------------------------------------- items


def knows_probabilities(source) -> bool:
    """Whether the source computes exact sentence probabilities (``sequence_nll``)."""
    own = getattr(type(source), "sequence_nll", None)
    return own is not None and own is not Source.sequence_nll


def task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])


def draw(n_available: int, n_items: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n_items`` of ``n_available`` (all when ``None`` or fewer), without replacement."""
    n = n_available if n_items is None else min(n_items, n_available)
    return rng.choice(n_available, size=n, replace=False)


def minimal_pair_items(rows: list[list[int]], n_words: int, rng: np.random.Generator) -> list[Item]:
    """A minimal pair per row (see the module docstring): one uniformly random word position replaced by a
    uniformly random other word; the two sentences in random order after the context ``row[:first word]``."""
    items = []
    for row in rows:
        positions = [t for t, tok in enumerate(row) if tok >= N_SPECIAL]
        t = positions[int(rng.integers(len(positions)))]
        other = int(rng.integers(n_words - 1))
        other += other >= row[t] - N_SPECIAL
        alt = list(row)
        alt[t] = other + N_SPECIAL
        start = positions[0]
        gold = int(rng.integers(2))
        pair = [list(row[start:]), alt[start:]]
        items.append(Item(list(row[:start]), pair if gold == 0 else pair[::-1], gold))
    return items


def cloze_items(rows: list[list[int]], n_words: int, k: int, rng: np.random.Generator) -> list[Item]:
    """A last-word cloze per row (see the module docstring): the true last word and ``k - 1`` distinct
    uniformly random other words, in random order, each followed by what follows the last word (EOS)."""
    items = []
    for row in rows:
        t = max(i for i, tok in enumerate(row) if tok >= N_SPECIAL)
        word = row[t] - N_SPECIAL
        others = rng.choice(n_words - 1, size=k - 1, replace=False)
        words = [word, *(int(w) + (w >= word) for w in others)]
        order = rng.permutation(k)
        choices = [[words[j] + N_SPECIAL, *row[t + 1 :]] for j in order]
        items.append(Item(list(row[:t]), choices, int(np.flatnonzero(order == 0)[0])))
    return items


def split_by_item(values: np.ndarray, items: list[Item]) -> list[np.ndarray]:
    bounds = np.cumsum([len(it.choices) for it in items])[:-1]
    return np.split(np.asarray(values, dtype=np.float64), bounds)


def exact_log_probs(source, items: list[Item]) -> list[np.ndarray]:
    """log P(context + choice) of every choice of every item, by the source's ``sequence_nll``."""
    full = [it.context + c for it in items for c in it.choices]
    return split_by_item(-np.asarray(source.sequence_nll(full), dtype=np.float64), items)


def exact_pll(source, items: list[Item]) -> list[np.ndarray] | None:
    """The pseudo-log-likelihood of every choice under the source's exact single-mask conditionals:
    sum over the choice's word tokens x_t of log p(x_t | x_-t); ``None`` where the source lacks them."""
    full = [it.context + c for it in items for c in it.choices]
    starts = [len(it.context) for it in items for _ in it.choices]
    conds = source.single_mask_conditionals(full)
    if conds is None:
        return None
    out = np.zeros(len(full))
    with np.errstate(divide="ignore"):
        for i, (row, cond, start) in enumerate(zip(full, conds, starts)):
            cond = np.asarray(cond, dtype=np.float64)
            words = [t for t, tok in enumerate(row) if tok >= N_SPECIAL]
            out[i] = sum(float(np.log(cond[k, row[t]])) for k, t in enumerate(words) if t >= start)
    return split_by_item(out, items)


# ----------------------------------------------------------------------------- scoring rules


def credit(scores: np.ndarray, gold: int) -> float:
    """1/m when ``gold`` is among the m choices of highest score (ties to a relative ``TIE``), else 0."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max()
    tied = s >= top - TIE * max(1.0, abs(top)) if np.isfinite(top) else s == top
    return float(tied[gold]) / float(tied.sum()) if tied.any() else 0.0  # NaN scores: no credit


def softmax(scores: np.ndarray) -> np.ndarray:
    """The softmax of log-likelihoods (uniform when every one is -inf)."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max()
    if not np.isfinite(top):
        return np.full(len(s), 1.0 / len(s))
    p = np.exp(s - top)
    return p / p.sum()


def choice_metrics(prefix: str, items: list[Item], scores: list[np.ndarray], counts: list[np.ndarray],
                   chance: float, n_bins: int = 15) -> dict[str, float]:
    """``acc``, ``acc_norm``, ``acc_ci95``, ``chance``, ``n`` and ``ece`` of the model's scores (see the
    module docstring); ``counts`` are the scored tokens, used by acc_norm where an item has no ``lengths``."""
    golds = [it.gold for it in items]
    credits = np.array([credit(s, g) for s, g in zip(scores, golds)])
    norm = [np.asarray(it.lengths if it.lengths is not None else c, dtype=np.float64)
            for it, c in zip(items, counts)]
    credits_norm = np.array([credit(s / np.maximum(n, 1.0), g) for s, n, g in zip(scores, norm, golds)])
    confidence = np.array([softmax(s).max() for s in scores])
    return {f"{prefix}/acc": float(credits.mean()),
            f"{prefix}/acc_norm": float(credits_norm.mean()),
            f"{prefix}/acc_ci95": t_interval(credits),
            f"{prefix}/chance": float(chance),
            f"{prefix}/n": float(len(items)),
            f"{prefix}/ece": expected_calibration_error(confidence, credits, n_bins)}


def exact_metrics(prefix: str, items: list[Item], exact: list[np.ndarray]) -> dict[str, float]:
    """``ceiling`` (accuracy of the exact-probability rule) and ``bayes`` (its expected accuracy)."""
    return {f"{prefix}/ceiling": float(np.mean([credit(s, it.gold) for s, it in zip(exact, items)])),
            f"{prefix}/bayes": float(np.mean([softmax(s).max() for s in exact]))}


# ----------------------------------------------------------------------------- reading the model


def _bidirectional_masked_log_probs(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log q(. | x_-t) at the MASK position ``pos`` of each row, read bidirectionally (MLM's reading)."""
    hidden = model(ids, Attention(BIDIRECTIONAL, padding=padding_of(ids)))
    hidden = hidden[torch.arange(len(ids), device=ids.device), pos.to(ids.device)]
    return F.log_softmax(model.logits(hidden).double(), dim=-1).cpu()


def masked_reader(objective):
    """How to ask the model for a single-mask conditional: the objective's ``masked_log_probs`` (or its
    base objective's, for a distillation), the MLM reading for another bidirectional model, else ``None``
    (the model is read causally)."""
    for obj in (objective, getattr(objective, "base", None)):
        reader = getattr(obj, "masked_log_probs", None)
        if reader is not None:
            return reader
    return _bidirectional_masked_log_probs if objective.attention == BIDIRECTIONAL else None


def _batches(order: list, batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def causal_scores(model, kind: str, seqs: list[list[int]], starts: list[int],
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each sequence, sum_{t >= start} log q(seq[t] | seq[:t]) (the CLM shift; with ``kind`` prefix the
    first ``start`` tokens are the bidirectional prefix) and the number of tokens scored."""
    device = model_device(model)
    out = np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    for chunk in _batches(order, batch_size):
        ids = pad_rows([seqs[i] for i in chunk]).to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        start = torch.tensor([starts[i] for i in chunk], device=device)
        length = torch.tensor([len(seqs[i]) for i in chunk], device=device)
        t = torch.arange(targets.shape[1], device=device)[None, :] + 1  # the position of each target
        sel = (t >= start[:, None]) & (t < length[:, None])
        attention = Attention(kind, padding=padding_of(inputs), prefix_len=start if kind == PREFIX else None)
        hidden = model(inputs, attention)
        logq = F.log_softmax(model.logits(hidden[sel]).double(), dim=-1)
        tok = logq.gather(-1, targets[sel][:, None]).squeeze(-1)
        rows = torch.arange(len(chunk), device=device)[:, None].expand_as(sel)[sel]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rows, tok)
        out[chunk] = sums.cpu().numpy()
    return out, np.array([len(s) - b for s, b in zip(seqs, starts)], dtype=np.float64)


@torch.no_grad()
def pll_scores(reader, model, seqs: list[list[int]], starts: list[int],
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each sequence, the pseudo-log-likelihood of its tokens from ``start`` on: sum over the word
    tokens seq[t] (id >= N_SPECIAL) of log q(seq[t] | seq with MASK at t), and the number of them."""
    device = model_device(model)
    queries = [(i, t) for i, seq in enumerate(seqs) for t in range(starts[i], len(seq)) if seq[t] >= N_SPECIAL]
    queries.sort(key=lambda q: len(seqs[q[0]]))
    out = np.zeros(len(seqs))
    for chunk in _batches(queries, batch_size):
        ids = pad_rows([seqs[i] for i, _ in chunk])
        pos = torch.tensor([t for _, t in chunk])
        arange = torch.arange(len(chunk))
        targets = ids[arange, pos].clone()
        ids[arange, pos] = MASK_ID
        logq = reader(model, ids.to(device), pos)
        np.add.at(out, [i for i, _ in chunk], logq[arange, targets].numpy())
    counts = np.array([sum(tok >= N_SPECIAL for tok in s[b:]) for s, b in zip(seqs, starts)], dtype=np.float64)
    return out, counts


# ----------------------------------------------------------------------------- jsonl items


def read_items(path: str) -> list[dict]:
    """The items of a jsonl file, checked (one sentence naming the fix on any problem)."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise UserError(f"the zero-shot items file {path!r} does not exist: check eval.zeroshot.path.")
    items = []
    try:
        with open(p, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"the zero-shot items file {path!r} is not UTF-8 text: save it as UTF-8 jsonl.") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number} of {path}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON: write one object per line, {ITEM_FORMAT}.") from e
        if not isinstance(item, dict) or not {"context", "choices", "gold"} <= set(item):
            raise UserError(f"{where} lacks a context, choices or gold: write one object per line, {ITEM_FORMAT}.")
        context, choices, gold = item["context"], item["choices"], item["gold"]
        if not isinstance(context, str):
            raise UserError(f"{where} has a context that is not a string: make it a string.")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where} needs choices as a list of two or more non-empty strings: fix its choices.")
        if isinstance(gold, bool) or not isinstance(gold, Integral) or not 0 <= gold < len(choices):
            raise UserError(f"{where} has gold {gold!r} for {len(choices)} choices: make gold the index of the "
                            f"right choice, 0 to {len(choices) - 1}.")
        items.append({"context": context, "choices": list(choices), "gold": int(gold)})
    if not items:
        raise UserError(f"the zero-shot items file {path!r} holds no items: add lines of the form {ITEM_FORMAT}.")
    return items


def text_items(source, records: list[dict]) -> list[Item]:
    """Token-id items of jsonl records: ``[BOS]`` + the context's tokens, each choice tokenized on its own;
    ``lengths`` are the choices' UTF-8 bytes."""
    contexts = source.encode([r["context"] for r in records])
    flat = source.encode([c for r in records for c in r["choices"]])
    items, k = [], 0
    for n, (record, context) in enumerate(zip(records, contexts)):
        choices = flat[k : k + len(record["choices"])]
        k += len(record["choices"])
        for j, c in enumerate(choices):
            if not c:
                raise UserError(f"choice {j} of item {n} ({record['choices'][j]!r}) has no tokens under this "
                                "tokenizer: give every choice some text the tokenizer keeps.")
        items.append(Item([BOS_ID, *context], [list(c) for c in choices], record["gold"],
                          [len(c.encode("utf-8")) for c in record["choices"]]))
    return items


def text_chance(records: list[dict]) -> float:
    """The rate of the most frequent gold choice where every item offers the same choices, else mean 1/k."""
    if all(r["choices"] == records[0]["choices"] for r in records):
        return Counter(r["gold"] for r in records).most_common(1)[0][1] / len(records)
    return float(np.mean([1.0 / len(r["choices"]) for r in records]))


# ----------------------------------------------------------------------------- the evaluator


class ZeroShot(Evaluator):
    """Multiple choice by log-likelihood (see the module docstring)."""

    name = "zeroshot"

    def __init__(self, tasks: str | list[str] | None = None, n_items: Optional[Positive] = 500,
                 choices: Annotated[int, Ge(2)] = 4, seed: NonNegative = 0, batch_size: Positive = 64,
                 path: str | list[str] | None = None, ece_bins: Positive = 15) -> None:
        self.tasks = None if tasks is None else [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
        for key, value, low in (("n_items", n_items, 1), ("choices", choices, 2), ("seed", seed, 0),
                                ("batch_size", batch_size, 1), ("ece_bins", ece_bins, 1)):
            if value is None and key == "n_items":
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise UserError(f"eval.zeroshot.{key} is {value!r}: make it an integer of at least {low}.")
        self.n_items = None if n_items is None else int(n_items)
        self.choices, self.seed = int(choices), int(seed)
        self.batch_size, self.ece_bins = int(batch_size), int(ece_bins)
        if path is None:
            self.paths: list[str] = []
        elif isinstance(path, (str, os.PathLike)):
            self.paths = [os.fspath(path)]
        else:
            self.paths = [os.fspath(p) for p in path]
        self._records: dict[str, list[dict]] = {}

    # ----- which tasks -----

    def _files(self) -> dict[str, str]:
        """Task name (the file's stem) -> path of each jsonl file."""
        files: dict[str, str] = {}
        for p in self.paths:
            stem = Path(p).stem
            if stem in files:
                raise UserError(f"two files of eval.zeroshot.path are named {stem!r}: rename one, the task is "
                                "named after the file.")
            files[stem] = p
        return files

    def available(self, source) -> list[str]:
        """The tasks this data offers (reading and checking every jsonl file)."""
        name = getattr(source, "name", type(source).__name__)
        tasks = []
        if knows_probabilities(source):
            tasks = list(SYNTHETIC_TASKS)
            for task in tasks:
                if self.tasks is None or task in self.tasks:
                    self._check_words(task, source)
        files = self._files()
        if files:
            if not callable(getattr(source, "encode", None)):
                raise UserError(f"eval.zeroshot.path holds text items but data {name} has no tokenizer: use "
                                "data=text or data=hf, or set eval.zeroshot.path=null.")
            for task, p in files.items():
                if task not in self._records:
                    self._records[task] = read_items(p)
            tasks += list(files)
        return tasks

    def _check_words(self, task: str, source) -> int:
        """The number of words of the source, checked against what ``task`` needs."""
        n_words = source.vocab_size - N_SPECIAL
        need = self.choices if task == CLOZE else 2
        if n_words < need:
            name = getattr(source, "name", type(source).__name__)
            fix = "lower eval.zeroshot.choices" if task == CLOZE else "drop minimal_pairs from eval.zeroshot.tasks"
            raise UserError(f"zeroshot {task} needs {need} words and data {name} has {n_words}: {fix}.")
        return n_words

    def selected(self, source) -> list[str]:
        available = self.available(source)
        if self.tasks is None:
            return available
        name = getattr(source, "name", type(source).__name__)
        missing = [t for t in self.tasks if t not in available]
        if missing:
            offer = ", ".join(available) if available else "none"
            raise UserError(f"eval.zeroshot.tasks names {', '.join(missing)}, which data {name} does not offer "
                            f"(it offers: {offer}): fix eval.zeroshot.tasks.")
        return list(self.tasks)

    def skip_reason(self, source, objective=None) -> str | None:
        if not self.selected(source):
            return (f"data {getattr(source, 'name', type(source).__name__)} knows no sentence probabilities "
                    "and eval.zeroshot.path names no jsonl file of items")
        return None

    # ----- items -----

    def items(self, task: str, source, test_split) -> tuple[list[Item], float]:
        """The items of ``task`` and its chance rate."""
        rng = task_rng(self.seed, task)
        if task in SYNTHETIC_TASKS:
            rows = [list(r) for r in test_split.with_format(None)[:]["input_ids"]]
            rows = [r for r in rows if any(tok >= N_SPECIAL for tok in r)]
            if not rows:
                raise UserError(f"the test split of data {source.name} holds no sentences: raise data.test_size.")
            rows = [rows[i] for i in draw(len(rows), self.n_items, rng)]
            n_words = self._check_words(task, source)
            if task == MINIMAL_PAIRS:
                return minimal_pair_items(rows, n_words, rng), 0.5
            return cloze_items(rows, n_words, self.choices, rng), 1.0 / self.choices
        records = self._records[task]
        records = [records[i] for i in draw(len(records), self.n_items, rng)]
        return text_items(source, records), text_chance(records)

    # ----- evaluation -----

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        source = datamodule.source
        model, objective = module.model, module.objective
        reader = masked_reader(objective)
        out: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            for task in self.selected(source):
                prefix = f"{self.name}/{task}"
                items, chance = self.items(task, source, datamodule.splits["test"])
                seqs = [it.context + c for it in items for c in it.choices]
                starts = [len(it.context) for it in items for _ in it.choices]
                if reader is None:
                    scores, counts = causal_scores(model, objective.attention, seqs, starts, self.batch_size)
                else:
                    scores, counts = pll_scores(reader, model, seqs, starts, self.batch_size)
                out.update(choice_metrics(prefix, items, split_by_item(scores, items), split_by_item(counts, items),
                                          chance, self.ece_bins))
                if task in SYNTHETIC_TASKS:
                    out.update(exact_metrics(prefix, items, exact_log_probs(source, items)))
                    pll = exact_pll(source, items) if reader is not None else None
                    if pll is not None:
                        out[f"{prefix}/pll_ceiling"] = float(np.mean([credit(s, it.gold) for s, it in zip(pll, items)]))
        finally:
            model.train(was_training)
        return out
