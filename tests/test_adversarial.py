"""The paper's algorithm baselines: objective=adversarial_mlm (gradients of the two-player loss) and the
lookup-table features of eval=probe (equal to the source's exact conditionals)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL
from lmlab.data.datamodule import DataModule
from lmlab.data.hmm import HMMSource
from lmlab.data.pcfg import PCFGSource
from lmlab.data.tasks import labelled_rows
from lmlab.evaluation.probe import Probe, lookup_features
from lmlab.models.transformer import Transformer
from lmlab.objectives.adversarial_mlm import AdversarialMLM
from lmlab.objectives.mlm import MLM
from lmlab.readout import features
from lmlab.vocab import N_SPECIAL
from tests.conftest import FAST, TINY


def _hmm(**kw):
    source = HMMSource(hidden_states=4, vocab_size=8, length=6, train_size=60, validation_size=10,
                       test_size=40, downstream_size=60, **kw)
    return source, source.build()


@pytest.mark.parametrize("pooling", ["mean", "concat"])
def test_adversarial_gradients(pooling):
    """d/d encoder = grad(MLM) - lam grad(head loss); d/d head = + grad(head loss); value = MLM - lam h."""
    source, splits = _hmm()
    lam = 0.7
    objective = AdversarialMLM(d_model=8, lam=lam, head_batch_size=16, pooling=pooling)
    objective.bind(source, splits)
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2)
    ids = torch.as_tensor(splits["train"][:12]["input_ids"])
    prepared = objective.prepare({"input_ids": ids, "seed": 5})
    total, metrics = objective.loss(model, prepared)
    enc_params, head_params = list(model.parameters()), list(objective.head.parameters())
    g_total = torch.autograd.grad(total, enc_params + head_params)

    # references, computed separately: plain MLM, and the head's loss on the same labelled rows
    mlm, _ = MLM.loss(MLM(vocab_size=source.vocab_size), model, MLM(vocab_size=source.vocab_size).prepare(
        {"input_ids": ids, "seed": 5}))
    head_ids, y = objective.head_batch(5)
    length = max(len(r) for r in labelled_rows(splits["train"], "task_z")[0])
    h = F.cross_entropy(objective.head(features(model, head_ids, BIDIRECTIONAL, pooling, length)), y)
    g_mlm = torch.autograd.grad(mlm, enc_params, allow_unused=True)
    g_h = torch.autograd.grad(h, enc_params + head_params)

    for gt, gm, gh in zip(g_total[: len(enc_params)], g_mlm, g_h[: len(enc_params)]):
        gm = torch.zeros_like(gt) if gm is None else gm
        torch.testing.assert_close(gt, gm - lam * gh, atol=1e-6, rtol=1e-5)
    for gt, gh in zip(g_total[len(enc_params):], g_h[len(enc_params):]):
        torch.testing.assert_close(gt, gh, atol=1e-7, rtol=1e-6)
    assert float(total) == pytest.approx(float(mlm) - lam * float(h), rel=1e-5)
    assert metrics["head_loss"] == pytest.approx(float(h), rel=1e-5)
    assert metrics["mlm_loss"] == pytest.approx(float(mlm), rel=1e-5)
    # the head rows are a deterministic function of the batch seed, taken from the train split
    torch.testing.assert_close(objective.head_batch(5)[0], head_ids)
    assert not torch.equal(objective.head_batch(6)[0], head_ids)


def test_adversarial_objective_is_a_module_with_the_head():
    source, splits = _hmm()
    objective = AdversarialMLM(d_model=8)
    objective.bind(source, splits)
    names = [n for n, _ in objective.named_parameters()]
    assert names == ["head.weight", "head.bias"]
    assert objective.head.out_features == 4 and objective.attention == BIDIRECTIONAL


@pytest.mark.parametrize("pooling", ["mean", "concat"])
def test_held_out_scores_the_head_on_every_test_row_one_at_a_time(pooling):
    """The adversary's own head on the test split: accuracy and mean loss equal a row-by-row loop over the
    labelled test rows (each padded to the head's length), in batches that do not divide the rows."""
    source, splits = _hmm()
    objective = AdversarialMLM(d_model=8, pooling=pooling)
    objective.bind(source, splits)
    torch.manual_seed(1)
    model = Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2)
    with torch.no_grad():
        objective.head.weight.normal_()
    model.train()
    got = objective.held_out(model, batch_size=7)
    assert model.training  # left as it was found
    rows, labels = labelled_rows(splits["test"], "task_z")
    length = max(len(r) for r in labelled_rows(splits["train"], "task_z")[0])
    model.eval()
    hits, nll = [], []
    with torch.no_grad():
        for row, y in zip(rows, labels):
            ids = torch.full((1, length), 0, dtype=torch.long)
            ids[0, : len(row)] = torch.as_tensor(row)
            logits = objective.head(features(model, ids, BIDIRECTIONAL, pooling, length))[0]
            hits.append(int(logits.argmax()) == int(y))
            nll.append(float(-torch.log_softmax(logits, -1)[int(y)]))
    assert len(rows) == 40
    assert got["head_acc"] == pytest.approx(float(np.mean(hits)), abs=1e-12)
    assert got["head_loss"] == pytest.approx(float(np.mean(nll)), rel=1e-5)
    assert 0 < got["head_acc"] < 1  # a real mix of right and wrong rows, so the count is tested


def test_held_out_is_empty_without_labelled_test_rows():
    source, splits = _hmm()
    objective = AdversarialMLM(d_model=8)
    objective.bind(source, {k: v for k, v in splits.items() if k != "test"})
    model = Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2)
    assert objective.held_out(model) == {}
    assert MLM(vocab_size=source.vocab_size).held_out(model) == {}


def test_adversarial_mlm_trains_through_the_cli(lmlab):
    code, out = lmlab("train", "objective=adversarial_mlm", "objective.lam=0.5", *FAST, *TINY,
                      "eval=[perplexity]")
    assert code == 0, out
    import json

    results = json.loads(next(lmlab.runs.rglob("results.json")).read_text())
    assert "perplexity/gap" in results["metrics"]
    # the adversary's head, scored on the test split after training
    assert 0.0 <= results["metrics"]["objective/head_acc"] <= 1.0
    assert results["metrics"]["objective/head_loss"] > 0


# ----- the lookup table -----

@pytest.mark.parametrize("make", ["hmm", "pcfg"])
def test_lookup_features_are_the_exact_conditionals(make):
    if make == "hmm":
        source, splits = _hmm()
    else:
        source = PCFGSource(levels=2, nonterminals_per_level=3, vocab_size=12, words_per_preterminal=4,
                            start_symbols=2, train_size=10, validation_size=10, test_size=30, downstream_size=30)
        splits = source.build()
    rows = [list(r) for r in splits["test"][:20]["input_ids"]]
    conds = source.single_mask_conditionals(rows)
    length = max(len(r) for r in rows)
    mean = lookup_features(source, rows, "mean", length).double()
    concat = lookup_features(source, rows, "concat", length).double().reshape(len(rows), length, -1)
    for i, (row, c) in enumerate(zip(rows, conds)):
        c = torch.as_tensor(np.asarray(c)[:, N_SPECIAL:])
        assert c.shape[0] == len(row) - 2
        torch.testing.assert_close(mean[i], c.mean(0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(concat[i, 1 : len(row) - 1], c, atol=1e-6, rtol=1e-6)  # word t at row position t
        assert float(concat[i, 0].abs().sum()) == 0 and float(concat[i, len(row) - 1 :].abs().sum()) == 0
        torch.testing.assert_close(concat[i, 1 : len(row) - 1].sum(-1), torch.ones(len(row) - 2, dtype=torch.float64))


def test_probe_reports_the_lookup_baseline():
    source, splits = _hmm()
    dm = DataModule(source, splits, batch_size=16, seed=0)
    torch.manual_seed(0)
    module = SimpleNamespace(model=Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2),
                             objective=MLM())
    probe = Probe(seeds=2, epochs=5, pooling="concat")
    out = probe(module, dm, None)
    assert {"probe/lookup_acc", "probe/lookup_acc_std", "probe/lookup_acc_ci95"} <= set(out)
    assert 0.0 <= out["probe/lookup_acc"] <= 1.0
    # the same heads on the same features: reproducible, and cached (independent of the model)
    again = Probe(seeds=2, epochs=5, pooling="concat")(module, dm, None)
    assert again["probe/lookup_acc"] == out["probe/lookup_acc"]
    assert probe._lookup_cache
    assert "probe/lookup_acc" not in Probe(seeds=1, epochs=1, lookup=False)(module, dm, None)


def test_bounded_adversary_stops_at_chance():
    """bound=true: the encoder's term is min(h, log C): above chance it gives the encoder no gradient (only
    the MLM's), below chance the same gradient as the unbounded objective."""
    source, splits = _hmm()
    ids = torch.as_tensor(splits["train"][:12]["input_ids"])
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, BIDIRECTIONAL, d_model=8, n_layers=1, n_heads=2)
    params = list(model.parameters())

    def encoder_grads(objective):
        objective.bind(source, splits)
        total, metrics = objective.loss(model, objective.prepare({"input_ids": ids, "seed": 5}))
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], metrics

    plain = MLM(vocab_size=source.vocab_size)
    mlm, _ = MLM.loss(plain, model, plain.prepare({"input_ids": ids, "seed": 5}))
    g_mlm = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(mlm, params, allow_unused=True))]
    chance = float(np.log(4))
    for above in (True, False):
        bounded, unbounded = AdversarialMLM(d_model=8, lam=0.7, bound=True), AdversarialMLM(d_model=8, lam=0.7)
        for objective in (bounded, unbounded):
            objective.bind(source, splits)
            if above:  # a confident random head: far worse than chance
                with torch.no_grad():
                    objective.head.weight.mul_(30.0)
            else:  # a head fitted to the (fixed) features of its rows: better than chance
                opt = torch.optim.Adam(objective.head.parameters(), lr=0.1)
                for _ in range(100):
                    _, own, _ = objective.head_losses(model, 5)
                    opt.zero_grad()
                    own.backward()
                    opt.step()
                model.zero_grad(set_to_none=True)
        g_bounded, metrics = encoder_grads(bounded)
        g_unbounded, _ = encoder_grads(unbounded)
        assert (metrics["head_loss"] > chance) == above, metrics
        for gb, gu, gm in zip(g_bounded, g_unbounded, g_mlm):
            torch.testing.assert_close(gb, gm if above else gu, atol=1e-6, rtol=1e-5)
        if not above:  # and the adversarial term really acts below chance
            assert any(not torch.allclose(gu, gm, atol=1e-6) for gu, gm in zip(g_unbounded, g_mlm))
