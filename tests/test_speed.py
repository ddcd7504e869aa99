"""Speed: the device peak table, tokens/s and MFU, the fused optimiser, torch.compile, and the benchmarks."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lmlab.attention import Attention
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.training import throughput
from lmlab.training.module import fast_optimizer_kwargs, make_optimizer
from lmlab.training.throughput import Throughput, matmul_precision, peak_flops

ROOT = Path(__file__).resolve().parents[1]


# ----- the peak table -----

@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA A10", "bf16", 125.0),
])
def test_peak_table(name, precision, tflops):
    assert peak_flops("cuda", precision, name=name) == pytest.approx(tflops * 1e12)


def test_unknown_device_warns_once_and_gives_no_peak():
    throughput._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peak_flops("cpu", "fp32") is None
        assert peak_flops("cpu", "fp32") is None
        assert peak_flops("cuda", "bf16", name="Imaginary GPU 9000") is None
        assert peak_flops("cuda", "bf16", name="NVIDIA V100") is None  # V100 has no bf16 peak
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and sum("'cpu'" in m for m in messages) == 1


def test_matmul_precision_of_lightning_settings():
    assert matmul_precision("bf16-mixed") == "bf16"
    assert matmul_precision("bf16-true") == "bf16"
    assert matmul_precision("16-mixed") == "fp16"
    assert matmul_precision("32-true") in ("fp32", "tf32")


# ----- tokens/s and MFU -----

def test_throughput_known_answer():
    """A fake clock: steps of 100 tokens at t = 0, 1, 3, 4 s; the window of the last 2 steps covers 3 s
    (t = 1 .. 4) and 200 tokens; with 2 processes the global rate doubles; MFU = flops/s / peak."""
    times = iter([0.0, 1.0, 3.0, 4.0])
    fpt = {10: 6.0}
    meter = Throughput(lambda t: fpt[t], peak=1000.0, world=2, window=2, clock=lambda: next(times))
    assert meter.step(100, 10) == {}
    assert meter.step(100, 10) == {"train/tokens_per_s": 200.0, "train/mfu": pytest.approx(0.6)}
    meter.step(100, 10)
    out = meter.step(100, 10)  # window: steps at t=3 and t=4 after the start mark t=1
    assert out["train/tokens_per_s"] == pytest.approx(200 / 3 * 2)
    assert out["train/mfu"] == pytest.approx(200 * 6.0 / 3 / 1000.0)
    no_peak = Throughput(lambda t: 1.0, peak=None, clock=iter([0.0, 2.0]).__next__)
    no_peak.step(10, 4)
    assert no_peak.step(10, 4) == {"train/tokens_per_s": 5.0}


def test_transformer_flops_per_token_counts_the_matmuls():
    """6 x (weights touched per token) + attention scores: checked against a count of the layers."""
    d, layers, vocab, T = 32, 3, 50, 16
    model = Transformer(vocab, d_model=d, n_layers=layers, n_heads=4)
    matmul_weights = layers * (4 * d * d + 2 * d * 4 * d) + d * vocab  # qkv+out, up+down, head
    norms = (2 * layers + 1) * d
    assert model.flops_per_token(T) == 6 * (matmul_weights + norms) + 12 * layers * d * T


# ----- the fused optimiser -----

def test_fused_adamw_where_available():
    factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    assert fast_optimizer_kwargs(factory, params) == {"fused": True}
    assert fast_optimizer_kwargs(factory, params, "16-mixed") == {}  # the fp16 scaler clips unfused grads
    assert fast_optimizer_kwargs(functools.partial(factory, fused=False), params) == {}  # the config decides
    assert fast_optimizer_kwargs(lambda groups: None, params) == {}  # no ``fused`` argument
    optimizer = make_optimizer(factory, [{"params": params}])
    assert optimizer.defaults["fused"] is (torch.__version__ >= "2.4")
    # fused and unfused take the same step
    ref = [torch.nn.Parameter(params[0].detach().clone())]
    plain = torch.optim.AdamW(ref, lr=1e-3)
    for p in (params[0], ref[0]):
        p.grad = torch.ones_like(p)
    optimizer.step()
    plain.step()
    assert torch.allclose(params[0], ref[0], atol=1e-6)


# ----- torch.compile on the CPU -----

def test_compiled_transformer_matches_eager():
    """``compile=true`` wraps the backbone in torch.compile: three training steps give the eager losses."""
    torch.manual_seed(0)
    eager = Transformer(40, d_model=32, n_layers=1, n_heads=2)
    compiled_model = Transformer(40, d_model=32, n_layers=1, n_heads=2)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    objective = CLM()
    ids = torch.randint(4, 40, (4, 13), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model, forward in [("eager", eager, eager), ("compiled", compiled_model, compiled)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[name] = []
        for _ in range(3):
            loss, _ = objective.loss(forward, objective.prepare({"input_ids": ids, "seed": 0}))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(float(loss))
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    assert compiled(ids, Attention("causal")).shape == (4, 13, 32)


# ----- the benchmarks run -----

def test_bench_gpu_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("lmlab ", "hf ", "lean ", "ratio lmlab / hf", "ratio lmlab / lean"):
        assert text in proc.stdout


def test_bench_speed_runs():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_speed
    finally:
        sys.path.pop(0)
    out = bench_speed.main(["--seq-len", "16", "--batch", "4", "--steps", "1", "--rounds", "1", "--threads", "1"])
    assert out["lmlab"] > 0 and out["hf"] > 0 and out["lean"] > 0 and out["lmlab default"] > 0
    assert out["ratio"] == pytest.approx(out["lmlab"] / out["hf"])  # one round: the median is that round
    assert out["ratio lean / hf"] > 0 and out["ratio lmlab / lean"] > 0


def test_vectorised_collate_matches_row_by_row_padding():
    import random

    from lmlab.data.datamodule import collate

    rng = random.Random(0)
    rows = [{"input_ids": [rng.randint(4, 30) for _ in range(rng.randint(1, 9))], "label": i} for i in range(7)]
    batch = collate(rows, seed=5)
    width = max(len(r["input_ids"]) for r in rows)
    expected = [r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]
    assert batch["input_ids"].tolist() == expected and batch["input_ids"].dtype == torch.long
    assert batch["label"].tolist() == list(range(7)) and batch["seed"] == 5


# ----- no host syncs in the CLM step -----

def test_dense_clm_loss_equals_the_masked_mean():
    """CLM's dense path (logits everywhere, ignore_index) gives the gathered-positions loss and gradients."""
    torch.manual_seed(0)
    model = Transformer(12, d_model=16, n_layers=1, n_heads=2)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0], [1, 9, 9, 2, 0]])
    from lmlab.data.datamodule import collate
    batch = collate([{"input_ids": [t for t in r if t]} for r in ids.tolist()])
    assert batch["padded"] is True and torch.equal(batch["input_ids"], ids)
    objective = CLM()
    assert objective.dense_loss
    prepared = objective.prepare(batch)
    loss, _ = objective.loss(model, prepared)
    grad = torch.autograd.grad(loss, model.embed.weight)[0]
    hidden = model(prepared.inputs, prepared.attention)
    ref = torch.nn.functional.cross_entropy(model.logits(hidden[prepared.loss_mask]),
                                            prepared.targets[prepared.loss_mask])
    ref_grad = torch.autograd.grad(ref, model.embed.weight)[0]
    assert float(loss) == pytest.approx(float(ref), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_padding_flag_from_collate_skips_the_device_check():
    from lmlab.attention import padding_of
    from lmlab.data.datamodule import collate
    full = collate([{"input_ids": [1, 4, 2]}, {"input_ids": [1, 5, 2]}])
    assert full["padded"] is False and padding_of(full["input_ids"], full["padded"]) is None
    ragged = collate([{"input_ids": [1, 4, 2]}, {"input_ids": [1, 2]}])
    mask = padding_of(ragged["input_ids"], ragged["padded"])
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    # without the flag the ids are checked (the old behaviour)
    assert padding_of(full["input_ids"]) is None and padding_of(ragged["input_ids"]).equal(mask)


def _module_with_grads(scaler, root=None):
    """An LMModule whose parameters carry gradients of norm 10 each, under a stand-in trainer."""
    from types import SimpleNamespace

    from lmlab.training.module import LMModule

    model = Transformer(20, "causal", d_model=8, n_layers=1, n_heads=2)
    module = LMModule(model, CLM(), functools.partial(torch.optim.AdamW, lr=1e-3), lambda step, total: 1.0)
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0 / p.numel() ** 0.5)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root or module),
                                      precision_plugin=SimpleNamespace(scaler=scaler))
    optimizer = make_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3),
                               [{"params": list(module.parameters())}])
    return module, optimizer


def test_gradient_clipping_where_lightning_refuses_it():
    """bf16 (no scaler) with the fused optimiser: clipped by the global norm; FSDP: by the root's own
    ``clip_grad_norm_``. Lightning's plugins raise in both cases (trainer=gpu and trainer=fsdp)."""
    module, optimizer = _module_with_grads(scaler=None)
    assert optimizer.defaults.get("fused") is (torch.__version__ >= "2.4")
    n = len(list(module.parameters()))
    before = torch.stack([p.grad.norm() for p in module.parameters()]).norm()
    assert float(before) == pytest.approx(10 * n ** 0.5, rel=1e-5)
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    after = torch.stack([p.grad.norm() for p in module.parameters()]).norm()
    assert float(after) == pytest.approx(1.0, rel=1e-4)
    module.configure_gradient_clipping(optimizer, 0.5, "value")
    assert max(float(p.grad.abs().max()) for p in module.parameters()) <= 0.5
    module.configure_gradient_clipping(optimizer, None, None)  # no clipping configured: nothing happens

    calls = []

    class Root:  # what FSDP's wrapped root offers
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)

    module, optimizer = _module_with_grads(scaler=None, root=Root())
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [1.0]
    assert all(float(p.grad.norm()) == pytest.approx(10.0, rel=1e-5) for p in module.parameters())


def test_bf16_mixed_training_runs_through_the_cli(lmlab):
    """trainer=gpu's precision (bf16-mixed) with its gradient clipping, on the CPU: Lightning's plugin is the
    same one, and it used to refuse to clip for the fused AdamW at the first step."""
    from tests.conftest import FAST, TINY

    code, out = lmlab("train", *TINY, *FAST, "trainer.precision=bf16-mixed", "eval=[perplexity]")
    assert code == 0, out[-3000:]
    results = json.loads(next(lmlab.runs.rglob("results.json")).read_text())
    assert math.isfinite(results["metrics"]["perplexity/loss"])


# ----- compile=true works for every model -----

MODELS = sorted(p.stem for p in (ROOT / "lmlab" / "conf" / "model").glob("*.yaml"))


def _compiled_and_eager(name: str, objective):
    """(eager LMModule, compile=true LMModule) of model ``name`` (one layer) and ``objective``, same weights."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from lmlab.training.module import LMModule

    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "model.n_layers=1"])
    torch.manual_seed(0)
    model = instantiate(cfg.model, vocab_size=260, attention=objective.attention)  # 260: hat reads bytes
    modules = [LMModule(model, objective, torch.optim.AdamW, lambda step, total: 1.0, compile=c)
               for c in (False, True)]
    return modules


def _assert_compiled_matches_eager(name, objective, lengths=(9, 12)):
    eager, compiled = _compiled_and_eager(name, objective)
    model = eager.model
    weight = model.embed.weight if hasattr(model, "embed") else next(model.parameters())
    for length in lengths:
        batch = {"input_ids": torch.randint(4, 260, (2, length), generator=torch.Generator().manual_seed(length)),
                 "seed": 0}
        losses, grads = [], []
        for module in (eager, compiled):
            loss, _ = module.loss(objective.prepare(batch))
            if model.aux_loss is not None:
                loss = loss + model.aux_loss
            grads.append(torch.autograd.grad(loss, weight)[0])
            losses.append(float(loss))
        assert losses[1] == pytest.approx(losses[0], abs=1e-4), (name, length)
        assert torch.allclose(grads[1], grads[0], atol=1e-4), (name, length)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_compiles_and_matches_eager(name):
    """``compile=true`` with next-token prediction compiles the whole loss (model, LM head, cross-entropy)
    of each model: the same loss and gradients as eager at two sequence lengths (the second call makes the
    length dynamic, as variable-length batches do). One layer each, to keep compilation short on a CPU."""
    compiled = _compiled_and_eager(name, CLM())[1]
    assert compiled.compiled_loss is not None
    _assert_compiled_matches_eager(name, CLM())


def test_sparse_objectives_compile_the_model_alone():
    """MLM's loss gathers a varying number of masked positions (EMO's too, though it is next-token prediction):
    ``compile=true`` compiles the model only."""
    from lmlab.objectives.emo import EMO
    from lmlab.objectives.mlm import MLM

    for objective in (MLM(), EMO()):
        compiled = _compiled_and_eager("transformer", objective)[1]
        assert compiled.compiled_loss is None and compiled.forward_model is not compiled.model
    _assert_compiled_matches_eager("transformer", MLM())


def test_lean_baseline_computes_what_lmlab_computes():
    """The benchmarks' lean GPT-2 and lmlab's parity transformer + CLM: same loss and gradients, same weights."""
    from lmlab.attention import CAUSAL
    from lmlab.models.transformer import Transformer
    from lmlab.objectives.clm import CLM

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from lean_gpt import LeanGPT, copy_from_lmlab, lean_name
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = Transformer(30, CAUSAL, d_model=32, n_layers=2, n_heads=4, norm="layernorm", positions="learned",
                        mlp="gelu", max_len=16)
    for p in model.parameters():  # away from the init's ones and zeros, so every weight matters
        p.data.add_(0.1 * torch.randn_like(p))
    lean = LeanGPT(30, 32, 2, 4, 16)
    copy_from_lmlab(lean, model)
    ids = torch.randint(4, 30, (3, 13), generator=torch.Generator().manual_seed(1))
    objective = CLM()
    loss, _ = objective.loss(model, objective.prepare({"input_ids": ids, "seed": 0}))
    lean_loss = lean(ids)
    torch.testing.assert_close(lean_loss, loss)
    loss.backward()
    lean_loss.backward()
    theirs = dict(lean.named_parameters())
    for name, p in model.named_parameters():  # the tied head is the embedding, listed once
        torch.testing.assert_close(theirs[lean_name(name)].grad, p.grad)
    # embeddings, 2 blocks of (2 norms x 2 + 4 matrices), final norm
    assert len(theirs) == len(dict(model.named_parameters())) == 2 + 2 * 8 + 2
