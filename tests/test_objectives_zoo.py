"""Known-answer tests of the objective zoo (EMO, ERNIE-Gram, span corruption, prefix LM, self-evolution,
distillation, MLM suffix masking), and the objectives through the real CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.models.base import Backbone
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.objectives.distill import distill_loss
from lmlab.objectives.emo import EMO, combine, emo_per_token
from lmlab.objectives.mlm import MLM
from lmlab.objectives.ngram_mlm import NgramMLM, build_lexicon, max_match, ngram_tstats
from lmlab.objectives.prefix_lm import PrefixLM, split_points
from lmlab.objectives.self_evolution import informative_positions, smoothed_ce, token_nll
from lmlab.objectives.span import SpanCorruption, corrupt, random_spans_noise_mask, reconstruct
from lmlab.vocab import BOS_ID, EOS_ID, MASK_ID, N_SPECIAL, PAD_ID
from tests.conftest import FAST, TINY

torch.set_default_dtype(torch.float32)


def tiny_model(attention=CAUSAL, vocab=20, d=16):
    torch.manual_seed(0)
    return Transformer(vocab_size=vocab, attention=attention, d_model=d, n_layers=1, n_heads=2)


# ----- EMO -----

def test_emo_equals_the_explicit_cost_matrix_formula():
    g = torch.Generator().manual_seed(0)
    V, H, N = 7, 5, 11
    e, logits = torch.randn(V, H, generator=g), torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    cos = (e @ e.T) / (e.norm(dim=1)[:, None] * e.norm(dim=1)[None])
    C = 1 - cos
    q = logits.softmax(-1)
    expected = torch.stack([sum(q[n, i] * C[i, y[n]] for i in range(V)) for n in range(N)])
    assert torch.allclose(emo_per_token(logits, y, e), expected, atol=1e-6)
    # a one-hot-correct model pays nothing; a uniform one pays 1 - mean_i cos(e_i, e_y)
    onehot = torch.full((N, V), -1e4).scatter(1, y[:, None], 1e4)
    assert torch.allclose(emo_per_token(onehot, y, e), torch.zeros(N), atol=1e-6)
    assert torch.allclose(emo_per_token(torch.zeros(N, V), y, e), 1 - cos[:, y].mean(0), atol=1e-6)
    # orthonormal cost embedding: emo = 1 - Q_y
    assert torch.allclose(emo_per_token(logits, y, torch.eye(V)), 1 - q[torch.arange(N), y], atol=1e-6)


def test_emo_mode1_forward_is_cross_entropy_and_gradient_is_the_mix():
    g = torch.Generator().manual_seed(1)
    V, N = 9, 6
    e = torch.randn(V, 4, generator=g)
    logits = torch.randn(N, V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    mle = F.cross_entropy(logits, y, reduction="none")
    emo = emo_per_token(logits, y, e)
    total = combine(mle, emo, "1").sum()
    assert torch.allclose(total, mle.sum(), atol=1e-5)
    (grad,) = torch.autograd.grad(total, logits, retain_graph=True)
    ratio = (mle / emo).detach()
    g_ce = torch.autograd.grad(mle.sum(), logits, retain_graph=True)[0]
    g_emo = torch.autograd.grad((ratio * emo).sum(), logits)[0]
    assert torch.allclose(grad, 0.5 * (g_ce + g_emo), atol=1e-5)
    assert torch.allclose(combine(mle, emo, "2"), 2 * emo, atol=1e-5)
    assert torch.allclose(combine(mle, emo, "pure"), emo)
    assert torch.allclose(combine(mle, emo, "1", ratio_clamp=0.0), 0.5 * mle)


def test_emo_frozen_copy_is_taken_once_and_survives_a_checkpoint():
    model = tiny_model()
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    emo = EMO()
    p = emo.prepare({"input_ids": ids, "seed": 0})
    loss, metrics = emo.loss(model, p)
    initial = model.head.weight.detach().clone()
    assert torch.equal(emo.cost_embedding, initial)
    ce = F.cross_entropy(model.logits(model(p.inputs, p.attention))[p.loss_mask], p.targets[p.loss_mask])
    ce = float(ce.detach())
    assert abs(float(loss.detach()) - ce) < 1e-5 and abs(metrics["mle"] - ce) < 1e-5  # mode 1 == CE
    with torch.no_grad():
        model.head.weight.add_(1.0)
    emo.loss(model, p)
    assert torch.equal(emo.cost_embedding, initial)  # frozen
    fresh = EMO()
    fresh.load_state_dict(emo.state_dict())
    assert torch.equal(fresh.cost_embedding, initial)
    tied = EMO(cost_embedding="tied_detached")
    assert torch.equal(tied.cost(model), model.head.weight)
    with pytest.raises(UserError, match="cost_checkpoint"):
        EMO(cost_embedding="checkpoint")


# ----- ERNIE-Gram -----

def test_tstatistic_ranks_a_planted_collocation_first():
    rng = np.random.default_rng(0)
    NEW, YORK = 4, 5
    rows = []
    for _ in range(300):
        words = list(rng.integers(6, 30, size=8))
        k = int(rng.integers(0, 7))
        words[k : k + 2] = [NEW, YORK]  # "new york" always together
        rows.append([BOS_ID, *map(int, words), EOS_ID])
    stats = ngram_tstats(rows, 3)
    best = max(stats[2], key=lambda g: stats[2][g][0])
    assert best == (NEW, YORK)
    t, c = stats[2][(NEW, YORK)]
    uni = {}
    for r in rows:
        for w in r[1:-1]:
            uni[w] = uni.get(w, 0) + 1
    total, n2 = sum(uni.values()), sum(len(r) - 3 for r in rows)
    f = c / n2
    assert abs(t - (f - uni[NEW] / total * uni[YORK] / total) / math.sqrt(f / n2)) < 1e-9
    assert build_lexicon(rows, 2, top_k=1, min_count=5) == [(NEW, YORK)]


def test_forward_maximum_matching_takes_the_longest_entry():
    NEW, YORK, CITY, X = 4, 5, 6, 7
    index = {(NEW, YORK): 0, (NEW, YORK, CITY): 1}
    assert max_match([NEW, YORK, CITY], index, 3) == [(0, 3)]
    assert max_match([X, NEW, YORK, X], index, 3) == [(0, 1), (1, 2), (3, 1)]
    assert max_match([NEW, YORK, CITY], index, 2) == [(0, 2), (2, 1)]


def test_ernie_gram_collator_invariants():
    obj = NgramMLM(d_model=16, max_n=3, mask_prob=0.5)
    obj.vocab_size = 20
    obj.set_lexicon([(4, 5), (4, 5, 6), (8, 9)])
    V = obj.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [[BOS_ID, *torch.randint(4, 12, (int(n),), generator=g).tolist(), EOS_ID]
            for n in torch.randint(3, 12, (64,), generator=g)]
    rows[0] = [BOS_ID, 4, 5, 6, 7, 8, 9, EOS_ID]
    ids = torch.full((len(rows), 13), PAD_ID)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
    p = obj.prepare({"input_ids": ids, "seed": 3})
    grams_seen = 0
    for i, row in enumerate(rows):
        short = [t for t in p.inputs[i].tolist() if t != PAD_ID]
        masked = p.loss_mask[i].nonzero().squeeze(1).tolist()
        assert masked and all(short[t] == MASK_ID for t in masked)
        lengths = []
        rebuilt = []
        for t, tok in enumerate(short):
            if t in masked:
                c = int(p.targets[i, t])
                gram = (c,) if c < V else obj.lexicon[c - V]
                fine = [x for x in p.fine_targets[i, t].tolist() if x >= 0]
                assert fine == (list(gram) if len(gram) > 1 else [])
                grams_seen += len(gram) > 1
                lengths.append(len(gram))
                rebuilt.extend(gram)
            else:
                rebuilt.append(tok)
        assert rebuilt == row  # the coarse targets map back to the original n-grams
        assert len(short) == len(row) - sum(n - 1 for n in lengths)  # one MASK per n-gram
        n_words = len(row) - 2
        assert sum(lengths) <= max(max(1, round(0.5 * n_words)), lengths[0])
    assert grams_seen > 0
    # the loss reaches the n-gram head and the fine offsets
    model = tiny_model("bidirectional", vocab=V)
    loss, metrics = obj.loss(model, p)
    loss.backward()
    assert obj.ngram_head.weight.grad.abs().sum() > 0 and obj.fine_offset.weight.grad.abs().sum() > 0
    assert set(metrics) == {"coarse", "fine"}


# ----- span corruption -----

def test_span_noise_density_and_mean_span_length():
    rng = np.random.default_rng(0)
    mask = random_spans_noise_mask(100, 0.15, 3.0, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.sum() == 15 and starts.sum() == 5 and not mask[0]
    noise = spans = total = 0
    for n in rng.integers(20, 60, size=400):
        m = random_spans_noise_mask(int(n), 0.15, 3.0, rng)
        noise += m.sum()
        spans += (m & ~np.concatenate([[False], m[:-1]])).sum()
        total += n
    assert abs(noise / total - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.3


def test_span_inputs_and_targets_reconstruct_the_original():
    obj = SpanCorruption()
    rng = np.random.default_rng(1)
    for n in range(3, 40):
        row = [BOS_ID, *rng.integers(N_SPECIAL, 50, size=n).tolist(), EOS_ID]
        noise = obj.noise(row, rng)
        inputs, targets = corrupt(row, noise)
        assert inputs.count(MASK_ID) == targets.count(MASK_ID) == max(1, round(round(0.15 * n) / 3)) or n < 5
        assert reconstruct(inputs, targets + [EOS_ID]) == row


def test_span_decoder_batch_layout():
    ids = torch.tensor([[BOS_ID, *range(4, 24), EOS_ID]])
    for kind in ("causal", "prefix"):
        p = SpanCorruption(attention=kind).prepare({"input_ids": ids, "seed": 5})
        seq = torch.cat([p.inputs[0], p.targets[0, -1:]]).tolist()
        start = seq.index(EOS_ID) + 1  # the corrupted row ends with EOS
        assert reconstruct(seq[:start], seq[start:]) == ids[0].tolist()
        assert p.loss_mask[0].nonzero().squeeze(1).tolist() == list(range(start - 1, len(seq) - 1))
        assert p.attention.kind == kind
        if kind == "prefix":
            assert p.attention.prefix_len.tolist() == [start]
    enc = SpanCorruption(attention="bidirectional").prepare({"input_ids": ids, "seed": 5})
    assert enc.inputs.shape == ids.shape and (enc.inputs[enc.loss_mask] == MASK_ID).all()
    assert enc.loss_mask.sum() == 3


def test_span_evaluation_asks_a_one_token_span():
    """The decoder reads ``row with x_t = MASK`` then the sentinel MASK; a model that predicts the input
    token found under the first MASK is perfect, so the loss is 0 exactly when the query is right."""

    class Oracle(torch.nn.Module):
        vocab_size = 12

        def __init__(self, truth):
            super().__init__()
            self.truth, self.w = truth, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, attention):
            out = torch.zeros(*ids.shape, self.vocab_size)
            for b, row in enumerate(ids.tolist()):
                t = row.index(MASK_ID)
                assert row[t + 1 :].count(MASK_ID) <= 1 and row.count(MASK_ID) == 2
                n = row.index(MASK_ID, t + 1)
                assert attention.kind != PREFIX or int(attention.prefix_len[b]) == n
                out[b, n, self.truth[tuple(row[:n])]] = 50.0
            return out

        def logits(self, h):
            return h

    rows = [[BOS_ID, 4, 5, 6, EOS_ID], [BOS_ID, 7, 8, EOS_ID]]
    truth = {tuple(r[:t] + [MASK_ID] + r[t + 1 :]): r[t] for r in rows for t in range(1, len(r) - 1)}
    for kind in ("causal", "prefix"):
        out = SpanCorruption(attention=kind).evaluate(Oracle(truth), rows, None, batch_size=2)
        assert out["loss"] < 1e-6


# ----- prefix LM -----

def test_prefix_attention_mask_is_exact():
    a = Attention(PREFIX, prefix_len=torch.tensor([3]))
    m = a.mask(8, torch.device("cpu"))[0, 0]
    expected = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    expected[:3, :3] = True
    assert torch.equal(m, expected)
    assert m[0, 2] and not m[0, 3]
    ids = torch.tensor([[BOS_ID, 4, 5, 6, 7, 8, 9, EOS_ID]])
    obj = PrefixLM()
    for seed in range(20):
        p = obj.prepare({"input_ids": ids, "seed": seed})
        s = int(p.attention.prefix_len[0])
        assert 1 <= s <= 7 and int(p.loss_mask.sum()) == 8 - s
        assert p.targets[p.loss_mask].tolist() == ids[0, s:].tolist()


def test_prefix_split_points_are_uniform():
    lengths = torch.full((40000,), 6)
    s = split_points(lengths, 0)
    counts = torch.bincount(s, minlength=6)[1:].double() / len(s)
    assert counts.min() > 0.19 and counts.max() < 0.21  # uniform on {1..5}


def test_prefix_lm_evaluation_is_the_causal_nll_and_causal_models_refuse_it():
    model = tiny_model(PREFIX)
    rows = [[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID]]
    a, b = PrefixLM().evaluate(model, rows, None, 2), CLM().evaluate(model, rows, None, 2)
    assert abs(a["loss"] - b["loss"]) < 1e-5

    class CausalOnly(Backbone):
        supported_attention = (CAUSAL,)

    with pytest.raises(UserError, match="cannot attend 'prefix'"):
        CausalOnly(10, 8, PrefixLM.attention)


# ----- self-evolution -----

def test_self_evolution_selector_and_rectified_labels():
    assert informative_positions([0.05, 0.2, 0.01, 3.0], [5, 6, 7, 8], 0.1) == [1, 3]
    assert informative_positions([0.05, 0.2, 0.01, 3.0], [5, EOS_ID, 7, 8], 0.1) == [3]
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 6, generator=g), torch.randint(0, 6, (8,), generator=g)
    p_ref = torch.randn(8, 6, generator=g).softmax(-1)
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(smoothed_ce(logits, y, p_ref, 0.0), ce)
    assert torch.allclose(smoothed_ce(logits, y, F.one_hot(y, 6).float(), 0.3), ce)
    alpha = 0.1
    ce_ref = -(p_ref * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(smoothed_ce(logits, y, p_ref, alpha) - ce, alpha * (ce_ref - ce), atol=1e-6)


def test_self_questioning_scores_are_the_token_nll():
    model = tiny_model("bidirectional")
    ids = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID]])
    nll = token_nll(model, "bidirectional", ids)
    logp = model.logits(model(ids[:1], Attention("bidirectional"))).log_softmax(-1)
    assert abs(float(nll[0, 2]) + float(logp[0, 2, 6].detach())) < 1e-5
    assert torch.isnan(nll[1, 3:]).all()
    causal = token_nll(tiny_model(), "causal", ids)
    assert torch.isnan(causal[:, 0]).all() and not torch.isnan(causal[0, 1:]).any()


# ----- distillation -----

def test_distillation_is_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    loss, kd, ce = distill_loss(logits, logits.clone(), y, alpha=1.0, tau=1.0)
    assert abs(float(loss)) < 1e-6 and abs(float(kd)) < 1e-6
    loss, _, ce = distill_loss(logits, logits.clone(), y, alpha=0.3, tau=1.0)
    assert torch.allclose(loss, 0.7 * ce)
    t = torch.randn(10, 7, generator=g)
    tau = 2.0
    p_t, p_s = (t / tau).softmax(-1), (logits / tau).softmax(-1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    loss, kd, ce = distill_loss(logits, t, y, alpha=0.5, tau=tau)
    assert torch.allclose(kd, kl, atol=1e-6) and torch.allclose(loss, 0.5 * 4 * kl + 0.5 * ce, atol=1e-6)


def test_distillation_counts_the_teachers_forward_in_mfu():
    from lmlab.objectives.distill import Distill

    teacher = tiny_model()
    objective = Distill()
    objective._teacher = [teacher]  # what bind() loads from the teacher run
    assert objective.extra_flops_per_token(9) == pytest.approx(teacher.flops_per_token(9) / 3)


# ----- MLM suffix -----

def test_mlm_suffix_masks_the_end_of_each_row():
    ids = torch.tensor([[BOS_ID, *range(4, 24), EOS_ID, PAD_ID], [BOS_ID, 4, 5, EOS_ID, *[PAD_ID] * 19]])
    p = MLM(strategy="suffix").prepare({"input_ids": ids, "seed": 0})
    assert p.loss_mask[0].nonzero().squeeze(1).tolist() == [18, 19, 20]  # round(0.15 * 20) = 3 last words
    assert p.loss_mask[1].nonzero().squeeze(1).tolist() == [2]
    assert (p.inputs[p.loss_mask] == MASK_ID).all() and torch.equal(p.inputs[~p.loss_mask], ids[~p.loss_mask])
    with pytest.raises(UserError, match="random or suffix"):
        MLM(strategy="prefix")


# ----- through the real CLI -----

ALL = "clm,mlm,emo,ngram_mlm,span,prefix_lm"


def test_every_objective_sweeps_with_the_transformer(lmlab):
    code, out = lmlab("train", "-m", f"objective={ALL}", "model=transformer", *FAST, *TINY, "eval=[perplexity]")
    assert code == 0, out
    sweep = next(lmlab.runs.glob("default/sweep*"))
    rows = {r["objective"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert set(rows) == set(ALL.split(","))
    for name, row in rows.items():
        assert row["status"] == "done", (name, row)
        assert float(row["perplexity/gap"]) > 0, (name, row)  # every objective has an exact evaluation


def _run(lmlab, *args):
    code, out = lmlab("train", *args, *FAST, *TINY, "eval=[perplexity]")
    assert code == 0, out
    done = {p.parent for p in lmlab.runs.rglob("DONE")}
    return done, out


def test_teacher_objectives_through_the_cli(lmlab):
    teacher, _ = _run(lmlab, "objective=clm", "name=teacher")
    scorer, _ = _run(lmlab, "objective=mlm", "name=scorer")
    (teacher,), (scorer,) = teacher, scorer - teacher
    before = {p.parent for p in lmlab.runs.rglob("DONE")}
    _run(lmlab, "objective=distill", f"objective.teacher='{teacher}'", "model.d_model=32", "name=student")
    _run(lmlab, "objective=self_evolution", f"objective.scorer='{scorer}'", "name=stage2")
    _run(lmlab, "objective=emo", "objective.cost_embedding=checkpoint", f"objective.cost_checkpoint='{teacher}'",
         "name=emo_ckpt")
    after = {p.parent for p in lmlab.runs.rglob("DONE")} - before
    assert len(after) == 3
    for run in after:
        assert "perplexity/gap" in json.loads((run / "results.json").read_text())["metrics"]
    code, out = lmlab("train", "objective=distill", f"objective.teacher='{teacher}'", "data.vocab_size=20",
                      *FAST, *TINY, "eval=[perplexity]")
    assert code != 0 and "same tokenizer" in out and "Traceback" not in out
