"""The coordinate check of a parameterisation (Yang et al. 2022, Tensor Programs V, arXiv 2203.03466, Fig. 5
and Appendix D.1; the ``mup`` package's ``coord_check``): train models of several widths for a few steps at one
learning rate and watch the size of each layer's output coordinates. Under muP the size of every layer's
activations stays the same as the width grows; under the standard parameterisation with Adam, the updates
grow the hidden and output activations in proportion to the width, and a large learning rate makes the
widest models blow up first.

``coord_check`` builds each width with the same seed, trains it with AdamW (the learning rates of
``lmlab.optim``'s groups, no weight decay, no schedule) on next-token prediction of a fixed stream of
uniformly random tokens, and records after each step the root mean square of each layer's output on a held
batch: the token embedding, every block (through forward hooks) and the logits. ``spread`` is, per layer,
the ratio of the largest to the smallest of these sizes across widths after the last step.

Run ``python -m lmlab.evaluation.coordcheck --out DIR`` for the table (``coordcheck.md``), the numbers
(``coordcheck.json``) and the plot (``coordcheck.png``); ``--help`` lists the settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.attention import CAUSAL, Attention
from lmlab.models.moe import MoETransformer
from lmlab.models.transformer import Transformer
from lmlab.optim import decay_groups, scale_lr
from lmlab.threads import one_thread

MODELS = {"transformer": Transformer, "moe": MoETransformer}
WIDTHS = (64, 128, 256, 512)
# the settings of docs/mup.md: AdamW at 3e-3 is large enough that the standard parameterisation's widest models
# grow their hidden activations a hundredfold within 10 steps, and small enough that muP's stay in step
SETTINGS = dict(steps=10, lr=0.003, base_width=64, n_layers=2, n_heads=4, vocab_size=64, seq_len=32, batch_size=8,
                seeds=2)

Sizes = dict[str, list[float]]  # layer -> its output RMS before training and after each step


def coord_sizes(model_name: str, parametrization: str, width: int, steps: int = 10, lr: float = 0.003,
                base_width: int = 64, n_layers: int = 2, n_heads: int = 4, vocab_size: int = 64, seq_len: int = 32,
                batch_size: int = 8, seed: int = 0) -> Sizes:
    """One model of ``width``: the RMS of each layer's output on a held batch, before training and after each
    of ``steps`` AdamW steps at ``lr``."""
    kwargs = {} if parametrization == "sp" else {"base_width": base_width}
    torch.manual_seed(seed)
    model = MODELS[model_name](vocab_size, CAUSAL, d_model=width, n_layers=n_layers, n_heads=n_heads,
                               parametrization=parametrization, **kwargs)
    data = torch.Generator().manual_seed(seed + 1)
    held = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=data)
    attention = Attention(CAUSAL)
    opt = scale_lr(torch.optim.AdamW(decay_groups(model), lr=lr, weight_decay=0.0))
    layers = [("embed", model.embed)] + [(f"block{i}", b) for i, b in enumerate(model.blocks)]
    sizes: Sizes = {name: [] for name, _ in layers} | {"logits": []}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, m in layers]

    def measure() -> None:
        model.eval()
        with torch.no_grad():
            logits = model.logits(model(held[:, :-1], attention))
        for name, _ in layers:
            sizes[name].append(seen[name].float().pow(2).mean().sqrt().item())
        sizes["logits"].append(logits.float().pow(2).mean().sqrt().item())
        model.train()

    try:
        with one_thread():
            measure()
            for _ in range(steps):
                batch = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=data)
                logits = model.logits(model(batch[:, :-1], attention))
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
                if model.aux_loss is not None:
                    loss = loss + model.aux_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                measure()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def coord_check(model_name: str, parametrization: str, widths=WIDTHS, seeds: int = 2, **settings) -> dict[int, Sizes]:
    """``coord_sizes`` at each of ``widths``, averaged over ``seeds`` seeds (0, 1, ...)."""
    out = {}
    for width in widths:
        runs = [coord_sizes(model_name, parametrization, width, seed=s, **settings) for s in range(seeds)]
        out[width] = {k: [sum(r[k][t] for r in runs) / seeds for t in range(len(runs[0][k]))] for k in runs[0]}
    return out


def spread(sizes: dict[int, Sizes], step: int = -1) -> dict[str, float]:
    """Per layer, the largest over the smallest output RMS across widths at ``step`` (the last by default)."""
    layers = next(iter(sizes.values()))
    return {k: max(s[k][step] for s in sizes.values()) / min(s[k][step] for s in sizes.values()) for k in layers}


def plot(results: dict[tuple[str, str], dict[int, Sizes]], path: Path) -> None:
    """One panel per (model, parametrisation): each layer's output RMS after the last step against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), sharey=True, squeeze=False)
    for ax, ((model_name, par), sizes) in zip(axes[0], results.items()):
        widths = sorted(sizes)
        for layer in sizes[widths[0]]:
            ax.plot(widths, [sizes[w][layer][-1] for w in widths], marker="o", ms=3, label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model_name}, {par}", fontsize=9)
        ax.set_xlabel("width (d_model)")
    axes[0][0].set_ylabel("output RMS after the last step")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmlab.evaluation.coordcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for coordcheck.md, coordcheck.json, coordcheck.png")
    parser.add_argument("--models", default="transformer,moe")
    parser.add_argument("--parametrizations", default="sp,mup")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    for key, value in SETTINGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    settings = {k: getattr(args, k) for k in SETTINGS}
    results = {(m, p): coord_check(m, p, widths, **settings)
               for m in args.models.split(",") for p in args.parametrizations.split(",")}
    command = "python -m lmlab.evaluation.coordcheck " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [f"Output RMS spread across widths {widths} (largest / smallest, after {args.steps} steps; "
            f"{', '.join(f'{k}={v}' for k, v in settings.items())}). Command: `{command}`", ""]
    layers = list(next(iter(next(iter(results.values())).values())))
    rows += ["| model | parametrization | " + " | ".join(layers) + " | max |",
             "|---|---|" + "---|" * (len(layers) + 1)]
    for (m, p), sizes in results.items():
        s = spread(sizes)
        rows.append(f"| {m} | {p} | " + " | ".join(f"{s[k]:.2f}" for k in layers) + f" | {max(s.values()):.2f} |")
    from lmlab.io import atomic_dir, write_json, write_text

    with atomic_dir(args.out, merge=True) as tmp:
        write_text(tmp / "coordcheck.md", "\n".join(rows) + "\n")
        write_json(tmp / "coordcheck.json", {"command": command, "settings": settings, "widths": widths,
                                             "sizes": {f"{m}/{p}": v for (m, p), v in results.items()}})
        plot(results, tmp / "coordcheck.png")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
