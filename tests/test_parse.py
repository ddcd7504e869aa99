"""``eval=parse``: gold trees of the PCFG (Viterbi), bracket F1, trees from syntactic distances, baselines."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmlab.data.datamodule import DataModule
from lmlab.data.grammar import parse_grammar
from lmlab.data.pcfg import PCFGSource, to_rows
from lmlab.errors import UserError
from lmlab.evaluation.parse import Parse, bracket_f1, left_branching, right_branching, tree_from_distances
from lmlab.models.lstm import LSTM
from lmlab.models.transformer import Transformer
from lmlab.objectives.mlm import MLM
from tests.test_evaluators import KeySource

PP_GRAMMAR = """
S NP VP 1.0
NP N 0.8
NP NP PP 0.2
N n 1.0
VP V NP {vnp}
VP VP PP {vpp}
PP P NP 1.0
V v 1.0
P p 1.0
"""


def _grammar(tmp_path, vnp: float):
    path = tmp_path / "pp.txt"
    path.write_text(PP_GRAMMAR.format(vnp=vnp, vpp=round(1 - vnp, 6)))
    return parse_grammar(path)


def test_viterbi_attaches_the_prepositional_phrase_by_hand(tmp_path):
    # "n v n p n": VP attachment has probability 0.8 * P(VP VP PP) * P(VP V NP) * 0.8 * 0.8,
    # NP attachment 0.8 * P(VP V NP) * 0.2 * 0.8 * 0.8. With P(VP V NP) = 0.7: 0.10752 > 0.07168 (VP);
    # with 0.9: 0.04608 < 0.09216 (NP).
    for vnp, attach in ((0.7, (1, 3)), (0.9, (2, 5))):
        g = _grammar(tmp_path, vnp)
        w = {name: i for i, name in enumerate(g.words)}
        sentence = [w[x] for x in "n v n p n".split()]
        assert g.viterbi_spans(sentence) == {(0, 5), (1, 5), (3, 5), attach}
    assert g.viterbi_spans([w["v"], w["n"]]) is None  # not a sentence of the grammar


def test_viterbi_follows_unary_chains(tmp_path):
    # "a b c": S -> X -> Y -> A (B C) with probability {chain}, against S -> (A B) C with 1 - {chain}
    for chain, inner in ((0.6, (1, 3)), (0.3, (0, 2))):
        path = tmp_path / "chain.txt"
        path.write_text(f"S X {chain}\nS AB C {1 - chain:.6f}\nX Y 1.0\nY A BC 1.0\nBC B C 1.0\nAB A B 1.0\n"
                        "A a 1.0\nB b 1.0\nC c 1.0\n")
        g = parse_grammar(path)
        assert g.viterbi_spans([g.words.index(x) for x in "abc"]) == {(0, 3), inner}


def _brute_force_best(g, words):
    """The most likely derivation's (log probability, spans) by plain recursion over every rule and split."""
    n = len(words)

    @lru_cache(maxsize=None)
    def best(a: int, i: int, j: int, unary_depth: int = 0):
        out = (-math.inf, frozenset())
        if j - i == 1:
            for (lhs, word), p in zip(g.emit, g.emit_p):
                if lhs == a and word == words[i] and p > 0:
                    out = max(out, (math.log(p), frozenset()), key=lambda x: x[0])
        for (lhs, b, c), p in zip(g.binary, g.binary_p):
            if lhs != a or p <= 0:
                continue
            for k in range(i + 1, j):
                (lb, sb), (lc, sc) = best(int(b), i, k), best(int(c), k, j)
                if lb + lc + math.log(p) > out[0]:
                    out = (lb + lc + math.log(p), sb | sc | {(i, j)})
        if unary_depth < 3:
            for (lhs, b), p in zip(g.unary, g.unary_p):
                if lhs == a and p > 0:
                    lb, sb = best(int(b), i, j, unary_depth + 1)
                    if lb + math.log(p) > out[0]:
                        out = (lb + math.log(p), sb)
        return out

    return best(g.start, 0, n)


def test_viterbi_equals_a_brute_force_search_on_the_default_grammar():
    source = PCFGSource(train_size=1, validation_size=1, test_size=1, downstream_size=1)
    g = source.grammar
    sentences = g.sample(40, np.random.default_rng(3))
    gold = source.gold_spans(to_rows(sentences))
    for words, spans in zip(sentences, gold):
        logp, expected = _brute_force_best(g, [int(x) for x in words])
        assert math.isfinite(logp)
        assert spans == set(expected), words
        assert len(spans) == len(words) - 1  # a binary tree


def test_gold_trees_score_one_against_themselves():
    source = PCFGSource(train_size=1, validation_size=60, test_size=1, downstream_size=1)
    rows = source.build()["validation"]["input_ids"]
    gold = source.gold_spans(rows)
    scores = [bracket_f1(g, g, len(r) - 2) for r, g in zip(rows, gold)]
    assert all(s == 1.0 for s, r in zip(scores, rows) if len(r) - 2 >= 3)
    assert all(s is None for s, r in zip(scores, rows) if len(r) - 2 < 3)  # no span but the trivial ones


def test_bracket_f1_of_hand_made_trees():
    # gold ((w0 w1) (w2 (w3 w4))) against right-branching (w0 (w1 (w2 (w3 w4)))): non-trivial gold spans
    # {(0,2), (2,5), (3,5)}, predicted {(1,5), (2,5), (3,5)}: 2 of 3 each way, F1 = 2/3
    gold = {(0, 5), (0, 2), (2, 5), (3, 5)}
    assert bracket_f1(right_branching(5), gold, 5) == pytest.approx(2 / 3)
    assert bracket_f1(left_branching(5), gold, 5) == pytest.approx(1 / 3)  # {(0,2),(0,3),(0,4)}: 1 of 3
    # flat gold {(0,2), (2,5)} against {(0,2), (0,3), (3,5)}: P = 1/3, R = 1/2, F1 = 2 PR / (P + R) = 0.4
    assert bracket_f1({(0, 2), (0, 3), (3, 5), (0, 5)}, {(0, 2), (2, 5), (0, 5)}, 5) == pytest.approx(0.4)
    assert bracket_f1({(0, 2)}, {(1, 3)}, 3) == 0.0
    assert bracket_f1({(0, 2)}, {(0, 2), (1, 2)}, 2) is None  # two words: nothing but trivial spans


def test_trees_from_distances_and_the_branching_baselines_by_hand():
    assert right_branching(4) == {(0, 4), (1, 4), (2, 4)}
    assert left_branching(4) == {(0, 4), (0, 2), (0, 3)}
    assert tree_from_distances([3, 2, 1]) == right_branching(4)
    assert tree_from_distances([1, 2, 3]) == left_branching(4)
    assert tree_from_distances([0, 0, 0]) == right_branching(4)  # ties split at the leftmost gap
    assert tree_from_distances([1, 3, 2]) == {(0, 4), (0, 2), (2, 4)}
    # the right-branching tree against gold ((w0 w1) (w2 w3)): {(1,4),(2,4)} vs {(0,2),(2,4)}: F1 = 1/2
    assert bracket_f1(right_branching(4), {(0, 4), (0, 2), (2, 4)}, 4) == 0.5


def test_the_distances_of_a_gold_tree_rebuild_it():
    """Distance between words t and t+1 = the length of the smallest gold span holding both: splitting at the
    largest rebuilds every gold tree exactly."""
    source = PCFGSource(train_size=1, validation_size=80, test_size=1, downstream_size=1)
    rows = source.build()["validation"]["input_ids"]
    for row, gold in zip(rows, source.gold_spans(rows)):
        n = len(row) - 2
        d = [min(j - i for i, j in gold if i <= t and t + 1 < j) for t in range(n - 1)]
        assert tree_from_distances(d) == gold


def _pcfg_module(model_cls=Transformer, **model_args):
    source = PCFGSource(train_size=50, validation_size=120, test_size=10, downstream_size=60)
    dm = DataModule(source, source.build(), batch_size=16, seed=0)
    objective = MLM()
    torch.manual_seed(0)
    model = model_cls(source.vocab_size, objective.attention, **model_args)
    return SimpleNamespace(model=model, objective=objective), dm


def test_parse_reports_every_layer_and_the_baselines_on_the_same_sentences():
    module, dm = _pcfg_module(d_model=32, n_layers=2, n_heads=2)
    out = Parse(layer="best")(module, dm, None)
    rows = [list(r) for r in dm.splits["validation"]["input_ids"] if len(r) - 2 >= 3]
    assert out["parse/sentences"] == len(rows)
    gold = dm.source.gold_spans(rows)
    right = [bracket_f1(right_branching(len(r) - 2), g, len(r) - 2) for r, g in zip(rows, gold)]
    assert out["parse/right_f1"] == pytest.approx(np.mean(right))
    assert out["parse/f1"] == out[f"parse/layer{int(out['parse/layer'])}/f1"]
    assert out["parse/f1_minus_right"] == pytest.approx(out["parse/f1"] - out["parse/right_f1"])
    for i in range(3):
        assert 0.0 <= out[f"parse/layer{i}/f1"] <= 1.0 and out[f"parse/layer{i}/f1_ci95"] > 0.0
    assert "parse/layer3/f1" not in out
    fixed = Parse(layer=2, distance="l2")(module, dm, None)
    assert fixed["parse/layer"] == 2.0 and fixed["parse/f1"] == fixed["parse/layer2/f1"]
    assert fixed["parse/right_f1"] == out["parse/right_f1"] and fixed["parse/random_f1"] == out["parse/random_f1"]


def test_parse_refusals():
    with pytest.raises(UserError, match="no gold trees"):
        Parse().skip_reason(KeySource())
    for bad in (dict(distance="jsd"), dict(layer="first"), dict(layer=-2)):
        with pytest.raises(UserError, match="eval.parse"):
            Parse(**bad)
    module, dm = _pcfg_module(LSTM, d_model=16)
    with pytest.raises(UserError, match="no block list"):
        Parse()(module, dm, None)
    last = Parse(layer="last")(module, dm, None)  # the output of any model
    assert 0.0 <= last["parse/f1"] <= 1.0 and "parse/layer0/f1" not in last


def test_the_command_line_runs_parse_and_the_probe_at_every_layer(lmlab):
    from tests.conftest import FAST, TINY

    code, out = lmlab("train", "objective=mlm", "model.n_layers=3", "eval=[probe,parse]", "eval.probe.layer=all",
                      "eval.probe.seeds=2", "eval.probe.epochs=5", *FAST, *TINY)
    assert code == 0, out
    (run,) = [p.parent for p in lmlab.runs.rglob("DONE")]
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics["probe/layer3/acc"] == metrics["probe/acc"] and "probe/layer4/acc" not in metrics
    assert all(f"probe/layer{i}/acc_ci95" in metrics for i in range(4))
    assert all(f"parse/layer{i}/f1" in metrics for i in range(4)) and 0 <= metrics["parse/f1"] <= 1
    code, out = lmlab("eval", f"run={run}", "eval=parse", "eval.parse.layer=7")
    assert code == 2 and "layers 0..3" in out
