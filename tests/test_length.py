"""Sliding-window attention with sinks, the rotary base, the document mask and eval=length's buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmlab.attention import CAUSAL, Attention, documents_of
from lmlab.data.datamodule import check_doc_mask, collate
from lmlab.errors import UserError
from lmlab.evaluation.length import Length, bucket_ends, bucket_losses
from lmlab.models.transformer import Transformer
from lmlab.vocab import BOS_ID, EOS_ID, PAD_ID


def _model(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(40, d_model=16, n_layers=2, n_heads=2, **kwargs).eval()


def _rotate(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """Rotary by complex multiplication, pairs (x_i, x_{i + d/2}) turning by ``pos * base^(-2i/d)``."""
    d = x.shape[-1] // 2
    angle = pos * base ** (-torch.arange(d, dtype=torch.float64) * 2 / (2 * d))
    z = torch.complex(x[..., :d].double(), x[..., d:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1)


def _reference_attention(attn, x: torch.Tensor, window: int, sinks: int, cache: bool, base: float) -> torch.Tensor:
    """Per query, by brute force: the keys it may see (``j <= i`` and ``i - j < window`` or ``j < sinks``), sink
    keys scored with the query at cache slot ``min(i, sinks + window - 1)`` when ``cache``."""
    B, T, D = x.shape
    H, hd = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).double().view(B, T, 3, H, hd).unbind(2)
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for i in range(T):
        keys = [j for j in range(i + 1) if i - j < window or j < sinks]
        scores = []
        for j in keys:
            qpos = i if (i - j < window or not cache) else min(i, sinks + window - 1)
            scores.append((_rotate(q[:, i], qpos, base) * _rotate(k[:, j], j, base)).sum(-1) / math.sqrt(hd))
        w = torch.softmax(torch.stack(scores, -1), -1)  # (B, H, keys)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", w, v[:, keys])
    return attn.out(out.reshape(B, T, D).float())


def test_mask_is_causal_window_plus_sinks_by_brute_force():
    T, window, sinks = 11, 3, 2
    mask = Attention(CAUSAL, window=window, sinks=sinks).mask(T, torch.device("cpu"))[0, 0]
    expected = torch.tensor([[j <= i and (i - j < window or j < sinks) for j in range(T)] for i in range(T)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("base", [10000.0, 50.0])
def test_sink_window_attention_matches_brute_force(cache, base):
    model = _model(rope_base=base)
    attn = model.blocks[0].attn
    with torch.no_grad():  # sharper attention than at initialisation, so that the key positions matter
        attn.qkv.weight.mul_(30.0)
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(1))
    record = Attention(CAUSAL, window=4, sinks=2, cache_positions=cache)
    mask = record.mask(13, x.device)
    with torch.no_grad():
        ours = attn(x, mask, False, (2, 4) if cache else None)
        ref = _reference_attention(attn, x, 4, 2, cache, base)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) < 1e-5 * scale
    if cache:  # the position scheme matters: original positions give other outputs
        with torch.no_grad():
            other = _reference_attention(attn, x, 4, 2, False, base)
        assert float((ours - other).abs().max()) > 1e-2 * scale


def test_window_at_least_the_length_is_full_attention_exactly():
    model = _model()
    ids = torch.randint(4, 40, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.logits(model(ids, Attention(CAUSAL)))
        assert torch.equal(model.logits(model(ids, Attention(CAUSAL, window=24, sinks=4))), full)
        assert torch.equal(model.logits(model(ids, Attention(CAUSAL, window=100))), full)
        # the explicit sink path with a window covering everything: the full causal softmax
        attn, x = model.blocks[0].attn, torch.randn(2, 24, 16)
        causal = attn(x, None, True)
        allowed = torch.ones(24, 24, dtype=torch.bool).tril()[None, None]
        assert torch.allclose(attn(x, allowed, False, (4, 24)), causal, atol=1e-6)
        # a window shorter than the sequence changes the logits
        assert not torch.allclose(model.logits(model(ids, Attention(CAUSAL, window=4, sinks=0))), full, atol=1e-3)


def test_rope_base_sets_the_rotary_frequencies():
    default, other = _model(), _model(rope_base=500.0)
    x = torch.randn(1, 9, 1, 8)
    ref = torch.stack([_rotate(x[0, t], t, 500.0) for t in range(9)])[None].float()
    assert torch.allclose(other.blocks[0].attn.rotary(x), ref, atol=1e-5)
    ids = torch.randint(4, 40, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(default.logits(default(ids, Attention())), other.logits(other(ids, Attention())))
    with pytest.raises(UserError, match="rope_base"):
        _model(positions="learned", rope_base=500.0)


def test_documents_of_known_answer():
    ids = torch.tensor([[BOS_ID, 5, 6, EOS_ID, BOS_ID, 7, EOS_ID, 8, 9, EOS_ID, PAD_ID]])
    assert documents_of(ids).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3]]


def test_doc_mask_makes_a_document_independent_of_the_one_before():
    model = _model()
    g = torch.Generator().manual_seed(3)
    second = [BOS_ID] + torch.randint(4, 40, (9,), generator=g).tolist() + [EOS_ID]
    rows = [[BOS_ID] + torch.randint(4, 40, (7,), generator=g).tolist() + [EOS_ID] + second for _ in range(2)]
    batch = collate([{"input_ids": r} for r in rows], doc_mask=True)
    ids = batch["input_ids"]
    with torch.no_grad():
        masked = model.logits(model(ids, Attention(CAUSAL, documents=batch["documents"])))
        plain = model.logits(model(ids, Attention(CAUSAL)))
    tail = slice(9, None)  # the second document's positions
    assert (masked[0, tail] - masked[1, tail]).abs().max() < 1e-6
    assert (plain[0, tail] - plain[1, tail]).abs().max() > 1e-3


def test_doc_mask_refused_where_it_would_not_apply():
    from lmlab.models.lstm import LSTM
    from lmlab.objectives.clm import CLM
    from lmlab.objectives.mlm import MLM

    check_doc_mask(True, _model(), CLM())
    with pytest.raises(UserError, match="doc_mask"):
        check_doc_mask(True, _model(attention="bidirectional"), MLM())
    with pytest.raises(UserError, match="doc_mask"):
        check_doc_mask(True, LSTM(40, d_model=16), CLM())


def test_buckets_by_hand():
    assert bucket_ends(64, 2048) == [64, 128, 256, 512, 1024, 2048]
    assert bucket_ends(10, 25) == [10, 20, 25]
    losses = np.array([4.0, 2.0, 3.0, 1.0, 1.0, 5.0, 0.0])
    assert bucket_losses(losses, [2, 5, 7]) == {2: 3.0, 5: 5.0 / 3.0, 7: 2.5}
    with pytest.raises(UserError, match="buckets"):
        bucket_ends(10, 40, [20, 10])


def test_length_refuses_non_causal_objectives_and_windows_on_recurrent_models():
    from lmlab.objectives.mlm import MLM

    with pytest.raises(UserError, match="causal"):
        Length().skip_reason(None, MLM())
    with pytest.raises(UserError, match="window"):
        Length(sinks=4)
    with pytest.raises(UserError, match="window"):
        Length(positions="original")


def test_length_and_doc_mask_through_the_cli(lmlab):
    import json

    from tests.conftest import FAST, TINY

    small = ["data=hmm", "data.length=7", "model.d_model=16", "model.n_layers=1", *TINY, *FAST]
    code, out = lmlab("train", *small, "data.doc_mask=true", "eval=[length]", "eval.length.factor=4",
                      "eval.length.window=4", "eval.length.sinks=1")
    assert code == 0, out
    metrics = json.loads(next(lmlab.runs.rglob("results.json")).read_text())["metrics"]
    assert metrics["length/train_length"] == 8 and metrics["length/sinks"] == 1
    keys = {"length/loss@8", "length/loss@16", "length/loss@32", "length/loss_in_window", "length/ratio"}
    assert keys <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in metrics if k.startswith("length/"))
    code, out = lmlab("train", *small, "model=lstm", "data.doc_mask=true", "eval=[]")
    assert code == 2 and "doc_mask" in out
    code, out = lmlab("train", *small, "model=lstm", "eval=[length]", "eval.length.window=4")
    assert code == 2 and "window" in out


def test_long_sequences_start_at_a_row():
    rows = [[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID], [BOS_ID, 8, 9, 10, EOS_ID], [BOS_ID, 11, EOS_ID]]
    seqs = Length(sequences=5).long_sequences(rows, 5)
    assert seqs.tolist() == [[BOS_ID, 5, 6, EOS_ID, BOS_ID], [BOS_ID, 8, 9, 10, EOS_ID]]
    with pytest.raises(UserError, match="validation_size"):
        Length().long_sequences(rows, 100)


def test_length_runs_a_recurrent_model_over_the_whole_sequence():
    """An LSTM reads the long sequence with its state carried: its per-position losses are the ones of one
    forward pass over the whole sequence (checked on bucket sums against a direct computation)."""
    from types import SimpleNamespace

    from datasets import Dataset, DatasetDict

    from lmlab.models.lstm import LSTM

    torch.manual_seed(0)
    model = LSTM(40, d_model=16).eval()
    g = torch.Generator().manual_seed(4)
    rows = [[BOS_ID] + torch.randint(4, 40, (6,), generator=g).tolist() + [EOS_ID] for _ in range(20)]
    dm = SimpleNamespace(splits=DatasetDict({"validation": Dataset.from_dict({"input_ids": rows})}))
    with pytest.raises(UserError, match="window"):
        Length(factor=4, window=4)(SimpleNamespace(model=model), dm)
    out = Length(factor=4, sequences=2)(SimpleNamespace(model=model), dm)
    seqs = Length(sequences=2).long_sequences(rows, 29)
    with torch.no_grad():
        logits = model.logits(model(seqs[:, :-1], Attention(CAUSAL)))
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).double(), seqs[:, 1:], reduction="none").mean(0)
    assert out["length/train_length"] == 7
    assert out["length/loss@7"] == pytest.approx(float(nll[:7].mean()), abs=1e-6)
    assert out["length/loss@28"] == pytest.approx(float(nll[14:28].mean()), abs=1e-6)


def test_clm_evaluation_reads_documents_apart_when_the_source_asks():
    """The validation loss of a run trained with data.doc_mask is scored with the same document mask."""
    from types import SimpleNamespace

    from lmlab.objectives.clm import CLM

    model = _model()
    g = torch.Generator().manual_seed(5)
    words = [torch.randint(4, 40, (11,), generator=g).tolist() for _ in range(3)]
    rows = [[BOS_ID, *w[:5], EOS_ID, *w[5:]] for w in words]
    ids = torch.tensor(rows)
    with torch.no_grad():
        logits = model.logits(model(ids[:, :-1], Attention(CAUSAL, documents=documents_of(ids[:, :-1]))))
    expected = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten()))
    masked = CLM().evaluate(model, rows, SimpleNamespace(doc_mask=True, sequence_nll=lambda r: None))["loss"]
    plain = CLM().evaluate(model, rows, SimpleNamespace(doc_mask=False, sequence_nll=lambda r: None))["loss"]
    assert masked == pytest.approx(expected, abs=1e-6)
    assert abs(masked - plain) > 1e-4
