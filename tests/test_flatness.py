"""Known answers for the two trace estimators of eval=flatness (lmlab/evaluation/flatness.py)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.attention import Attention
from lmlab.data.datamodule import DataModule
from lmlab.data.hmm import HMMSource
from lmlab.errors import UserError
from lmlab.evaluation.flatness import (
    Flatness,
    hutchinson_samples,
    hutchinson_terms,
    mean_and_se,
    per_example_sq_grad_norms,
    per_example_sq_grads,
    probe_vector,
    select_parameters,
)
from lmlab.models.scan import reference_scan
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.objectives.mlm import MLM

# ----- quadratic losses: the Hessian is known -----

def test_rademacher_probe_is_exact_on_a_diagonal_hessian():
    a = torch.tensor([0.5, -2.0, 3.0, 7.0, 0.1], dtype=torch.float64)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    loss = 0.5 * (a * theta**2).sum() + 0.5 * (b * extra**2).sum()
    samples = hutchinson_samples(loss, [theta, extra], 3, "rademacher", torch.Generator().manual_seed(0))
    for s in samples:  # v^T diag(a) v = sum a_i v_i^2 = sum a_i for v_i = +-1
        assert s == pytest.approx(float(a.sum() + b.sum()), abs=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_to_the_trace_of_a_full_hessian(distribution):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = m @ m.T / 12 + torch.diag(torch.linspace(-1, 2, 12, dtype=torch.float64))
    theta = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * theta @ a @ theta + theta.sum()  # Hessian = A
    samples = hutchinson_samples(loss, [theta], 4000, distribution, torch.Generator().manual_seed(1))
    mean, se = mean_and_se(samples)
    assert abs(mean - float(a.trace())) < 4 * se, (mean, se, float(a.trace()))
    assert se < 0.1 * abs(float(a.trace()))


# ----- a tiny softmax model at its optimum: Hessian trace = Fisher trace -----

def _tiny_softmax_model():
    """A one-hidden-layer tanh MLP with a softmax output; the data's labels are drawn from the model itself,
    so the expected loss E_x sum_y p0(y|x) (-log p_theta(y|x)) is minimised at theta0 and its Hessian there
    is the Fisher."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    x = torch.randn(24, 3, dtype=torch.float64)
    with torch.no_grad():
        p0 = torch.softmax(net(x), -1)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflatten(theta):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            out[n] = theta[i : i + k].reshape(s)
            i += k
        return out

    def expected_loss(theta):
        logp = torch.log_softmax(functional_call(net, unflatten(theta), (x,)), -1)
        return -(p0 * logp).sum(-1).mean()

    return net, x, p0, theta0, unflatten, expected_loss


def test_fisher_and_hutchinson_match_the_exact_hessian_trace_at_the_optimum():
    net, x, p0, theta0, unflatten, expected_loss = _tiny_softmax_model()
    exact = float(torch.autograd.functional.hessian(expected_loss, theta0).trace())
    params = {n: p.detach() for n, p in net.named_parameters()}

    def logp(ps, xi, yi):
        return torch.log_softmax(functional_call(net, ps, (xi[None],))[0], -1).gather(0, yi.view(1)).squeeze(0)

    # exact Fisher: every label weighted by p0 (per-example squared gradient norms through vmap)
    xs = x.repeat_interleave(4, 0)
    ys = torch.arange(4).repeat(len(x))
    sq = per_example_sq_grad_norms(logp, params, (xs, ys))
    exact_fisher = float((sq * p0.reshape(-1)).sum() / len(x))
    assert exact_fisher == pytest.approx(exact, rel=1e-9)

    # the Fisher estimator: labels sampled from the model's own prediction
    g = torch.Generator().manual_seed(0)
    xs = x.repeat(200, 1)
    ys = torch.multinomial(p0.repeat(200, 1), 1, generator=g).squeeze(1)
    mean, se = mean_and_se(per_example_sq_grad_norms(logp, params, (xs, ys), chunk_size=1024).numpy())
    assert abs(mean - exact) < 4 * se and se < 0.05 * exact, (mean, se, exact)

    # in chunks (the last one short) == one vmap over every example
    chunked = per_example_sq_grads(logp, params, (xs, ys), chunk_size=7)
    whole = per_example_sq_grads(logp, params, (xs, ys))
    assert chunked.keys() == whole.keys()
    for name, v in chunked.items():
        assert v.shape == (len(xs),) and torch.allclose(v, whole[name], rtol=1e-6, atol=0)

    # Hutchinson on the expected loss
    theta = theta0.clone().requires_grad_(True)
    samples = hutchinson_samples(expected_loss(theta), [theta], 3000, "rademacher", torch.Generator().manual_seed(2))
    mean, se = mean_and_se(samples)
    assert abs(mean - exact) < 4 * se and se < 0.1 * exact, (mean, se, exact)


# ----- the evaluator on a real backbone and objective -----

@pytest.fixture(scope="module")
def hmm():
    source = HMMSource(hidden_states=4, vocab_size=8, length=6, train_size=50, validation_size=64,
                       test_size=20, downstream_size=20)
    return source, DataModule(source, source.build(), batch_size=16, seed=0)


def _module(objective, source, d_model=8):
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, objective.attention, d_model=d_model, n_layers=1, n_heads=2)
    model.train()
    objective.bind(source, None)
    return SimpleNamespace(model=model, objective=objective)


def _exact_block_trace(module, dm, params: str, batch_size: int) -> float:
    """Exact trace over a few parameters: sum_i e_i^T H e_i on the first batch, one HVP per coordinate."""
    ev = Flatness(params=params, batches=1, batch_size=batch_size)
    model = module.model.eval()
    prepared = ev._prepared_batches(module.objective, dm.splits["validation"])[0]
    chosen = list(select_parameters(model, params).values())
    total = 0.0
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        grads = torch.autograd.grad(ev._loss(model, prepared), chosen, create_graph=True)
        for j, p in enumerate(chosen):
            for i in range(p.numel()):
                e = [torch.zeros_like(q) for q in chosen]
                e[j].view(-1)[i] = 1.0
                hv = torch.autograd.grad(grads, chosen, grad_outputs=e, retain_graph=True)
                total += float(hv[j].view(-1)[i])
    model.train()
    return total


@pytest.mark.parametrize("objective", [MLM, CLM])
def test_hutchinson_evaluator_matches_the_exact_trace_of_a_parameter_block(hmm, objective):
    source, dm = hmm
    module = _module(objective(), source)
    which = "norm"  # the 24 norm gains: exact trace by 24 HVPs
    exact = _exact_block_trace(module, dm, which, 32)
    out = Flatness(params=which, batches=1, batch_size=32, probes=600)(module, dm)
    assert out["flatness/params"] == 24 and out["flatness/samples"] == 600
    assert abs(out["flatness/trace"] - exact) < 4 * out["flatness/trace_se"] + 1e-6, (out, exact)
    assert out["flatness/trace_se"] < 0.1 * abs(exact)
    assert module.model.training  # mode restored
    assert all(p.grad is None for p in module.model.parameters())


def test_fisher_evaluator_equals_a_per_example_loop(hmm):
    """vmap'd per-example gradients == one autograd.grad per example (same positions, same sampled labels)."""
    source, dm = hmm
    module = _module(MLM(), source)
    ev = Flatness(estimator="fisher", examples=10, batches=1, batch_size=16, seed=3)
    out = ev(module, dm)
    model = module.model.eval()
    p = ev._prepared_batches(module.objective, dm.splits["validation"])[0]
    b, t = p.loss_mask.nonzero(as_tuple=True)
    b, t = b[:10], t[:10]
    with torch.no_grad():
        probs = torch.softmax(model.logits(model(p.inputs, p.attention)[b, t]).float(), -1)
    labels = torch.multinomial(probs.double(), 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    sq = []
    for bi, ti, yi in zip(b, t, labels):
        pad = p.attention.padding
        att = Attention(p.attention.kind, padding=None if pad is None else pad[bi : bi + 1])
        logp = torch.log_softmax(model.logits(model(p.inputs[bi : bi + 1], att)[0, ti]), -1)[yi]
        sq.append(sum(float(g.pow(2).sum()) for g in torch.autograd.grad(logp, list(model.parameters()))))
    mean, se = mean_and_se(sq)
    assert out["flatness/trace"] == pytest.approx(mean, rel=1e-4)
    assert out["flatness/trace_se"] == pytest.approx(se, rel=1e-3)
    assert out["flatness/samples"] == 10


def test_sum_reduction_scales_by_loss_positions_per_row(hmm):
    source, dm = hmm
    module = _module(CLM(), source)
    common = dict(batches=1, batch_size=16, probes=3)
    mean = Flatness(reduction="mean", **common)(module, dm)["flatness/trace"]
    total = Flatness(reduction="sum", **common)(module, dm)["flatness/trace"]
    # CLM on length-6 rows: 7 targets (6 words + EOS) per row, so L_sum = 7 L_mean exactly
    assert total == pytest.approx(7 * mean, rel=1e-4)


def test_parameter_selection_and_widening(hmm):
    source, dm = hmm
    module = _module(MLM(), source)
    n_all = Flatness(batches=1, probes=1)(module, dm)["flatness/params"]
    n_blocks = Flatness(batches=1, probes=1, params="no_embeddings")(module, dm)["flatness/params"]
    assert n_all - n_blocks == source.vocab_size * 8  # the tied embedding / head
    wide = Flatness(estimator="fisher", examples=8, batches=1, embed_width=16)(module, dm)
    # widened: untied embedding and head (2 x V x 16) + blocks of 4x the weights
    assert wide["flatness/params"] == 2 * source.vocab_size * 16 + 4 * (n_blocks - 3 * 8) + 2 * 3 * 8
    assert module.model.d_model == 8 and module.model.training
    with pytest.raises(UserError, match="matches no parameter"):
        Flatness(params="nothing_is_called_this")(module, dm)
    with pytest.raises(UserError, match="estimator"):
        Flatness(estimator="lanczos")
    with pytest.raises(UserError, match="multiple"):
        Flatness(embed_width=12)(module, dm)


# ----- several estimators, the block trace -----

def _fisher_loop(module, ev, n, names=None):
    """Per-example squared gradient norms by one ``torch.autograd.grad`` per example (outside any
    ``reference_scan``: the model's own kernels), over the parameters whose names match ``names`` (all if
    None); the examples and sampled labels as the evaluator's (first batch, first ``n`` loss positions)."""
    model = module.model.eval()
    p = ev._prepared_batches(module.objective, module.datamodule.splits["validation"])[0]
    b, t = p.loss_mask.nonzero(as_tuple=True)
    b, t = b[:n], t[:n]
    with torch.no_grad():
        probs = torch.softmax(model.logits(model(p.inputs, p.attention)[b, t]).float(), -1)
    labels = torch.multinomial(probs.double(), 1, generator=torch.Generator().manual_seed(ev.seed)).squeeze(1)
    chosen = [q for name, q in model.named_parameters() if names is None or re.search(names, name)]
    sq = []
    for bi, ti, yi in zip(b, t, labels):
        pad = p.attention.padding
        att = Attention(p.attention.kind, padding=None if pad is None else pad[bi : bi + 1])
        logp = torch.log_softmax(model.logits(model(p.inputs[bi : bi + 1], att)[0, ti]).float(), -1)[yi]
        sq.append(sum(float(g.double().pow(2).sum()) for g in torch.autograd.grad(logp, chosen)))
    model.train()
    return sq


def test_several_estimators_in_one_evaluation(hmm):
    source, dm = hmm
    module = _module(MLM(), source)
    common = dict(batches=2, batch_size=16, probes=3, examples=12)
    both = Flatness(estimator=["fisher", "hutchinson"], **common)(module, dm)
    alone = {e: Flatness(estimator=e, **common)(module, dm) for e in ("fisher", "hutchinson")}
    for e in ("fisher", "hutchinson"):
        for k in ("trace", "trace_se", "samples", "blocks_trace", "blocks_trace_se"):
            assert both[f"flatness/{e}/{k}"] == alone[e][f"flatness/{e}/{k}"] == alone[e][f"flatness/{k}"]
    for k in ("trace", "trace_se", "samples", "blocks_trace", "blocks_trace_se"):  # the primary
        assert both[f"flatness/{k}"] == both[f"flatness/fisher/{k}"]
    assert both["flatness/samples"] == 12 and both["flatness/hutchinson/samples"] == 6
    assert both["flatness/params"] == alone["fisher"]["flatness/params"]
    assert 0 < both["flatness/blocks_params"] < both["flatness/params"]
    assert 0 < both["flatness/blocks_trace"] < both["flatness/trace"]  # Fisher: a partial sum
    off = Flatness(estimator="fisher", blocks=None, **common)(module, dm)
    assert not any("blocks" in k for k in off) and off["flatness/trace"] == both["flatness/trace"]
    again = Flatness(estimator=["fisher", "hutchinson"], **common)(module, dm)
    assert again == both  # a fixed seed repeats exactly
    none = Flatness(estimator="fisher", blocks="nothing_is_called_this", **common)(module, dm)
    assert none["flatness/blocks_params"] == 0 and none["flatness/blocks_trace"] == 0
    with pytest.raises(UserError, match="once"):
        Flatness(estimator=["fisher", "fisher"])
    with pytest.raises(UserError, match="blocks"):
        Flatness(blocks="(")


def test_fisher_blocks_trace_equals_a_per_example_loop_over_block_parameters(hmm):
    source, dm = hmm
    module = _module(CLM(), source)
    module.datamodule = dm
    ev = Flatness(estimator="fisher", examples=10, batches=1, batch_size=16, seed=3, blocks="blocks\\.")
    out = ev(module, dm)
    block, total = _fisher_loop(module, ev, 10, "blocks\\."), _fisher_loop(module, ev, 10)
    assert out["flatness/blocks_trace"] == pytest.approx(mean_and_se(block)[0], rel=1e-5)
    assert out["flatness/blocks_trace_se"] == pytest.approx(mean_and_se(block)[1], rel=1e-4)
    assert out["flatness/trace"] == pytest.approx(mean_and_se(total)[0], rel=1e-5)
    n_block = sum(p.numel() for n, p in module.model.named_parameters() if n.startswith("blocks."))
    assert out["flatness/blocks_params"] == n_block


def test_hutchinson_blocks_trace_converges_to_the_exact_block_trace(hmm):
    """Probes over all parameters, summed over the blocks only: E = tr(H_BB), the cross term with the
    embeddings and the final norm averages out (exact: one HVP per block coordinate of a model with 400 block
    parameters)."""
    source, dm = hmm
    objective = MLM()
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, objective.attention, d_model=8, n_layers=1, n_heads=2, d_ff=8)
    objective.bind(source, None)
    module = SimpleNamespace(model=model, objective=objective)
    exact = _exact_block_trace(module, dm, "blocks\\.", 32)
    out = Flatness(params="all", blocks="blocks\\.", batches=1, batch_size=32, probes=1500)(module, dm)
    assert out["flatness/blocks_params"] == 400 and out["flatness/params"] == 400 + 8 + 12 * 8
    est, se = out["flatness/blocks_trace"], out["flatness/blocks_trace_se"]
    assert abs(est - exact) < 4 * se, (est, se, exact)
    assert se < 0.2 * abs(exact), (se, exact)
    assert abs(out["flatness/trace"] - exact) > 10 * se  # the full trace is another number


# ----- every model -----

MODELS = ["transformer", "lstm", "mamba", "mamba2", "hyena", "moe", "mom", "hat", "transnormer"]
TINY_MODELS = {"transformer": {"n_heads": 2}, "moe": {"n_heads": 2}, "transnormer": {"n_heads": 2},
        "hat": {"d_word": 16, "n_heads": 2, "byte_heads": 2}, "mom": {"n_heads": 2, "head_dim": 8},
        "hyena": {"l_max": 64, "filter_order": 8}}


def _conf_model(name: str, vocab_size: int, attention: str, **kw):
    """The model of ``conf/model/{name}.yaml`` with tiny sizes."""
    from pathlib import Path

    import yaml
    from hydra.utils import get_class

    cfg = yaml.safe_load((Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml").read_text())
    cls = get_class(cfg.pop("_target_"))
    cfg.update({"d_model": 16, "n_layers": 1, **TINY_MODELS.get(name, {}), **kw})
    torch.manual_seed(0)
    return cls(vocab_size, attention, **cfg)


@pytest.fixture(scope="module")
def byte_hmm():
    """HAT reads bytes: an HMM over 256 words (vocabulary 260 with the specials)."""
    source = HMMSource(hidden_states=4, vocab_size=256, length=6, train_size=20, validation_size=16,
                       test_size=4, downstream_size=4)
    return source, DataModule(source, source.build(), batch_size=8, seed=0)


@pytest.mark.parametrize("name", MODELS)
def test_both_estimators_run_on_every_model(hmm, byte_hmm, name):
    source, dm = byte_hmm if name == "hat" else hmm
    objective = CLM()
    objective.bind(source, None)
    module = SimpleNamespace(model=_conf_model(name, source.vocab_size, objective.attention), objective=objective)
    out = Flatness(estimator=["fisher", "hutchinson"], examples=4, probes=2, batches=1, batch_size=8,
                   blocks=".")(module, dm)
    for e in ("fisher", "hutchinson"):
        for k in ("trace", "trace_se", "blocks_trace"):
            assert math.isfinite(out[f"flatness/{e}/{k}"]), (name, e, k, out)
    assert out["flatness/fisher/trace"] > 0 and out["flatness/blocks_params"] == out["flatness/params"]


# ----- Mamba: the reference scan against the fast kernel -----

@pytest.fixture()
def mamba_module(hmm):
    source, dm = hmm
    objective = CLM()
    objective.bind(source, None)
    # layernorm: our RMSNorm computes in float32 even for a float64 model, which would spoil the float64 FD
    model = _conf_model("mamba", source.vocab_size, objective.attention, d_model=8, d_state=4, norm="layernorm")
    assert model.blocks[0].mixer.impl == "auto"  # on the CPU: the chunked scan (first-order backward only)
    return SimpleNamespace(model=model, objective=objective, datamodule=dm)


def test_mamba_fisher_through_the_reference_equals_a_loop_through_the_fast_kernel(mamba_module):
    ev = Flatness(estimator="fisher", examples=10, batches=1, batch_size=16, seed=3)
    out = ev(mamba_module, mamba_module.datamodule)
    mean, se = mean_and_se(_fisher_loop(mamba_module, ev, 10))
    assert out["flatness/trace"] == pytest.approx(mean, rel=1e-4)
    assert out["flatness/trace_se"] == pytest.approx(se, rel=1e-3)


def test_mamba_hutchinson_quadratic_form_equals_a_finite_difference_through_the_fast_kernel(mamba_module):
    """v^T H v by double backprop through the sequential reference == (g(θ+εv) − g(θ−εv))·v / (2ε) with the
    gradients g through the chunked scan's hand-written backward, in float64."""
    model, objective = mamba_module.model.double().eval(), mamba_module.objective
    p = Flatness(batches=1, batch_size=16)._prepared_batches(objective, mamba_module.datamodule.splits["validation"])[0]
    params = list(model.parameters())

    def loss():
        logits = model.logits(model(p.inputs, p.attention)[p.loss_mask])
        return F.cross_entropy(logits, p.targets[p.loss_mask])

    with reference_scan():
        vhv = float(hutchinson_terms(loss(), params, 1, "rademacher", torch.Generator().manual_seed(5)).sum())
    g = torch.Generator().manual_seed(5)
    v = [probe_vector(q, "rademacher", g) for q in params]
    eps, grads = 1e-6, []  # the central difference errs by O(eps^2): 2.5e-4 relative at eps = 1e-4 here
    for sign in (1, -1):
        with torch.no_grad():
            for q, vq in zip(params, v):
                q.add_(sign * eps * vq)
        grads.append(torch.autograd.grad(loss(), params))
        with torch.no_grad():
            for q, vq in zip(params, v):
                q.sub_(sign * eps * vq)
    fd = sum(float(((a - b) * vq).sum()) for a, b, vq in zip(*grads, v)) / (2 * eps)
    assert vhv == pytest.approx(fd, rel=1e-4), (vhv, fd)
    assert abs(vhv) > 1e-3
