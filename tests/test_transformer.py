"""The attention-mask contract and the Transformer backbone (masking, positions, FLOPs, tying)."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.attention import Attention
from lmlab.errors import UserError
from lmlab.models.layers import Rotary
from lmlab.models.transformer import Transformer

V = 20


def _tiny(attention="causal", **kw):
    torch.manual_seed(0)
    kw = {"d_model": 16, "n_layers": 2, "n_heads": 2, **kw}
    return Transformer(V, attention, **kw).eval()


def test_mask_causal_is_always_the_fused_path():
    # rows are right-padded, so under causal attention a real token never sees a pad: no mask needed
    att = Attention("causal", padding=torch.tensor([[True, True, False]]))
    assert att.mask(3, torch.device("cpu")) is None
    assert Attention("causal").mask(3, torch.device("cpu")) is None


def test_mask_bidirectional_with_padding():
    att = Attention("bidirectional", padding=torch.tensor([[True, True, False]]))
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # pad row: keys + itself
    assert torch.equal(att.mask(3, torch.device("cpu"))[0, 0], expected)
    assert Attention("bidirectional").mask(3, torch.device("cpu")) is None


def test_mask_prefix():
    att = Attention("prefix", prefix_len=torch.tensor([2, 0]))
    m = att.mask(4, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected)
    assert torch.equal(m[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())  # empty prefix: causal


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_causal_outputs_ignore_the_future(positions):
    model = _tiny("causal", positions=positions)
    ids = torch.randint(4, V, (2, 8), generator=torch.Generator().manual_seed(1))
    base = model(ids, Attention("causal"))
    assert base.shape == (2, 8, 16)
    for t in range(7):
        other = ids.clone()
        other[:, t + 1 :] = (other[:, t + 1 :] + 3 - 4) % (V - 4) + 4
        out = model(other, Attention("causal"))
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_causal_real_tokens_ignore_right_padding():
    model = _tiny("causal")
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]])
    padding = ids != 0
    base = model(ids, Attention("causal", padding=padding))
    out = model(ids.masked_fill(~padding, 9), Attention("causal", padding=padding))
    torch.testing.assert_close(out[padding], base[padding])
    torch.testing.assert_close(base[1:], model(ids[1:], Attention("causal")))


def test_prefix_positions_see_each_other():
    model = _tiny("prefix")
    ids = torch.randint(4, V, (1, 8), generator=torch.Generator().manual_seed(3))
    att = Attention("prefix", prefix_len=torch.tensor([3]))
    base = model(ids, att)
    changed = ids.clone()
    changed[0, 2] = 4 if ids[0, 2] != 4 else 5  # last prefix token
    out = model(changed, att)
    assert not torch.allclose(out[:, 0], base[:, 0])  # position 0 sees position 2 (bidirectional prefix)
    later = ids.clone()
    later[0, 5] = 4 if ids[0, 5] != 4 else 5  # a token after the prefix
    out = model(later, att)
    torch.testing.assert_close(out[:, :5], base[:, :5])  # the suffix is causal


def test_bidirectional_ignores_pad_tokens():
    model = _tiny("bidirectional")
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 2, 0, 0, 0, 0]])
    padding = ids != 0
    att = Attention("bidirectional", padding=padding)
    base = model(ids, att)
    garbage = ids.masked_fill(~padding, 9)
    out = model(garbage, att)
    torch.testing.assert_close(out[padding], base[padding])
    # and it is bidirectional: the first position sees the last real token
    changed = ids.clone()
    changed[0, 3] = 10
    assert not torch.allclose(model(changed, att)[0, 0], base[0, 0])


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_learned_and_rotary_run_and_train(norm):
    for positions in ("rotary", "learned"):
        model = _tiny("causal", positions=positions, norm=norm, max_len=16).train()
        ids = torch.randint(4, V, (2, 10))
        logits = model.logits(model(ids, Attention("causal")))
        assert logits.shape == (2, 10, V)
        logits.logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_learned_positions_refuse_long_sequences():
    model = _tiny("causal", positions="learned", max_len=4)
    with pytest.raises(UserError):
        model(torch.randint(4, V, (1, 5)), Attention("causal"))


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(4, V, (2, 6), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        model = _tiny("causal", activation_checkpointing=ckpt).train()
        model.logits(model(ids, Attention("causal"))).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_flops_per_token_hand_count():
    model = Transformer(10, "causal", d_model=8, n_layers=1, n_heads=2, d_ff=16)
    # per block: qkv 8*24 + out 8*8 + up 8*16 + down 16*8 + two norms 2*8; final norm 8
    n = 8 * 24 + 8 * 8 + 8 * 16 + 16 * 8 + 2 * 8 + 8
    assert model.non_embedding_parameters() == n == 536
    assert model.flops_per_token(5) == 6 * 536 + 6 * 8 * 10 + 12 * 1 * 8 * 5 == 4176
    untied = Transformer(10, "causal", d_model=8, n_layers=1, n_heads=2, d_ff=16, tie_embeddings=False,
                         positions="learned", max_len=7)
    assert untied.flops_per_token(5) == model.flops_per_token(5)  # embeddings/head counted once as matmul


def test_tied_embeddings_share_storage():
    model = _tiny("causal")
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert model.num_parameters() == model.num_parameters(exclude_embeddings=True) + V * 16
    untied = _tiny("causal", tie_embeddings=False)
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_init_scales_residual_projections():
    model = Transformer(V, "causal", d_model=64, n_layers=8, n_heads=4)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.001


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        Transformer(V, "causal", d_model=10, n_heads=4)
    with pytest.raises(UserError):
        Transformer(V, "causal", norm="batchnorm")


def _rotation(t: int, head_dim: int) -> torch.Tensor:
    """R_t: pair (i, i + head_dim/2) turned by the angle t * 10000^(-2i/head_dim) (RoFormer, rotate-half)."""
    R = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    half = head_dim // 2
    for i in range(half):
        angle = t * 10000.0 ** (-2 * i / head_dim)
        c, s = math.cos(angle), math.sin(angle)
        R[i, i], R[i, i + half], R[i + half, i], R[i + half, i + half] = c, -s, s, c
    return R


def test_rotary_known_answer_forward_backward_and_relative_scores():
    head_dim, T = 8, 6
    rotary = Rotary(head_dim, max_len=4)  # its tables grow on demand to T
    R = torch.stack([_rotation(t, head_dim) for t in range(T)])  # (T, h, h)
    # queries and keys at once, as the attention passes them: (B, T, 2, H, head_dim)
    x = torch.randn(3, T, 2, 5, head_dim, requires_grad=True)
    g = torch.randn(3, T, 2, 5, head_dim)
    out = rotary(x)
    torch.testing.assert_close(out.double(), torch.einsum("tij,btnhj->btnhi", R, x.double()), atol=1e-5, rtol=0)
    (out * g).sum().backward()  # d/dx <R x, g> = R^T g
    torch.testing.assert_close(x.grad.double(), torch.einsum("tji,btnhj->btnhi", R, g.double()), atol=1e-5, rtol=0)
    # attention scores then depend on the offset only: q_t . k_s == q_{t+1} . k_{s+1} for fixed q, k
    qk = torch.randn(2, head_dim).expand(1, T, 2, head_dim)
    rows = rotary(qk)[0]
    scores = rows[:, 0] @ rows[:, 1].T
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], atol=1e-5, rtol=0)
