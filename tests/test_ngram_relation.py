"""Known-answer tests of ERNIE-Gram's enhanced n-gram relation modelling (``objective=ngram_mlm
objective.relation=true``): the generator's sampler, the corruption, the replaced-token-detection targets,
the loss as the sum of its parts, and a run through the real CLI."""

from __future__ import annotations

import csv
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import BIDIRECTIONAL
from lmlab.errors import UserError
from lmlab.models.transformer import Transformer
from lmlab.objectives.ngram_mlm import NgramMLM, sample_identities
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID
from tests.conftest import TINY

V = 20
LEXICON = [(4, 5), (4, 5, 6), (8, 9)]


def make(fine_weight=1.0, rtd_weight=1.0, relation=True):
    torch.manual_seed(0)
    obj = NgramMLM(d_model=16, max_n=3, mask_prob=0.5, fine_weight=fine_weight, relation=relation,
                   generator=partial(Transformer, n_layers=1), rtd_weight=rtd_weight)
    obj.vocab_size = V
    obj.set_lexicon(LEXICON)
    model = Transformer(vocab_size=V, attention=BIDIRECTIONAL, d_model=16, n_layers=1, n_heads=2)
    return obj, model


def batch(seed=3, n=16):
    g = torch.Generator().manual_seed(0)
    rows = [[BOS_ID, *torch.randint(4, 12, (int(k),), generator=g).tolist(), EOS_ID]
            for k in torch.randint(3, 12, (n,), generator=g)]
    rows[0] = [BOS_ID, 4, 5, 6, 7, 8, 9, EOS_ID]
    ids = torch.full((n, 13), PAD_ID)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
    return rows, {"input_ids": ids, "seed": seed}


def forced(identities: torch.Tensor, k: int = V + len(LEXICON)) -> torch.Tensor:
    """Generator logits whose samples are ``identities`` whatever the uniforms."""
    return torch.full((len(identities), k), -1e4).scatter(1, identities[:, None], 1e4)


def test_sampler_follows_the_softmax_and_never_proposes_excluded_classes():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, 2.0, float("-inf")]])
    u = (torch.arange(20000) + 0.5) / 20000
    picks = sample_identities(logits.expand(len(u), -1), u)
    freq = torch.bincount(picks, minlength=5).double() / len(u)
    assert torch.allclose(freq, logits.softmax(-1)[0].double(), atol=1e-4)
    assert sample_identities(logits, torch.zeros(1)).item() == 1  # u = 0: the first possible class
    assert sample_identities(logits, torch.tensor([1 - 2**-24])).item() == 3  # the largest u


def test_a_generator_that_reproduces_the_original_replaces_nothing():
    obj, model = make()
    rows, b = batch()
    p = obj.prepare(b)
    targets = p.targets[p.loss_mask]
    logits = forced(targets)
    for seed in range(5):
        u = torch.rand(len(targets), generator=torch.Generator().manual_seed(seed))
        ids, replaced = obj.corrupt(p, sample_identities(logits, u))
        assert not replaced.any()  # every RTD target is 0
        assert torch.equal(ids[p.loss_mask], targets) and torch.equal(ids[~p.loss_mask], p.inputs[~p.loss_mask])
        # a row whose masked units are all single words is given back exactly
        for i, row in enumerate(rows):
            if bool((p.targets[i][p.loss_mask[i]] < V).all()):
                assert ids[i, : len(row)].tolist() == row
    obj.generator_logits = lambda prepared: logits
    loss, metrics = obj.loss(model, p)
    assert metrics["replaced"] == 0.0 and metrics["gen"] == 0.0
    assert math.isfinite(float(loss.detach()))


def test_rtd_targets_are_exactly_the_slots_whose_sample_differs():
    obj, model = make()
    _, b = batch()
    p = obj.prepare(b)
    targets = p.targets[p.loss_mask]
    # keep even slots, replace odd slots by a word or an n-gram other than the original
    other = torch.where(targets == V + 2, torch.tensor(V + 0), torch.tensor(V + 2))
    other[1::4] = torch.where(targets[1::4] == 7, 11, 7)
    sampled = torch.where(torch.arange(len(targets)) % 2 == 0, targets, other)
    ids, replaced = obj.corrupt(p, sampled)
    positions = p.loss_mask.nonzero().tolist()
    expected = {tuple(positions[k]) for k in range(1, len(targets), 2)}
    assert {tuple(x) for x in replaced.nonzero().tolist()} == expected
    # the loss reports the same fraction and the RTD BCE by its formula
    obj.generator_logits = lambda prepared: forced(sampled)
    _, metrics = obj.loss(model, p)
    assert metrics["replaced"] == pytest.approx(len(expected) / len(targets))
    with torch.no_grad():
        x = obj.rtd_head(obj.hidden_of_identities(model, ids, p.attention)).squeeze(-1)
    real = p.inputs != PAD_ID
    t = replaced.double()
    bce = -(t * F.logsigmoid(x.double()) + (1 - t) * F.logsigmoid(-x.double()))[real].mean()
    assert metrics["rtd"] == pytest.approx(float(bce), rel=1e-5)


def test_corruption_keeps_the_collators_shortened_rows():
    obj, model = make()
    rows, b = batch(n=32)
    p = obj.prepare(b)
    with torch.no_grad():
        logits = obj.generator_logits(p)  # the real (untrained) generator
    u = torch.rand(len(logits), generator=torch.Generator().manual_seed(b["seed"]))
    sampled = sample_identities(logits, u)
    assert (sampled >= N_SPECIAL).all() and (sampled < V + len(LEXICON)).all()
    assert (sampled >= V).any() and (sampled < V).any()  # both words and n-grams are proposed
    ids, replaced = obj.corrupt(p, sampled)
    assert ids.shape == p.inputs.shape
    assert torch.equal(ids != PAD_ID, p.inputs != PAD_ID)  # same shortened lengths, one slot per n-gram
    assert torch.equal(ids[~p.loss_mask], p.inputs[~p.loss_mask])
    assert torch.equal(replaced, p.loss_mask & (ids != p.targets))
    for i, row in enumerate(rows):
        coarse = p.targets[i][p.loss_mask[i]]
        saved = sum(len(LEXICON[c - V]) - 1 for c in coarse.tolist() if c >= V)
        assert int((ids[i] != PAD_ID).sum()) == len(row) - saved


def test_an_ngram_enters_as_its_row_of_the_ngram_embedding():
    obj, model = make()
    ids = torch.tensor([[BOS_ID, 7, V + 1, 9, EOS_ID], [BOS_ID, V + 2, V + 0, EOS_ID, PAD_ID]])
    attention = obj.prepare({"input_ids": ids.clamp_max(V - 1), "seed": 0}).attention
    big = Transformer(vocab_size=V + len(LEXICON), attention=BIDIRECTIONAL, d_model=16, n_layers=1, n_heads=2)
    state = model.state_dict()
    state["embed.weight"] = torch.cat([state["embed.weight"], obj.ngram_head.weight.detach()])
    state["head.weight"] = state["embed.weight"]
    big.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(obj.hidden_of_identities(model, ids, attention), big(ids, attention), atol=1e-6)
    assert not model.embed._forward_hooks  # the hook is removed
    with pytest.raises(UserError, match="relation=false"):
        obj.hidden_of_identities(torch.nn.Linear(2, 2), ids, attention)


def test_the_loss_is_the_sum_of_its_parts():
    obj, model = make(fine_weight=0.5, rtd_weight=3.0)
    _, b = batch(seed=5)
    p = obj.prepare(b)
    targets = p.targets[p.loss_mask]
    g = torch.Generator().manual_seed(1)
    stub = torch.randn(len(targets), V + len(LEXICON), generator=g)
    stub[:, :N_SPECIAL] = -1e4
    stub[:, V:] = -1e4  # only words are sampled, so the model reads plain token ids
    obj.generator_logits = lambda prepared: stub
    loss, metrics = obj.loss(model, p)
    # by hand
    logp = stub.double().log_softmax(-1)
    gen = -logp[torch.arange(len(targets)), targets].mean()
    u = torch.rand(len(targets), generator=torch.Generator().manual_seed(5))
    sampled = sample_identities(stub, u)
    ids = p.inputs.clone()
    ids[p.loss_mask] = sampled
    with torch.no_grad():
        hidden = model(ids, p.attention).double()
        W = torch.cat([model.head.weight, obj.ngram_head.weight]).double()
        h = hidden[p.loss_mask]
        coarse = -(h @ W.T).log_softmax(-1)[torch.arange(len(targets)), targets].mean()
        terms = []
        for m, fine in enumerate(p.fine_targets[p.loss_mask].tolist()):
            for i, x in enumerate(t for t in fine if t >= 0):
                z = (h[m] + obj.fine_offset.weight[i].double()) @ model.head.weight.double().T
                terms.append(-z.log_softmax(-1)[x])
        fine = torch.stack(terms).mean()
        real = p.inputs != PAD_ID
        r = (p.loss_mask & (ids != p.targets)).double()
        x = hidden @ obj.rtd_head.weight.double()[0] + obj.rtd_head.bias.double()
        rtd = -(r * torch.log(torch.sigmoid(x)) + (1 - r) * torch.log(1 - torch.sigmoid(x)))[real].mean()
    for name, value in {"gen": gen, "coarse": coarse, "fine": fine, "rtd": rtd}.items():
        assert metrics[name] == pytest.approx(float(value), rel=1e-5), name
    assert float(loss) == pytest.approx(float(gen + coarse + 0.5 * fine + 3.0 * rtd), rel=1e-5)


def test_sampling_is_seeded_and_no_gradient_flows_through_it():
    obj, model = make()
    _, b = batch()
    p = obj.prepare(b)
    first = obj.loss(model, p)[0]
    assert float(first) == float(obj.loss(model, p)[0])  # the same seed, the same samples
    p2 = obj.prepare(b)
    p2.seed = 4
    assert float(first) != float(obj.loss(model, p2)[0])
    # the generator learns from its own MLM loss only
    F.cross_entropy(obj.generator_logits(p), p.targets[p.loss_mask]).backward()
    alone = [q.grad.clone() for q in obj.generator.parameters()]
    obj.zero_grad()
    model.zero_grad()
    obj.loss(model, p)[0].backward()
    for a, q in zip(alone, obj.generator.parameters()):
        assert torch.allclose(a, q.grad, atol=1e-7)
    assert obj.rtd_head.weight.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0


def test_relation_off_leaves_the_objective_unchanged():
    on, model = make()
    off, _ = make(relation=False)
    assert off.generator is None and off.rtd_head is None
    assert {k for k in on.state_dict() if not k.startswith(("generator", "rtd_head"))} == set(off.state_dict())
    _, b = batch()
    _, metrics = off.loss(model, off.prepare(b))
    assert set(metrics) == {"coarse", "fine"}


def test_mfu_counts_the_generator():
    """The training step's FLOPs per token: the model's plus the generator's (both forward + backward)."""
    from lmlab.objectives.clm import CLM
    from lmlab.training.module import LMModule

    on, model = make()
    off, _ = make(relation=False)
    assert off.extra_flops_per_token(12) == 0.0 == CLM().extra_flops_per_token(12)
    assert on.extra_flops_per_token(12) == on.generator.flops_per_token(12) > 0
    module = LMModule(model, on, torch.optim.AdamW, lambda step, total: 1.0)
    assert module.flops_per_token(12) == model.flops_per_token(12) + on.generator.flops_per_token(12)


def test_relation_trains_through_the_cli(lmlab):
    args = ["max_steps=30", "val_every=15", "checkpoint_every=15", "batch_size=16", "logger=csv",
            "optim.lr=3e-3", "model.d_model=32", "model.n_heads=2", "eval=[perplexity]"]
    code, out = lmlab("train", "objective=ngram_mlm", "objective.relation=true", *args, *TINY)
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    assert math.isfinite(json.loads((run / "results.json").read_text())["metrics"]["perplexity/gap"])
    rows = [r for r in csv.DictReader((run / "logs" / "metrics.csv").open()) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and {"train/gen", "train/rtd", "train/replaced"} <= set(rows[0])
    assert len(losses) >= 2 and losses[-1] < losses[0]
