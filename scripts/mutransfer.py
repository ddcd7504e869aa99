"""Render docs/mup-results.md from real runs of the current tree: the learning-rate grid of
``experiment=mutransfer`` under muP and under the standard parameterisation, the rate an Optuna search finds
at the smallest width, and the largest width trained at that rate beside its own grid.

    python scripts/mutransfer.py [--workdir build/mutransfer] [--seed 0]

Each sweep runs ``lmlab`` (``python -m lmlab``) in ``--workdir``; rerunning skips finished runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from scaling_lab import lmlab  # scripts/: the same way of running lmlab

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "mup-results.md"
WIDTHS = (32, 64, 128, 256)
RATES = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)
METRIC = "perplexity/loss"
TRIALS = 16


def losses(workdir: Path, name: str) -> dict[tuple[int, float], float]:
    """``{(width, rate): loss}`` of every finished run under ``runs/<name>``."""
    out = {}
    for done in (workdir / "runs" / name).rglob("DONE"):
        results = json.loads((done.parent / "results.json").read_text())
        config = results["config"]
        out[int(config["model"]["d_model"]), float(config["optim"]["lr"])] = float(results["metrics"][METRIC])
    return out


def best(grid: dict[tuple[int, float], float], width: int) -> float:
    return min((loss, rate) for (w, rate), loss in grid.items() if w == width)[1]


def table(grid: dict[tuple[int, float], float]) -> list[str]:
    rows = ["| width | " + " | ".join(f"{r:g}" for r in RATES) + " | best rate (grid point) |",
            "|---|" + "---|" * len(RATES) + "---|"]
    for w in WIDTHS:
        b = best(grid, w)
        cells = [f"**{grid[w, r]:.4f}**" if r == b else f"{grid[w, r]:.4f}" for r in RATES]
        rows.append(f"| {w} | " + " | ".join(cells) + f" | {b:g} ({RATES.index(b)}) |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutransfer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    seed = f"seed={args.seed}"
    commands = {
        "mup": ["train", "-m", "experiment=mutransfer", "name=mutransfer-mup", seed],
        "sp": ["train", "-m", "experiment=mutransfer", "name=mutransfer-sp", "model.parametrization=sp",
               "model.base_width=null", seed],
        "search": ["train", "-m", "experiment=mutransfer", "name=mutransfer-search", "hydra/sweeper=optuna",
                   f"model.d_model={WIDTHS[0]}", "optim.lr=tag(log,interval(1e-4,1e-1))",
                   f"hydra.sweeper.n_trials={TRIALS}", f"hydra.sweeper.metric={METRIC}", seed],
    }
    for c in commands.values():
        lmlab(work, *c)
    (found,) = (work / "runs" / "mutransfer-search").rglob("optimization_results.yaml")
    rate = float(yaml.safe_load(found.read_text())["best_params"]["optim.lr"])
    transfer = ["train", "experiment=mutransfer", "name=mutransfer-transfer", f"model.d_model={WIDTHS[-1]}",
                f"optim.lr={rate}", seed]
    lmlab(work, *transfer)
    # the runs' own times (a rerun skips finished runs, so its wall time says nothing)
    walls = {k: sum(json.loads(r.read_text())["timings"]["total_s"]
                    for r in (work / "runs" / f"mutransfer-{k}").rglob("results.json")) for k in commands}
    grids = {k: losses(work, f"mutransfer-{k}") for k in ("mup", "sp")}
    transferred = next(iter(losses(work, "mutransfer-transfer").values()))
    big = grids["mup"][WIDTHS[-1], best(grids["mup"], WIDTHS[-1])]
    moves = {k: [RATES.index(best(g, w)) for w in WIDTHS] for k, g in grids.items()}
    PAGE.write_text("\n".join([
        "# muP on lmlab's own runs: does the best learning rate transfer across widths?", "",
        f"Rendered by `python scripts/mutransfer.py --seed {args.seed}` from runs of the current tree on a 2-core CPU "
        "machine (one thread per run); [mup.md](mup.md) describes the parameterisations and the experiment "
        f"(`conf/experiment/mutransfer.yaml`). One seed ({args.seed}): a grid point's loss carries the noise of one "
        "run, so a best rate one point away from another is within that noise; what one seed cannot say is "
        "whether the optimum moves by less than a grid step.", "",
        f"## The grid: `{METRIC}` after 300 steps, 8 rates x2 apart", "",
        f"muP (base width {WIDTHS[0]}): `lmlab {' '.join(commands['mup'])}` (its runs' own times: "
        f"{walls['mup'] / 60:.1f} min)", "",
        *table(grids["mup"]), "",
        f"Standard parameterisation: `lmlab {' '.join(commands['sp'])}` (its runs' own times: "
        f"{walls['sp'] / 60:.1f} min)", "",
        *table(grids["sp"]), "",
        "Grid index of the best rate at widths " + ", ".join(map(str, WIDTHS)) + ": muP "
        f"{moves['mup']} (moves by {max(moves['mup']) - min(moves['mup'])} points), standard "
        f"{moves['sp']} (moves by {max(moves['sp']) - min(moves['sp'])} points). Grid points within 0.01 nats of "
        "each width's best (how flat the optimum is): " + "; ".join(
            f"{k} {w}: {[RATES.index(r) for r in RATES if g[w, r] - g[w, best(g, w)] <= 0.01]}"
            for k, g in grids.items() for w in WIDTHS) + ".", "",
        "## Tune small, train large", "",
        f"`lmlab {' '.join(commands['search'])}` ({TRIALS} trials, their own times {walls['search'] / 60:.1f} min) "
        "finds "
        f"optim.lr = {rate:.4g} at width {WIDTHS[0]}; `lmlab {' '.join(transfer[:-2])} optim.lr=<that rate> {seed}` "
        f"gives {transferred:.4f} at width {WIDTHS[-1]}, against {big:.4f} at the best rate of the width-"
        f"{WIDTHS[-1]} grid: {transferred - big:+.4f} nats.", ""]))
    print(f"[mutransfer] {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
