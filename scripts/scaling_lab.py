"""Render docs/scaling-results.md from real runs of the current tree: a model ladder on the default PCFG with its
scaling report (the fits against the exact optimum, and the extrapolation to the largest model), the compute
multiplier between two schedules on one ladder, and cooldown branches of warmup-stable-decay runs against
separate runs of the same lengths.

    python scripts/scaling_lab.py                          # every part (about 40 min on one CPU thread)
    python scripts/scaling_lab.py --only ladder wsd        # some parts; the page keeps the others' sections

Each part runs ``lmlab`` (``python -m lmlab``) in ``--workdir`` (default ``build/scaling-lab``); rerunning skips
finished runs, as any sweep does. The page and each ladder's ``report.md`` and ``scaling.png`` are written into
``docs/scaling-results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "scaling-results"
PAGE = ROOT / "docs" / "scaling-results.md"

LADDER = ["experiment=ladder", "logger=none", "model.d_model=32,64,128,256", "max_steps=500,1000,2000",
          "data.train_size=128000"]
COMPARE = ["experiment=ladder", "name=ladder-schedules", "logger=none", "schedule=cosine,wsd",
           "model.d_model=32,64,128", "max_steps=500,1000,2000", "data.train_size=128000"]
BUDGETS = (1000, 2000, 3000)  # the WSD runs' lengths; each decays over its last DECAY of them
DECAY = 0.2
WARMUP_STEPS = 30
SEEDS = (0, 1, 2)
WSD = ["logger=none", "eval=[perplexity]", "schedule=wsd", f"schedule.warmup_steps={WARMUP_STEPS}"]


def lmlab(workdir: Path, *args: str) -> float:
    """Run ``lmlab args`` in ``workdir`` (one thread), failing loudly; the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "LMLAB_CACHE": os.environ.get("LMLAB_CACHE", str(workdir / "cache"))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmlab", *args], cwd=workdir, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"lmlab {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                         f"\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def sweep_dir(workdir: Path, name: str) -> Path:
    (sweep,) = [p.parent for p in (workdir / "runs" / name).glob("sweep-*/multirun.yaml")]
    return sweep


def run_dir(workdir: Path, name: str) -> Path:
    (done,) = (workdir / "runs" / name).glob("*/DONE")
    return done.parent


def ladder(workdir: Path, name: str, overrides: list[str], compare: str | None) -> str:
    wall = lmlab(workdir, "train", "-m", *overrides)
    sweep = sweep_dir(workdir, name)
    report_args = ["report", str(sweep), "--scaling"] + (["--compare", compare] if compare else [])
    wall_report = lmlab(workdir, *report_args)
    target = OUT / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(sweep / "scaling.png", target / "scaling.png")
    report = (sweep / "report.md").read_text().replace(str(sweep), f"runs/{name}/{sweep.name}")
    (target / "report.md").write_text(report)
    command = f"lmlab train -m {' '.join(overrides)}"
    body = report.split("\n", 1)[1].replace("![scaling](scaling.png)",
                                            f"![scaling](scaling-results/{name}/scaling.png)")
    body = body.replace("\n## ", "\n### ")
    runs = sum(json.loads(r.read_text())["timings"]["total_s"] for r in sweep.parent.rglob("results.json")
               if r.parent.parent == sweep.parent or r.parent.parent == sweep)
    return (f"Commands: `{command}` (the runs' own times add up to {runs / 60:.1f} min; this call "
            f"{wall / 60:.1f} min, finished runs skipped), then "
            f"`lmlab {' '.join(report_args[:1] + [f'runs/{name}/{sweep.name}'] + report_args[2:])}` "
            f"({wall_report:.0f} s). The report as written: [scaling-results/{name}/report.md]"
            f"(scaling-results/{name}/report.md).\n{body}")


def wsd(workdir: Path) -> str:
    from lmlab.stats import mean_interval

    longest = max(BUDGETS)
    kept = [b - int(DECAY * b) for b in BUDGETS if b != longest]
    walls = {"separate": 0.0, "branches": 0.0}
    losses: dict[tuple[str, int], list[float]] = {}
    for seed in SEEDS:
        for budget in BUDGETS:  # separate runs; the longest also keeps its stable-phase checkpoints (the parent)
            extra = ["callbacks=trajectory", "callbacks.trajectory.log=null",
                     f"callbacks.trajectory.steps=[{','.join(map(str, kept))}]"] if budget == longest else []
            name = f"wsd-separate-{budget}-seed{seed}"
            walls["separate"] += lmlab(workdir, "train", f"name={name}", f"seed={seed}", f"max_steps={budget}",
                                       f"schedule.decay_steps={int(DECAY * budget)}", *WSD, *extra)
            losses["separate", budget] = losses.get(("separate", budget), []) + [_loss(run_dir(workdir, name))]
        parent = run_dir(workdir, f"wsd-separate-{longest}-seed{seed}")
        for budget, step in zip([b for b in BUDGETS if b != longest], kept):
            name = f"wsd-branch-{budget}-seed{seed}"
            walls["branches"] += lmlab(workdir, "train", f"name={name}", f"seed={seed}", f"max_steps={budget}",
                                       f"schedule.decay_steps={int(DECAY * budget)}", *WSD,
                                       f"branch.run={parent}", f"branch.step={step}")
            losses["branch", budget] = losses.get(("branch", budget), []) + [_loss(run_dir(workdir, name))]
        losses["branch", longest] = losses["separate", longest]  # the parent is the longest budget's run
    separate_steps = sum(BUDGETS)
    branch_steps = longest + sum(int(DECAY * b) for b in BUDGETS if b != longest)
    rows = ["| steps | decay steps | separate runs: perplexity/loss | one run and its branches | largest difference "
            "over seeds |", "|---|---|---|---|---|"]
    for b in BUDGETS:
        s, r = mean_interval(losses["separate", b]), mean_interval(losses["branch", b])
        diff = max(abs(x - y) for x, y in zip(losses["separate", b], losses["branch", b]))
        rows.append(f"| {b} | {int(DECAY * b)} | {s.mean:.5f} [{s.low:.5f}, {s.high:.5f}] | "
                    f"{r.mean:.5f} [{r.low:.5f}, {r.high:.5f}] | {diff:.2g} |")
    cmd_parent = (f"lmlab train seed=S max_steps={longest} schedule.decay_steps={int(DECAY * longest)} "
                  f"{' '.join(WSD)} callbacks=trajectory callbacks.trajectory.log=null "
                  f"callbacks.trajectory.steps=[{','.join(map(str, kept))}]")
    b0, k0 = BUDGETS[0], kept[0]
    cmd_branch = (f"lmlab train seed=S max_steps={b0} schedule.decay_steps={int(DECAY * b0)} {' '.join(WSD)} "
                  f"branch.run=<the parent's run directory> branch.step={k0}")
    return "\n".join([
        f"Seeds {', '.join(map(str, SEEDS))}; every run `schedule=wsd` with {WARMUP_STEPS} warmup steps and a 1-sqrt "
        f"decay over the last {DECAY:.0%} of its steps, on the default job otherwise. Separate runs: one run per "
        f"length. Branches: one run of {longest} steps keeping its stable-phase checkpoints at steps "
        f"{', '.join(map(str, kept))}, and from each a branch that trains only its decay:", "",
        f"    {cmd_parent}", f"    {cmd_branch}", "",
        *rows, "",
        f"Training steps: {separate_steps} for the separate runs, {branch_steps} for one run and its branches "
        f"({branch_steps / separate_steps:.0%}); wall time over the seeds (one thread): separate "
        f"{walls['separate'] / 60:.1f} min, branches {walls['branches'] / 60:.1f} min beyond the parents. Intervals: "
        "95% t over the seeds. A branch resumes its parent's checkpoint (weights, optimiser state, step and data "
        "order, all functions of seed and step), so it trains exactly the steps the separate run of its length "
        "trains after that point: the differences measure only floating-point non-associativity, not the method. "
        "What this cannot say: whether a decay from a stable phase matches a run with another schedule (a cosine "
        "of the same length), which is a different comparison.", ""])


def _loss(run: Path) -> float:
    return float(json.loads((run / "results.json").read_text())["metrics"]["perplexity/loss"])


PARTS = {
    "ladder": ("A ladder of 4 widths x 3 budgets", lambda w: ladder(w, "ladder", LADDER, None)),
    "compare": ("Two schedules on one ladder: the compute multiplier",
                lambda w: ladder(w, "ladder-schedules", COMPARE, "schedule=cosine,wsd")),
    "wsd": ("Cooldown branches against separate runs", wsd),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "scaling-lab")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for part in args.only:
        text = PARTS[part][1](args.workdir.resolve())
        (OUT / f"{part}.md").write_text(text)
        print(f"[scaling_lab] {part} done")
    sections = [f"## {title}\n\n{(OUT / f'{part}.md').read_text()}" for part, (title, _) in PARTS.items()
                if (OUT / f"{part}.md").exists()]
    PAGE.write_text("\n".join([
        "# Scaling results on lmlab's own runs", "",
        "Rendered by `python scripts/scaling_lab.py` from runs of the current tree on a 2-core CPU machine (one "
        "thread per run); [scaling.md](scaling.md) says what each fit assumes. The default PCFG's exact optimum "
        "(`perplexity/optimum`) is the truth the fitted E is checked against.", "", *sections]))
    print(f"[scaling_lab] {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
