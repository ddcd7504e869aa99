"""GPU training speed at GPT-2-small shape: lmlab against Hugging Face ``GPT2LMHeadModel``, eager and compiled.

One process, one shape (124M parameters: d_model 768, 12 layers, 12 heads, vocabulary 50257, sequence 1024),
bf16 autocast, fused AdamW, gradient clipping, no dropout. Six rows: lmlab eager, lmlab with
``torch.compile`` (what ``compile=true`` does for CLM: the model, LM head and cross-entropy), HF eager and
HF compiled, and the bare GPT-2 of ``scripts/lean_gpt.py`` (the "lean" yardstick: lmlab's arithmetic
and nothing else; ``--activation-checkpointing`` does not apply to it) eager and compiled. Each prints
training tokens/s, MFU (from lmlab's ``flops_per_token`` for this shape and the peak in
``lmlab/training/throughput.py``; HF's biases add < 0.1%) and peak GPU memory.

    python scripts/bench_gpu.py                          # on a GPU
    python scripts/bench_gpu.py --batch 32 --activation-checkpointing
    python scripts/bench_gpu.py --smoke                  # a tiny shape on the CPU (a test runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import time

import torch


def build_lmlab(args, device):
    from lmlab.attention import CAUSAL
    from lmlab.models.transformer import Transformer
    from lmlab.objectives.clm import CLM

    model = Transformer(args.vocab, CAUSAL, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        norm="layernorm", positions="learned", mlp="gelu", max_len=args.seq_len, dropout=0.0,
                        activation_checkpointing=args.activation_checkpointing).to(device)
    objective = CLM()
    loss = torch.compile(objective.loss) if args.compiled else objective.loss  # as compile=true does for CLM

    def loss_fn(ids):
        return loss(model, objective.prepare({"input_ids": ids, "seed": 0, "padded": False}))[0]

    return model, loss_fn, model.flops_per_token(args.seq_len)


def build_hf(args, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(device)
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    forward = torch.compile(model) if args.compiled else model

    def loss_fn(ids):
        ids = ids[:, :-1]
        return forward(input_ids=ids, labels=ids).loss

    return model, loss_fn, None


def build_lean(args, device):
    from lean_gpt import LeanGPT

    model = LeanGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq_len).to(device)
    forward = torch.compile(model) if args.compiled else model
    return model, forward, None


def measure(name: str, builder, args, device, flops_per_token: float | None, peak: float | None) -> dict:
    from lmlab.training.module import make_optimizer

    torch.manual_seed(0)
    model, loss_fn, own_fpt = builder(args, device)
    fpt = flops_per_token or own_fpt
    factory = functools.partial(torch.optim.AdamW, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer = make_optimizer(factory, [{"params": list(model.parameters())}])
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, args.vocab, (args.batch, args.seq_len + 1), generator=gen).to(device)
               for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        with autocast:
            loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    loss = float(loss.detach())  # waits for the device
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    tokens_per_s = args.batch * args.seq_len * args.steps / seconds
    row = {"name": name, "tokens_per_s": tokens_per_s, "loss": loss,
           "mfu": tokens_per_s * fpt / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
           "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--only", default="lmlab,lmlab-compiled,hf,hf-compiled,lean,lean-compiled",
                        help="comma-separated rows to run")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape, 2 steps, fp32, no compilation: checks that the script runs")
    args = parser.parse_args(argv)
    from lmlab.training.throughput import peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke or device.type == "cpu":
        args.batch, args.seq_len, args.d_model, args.layers, args.heads, args.vocab = 4, 64, 64, 2, 4, 256
        args.steps, args.warmup = 2, 1
        args.only = ",".join(r for r in args.only.split(",") if not r.endswith("compiled")) if \
            device.type == "cpu" else args.only
    args.bf16 = device.type == "cuda"
    if args.bf16:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(device, "bf16" if args.bf16 else "fp32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; shape: d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"vocab={args.vocab} seq_len={args.seq_len} batch={args.batch}; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}; torch {torch.__version__}")
    from lmlab.attention import CAUSAL
    from lmlab.models.transformer import Transformer

    with torch.device("meta"):
        reference = Transformer(args.vocab, CAUSAL, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                                norm="layernorm", positions="learned", mlp="gelu", max_len=args.seq_len)
    fpt = reference.flops_per_token(args.seq_len)
    rows = []
    builders = {"lmlab": (build_lmlab, False), "lmlab-compiled": (build_lmlab, True),
                "hf": (build_hf, False), "hf-compiled": (build_hf, True),
                "lean": (build_lean, False), "lean-compiled": (build_lean, True)}
    for row_name in args.only.split(","):
        builder, compiled = builders[row_name]
        args.compiled = compiled
        rows.append(measure(row_name, builder, args, device, fpt, peak))
        gc.collect()  # the measured model and optimiser are gone before the next row builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = rows[-1]
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "  n/a"
        mem = f"{r['peak_mem_gib']:6.2f} GiB" if r["peak_mem_gib"] is not None else "   n/a"
        print(f"{row_name:<16} {r['tokens_per_s']:12,.0f} tokens/s   MFU {mfu}   peak memory {mem}   "
              f"params {r['params'] / 1e6:.1f}M   loss {r['loss']:.3f}", flush=True)
    by = {r["name"]: r["tokens_per_s"] for r in rows}
    for a, b in [("lmlab", "hf"), ("lmlab-compiled", "hf-compiled"), ("lmlab-compiled", "hf"),
                 ("lmlab", "hf-compiled"), ("lean-compiled", "hf-compiled"), ("lmlab", "lean"),
                 ("lmlab-compiled", "lean-compiled")]:
        if a in by and b in by:
            print(f"ratio {a} / {b}: {by[a] / by[b]:.2f}x")
    return rows


if __name__ == "__main__":
    main()
