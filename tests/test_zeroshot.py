"""eval=zeroshot and the expected calibration error: known answers (hand-computed ECE, ceilings against
brute-force enumeration of tiny grammars/HMMs, oracle models that score with the true distribution,
batched scoring against one-at-a-time scoring), a trained model through the CLI, jsonl items on text data,
and the mistakes a user can make."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.data.hmm import HMMSource
from lmlab.data.pcfg import PCFGSource
from lmlab.errors import UserError
from lmlab.evaluation.common import head_calibration
from lmlab.evaluation.finetune import Finetune
from lmlab.evaluation.probe import Probe
from lmlab.evaluation.zeroshot import (
    Item,
    ZeroShot,
    causal_scores,
    choice_metrics,
    credit,
    exact_log_probs,
    exact_metrics,
    pll_scores,
    read_items,
    softmax,
    text_chance,
)
from lmlab.models.transformer import Transformer
from lmlab.objectives.mlm import MLM
from lmlab.stats import expected_calibration_error
from lmlab.vocab import BOS_ID, EOS_ID, MASK_ID, N_SPECIAL, PAD_ID
from tests.conftest import FAST
from tests.test_pcfg import brute_force as derivations

# ----------------------------------------------------------------------------- expected calibration error


def test_ece_hand_example_with_exact_fractions():
    # 4 bins (0,1/4], (1/4,1/2], (1/2,3/4], (3/4,1]; every confidence is a dyadic fraction (exact in float)
    conf = [Fraction(1, 8), Fraction(3, 8), Fraction(3, 8), Fraction(5, 8), Fraction(5, 8), Fraction(5, 8),
            Fraction(7, 8), Fraction(1)]
    hit = [0, 1, 0, 1, 1, 0, 1, 1]
    # by hand: bin 1 |0 - 1/8| * 1/8, bin 2 |1/2 - 3/8| * 2/8, bin 3 |2/3 - 5/8| * 3/8, bin 4 |1 - 15/16| * 2/8
    expected = (Fraction(1, 8) * Fraction(1, 8) + Fraction(1, 8) * Fraction(2, 8)
                + Fraction(1, 24) * Fraction(3, 8) + Fraction(1, 16) * Fraction(2, 8))
    assert expected == Fraction(5, 64)
    assert expected_calibration_error([float(c) for c in conf], hit, n_bins=4) == pytest.approx(5 / 64, abs=1e-15)


def test_ece_bins_are_closed_on_the_right_and_one_bin_is_the_overall_gap():
    # 1/2 belongs to the first of two bins: |1 - 1/2| * 1/2 + |0 - 1| * 1/2 = 3/4 (left-closed bins: 1/4)
    assert expected_calibration_error([0.5, 1.0], [1, 0], n_bins=2) == pytest.approx(0.75, abs=1e-15)
    # a confidence of 0 goes into the first bin
    assert expected_calibration_error([0.0, 0.0], [0, 0], n_bins=3) == 0.0
    # ten predictions at confidence 0.9, six right: |0.6 - 0.9| = 0.3 whatever the bins
    for bins in (1, 10, 15):
        assert expected_calibration_error([0.9] * 10, [1] * 6 + [0] * 4, bins) == pytest.approx(0.3, abs=1e-12)
    # a fractional credit (a tie worth 1/2) counts as half right
    assert expected_calibration_error([0.5, 0.5], [0.5, 0.5], n_bins=15) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(expected_calibration_error([], []))
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


def test_ece_of_perfectly_calibrated_predictions_is_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, size=200_000)
    hit = rng.random(conf.shape) < conf  # right with probability equal to the confidence
    assert expected_calibration_error(conf, hit) < 0.01
    # the same predictions claiming 0.1 more than they deliver
    assert expected_calibration_error(np.minimum(conf + 0.1, 1.0), hit) > 0.08


def test_head_calibration_reads_softmax_confidences():
    # two rows: p = (3/4, 1/4) right, p = (1/4, 3/4) wrong (label 0): one bin of [0, 1], gap |1/2 - 3/4|
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    assert head_calibration(logits, torch.tensor([0, 0]), n_bins=1) == pytest.approx(0.25, abs=1e-12)


def _key_setup():
    """The labelled KeySource of tests/test_evaluators.py, rebuilt here (a label is a word mod 3)."""
    from datasets import Dataset, DatasetDict

    from lmlab.data.datamodule import DataModule
    from lmlab.data.source import Source
    from lmlab.objectives.clm import CLM

    class KeySource(Source):
        tasks = {"key": 3}

        @property
        def vocab_size(self) -> int:
            return N_SPECIAL + 30

        def build(self) -> DatasetDict:
            out = {}
            for i, (split, n) in enumerate({"train": 50, "validation": 20, "test": 300, "downstream": 600}.items()):
                rng = np.random.default_rng(i)
                rows = [[BOS_ID, *map(int, rng.integers(N_SPECIAL, N_SPECIAL + 30, 6)), EOS_ID] for _ in range(n)]
                out[split] = Dataset.from_dict({"input_ids": rows, "key": [(r[3] - N_SPECIAL) % 3 for r in rows]})
            return DatasetDict(out)

    source = KeySource()
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, CAUSAL, d_model=32, n_layers=1, n_heads=2)
    return SimpleNamespace(model=model, objective=CLM()), DataModule(source, source.build(), batch_size=16, seed=0)


def test_probe_and_finetune_ece_leave_every_other_number_unchanged():
    module, dm = _key_setup()
    plain = Probe(pooling="concat", seeds=2, epochs=5)(module, dm, None)
    with_ece = Probe(pooling="concat", seeds=2, epochs=5, ece=True)(module, dm, None)
    assert set(with_ece) == set(plain) | {"probe/ece"}
    assert all(with_ece[k] == plain[k] for k in plain)
    assert 0.0 <= with_ece["probe/ece"] <= 1.0
    plain = Finetune(epochs=1, max_train=200, max_test=100, lr=1e-3)(module, dm, None)
    with_ece = Finetune(epochs=1, max_train=200, max_test=100, lr=1e-3, ece=True)(module, dm, None)
    assert set(with_ece) == set(plain) | {"finetune/ece"}
    # one fine-tuning seed: its spread and interval are not defined (NaN) in both
    assert all(with_ece[k] == plain[k] or (math.isnan(with_ece[k]) and math.isnan(plain[k])) for k in plain)
    assert 0.0 <= with_ece["finetune/ece"] <= 1.0


# ----------------------------------------------------------------------------- tiny sources, enumerated

# y and z are interchangeable everywhere (same rules, same probabilities): swapping one for the other is a
# corruption exactly as probable as the original, a tie. Sentences of 2 to 4 words over x, y, z.
RULES = [
    ("S", ("A", "B"), 0.6), ("S", ("B", "B"), 0.4),
    ("A", ("y",), 0.35), ("A", ("z",), 0.35), ("A", ("B", "B"), 0.3),
    ("B", ("y",), 0.3), ("B", ("z",), 0.3), ("B", ("x",), 0.4),
]
WORDS = ("x", "y", "z")


def sentence_probabilities(rules) -> dict[tuple[int, ...], float]:
    """P(sentence) of every sentence of a finite grammar, by recursion over all derivations
    (``tests.test_pcfg.brute_force``); sentences as tuples of word indices (words sorted, as the PCFG source
    numbers them)."""
    return {tuple(WORDS.index(w) for w in s): p for s, p in derivations(rules)["S"].items()}


def hmm_probabilities(src: HMMSource) -> dict[tuple[int, ...], float]:
    """P(x) of every sentence of an HMM, by summing over every hidden path (no forward algorithm)."""
    out = {}
    h, v, n = src.hidden_states, src.n_words, src.length
    for x in itertools.product(range(v), repeat=n):
        total = 0.0
        for z in itertools.product(range(h), repeat=n):
            p = src.initial[z[0]] * src.emission[z[0], x[0]]
            for t in range(1, n):
                p *= src.transition[z[t - 1], z[t]] * src.emission[z[t], x[t]]
            total += p
        out[x] = total
    return out


def row(words) -> list[int]:
    return [BOS_ID, *(w + N_SPECIAL for w in words), EOS_ID]


@pytest.fixture(scope="module")
def pcfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("zeroshot") / "tiny.txt"
    path.write_text("".join(f"{lhs} {' '.join(rhs)} {p!r}\n" for lhs, rhs, p in RULES))
    src = PCFGSource(grammar=str(path), train_size=10, validation_size=10, test_size=4000, downstream_size=10)
    probs = sentence_probabilities(RULES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    return SimpleNamespace(source=src, splits=src.build(), probs=probs)


@pytest.fixture(scope="module")
def hmm():
    src = HMMSource(hidden_states=2, vocab_size=3, length=3, alpha_transition=0.5, alpha_emission=0.5,
                    hmm_seed=1, seed=2, label_position=1, train_size=10, validation_size=10, test_size=4000,
                    downstream_size=10)
    probs = hmm_probabilities(src)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    return SimpleNamespace(source=src, splits=src.build(), probs=probs)


def brute_force(probs: dict, n_words: int, task: str, k: int = 2):
    """Every item the task can draw, with its probability, built from the enumeration alone: returns
    (items, weights, the accuracy of the Bayes rule: the credit of the gold choice when the most probable
    choice is picked, ties split, weighted over every item)."""
    items, weights, accuracy = [], [], 0.0

    def p(words):
        return probs.get(tuple(words), 0.0)

    def bayes_credit(ps, gold):
        top = max(ps)
        tied = [abs(q - top) <= 1e-12 * top for q in ps]
        return tied[gold] / sum(tied)

    for x, px in probs.items():
        if task == "minimal_pairs":
            for i in range(len(x)):
                for w in range(n_words):
                    if w == x[i]:
                        continue
                    alt = list(x)
                    alt[i] = w
                    weight = px / len(x) / (n_words - 1)
                    items.append(Item([BOS_ID], [row(x)[1:], row(alt)[1:]], 0))
                    weights.append(weight)
                    accuracy += weight * bayes_credit([px, p(alt)], 0)
        else:
            others = [w for w in range(n_words) if w != x[-1]]
            for distractors in itertools.combinations(others, k - 1):
                choices = [x[-1], *distractors]
                weight = px / math.comb(n_words - 1, k - 1)
                items.append(Item(row(x[:-1])[:-1], [[c + N_SPECIAL, EOS_ID] for c in choices], 0))
                weights.append(weight)
                accuracy += weight * bayes_credit([p((*x[:-1], c)) for c in choices], 0)
    return items, np.asarray(weights), accuracy


@pytest.mark.parametrize("name", ["pcfg", "hmm"])
@pytest.mark.parametrize("task", ["minimal_pairs", "cloze"])
def test_bayes_accuracy_equals_brute_force_enumeration(request, name, task):
    data = request.getfixturevalue(name)
    n_words = data.source.vocab_size - N_SPECIAL
    items, weights, accuracy = brute_force(data.probs, n_words, task)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    # the evaluator's per-item Bayes accuracy, max_j P_j / sum_j P_j, from the source's own sentence_nll
    bayes = np.array([softmax(s).max() for s in exact_log_probs(data.source, items)])
    assert float(weights @ bayes) == pytest.approx(accuracy, abs=1e-12)
    # and the items the evaluator draws from the test split: 4000 of them estimate the same number
    items, _ = ZeroShot(n_items=None, choices=2).items(task, data.source, data.splits["test"])
    assert len(items) == 4000
    out = exact_metrics("t", items, exact_log_probs(data.source, items))
    for key in ("t/bayes", "t/ceiling"):
        assert abs(out[key] - accuracy) < 4 * 0.5 / math.sqrt(4000), (key, out[key], accuracy)


def test_minimal_pairs_have_ties_worth_a_half(pcfg):
    ev = ZeroShot(n_items=400, tasks=["minimal_pairs"])
    items, chance = ev.items("minimal_pairs", pcfg.source, pcfg.splits["test"])
    assert chance == 0.5
    credits = [credit(s, it.gold) for s, it in zip(exact_log_probs(pcfg.source, items), items)]
    assert 0.5 in credits and 1.0 in credits  # y <-> z swaps tie; x <-> y mostly does not


# ----------------------------------------------------------------------------- oracle models


class OracleCLM(nn.Module):
    """A "causal model" whose next-token distribution is the true one, from the enumerated sentence
    probabilities: P(w | prefix) = P(sentences starting prefix + w) / P(sentences starting prefix), EOS
    with the probability that the sentence is the prefix; uniform after an impossible prefix."""

    def __init__(self, probs: dict, vocab_size: int) -> None:
        super().__init__()
        self.probs, self.vocab_size = probs, vocab_size

    def forward(self, ids: torch.Tensor, attention: Attention) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab_size, dtype=torch.float64)
        for b, seq in enumerate(ids.tolist()):
            for t in range(len(seq)):
                prefix = tuple(w - N_SPECIAL for w in seq[1 : t + 1])
                if any(w < 0 for w in prefix) or seq[0] != BOS_ID:
                    continue  # EOS or padding read: nothing to predict
                nxt = np.zeros(self.vocab_size)
                for x, p in self.probs.items():
                    if x[: len(prefix)] == prefix:
                        if len(x) == len(prefix):
                            nxt[EOS_ID] += p
                        else:
                            nxt[x[len(prefix)] + N_SPECIAL] += p
                if nxt.sum() == 0:
                    nxt[N_SPECIAL:] = 1.0
                with np.errstate(divide="ignore"):
                    out[b, t] = torch.from_numpy(np.log(nxt / nxt.sum()))
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def oracle_masked_log_probs(probs: dict, vocab_size: int):
    """The true single-mask conditional p(x_t | x_-t), by enumeration: ``masked_log_probs`` of an oracle
    masked model."""

    def read(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(ids), vocab_size), -math.inf, dtype=torch.float64)
        for b, (seq, t) in enumerate(zip(ids.tolist(), pos.tolist())):
            seq = [s for s in seq if s != PAD_ID]
            assert seq[t] == MASK_ID
            words = seq[1:-1]
            k = t - 1
            p = np.zeros(vocab_size)
            for w in range(vocab_size - N_SPECIAL):
                filled = tuple(v - N_SPECIAL for v in words[:k]) + (w,) + tuple(v - N_SPECIAL for v in words[k + 1 :])
                p[w + N_SPECIAL] = probs.get(filled, 0.0)
            with np.errstate(divide="ignore"):
                out[b] = torch.from_numpy(np.log(p / p.sum()))
        return out

    return read


def oracle(data, reading: str):
    """(module, datamodule) with an oracle model read causally or by pseudo-log-likelihood."""
    vocab = data.source.vocab_size
    if reading == "causal":
        objective = SimpleNamespace(attention=CAUSAL)
    else:
        reader = oracle_masked_log_probs(data.probs, vocab)
        objective = SimpleNamespace(attention=BIDIRECTIONAL, masked_log_probs=reader)
    module = SimpleNamespace(model=OracleCLM(data.probs, vocab), objective=objective)
    return module, SimpleNamespace(source=data.source, splits=data.splits)


@pytest.mark.parametrize("name", ["pcfg", "hmm"])
def test_ceiling_is_the_exact_probability_rule_and_an_oracle_reaches_it(request, name):
    data = request.getfixturevalue(name)
    ev = ZeroShot(n_items=300, choices=3)
    module, dm = oracle(data, "causal")
    out = ev(module, dm)
    for task in ("minimal_pairs", "cloze"):
        items, chance = ev.items(task, data.source, data.splits["test"])
        # independently: the accuracy of picking the choice of highest enumerated probability (ties split)
        accs = []
        for it in items:
            ps = [data.probs.get(tuple(w - N_SPECIAL for w in (it.context + c)[1:-1]), 0.0) for c in it.choices]
            tied = [abs(q - max(ps)) <= 1e-12 * max(ps) for q in ps]
            accs.append(tied[it.gold] / sum(tied))
        p = f"zeroshot/{task}"
        assert out[f"{p}/ceiling"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert out[f"{p}/chance"] == chance == (0.5 if task == "minimal_pairs" else 1 / 3)
        assert out[f"{p}/chance"] < out[f"{p}/ceiling"] <= 1.0
        assert out[f"{p}/bayes"] <= 1.0 and out[f"{p}/n"] == 300
        # a model that scores with the true distribution is the exact-probability rule
        assert out[f"{p}/acc"] == pytest.approx(out[f"{p}/ceiling"], abs=1e-12)
        assert out[f"{p}/acc_norm"] == out[f"{p}/acc"]  # the choices of an item have equal lengths
        assert f"{p}/pll_ceiling" not in out


@pytest.mark.parametrize("name", ["pcfg", "hmm"])
def test_an_oracle_masked_model_reaches_the_pll_ceiling(request, name):
    data = request.getfixturevalue(name)
    out = ZeroShot(n_items=200, choices=2)(*oracle(data, "pll"))
    # read by PLL the cloze asks p(last word | rest): the Bayes rule
    assert out["zeroshot/cloze/acc"] == pytest.approx(out["zeroshot/cloze/ceiling"], abs=1e-12)
    assert out["zeroshot/cloze/pll_ceiling"] == pytest.approx(out["zeroshot/cloze/ceiling"], abs=1e-12)
    # minimal pairs: the PLL rule with exact conditionals, which need not be the Bayes rule
    assert out["zeroshot/minimal_pairs/acc"] == pytest.approx(out["zeroshot/minimal_pairs/pll_ceiling"], abs=1e-12)


def test_items_are_reproducible_and_independent_of_the_other_tasks(pcfg):
    a = ZeroShot(n_items=50, seed=3, choices=2)
    b = ZeroShot(n_items=50, seed=3, choices=2, tasks="cloze")
    assert a.items("cloze", pcfg.source, pcfg.splits["test"]) == b.items("cloze", pcfg.source, pcfg.splits["test"])
    c = ZeroShot(n_items=50, seed=4, choices=2)
    assert a.items("cloze", pcfg.source, pcfg.splits["test"]) != c.items("cloze", pcfg.source, pcfg.splits["test"])
    items, _ = a.items("minimal_pairs", pcfg.source, pcfg.splits["test"])
    for it in items:  # a pair differs in exactly one word
        x, y = it.choices
        assert len(x) == len(y) and sum(u != v for u, v in zip(x, y)) == 1
    items, _ = ZeroShot(n_items=50, choices=3).items("cloze", pcfg.source, pcfg.splits["test"])
    for it in items:  # the gold choice is the sentence's last word; the others distinct words
        assert len({c[0] for c in it.choices}) == 3 and all(c[1:] == [EOS_ID] for c in it.choices)


# ----------------------------------------------------------------------------- batched scoring


def _sequences():
    rng = np.random.default_rng(0)
    seqs, starts = [], []
    for _ in range(11):
        n = int(rng.integers(3, 9))
        seqs.append([BOS_ID, *map(int, rng.integers(N_SPECIAL, N_SPECIAL + 20, n)), EOS_ID])
        starts.append(int(rng.integers(1, n + 1)))
    return seqs, starts


@pytest.mark.parametrize("kind", [CAUSAL, PREFIX])
def test_causal_scores_equal_one_sequence_at_a_time(kind):
    torch.manual_seed(0)
    model = Transformer(N_SPECIAL + 20, kind, d_model=32, n_layers=2, n_heads=2).eval()
    seqs, starts = _sequences()
    scores, counts = causal_scores(model, kind, seqs, starts, batch_size=4)
    for seq, start, score, count in zip(seqs, starts, scores, counts):
        ids = torch.tensor([seq[:-1]])
        attention = Attention(kind, prefix_len=torch.tensor([start]) if kind == PREFIX else None)
        with torch.no_grad():
            logq = torch.log_softmax(model.logits(model(ids, attention)).double(), -1)[0]
        expected = sum(float(logq[t - 1, seq[t]]) for t in range(start, len(seq)))
        assert score == pytest.approx(expected, abs=1e-4)
        assert count == len(seq) - start


def test_pll_scores_equal_one_mask_at_a_time():
    torch.manual_seed(0)
    model = Transformer(N_SPECIAL + 20, BIDIRECTIONAL, d_model=32, n_layers=2, n_heads=2).eval()
    seqs, starts = _sequences()
    scores, counts = pll_scores(MLM().masked_log_probs, model, seqs, starts, batch_size=5)
    for seq, start, score, count in zip(seqs, starts, scores, counts):
        expected = 0.0
        for t in range(start, len(seq) - 1):  # every word of the choice; EOS is not a word
            ids = torch.tensor([seq])
            ids[0, t] = MASK_ID
            with torch.no_grad():
                hidden = model(ids, Attention(BIDIRECTIONAL))
                expected += float(torch.log_softmax(model.logits(hidden[0, t]).double(), -1)[seq[t]])
        assert score == pytest.approx(expected, abs=1e-4)
        assert count == len(seq) - 1 - start


def test_metrics_of_hand_scores():
    items = [Item([BOS_ID], [[5], [6]], 0, lengths=[10, 3]),  # raw picks 1; per byte -1 vs -2 picks 0
             Item([BOS_ID], [[5], [6], [7]], 2, lengths=[1, 1, 1]),  # three-way tie with gold: 1/3
             Item([BOS_ID], [[5], [6]], 1, lengths=[1, 1])]
    scores = [np.array([-10.0, -6.0]), np.array([-1.0, -1.0, -1.0]), np.array([0.0, math.log(3.0)])]
    out = choice_metrics("t", items, scores, [np.ones(len(s)) for s in scores], chance=0.4, n_bins=1)
    assert out["t/acc"] == pytest.approx((0 + 1 / 3 + 1) / 3)
    assert out["t/acc_norm"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    conf = [1 / (1 + math.exp(-4)), 1 / 3, 3 / 4]  # softmax of the raw scores, top choice
    assert out["t/ece"] == pytest.approx(abs(np.mean(conf) - out["t/acc"]), abs=1e-12)
    assert out["t/chance"] == 0.4 and out["t/n"] == 3
    assert out["t/acc_ci95"] > 0


# ----------------------------------------------------------------------------- through the CLI


def test_a_trained_model_lands_between_chance_and_ceiling(lmlab):
    code, out = lmlab("train", "eval=[zeroshot]", "data.train_size=4000", "data.validation_size=100",
                      "data.test_size=400", "data.downstream_size=100", "max_steps=300", "val_every=300",
                      "checkpoint_every=300", "batch_size=32", "logger=none")
    assert code == 0, out
    (run,) = [p.parent for p in lmlab.runs.rglob("results.json")]
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    for task in ("minimal_pairs", "cloze"):
        m = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"zeroshot/{task}/")}
        assert set(m) == {"acc", "acc_norm", "acc_ci95", "chance", "n", "ece", "ceiling", "bayes"}
        assert m["n"] == 400
        assert m["chance"] + m["acc_ci95"] < m["acc"] <= m["ceiling"] + m["acc_ci95"], m
        assert m["acc_norm"] == m["acc"]
        assert 0 <= m["ece"] < 0.2
    assert "zeroshot/cloze/ceiling" in out  # printed in the results table


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


GOOD = [{"context": "Did Ella see the fox at the", "choices": [" beach?", " purple"], "gold": 0},
        {"context": "The small mouse walked near the", "choices": [" library.", " ran the"], "gold": 0},
        {"context": "Jack played near the", "choices": [" farm.", " told"], "gold": 1}]


def test_jsonl_items_on_text_data(lmlab, tmp_path):
    path = write_jsonl(tmp_path / "towns.jsonl", GOOD)
    code, out = lmlab("train", "data=text", "data/tokenizer=byte", *FAST, "eval=[zeroshot]",
                      f"eval.zeroshot.path={path}")
    assert code == 0, out
    (run,) = [p.parent for p in lmlab.runs.rglob("results.json")]
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    m = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("zeroshot/towns/")}
    assert set(m) == {"acc", "acc_norm", "acc_ci95", "chance", "n", "ece"}  # no ceiling on text
    assert m["n"] == 3
    assert m["chance"] == pytest.approx(0.5)  # the choices differ between items: mean 1/k
    assert 0 <= m["acc"] <= 1 and 0 <= m["ece"] <= 1


def test_text_items_are_tokenized_with_bos_and_byte_lengths(tmp_path):
    from lmlab.data.text import TextSource
    from lmlab.data.tokenizers import Byte

    source = TextSource(tokenizer=Byte())
    ev = ZeroShot(path=str(write_jsonl(tmp_path / "t.jsonl", GOOD)), n_items=None)
    assert ev.skip_reason(source) is None
    items, chance = ev.items("t", source, None)
    assert [it.gold for it in items] == [0, 0, 1] and chance == 0.5
    for it, record in zip(items, GOOD):
        assert it.context == [BOS_ID, *(b + N_SPECIAL for b in record["context"].encode())]
        assert it.lengths == [len(c.encode()) for c in record["choices"]]
    # a fixed set of choices: chance is the rate of the most frequent gold choice
    fixed = [{"context": str(i), "choices": ["yes", "no"], "gold": int(i % 4 == 0)} for i in range(8)]
    assert text_chance(fixed) == 0.75


@pytest.mark.parametrize("line,match", [
    ("{not json", "line 2 of .* is not JSON"),
    ('{"context": "a", "choices": ["b", "c"]}', "line 2 .* lacks a context, choices or gold"),
    ('{"context": 3, "choices": ["b", "c"], "gold": 0}', "context that is not a string"),
    ('{"context": "a", "choices": ["b"], "gold": 0}', "two or more non-empty strings"),
    ('{"context": "a", "choices": ["b", ""], "gold": 0}', "two or more non-empty strings"),
    ('{"context": "a", "choices": ["b", "c"], "gold": 2}', "gold 2 for 2 choices: make gold the index"),
    ('{"context": "a", "choices": ["b", "c"], "gold": true}', "gold True"),
    ('["a", "b"]', "lacks a context"),
])
def test_a_malformed_line_is_one_sentence(tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], line])
    with pytest.raises(UserError, match=match):
        read_items(str(path))


def test_bad_settings_and_files_are_user_errors(tmp_path, pcfg):
    with pytest.raises(UserError, match="does not exist: check eval.zeroshot.path"):
        read_items(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="holds no items"):
        read_items(str(write_jsonl(tmp_path / "empty.jsonl", [""])))
    for key, value in (("n_items", 0), ("choices", 1), ("batch_size", 0), ("seed", -1), ("ece_bins", 0)):
        with pytest.raises(UserError, match=f"eval.zeroshot.{key}"):
            ZeroShot(**{key: value})
    src = pcfg.source
    with pytest.raises(UserError, match="has no tokenizer"):
        ZeroShot(choices=2, path=str(write_jsonl(tmp_path / "g.jsonl", GOOD))).skip_reason(src)
    with pytest.raises(UserError, match="eval.zeroshot.tasks names nope"):
        ZeroShot(choices=2, tasks=["nope"]).skip_reason(src)
    with pytest.raises(UserError, match="cloze needs 4 words and data PCFGSource has 3: lower eval.zeroshot.choices"):
        ZeroShot(choices=4).skip_reason(src)
    assert ZeroShot(choices=4, tasks=["minimal_pairs"]).skip_reason(src) is None


def test_text_data_without_items_is_skipped_and_a_bad_file_stops_the_cli(lmlab, tmp_path):
    code, out = lmlab("train", "data=text", "data/tokenizer=byte", *FAST, "eval=[zeroshot]")
    assert code == 0, out
    assert "eval zeroshot skipped: data TextSource knows no sentence probabilities" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], '{"context": "a", "choices": ["b", "c"], "gold": 5}'])
    code, out = lmlab("train", "data=text", "data/tokenizer=byte", *FAST, "eval=[zeroshot]",
                      f"eval.zeroshot.path={bad}")
    assert code != 0
    assert "line 2 of" in out and "make gold the index of the right choice, 0 to 1." in out
    assert "Traceback" not in out
