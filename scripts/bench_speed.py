"""CPU training speed: lmlab's transformer against Hugging Face ``GPT2LMHeadModel`` of the same shape.

Both models get the same d_model, layers, heads, vocabulary and sequence length, a GELU MLP of 4 x d_model,
learned positions, LayerNorm, tied embeddings and no dropout (lmlab's transformer is built with
``positions=learned norm=layernorm mlp=gelu`` for parity; GPT-2 also carries biases, lmlab does not). One
training step is forward, cross-entropy, backward, gradient clipping and an AdamW step (fused where
PyTorch has it, for all rows), on random token ids without padding.

Two more rows put the ratio in context. ``lean`` is a bare GPT-2 (``scripts/lean_gpt.py``: the same arithmetic
as lmlab's parity model, tested, and nothing else), so ``lean / HF`` is the most any implementation of these
kernels gains over Hugging Face and ``lmlab / lean`` is lmlab's own overhead. ``lmlab default`` is lmlab's
default configuration (RMSNorm, rotary positions): not the same arithmetic, shown for what users run.
All rows are timed in alternating rounds in one process, so that a busy machine slows them alike, and the
median of the per-round ratios is printed.

    python scripts/bench_speed.py                # the default shape (d_model 64, 2 layers, 4 heads)
    python scripts/bench_speed.py --seq-len 512 --d-model 256 --layers 4 --heads 8
    python scripts/bench_speed.py --compile      # also lmlab, lean and HF compiled (inductor), loss included
    python scripts/bench_speed.py --stats-callback   # the default job with and without callbacks=stats

``--stats-callback`` times something else: the default job of ``lmlab train`` (Lightning, its data, the CSV
logger), trained for ``--fit-steps`` steps with and without the statistics callback (``callbacks=stats``,
interval 50), in alternating rounds in one process, timing the steps (not the Trainer's set-up); it prints each
arm's tokens/s and the median ratio, by the wall clock and per CPU second of this process.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning as L
import torch
from lean_gpt import LeanGPT  # scripts/, next to this file


def make_lmlab(args, parity: bool = True, compiled: bool = False):
    """lmlab's transformer and CLM loss; ``compiled``: what ``compile=true`` does for CLM (the whole loss)."""
    from lmlab.attention import CAUSAL
    from lmlab.models.transformer import Transformer
    from lmlab.objectives.clm import CLM

    layout = dict(norm="layernorm", positions="learned", mlp="gelu") if parity else {}
    model = Transformer(args.vocab, CAUSAL, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        max_len=args.seq_len, dropout=0.0, **layout)
    objective = CLM()
    loss = torch.compile(objective.loss) if compiled else objective.loss
    ids = token_rows(args)

    def loss_fn():
        return loss(model, objective.prepare({"input_ids": ids, "seed": 0, "padded": False}))[0]

    return model, loss_fn


def make_lean(args):
    model = LeanGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq_len)
    ids = token_rows(args)
    return model, lambda: model(ids)


def token_rows(args) -> torch.Tensor:
    """(B, T+1) rows: inputs are the first T tokens, targets the last T (HF shifts inside, so it reads T)."""
    return torch.randint(4, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))


def make_hf(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, n_inner=4 * args.d_model, activation_function="gelu", resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # older transformers: sdpa is the default where available
        pass
    ids = token_rows(args)[:, :-1]

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def trainer_step(model, loss_fn):
    from lmlab.training.module import make_optimizer

    # the optimiser lmlab trains with (fused AdamW where this PyTorch has it), for both models alike
    factory = functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    optimizer = make_optimizer(factory, [{"params": list(model.parameters())}])
    model.train()

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``n`` steps."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return time.perf_counter() - t, time.process_time() - c


class FitClock(L.Callback):
    """The training tokens (non-PAD) of a fit, and the wall and CPU seconds from its first to its last step
    (Trainer set-up and teardown left out)."""

    def __init__(self) -> None:
        self.tokens, self.wall, self.cpu = 0, 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tokens += int((batch["input_ids"] != 0).sum())  # 0: PAD

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


def stats_overhead(args) -> dict:
    """tokens/s of the default job without and with ``callbacks=stats`` (every 50 steps), alternating."""
    import tempfile

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    from lmlab.cli import CONF, _register_resolvers
    from lmlab.data.datamodule import DataModule
    from lmlab.pipeline import build, quiet
    from lmlab.training.callbacks import DivergenceGuard
    from lmlab.training.module import LMModule

    _register_resolvers()
    quiet()
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["callbacks=stats", f"max_steps={args.fit_steps}"])
    objective, source, model, _, splits = build(cfg)
    dm = DataModule(source, splits, batch_size=cfg.batch_size, seed=cfg.seed)
    wall: dict[str, list[float]] = {"default": [], "stats": []}
    cpu: dict[str, list[float]] = {"default": [], "stats": []}
    with tempfile.TemporaryDirectory(prefix="bench-stats-") as scratch:
        for r in range(args.rounds):
            for arm in wall:
                clock = FitClock()
                callbacks = [DivergenceGuard(every=cfg.trainer.log_every_n_steps), clock]
                if arm == "stats":
                    callbacks.append(instantiate(cfg.callbacks.stats))
                module = LMModule(model, objective, instantiate(cfg.optim), instantiate(cfg.schedule))
                trainer = instantiate(cfg.trainer, logger=CSVLogger(scratch, name=f"{arm}{r}"), callbacks=callbacks,
                                      enable_progress_bar=False, enable_checkpointing=False,
                                      default_root_dir=f"{scratch}/{arm}{r}")
                trainer.fit(module, datamodule=dm)
                wall[arm].append(clock.tokens / clock.wall)
                cpu[arm].append(clock.tokens / clock.cpu)
    ratios = [s / d for s, d in zip(wall["stats"], wall["default"])]
    cpu_ratios = [s / d for s, d in zip(cpu["stats"], cpu["default"])]
    out = {arm: statistics.median(r) for arm, r in wall.items()}
    out["ratio"], out["cpu ratio"] = statistics.median(ratios), statistics.median(cpu_ratios)
    print(f"default job (lmlab train), {args.fit_steps} steps per fit, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for arm in wall:
        print(f"{'callbacks=' + arm:32s} {out[arm]:12,.0f} tokens/s (median; "
              f"{statistics.median(cpu[arm]):,.0f} per CPU second)")
    print(f"{'ratio stats / default':32s} {out['ratio']:6.3f}x wall clock (per round: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); {out['cpu ratio']:.3f}x per CPU second (per round: "
          f"{', '.join(f'{x:.2f}' for x in cpu_ratios)})")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=34, help="34: the default PCFG (30 words + 4 specials)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--stats-callback", action="store_true",
                        help="time the default job with and without callbacks=stats instead")
    parser.add_argument("--fit-steps", type=int, default=50, help="with --stats-callback: steps per fit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stats_callback:
        return stats_overhead(args)
    torch.manual_seed(0)
    makers = {"lmlab": make_lmlab, "lmlab default": functools.partial(make_lmlab, parity=False),
              "lean": make_lean, "hf": make_hf}
    steps = {name: trainer_step(*make(args)) for name, make in makers.items()}
    if args.compile:  # each forward with its loss compiled (for lmlab: what compile=true does), optimiser eager
        steps["lmlab compiled"] = trainer_step(*make_lmlab(args, compiled=True))
        for name in ("lean", "hf"):
            model, loss_fn = makers[name](args)
            model.compile()  # their forward computes the loss
            steps[f"{name} compiled"] = trainer_step(model, loss_fn)
    for name, step in steps.items():  # warm-up (allocator, first-call overheads, compilation)
        w, _ = timed(step, 2)
        if "compiled" in name:
            print(f"{name}: warm-up (compilation) {w:.1f} s")
    tokens = args.batch * args.seq_len * args.steps
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            w, c = timed(step, args.steps)
            wall[name].append(tokens / w)
            cpu[name].append(tokens / c)
    out = {name: statistics.median(r) for name, r in wall.items()}
    print(f"shape: d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab} "
          f"seq_len={args.seq_len} batch={args.batch}, {args.threads} threads, torch {torch.__version__}")
    for name in steps:
        label = name.replace("hf", "HF GPT2LMHeadModel").replace("lmlab", "lmlab Transformer")
        print(f"{label:32s} {out[name]:12,.0f} tokens/s (median of {args.rounds} rounds of {args.steps} steps)")
    pairs = [("lmlab", "hf"), ("lean", "hf"), ("lmlab", "lean"), ("lmlab default", "hf"),
             ("lmlab compiled", "hf"), ("lean compiled", "hf"), ("lmlab compiled", "hf compiled"),
             ("lean compiled", "hf compiled"),
             ("lmlab compiled", "lean compiled")]
    for a, b in [(a, b) for a, b in pairs if a in steps and b in steps]:
        ratios = [x / y for x, y in zip(wall[a], wall[b])]
        cpu_ratio = statistics.median(x / y for x, y in zip(cpu[a], cpu[b]))
        key = "ratio" if (a, b) == ("lmlab", "hf") else f"ratio {a} / {b}"
        out[key] = statistics.median(ratios)
        print(f"ratio {a} / {b}".ljust(32) + f" {out[key]:6.2f}x wall clock (per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); {cpu_ratio:.2f}x per CPU second of this process")
    return out


if __name__ == "__main__":
    main()
