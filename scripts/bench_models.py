"""Training throughput of every model of lmlab/conf/model/ on the CPU, at a matched parameter count.

For each model YAML: build it with d_model chosen so that its parameter count is closest to ``--params``, time
training steps (forward, backward, AdamW step) on random token ids in alternating rounds, print tokens/s and
the median per-round ratio to the transformer measured in the same process. For Mamba also, at the same shape
in the same run: lmlab's chunked scan, its sequential reference, and Hugging Face transformers'
``MambaForCausalLM`` (randomly initialised, its pure-PyTorch path), as whole training steps and as the scan
alone.

    python scripts/bench_models.py            # batch 4, length 512 (HF's Mamba step alone takes over a minute)
    python scripts/bench_models.py --quick    # a few seconds: tiny shapes, for the test suite

Timings on a shared machine are noisy; ratios are measured in one process to be comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmlab.attention import Attention  # noqa: E402

CONF = ROOT / "lmlab" / "conf" / "model"
VOCAB = 260  # the byte vocabulary, so that the byte-level model (hat) builds too


def build(name: str, d_model: int, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.d_model = d_model
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg, vocab_size=VOCAB, attention="causal")


def matched(name: str, target: int, **overrides):
    """The model with the d_model (a multiple of 16) whose parameter count is closest to ``target``."""
    best, error = None, ""
    for d in range(16, 1025, 16):
        try:
            model = build(name, d, **overrides)
        except Exception as e:  # noqa: BLE001 - a width this model cannot take
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        n = model.num_parameters()
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (model, n, d)
        if n > 2 * target:
            break
    if best is None:
        raise RuntimeError(f"no width between 16 and 1024 builds ({error[:80]})")
    return best


def lm_loss(model, ids):
    hidden = model(ids, Attention())
    loss = F.cross_entropy(model.logits(hidden[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    aux = getattr(model, "aux_loss", None)
    return loss + aux if aux is not None else loss


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def make_step(model, loss_fn, batch: int, seq_len: int):
    """One full training step (forward, backward, AdamW) of ``model`` on fixed random ids."""
    torch.manual_seed(0)
    ids = torch.randint(4, VOCAB, (batch, seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_tps(model, loss_fn, batch: int, seq_len: int, steps: int, warmup: bool = True) -> float:
    """Tokens per second of the best of ``steps`` training steps (after one warm-up step unless ``warmup`` is off)."""
    step = make_step(model, loss_fn, batch, seq_len)
    if warmup:
        step()
    elapsed = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        elapsed.append(time.perf_counter() - t0)
    return batch * seq_len / min(elapsed)


def scan_seconds(impl: str, batch: int, seq_len: int, E: int, N: int, reps: int) -> float:
    """Best time of one forward + backward of the selective scan alone."""
    from lmlab.models.scan import selective_scan

    torch.manual_seed(0)
    x, delta = torch.randn(batch, seq_len, E), F.softplus(torch.randn(batch, seq_len, E) - 2)
    A, B, C, D = -torch.rand(E, N) * 3, torch.randn(batch, seq_len, N), torch.randn(batch, seq_len, N), torch.ones(E)
    inputs = [t.requires_grad_() for t in (x, delta, A, B, C, D)]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        selective_scan(*inputs, impl=impl).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_mamba(d_model: int, n_layers: int, d_state: int, expand: int, d_conv: int):
    try:
        from transformers import MambaConfig, MambaForCausalLM
    except Exception as e:  # noqa: BLE001
        return None, f"transformers' Mamba unavailable ({type(e).__name__})"
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=d_model, state_size=d_state, num_hidden_layers=n_layers,
                      expand=expand, conv_kernel=d_conv, use_mambapy=False, tie_word_embeddings=True)
    return MambaForCausalLM(cfg), ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of this script)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--params", type=int, default=750_000, help="target parameter count of every model")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (the median per-round ratio is printed)")
    p.add_argument("--models", default="", help="comma-separated YAML names (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.seq_len, args.params, args.steps, args.rounds = 2, 32, 30_000, 1, 1
    names = [n for n in (args.models.split(",") if args.models else sorted(f.stem for f in CONF.glob("*.yaml")))]
    names = ["transformer"] + [n for n in names if n != "transformer"]
    print(f"training throughput on CPU ({torch.get_num_threads()} threads): batch {args.batch}, length "
          f"{args.seq_len}, vocab {VOCAB}, about {args.params:,} parameters per model, fwd+bwd+AdamW; "
          f"{args.rounds} rounds of {args.steps} steps per model, models alternating within each round")
    built, steps = {}, {}
    for name in names:
        try:
            built[name] = matched(name, args.params)
            steps[name] = make_step(built[name][0], lm_loss, args.batch, args.seq_len)
            steps[name]()  # warm-up
        except Exception as e:  # noqa: BLE001 - report and go on with the other models
            print(f"{name:<14} skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
            built.pop(name, None)
            steps.pop(name, None)
    # alternating rounds: a machine that slows down mid-run slows every model of that round alike
    tps: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            tps[name].append(args.batch * args.seq_len * args.steps / (time.perf_counter() - t0))
    print(f"{'model':<14}{'d_model':>8}{'params':>10}{'tokens/s':>12}{'vs transformer':>16}  (per round)")
    base = tps.get("transformer")
    for name, rates in tps.items():
        model, n, d = built[name]
        ratios = [r / b for r, b in zip(rates, base)] if base else []
        ratio = f"{statistics.median(ratios):>15.2f}x  ({', '.join(f'{r:.2f}' for r in ratios)})" if base else ""
        print(f"{name:<14}{d:>8}{n:>10,}{statistics.median(rates):>12,.0f}{ratio}", flush=True)
    mamba_shape = (built["mamba"][2], built["mamba"][0]) if "mamba" in built else None

    if mamba_shape is None:
        return
    d, model = mamba_shape
    mixer = model.blocks[0].mixer
    n_layers, d_state, expand = len(model.blocks), mixer.d_state, mixer.d_inner // d
    print(f"\nmamba at d_model {d}, {n_layers} layers, d_state {d_state}, expand {expand}, batch {args.batch}, "
          f"length {args.seq_len} (same run):")
    rows = {}
    for impl in ("chunked", "sequential"):
        m = build("mamba", d, impl=impl)
        rows[f"lmlab {impl}"] = train_tps(m, lm_loss, args.batch, args.seq_len, args.steps)
    hf, why = hf_mamba(d, n_layers, d_state, expand, mixer.conv.kernel)
    if hf is not None:
        try:
            # its reference scan slices a (B, ED, T, N) tensor per step, so its backward costs O(T^2):
            # one step, no warm-up, keeps the whole benchmark within minutes
            rows["HF MambaForCausalLM (torch path)"] = train_tps(hf, hf_loss, args.batch, args.seq_len, 1,
                                                                 warmup=False)
        except Exception as e:  # noqa: BLE001
            why = f"HF MambaForCausalLM failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    ref = rows["lmlab sequential"]
    for label, tps in rows.items():
        print(f"  {label:<34}{tps:>12,.0f} tokens/s {tps / ref:>8.2f}x the sequential reference")
    if why:
        print(f"  ({why})")
    E = mixer.d_inner
    seq = scan_seconds("sequential", args.batch, args.seq_len, E, d_state, args.steps)
    chunked = scan_seconds("chunked", args.batch, args.seq_len, E, d_state, args.steps)
    print(f"  scan alone, forward + backward ({args.batch} x {args.seq_len} x {E} x {d_state}): chunked "
          f"{chunked * 1e3:.0f} ms, sequential {seq * 1e3:.0f} ms: {seq / chunked:.2f}x")


if __name__ == "__main__":
    main()
