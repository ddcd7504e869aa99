"""``make reproduce-paper``: rerun Liu, Xie, Li & Ma, "Same Pre-training Loss, Better Downstream: Implicit
Bias Matters for Language Models" (ICML 2023, arXiv 2210.14199) on lmlab, claim by claim, and write the report.

It runs the three experiments of ``conf/experiment/same_loss/`` (continue, size, algorithm) as sweeps
through the real CLI (``python -m lmlab.cli train -m experiment=same_loss/<x> ...``, one subprocess per
sweep, ``--workers`` at a time), then ``lmlab.report.paper.write_report`` on the output directory.
Rerunning the same command skips finished jobs and resumes interrupted ones.

Profiles:
  cpu    (default) a small HMM and a small PCFG (generated), 3 seeds; the experiment configs as written.
         Two sweeps at a time, one thread each: at most 30 minutes on a quiet 2-core machine.
  gpu    the paper's PCFG (``--grammar``, its rule file ``rule_deep_mlm.txt``: ``pcfg/rule_deep_mlm.txt`` in
         the code released with the paper, GitHub Liuhong99/implicitbiasmlmcode) on one GPU, wider and
         deeper models, 3 seeds; not yet run on a GPU (estimated at about 10 minutes).
  micro  tiny data, a few steps, 2 seeds, 2 sizes: the whole pipeline in a minute or two (the test
         suite runs it); its verdicts mean nothing.

  python scripts/reproduce_paper.py                       # cpu
  python scripts/reproduce_paper.py --profile gpu --grammar path/to/rule_deep_mlm.txt
  python scripts/reproduce_paper.py --micro --out /tmp/micro
  python scripts/reproduce_paper.py --profile gpu --grammar G --dry-run   # compose every job, run nothing
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("size", "algorithm", "continue")  # longest first, for the two-at-a-time schedule

# Overrides per profile: common to every sweep, then per experiment. A comma-separated value on the
# command line replaces the experiment's own sweep axis (hydra.sweeper.params) for that key.
TINY = ["data.train_size=400", "data.validation_size=60", "data.test_size=120", "data.downstream_size=160"]
PROFILES: dict[str, dict] = {
    "cpu": {
        "datasets": [["data=hmm"], ["data=pcfg"]],
        "common": [],
        "per_experiment": {},
        "workers": 2,
        "threads": 1,
        # measured: d=64 after 1000-2000 AdamW steps at batch 128 sits 0.08-0.15 nats from the optimum
        "tolerance": 0.2,
        "note": "small HMM (10 states, 30 words, length 12) and small generated PCFG, 3 seeds, CPU",
    },
    "gpu": {
        "datasets": [["data=pcfg", "data.grammar={grammar}"]],
        "common": ["trainer=gpu", "batch_size=256", "model.n_layers=4", "model.n_heads=8", "model.d_model=256",
                   "eval.perplexity.max_rows=1000"],
        "per_experiment": {
            "continue": ["max_steps=4000", "eval_every=500"],
            "size": ["max_steps=2500", "model.d_model=128,256,512", "eval.flatness.embed_width=512"],
            "algorithm": ["max_steps=2500"],
        },
        "workers": 3,  # the three sweeps share the GPU (small models leave most of it idle); not yet timed
        "threads": None,
        "tolerance": 0.1,
        "note": "the paper's PCFG (rule file from --grammar), 3 seeds, one GPU",
    },
    "micro": {
        "datasets": [["data=hmm"], ["data=pcfg"]],
        "common": [*TINY, "max_steps=12", "batch_size=16", "val_every=12", "checkpoint_every=12", "logger=none",
                   "seed=0,1", "model.d_model=16", "model.n_heads=2", "eval.perplexity.max_rows=30",
                   "eval.probe.seeds=2", "eval.probe.epochs=3", "eval.flatness.probes=1",
                   "eval.flatness.batches=1", "eval.flatness.batch_size=8"],
        "per_experiment": {
            "continue": ["eval_every=4"],
            "size": ["model.d_model=8,16", "eval.flatness.embed_width=16"],
        },
        "workers": 1,
        "threads": 1,
        "in_process": True,
        "tolerance": 100.0,  # every micro run counts as converged, so that every comparison is exercised
        "note": "micro: tiny data and a few steps, to test the pipeline (its verdicts mean nothing)",
    },
}


@dataclass
class Sweep:
    experiment: str
    overrides: list[str]

    @property
    def label(self) -> str:
        data = next((o.split("=", 1)[1] for o in self.overrides if o.startswith("data=")), "data")
        return f"{self.experiment}-{data}"


def sweeps(profile: str, out: Path, grammar: str | None, only: list[str] | None = None,
           extra_overrides: list[str] | None = None) -> list[Sweep]:
    """The sweeps of a profile, each as the overrides of one ``lmlab train -m`` command."""
    p = PROFILES[profile]
    result = []
    for experiment in EXPERIMENTS:
        if only and experiment not in only:
            continue
        for data in p["datasets"]:
            data = [d.format(grammar=grammar) for d in data]
            extra = [*p["per_experiment"].get(experiment, []), *(extra_overrides or [])]
            keys = {o.split("=", 1)[0] for o in extra}
            common = [o for o in p["common"] if o.split("=", 1)[0] not in keys]
            result.append(Sweep(experiment, [f"experiment=same_loss/{experiment}", f"out_dir={out / 'runs'}",
                                             *data, *common, *extra]))
    return result


def _jobs_of(sweep: Sweep) -> list[list[str]]:
    """Every job of a sweep: the experiment's sweep axes, replaced by the command line's, expanded."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    exp = [o for o in sweep.overrides if o.startswith("experiment=")]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=exp, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    axes: dict[str, list[str]] = {k: str(v).split(",") for k, v in params.items()}
    for o in sweep.overrides:
        key, _, value = o.partition("=")
        axes[key] = value.split(",") if ("," in value and not value.startswith(("[", "'", '"'))) else [value]
    keys = list(axes)
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(axes[k] for k in keys))]


def dry_run(plan: list[Sweep]) -> int:
    """Compose every job of every sweep (and check that its options exist) without running anything."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.cli import preflight

    n = 0
    for sweep in plan:
        jobs = _jobs_of(sweep)
        preflight("train", jobs[0])  # every key and type of the sweep (UserError with one sentence if bad)
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
            for job in jobs:  # every value of every axis composes
                cfg = compose(config_name="train", overrides=job)
                for key in ("data", "model", "objective", "optim", "trainer"):
                    assert cfg[key].get("_target_"), f"{key} has no _target_ in {job}"
                for name, ecfg in cfg.eval.items():
                    assert ecfg.get("_target_"), f"eval.{name} has no _target_ in {job}"
        n += len(jobs)
        print(f"[reproduce] {sweep.label}: {len(jobs)} jobs compose")
        print("  lmlab train -m " + " ".join(_quote(o) for o in sweep.overrides))
    print(f"[reproduce] dry run: {n} jobs in {len(plan)} sweeps compose")
    return n


def _quote(o: str) -> str:
    return f"'{o}'" if any(c in o for c in "[]*?' ") else o


def run_sweeps(plan: list[Sweep], workers: int, threads: int | None, log_dir: Path) -> dict[str, dict]:
    """Run the sweeps as ``python -m lmlab.cli train -m ...`` subprocesses, ``workers`` at a time."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(plan), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            sweep = pending.pop(0)
            log = (log_dir / f"{sweep.label}.log").open("w")
            cmd = [sys.executable, "-m", "lmlab.cli", "train", "-m", *sweep.overrides]
            print(f"[reproduce] start {sweep.label}: lmlab train -m {' '.join(_quote(o) for o in sweep.overrides)}",
                  flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[sweep.label] = (proc, time.time(), log)
        time.sleep(0.5)
        for label, (proc, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            seconds = time.time() - started
            done[label] = {"returncode": proc.returncode, "seconds": round(seconds, 1)}
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log_dir / label}.log)"
            print(f"[reproduce] done  {label}: {seconds:.0f} s, {status}", flush=True)
            del running[label]
    return done


def run_in_process(plan: list[Sweep], threads: int | None) -> dict[str, dict]:
    """Run the sweeps one after the other in this process (``lmlab.cli.main``): no interpreter start-up
    per sweep, which dominates tiny runs."""
    import torch

    from lmlab.cli import main as lmlab_main

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_each(plan, lmlab_main)
    finally:
        torch.set_num_threads(before)


def _run_each(plan: list[Sweep], lmlab_main) -> dict[str, dict]:
    done = {}
    for sweep in plan:
        started = time.time()
        print(f"[reproduce] start {sweep.label}: lmlab train -m {' '.join(_quote(o) for o in sweep.overrides)}",
              flush=True)
        code = 0
        try:
            lmlab_main(["train", "-m", *sweep.overrides])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        seconds = time.time() - started
        done[sweep.label] = {"returncode": code, "seconds": round(seconds, 1)}
        print(f"[reproduce] done  {sweep.label}: {seconds:.0f} s, {'ok' if code == 0 else 'FAILED'}", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("PROFILE") or "cpu")
    parser.add_argument("--micro", action="store_true", help="the micro profile (same as --profile micro)")
    parser.add_argument("--grammar", default=os.environ.get("GRAMMAR") or None,
                        help="the paper's PCFG rule file, rule_deep_mlm.txt (gpu profile): pcfg/rule_deep_mlm.txt "
                             "of github.com/Liuhong99/implicitbiasmlmcode")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/reproduce-paper-<profile>)")
    parser.add_argument("--workers", type=int, default=None, help="sweeps run at the same time")
    parser.add_argument("--in-process", action="store_true", default=None,
                        help="run the sweeps one by one in this process (default for micro)")
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, help="run only these experiments")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every sweep (repeatable), e.g. --set max_steps=1000")
    parser.add_argument("--dry-run", action="store_true", help="compose every job and print the commands; run nothing")
    args = parser.parse_args(argv)
    profile = "micro" if args.micro else args.profile
    p = PROFILES[profile]
    if profile == "gpu":
        if not args.grammar:
            print("reproduce-paper: error: the gpu profile needs the paper's rule file: pass GRAMMAR=<path to "
                  "rule_deep_mlm.txt> (make) or --grammar <path>.", file=sys.stderr)
            return 2
        if not Path(args.grammar).is_file():
            print(f"reproduce-paper: error: no grammar file at {args.grammar}: pass the path of the paper's "
                  "rule_deep_mlm.txt.", file=sys.stderr)
            return 2
        args.grammar = str(Path(args.grammar).resolve())
    out = (args.out or ROOT / "runs" / f"reproduce-paper-{profile}").resolve()
    plan = sweeps(profile, out, args.grammar, args.only, args.overrides)
    if args.dry_run:
        try:
            dry_run(plan)
        except Exception as e:  # a UserError names the fix
            print(f"reproduce-paper: error: {e}", file=sys.stderr)
            return 2
        return 0

    sys.path.insert(0, str(ROOT))
    from lmlab.io import write_json
    from lmlab.report.paper import SETTINGS_FILE, write_report

    started = time.time()
    settings = {"profile": profile, "tolerance": p["tolerance"], "note": p["note"],
                "commands": ["lmlab train -m " + " ".join(s.overrides) for s in plan]}
    write_json(out / SETTINGS_FILE, settings)
    in_process = args.in_process if args.in_process is not None else p.get("in_process", False)
    if in_process:
        timings = run_in_process(plan, p["threads"])
    else:
        timings = run_sweeps(plan, args.workers or p["workers"], p["threads"], out / "logs")
    settings.update(wall_s=time.time() - started, sweeps=timings)
    write_json(out / SETTINGS_FILE, settings)
    report = write_report(out)
    print(f"[reproduce] report: {report} ({time.time() - started:.0f} s in all)")
    failed = [k for k, v in timings.items() if v["returncode"] != 0]
    if failed:
        print(f"reproduce-paper: error: {len(failed)} sweep(s) had failed jobs ({', '.join(failed)}): the report "
              "lists them; rerun the same command to retry only those.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
