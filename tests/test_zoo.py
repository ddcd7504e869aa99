"""Known-answer tests of the model zoo (hyena, transnormer, moe, hat, lstm) and a short CLI training run
of each, whose loss must go down."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lmlab.attention import Attention
from lmlab.data.tokenizers import Byte
from lmlab.errors import UserError
from lmlab.models.hat import HAT, split_words, word_starts
from lmlab.models.hyena import Hyena, HyenaOperator
from lmlab.models.layers import MLP, CausalDepthwiseConv1d
from lmlab.models.lstm import LSTM
from lmlab.models.moe import MoEMLP, MoETransformer, balance_loss, route
from lmlab.models.scan import direct_causal_conv, fft_causal_conv, lightning_attention, masked_linear_attention
from lmlab.models.transformer import Transformer
from lmlab.models.transnormer import TransNormer, decay_rates
from tests.conftest import TINY

CAUSAL = Attention("causal")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- shared layers -----

def test_causal_depthwise_conv_matches_direct_sum_and_steps():
    conv = CausalDepthwiseConv1d(3, 4).double()
    x = torch.randn(2, 9, 3, generator=_gen(0), dtype=torch.float64)
    y = conv(x)
    w, b = conv.conv.weight[:, 0], conv.conv.bias  # (C, k): w[:, k-1] multiplies x_t, w[:, k-1-s] x_{t-s}
    for t in range(9):
        ref = b + sum(w[:, 3 - s] * x[:, t - s] for s in range(4) if t - s >= 0)
        torch.testing.assert_close(y[:, t], ref)
    cache = conv.init_cache(2, dtype=torch.float64)
    for t in range(9):
        out, cache = conv.step(x[:, t], cache)
        torch.testing.assert_close(out, y[:, t])


# ----- hyena -----

@pytest.mark.parametrize("T", [1, 7, 16, 33])
def test_hyena_fft_convolution_equals_direct_causal_convolution(T):
    u = torch.randn(2, 3, T, generator=_gen(T), dtype=torch.float64)
    h = torch.randn(3, T, generator=_gen(T + 1), dtype=torch.float64)
    torch.testing.assert_close(fft_causal_conv(u, h), direct_causal_conv(u, h), atol=1e-12, rtol=1e-12)
    # and by hand for T >= 2: y_1 = h_0 u_1 + h_1 u_0
    if T >= 2:
        torch.testing.assert_close(fft_causal_conv(u, h)[..., 1], h[:, 0] * u[..., 1] + h[:, 1] * u[..., 0])


def test_hyena_operator_is_causal_and_order2_formula():
    torch.manual_seed(0)
    op = HyenaOperator(8, l_max=32).double()
    x = torch.randn(2, 12, 8, generator=_gen(1), dtype=torch.float64)
    y = op(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 8, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(op(x2)[:, :7], y[:, :7])
    # order 2: out_proj(x0 * (h * (x1 * v) + bias * v)), with the convolution done directly
    u = op.short_conv(op.in_proj(x)).transpose(1, 2)
    x0, x1, v = u.split(8, dim=1)
    w = x1 * v
    inner = direct_causal_conv(w, op.filter(12)[0]) + op.filter_bias[0][None, :, None] * w
    torch.testing.assert_close(y, op.out_proj((x0 * inner).transpose(1, 2)))


def test_hyena_refuses_long_sequences_and_non_causal():
    with pytest.raises(UserError, match="supports causal"):
        Hyena(20, "bidirectional")
    with pytest.raises(UserError, match="l_max"):
        Hyena(20, "causal", l_max=8)(torch.full((1, 9), 5), CAUSAL)


# ----- transnormer / lightning attention -----

def _sequential_decay_attention(q, k, v, s):
    """Token-by-token recurrence S = lambda S + k v^T, o = q S."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1])
    lam = torch.exp(-s)[None, :, None, None]
    out = []
    for t in range(T):
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("T,block", [(1, 8), (7, 8), (23, 8), (37, 16), (65, 16), (100, 64)])
def test_blockwise_linear_attention_equals_masked_quadratic_form(T, block):
    q, k, v = torch.randn(3, 2, 3, T, 5, generator=_gen(T), dtype=torch.float64).unbind(0)
    s = torch.tensor([0.0, 0.3, 1.7], dtype=torch.float64)
    blockwise = lightning_attention(q, k, v, s, block)
    quadratic = masked_linear_attention(q, k, v, s)
    torch.testing.assert_close(blockwise, quadratic, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(blockwise, _sequential_decay_attention(q, k, v, s), atol=1e-10, rtol=1e-10)
    # gradients agree too
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    qm = [t.clone().requires_grad_() for t in (q, k, v)]
    lightning_attention(*qs, s, block).square().sum().backward()
    masked_linear_attention(*qm, s).square().sum().backward()
    for a, b in zip(qs, qm):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9)


def test_no_decay_is_plain_causal_linear_attention():
    q, k, v = torch.randn(3, 1, 2, 11, 4, generator=_gen(5), dtype=torch.float64).unbind(0)
    out = lightning_attention(q, k, v, torch.zeros(2, dtype=torch.float64), 4)
    kv = torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)  # sum_{j<=i} k_j v_j^T
    torch.testing.assert_close(out, (q[..., None, :] @ kv)[..., 0, :])


def test_decay_rates_formulas():
    alibi0 = decay_rates("alibi_layerwise", 4, 0, 3)
    torch.testing.assert_close(alibi0, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]) * (1 + 1e-5))
    torch.testing.assert_close(decay_rates("alibi_layerwise", 4, 2, 3), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6,
                                                                                       2 ** -8]) * 1e-5)
    torch.testing.assert_close(decay_rates("paper", 4, 1, 4), torch.tensor([0.0, 2.0, 4.0, 6.0]) * 0.75)
    with pytest.raises(UserError, match="decay"):
        decay_rates("nope", 4, 0, 2)


@pytest.mark.parametrize("lrpe,decay", [(False, "alibi_layerwise"), (True, "paper")])
def test_transnormer_step_decoding_equals_parallel_forward(lrpe, decay):
    torch.manual_seed(0)
    model = TransNormer(20, "causal", d_model=16, n_heads=2, lrpe=lrpe, decay=decay, block_size=4).double().eval()
    ids = torch.randint(4, 20, (2, 11), generator=_gen(3))
    parallel = model(ids, CAUSAL)
    state, steps = model.init_state(2), []
    for t in range(11):
        h, state = model.step(ids[:, t], state)
        steps.append(h)
    torch.testing.assert_close(torch.stack(steps, 1), parallel, atol=1e-10, rtol=1e-10)


def test_lrpe_scores_depend_on_relative_position_only():
    from lmlab.models.transnormer import LRPE

    lrpe = LRPE(6).double()
    q = torch.randn(1, 1, 1, 6, generator=_gen(0), dtype=torch.float64)
    k = torch.randn(1, 1, 1, 6, generator=_gen(1), dtype=torch.float64)
    a = (lrpe(q, 5) * lrpe(k, 2)).sum()
    b = (lrpe(q, 13) * lrpe(k, 10)).sum()
    torch.testing.assert_close(a, b)


# ----- lstm -----

def test_lstm_step_decoding_equals_parallel_forward():
    torch.manual_seed(0)
    model = LSTM(20, "causal", d_model=16, n_layers=2).eval()
    ids = torch.randint(4, 20, (3, 9), generator=_gen(4))
    parallel = model(ids, CAUSAL)
    state, steps = model.init_state(3), []
    for t in range(9):
        h, state = model.step(ids[:, t], state)
        steps.append(h)
    torch.testing.assert_close(torch.stack(steps, 1), parallel, atol=1e-6, rtol=1e-5)


def test_bidirectional_lstm_sees_both_sides_and_ignores_padding():
    torch.manual_seed(0)
    model = LSTM(20, "bidirectional", d_model=16).eval()
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]])
    pad = ids != 0
    att = Attention("bidirectional", padding=pad)
    base = model(ids, att)
    torch.testing.assert_close(model(ids.masked_fill(~pad, 9), att)[pad], base[pad])  # pads unseen
    torch.testing.assert_close(base[1:], model(ids[1:], Attention("bidirectional")))
    later = ids.clone()
    later[1, 4] = 11
    assert not torch.allclose(model(later, att)[1, 0], base[1, 0])  # position 0 sees position 4
    with pytest.raises(UserError, match="supports causal, bidirectional"):
        LSTM(20, "prefix")


# ----- mixture of experts -----

def test_routing_respects_top_k_and_capacity():
    probs = torch.tensor([[0.6, 0.3, 0.1],
                          [0.5, 0.1, 0.4],
                          [0.7, 0.2, 0.1],
                          [0.1, 0.2, 0.7]])
    experts, gates, keep = route(probs, top_k=2, capacity=None)
    assert experts.tolist() == [[0, 1], [0, 2], [0, 1], [2, 1]]
    torch.testing.assert_close(gates, torch.tensor([[2 / 3, 1 / 3], [5 / 9, 4 / 9], [7 / 9, 2 / 9], [7 / 9, 2 / 9]]))
    assert keep.all()
    # capacity 2: expert 0 is the first choice of tokens 0, 1, 2 -> token 2 (later in order) is dropped;
    # expert 1 is the second choice of tokens 0, 2, 3 -> token 3 is dropped; expert 2 takes 3 then 1.
    experts, gates, keep = route(probs, top_k=2, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    # top-1 keeps the raw probability as its gate (Switch)
    experts, gates, _ = route(probs, top_k=1, capacity=None)
    torch.testing.assert_close(gates[:, 0], torch.tensor([0.6, 0.5, 0.7, 0.7]))
    # first choices are served before second choices, whatever the token order
    # (token 0's 2nd choice is token 1's 1st, expert 2: token 1 gets it although it comes later)
    probs2 = torch.tensor([[0.1, 0.5, 0.4], [0.2, 0.1, 0.7]])
    _, _, keep = route(probs2, top_k=2, capacity=1)
    assert keep.tolist() == [[True, False], [True, True]]
    assert MoEMLP(4, 8, 3, 2, 1.25).capacity(4) == math.ceil(1.25 * 4 * 2 / 3)


def test_balance_loss_hand_case():
    probs = torch.tensor([[0.6, 0.3, 0.1],
                          [0.5, 0.1, 0.4],
                          [0.7, 0.2, 0.1],
                          [0.1, 0.2, 0.7]])
    experts, _, _ = route(probs, top_k=2, capacity=None)
    P = probs.mean(0)  # 0.475, 0.2, 0.325
    f1 = torch.tensor([3, 0, 1]) / 4  # first choices 0, 0, 0, 2
    f2 = torch.tensor([0, 3, 1]) / 4  # second choices 1, 2, 1, 1
    expected = 3 * float((f1 * P).sum() + (f2 * P).sum())
    assert float(balance_loss(probs, experts)) == pytest.approx(expected)
    uniform = torch.full((5, 4), 0.25)
    assert float(balance_loss(uniform, route(uniform, 2, None)[0])) == pytest.approx(2.0)


def test_one_expert_equals_the_dense_mlp():
    torch.manual_seed(0)
    moe = MoEMLP(8, 16, n_experts=1, top_k=1, capacity_factor=None)
    dense = MLP(8, 16)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 8, generator=_gen(0))
    torch.testing.assert_close(moe(x), dense(x))
    assert float(moe.aux.detach()) == pytest.approx(1.0)
    torch.manual_seed(0)
    model = MoETransformer(20, "causal", d_model=16, n_heads=2, n_experts=1, top_k=1)
    torch.manual_seed(0)
    ref = Transformer(20, "causal", d_model=16, n_heads=2)
    state = {k.replace(".experts.0.", "."): v for k, v in model.state_dict().items() if "router" not in k}
    ref.load_state_dict(state)
    ids = torch.randint(4, 20, (2, 7), generator=_gen(1))
    torch.testing.assert_close(model(ids, CAUSAL), ref(ids, CAUSAL))
    assert model.flops_per_token(7) == ref.flops_per_token(7) + 6 * 2 * 16  # plus the routers' matmuls


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
def test_moe_supports_every_attention_and_sets_aux_loss(kind):
    torch.manual_seed(0)
    model = MoETransformer(20, kind, d_model=16, n_heads=2, n_experts=4, top_k=2, aux_loss_coef=0.01)
    ids = torch.randint(4, 20, (2, 7), generator=_gen(1))
    att = Attention(kind, prefix_len=torch.tensor([3, 2]) if kind == "prefix" else None)
    hidden = model(ids, att)
    assert hidden.shape == (2, 7, 16)
    layer_aux = torch.stack([b.mlp.aux for b in model.blocks]).mean()
    torch.testing.assert_close(model.aux_loss, 0.01 * layer_aux)
    assert 0.0 < float(layer_aux.detach()) <= 4 * 2  # at most E * top_k (everything on one expert)
    model.aux_loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_moe_flops_count_the_active_experts_only():
    model = MoETransformer(20, "causal", d_model=16, n_heads=2, n_layers=2, n_experts=4, top_k=1)
    per_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    total = Transformer.flops_per_token(model, 8)
    assert model.flops_per_token(8) == total - 6 * 2 * 3 * per_expert


# ----- hat -----

def test_hat_word_splitting():
    assert split_words(b"Hello, world!") == [b"Hello,", b" world!"]
    assert split_words(b"camelCase") == [b"camel", b"Case"]
    assert split_words(b"Hello, world!", max_word_size=4) == [b"Hell", b"o,", b" wor", b"ld!"]
    assert split_words(b"one\ntwo  three") == [b"one", b"\n", b"two", b"  three"]
    text = "Größe, naïve café!\tdone".encode()
    words = split_words(text)
    assert words == ["Größe,".encode(), " naïve".encode(), " café!".encode(), b"\t", b"done"]
    # special tokens are words of their own; PAD never starts one
    ids = torch.tensor([[1, *Byte().encode(["ab cd"])[0], 2, 0, 0]])
    assert word_starts(ids)[0].tolist() == [True, True, False, True, False, False, True, False, False]
    # splitting is prefix-stable (causal): the split of a prefix is a prefix of the split
    for n in range(1, len(text) + 1):
        cut = split_words(text[:n])
        assert cut[:-1] == words[: len(cut) - 1]


def test_hat_byte_round_trip():
    text = "Hello, wörld! 你好\n"
    data = text.encode()
    ids = Byte().encode([text])[0]
    assert min(ids) >= 4 and max(ids) < 260
    assert Byte().decode(ids) == text
    assert b"".join(split_words(data)) == data
    assert Byte().decode([1, *ids, 2, 0]).encode() == data  # specials dropped
    from lmlab.data.text import TextSource  # the byte tokenizer of the data source agrees

    source = TextSource(tokenizer=Byte())
    assert source.encode([text]) == [ids]
    assert source.decode(ids) == text


def test_hat_is_causal_and_refuses_non_byte_vocabularies():
    torch.manual_seed(0)
    model = HAT(260, "causal", d_model=16, d_word=32, n_heads=2, byte_heads=2, byte_window=6).eval()
    ids = torch.tensor([[1, *Byte().encode(["Hello, world! The HAT reads bytes."])[0]]])
    base = model(ids, CAUSAL)
    for t in range(0, ids.shape[1] - 1, 3):
        other = ids.clone()
        other[0, t + 1:] = torch.randint(4, 260, (ids.shape[1] - t - 1,), generator=_gen(t))
        torch.testing.assert_close(model(other, CAUSAL)[:, : t + 1], base[:, : t + 1])
    # right padding is ignored by real bytes
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    out = model(padded, Attention("causal", padding=padded != 0))
    torch.testing.assert_close(out[:, : ids.shape[1]], base)
    with pytest.raises(UserError, match="data.tokenizer=byte"):
        HAT(34, "causal")


# ----- through the CLI -----

def _train_losses(run_dir) -> list[float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.parametrize("model,extra", [
    ("lstm", [*TINY]),
    ("hyena", [*TINY]),
    ("transnormer", [*TINY]),
    ("moe", [*TINY]),
    ("hat", ["data=text", "data/tokenizer=byte", "model.d_word=64"]),
])
def test_every_model_trains_and_its_loss_goes_down(lmlab, model, extra):
    code, out = lmlab("train", f"model={model}", "model.d_model=32", *extra, "max_steps=100", "batch_size=16",
                      "val_every=1000", "checkpoint_every=1000", "logger=csv", "trainer.log_every_n_steps=5",
                      "eval=[perplexity]", "eval.perplexity.max_rows=40")
    assert code == 0, out
    run = next(lmlab.runs.rglob("DONE")).parent
    losses = _train_losses(run)
    assert len(losses) >= 18  # one every 5 steps
    first, last = sum(losses[:2]) / 2, sum(losses[-4:]) / 4
    assert last < first - 0.3, (first, last)


@pytest.mark.parametrize("args,expect", [
    (["model=hyena", "objective=mlm"], "cannot attend 'bidirectional'"),
    (["model=transnormer", "objective=mlm"], "cannot attend 'bidirectional'"),
    (["model=hat"], "data/tokenizer=byte"),
])
def test_impossible_pairs_stop_before_data_is_generated(lmlab, tmp_path, monkeypatch, args, expect):
    cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
    code, out = lmlab("train", *args, *TINY, "max_steps=4", "logger=none")
    assert code != 0 and expect in out and "Traceback" not in out
    assert not cache.exists() or not any(cache.iterdir())
    errors = [line for line in out.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1 and errors[0].rstrip().endswith(".")
