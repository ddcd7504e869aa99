"""End-to-end tests of the real CLI: every config composes and runs, sweeps, skip/resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmlab.cli import config_groups, run_name
from tests.conftest import FAST, TINY
from tests.signals import pause_at, wait_for_pause

ROOT = Path(__file__).resolve().parents[1]
LMLAB = str(Path(sys.executable).parent / "lmlab")


def _only_run(runs: Path) -> Path:
    dirs = [p.parent for p in runs.rglob("config_resolved.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ----- composition -----

# a nested group is chosen inside an option of its parent group: compose it inside one that has it
NESTED_IN = {"data/tokenizer": ["data=text"]}

def all_options() -> list[tuple[str, str]]:
    return [(g, o) for g, opts in config_groups().items() for o in opts]


@pytest.mark.parametrize("group,option", all_options())
def test_every_yaml_composes(group, option):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*NESTED_IN.get(group, []), f"{group}={option}"])
        if group == "experiment":  # a frozen recipe: it composes the whole config (its `name` set)
            assert cfg.name != "default", f"experiment {option} should set name"
            return
        if group == "launcher":  # it sets hydra.launcher only: tests/test_distributed.py::test_launchers_compose
            return
        node = cfg.eval if group == "eval" else OmegaConf.select(cfg, group.replace("/", "."))
        raw = OmegaConf.to_container(node, resolve=False)
        assert raw, f"{group}={option} composed to nothing"
        if group == "callbacks":  # named callbacks, each its own _target_
            assert all("_target_" in c for c in raw.values())
        elif group != "eval":
            assert "_target_" in raw
        for key, value in raw.items():  # every value resolves (those that need a running job aside)
            if "${hydra:" not in str(value):
                OmegaConf.select(node, key)
        ecfg = compose(config_name="eval", overrides=["run=x"])
        assert list(ecfg.eval) == ["perplexity", "probe"]


def test_help_lists_groups_and_options(lmlab):
    code, out = lmlab("--help")
    assert code == 0
    for group, options in config_groups().items():
        assert group in out and all(o in out for o in options)
    code, out = lmlab("train", "--help")
    assert code == 0 and "model" in out and "transformer" in out and "-m" in out


def test_run_name_is_deterministic_and_order_independent():
    assert run_name([]) == "default"
    assert run_name(["b=2", "a=1"]) == run_name(["a=1", "b=2"]) == "a=1,b=2"
    assert run_name(["hydra.verbose=true", "out_dir=/x"]) == "default"
    long = run_name([f"model.key{i}=value{i}" for i in range(20)])
    assert len(long) <= 96 and long == run_name([f"model.key{i}=value{i}" for i in reversed(range(20))])
    assert "/" not in run_name(["data.grammar=/a/b.txt"])


# ----- smoke: every option of every group runs a few steps through the CLI -----

# Options that need more than the defaults to run get extra overrides here (byte-level data for a byte
# model, say); options that cannot run from a bare config get a skip reason naming the test that runs
# them through the CLI instead.
SMOKE_ARGS: dict[tuple[str, str], list[str]] = {("data", "text"): []}
SMOKE_ARGS[("model", "hat")] = ["data=text", "data/tokenizer=byte"]  # a byte-level model needs byte data
SMOKE_ARGS[("eval", "lm_eval")] = ["data=text", "eval.lm_eval.limit=4"]  # lm-eval scores text: grammar data is refused
SMOKE_ARGS[("eval", "mask_classifier")] = [*TINY, "objective=mlm"]  # reads a masked-LM head: causal runs are refused
SMOKE_SKIP = {("trainer", "gpu"): "needs CUDA",
              ("trainer", "ddp"): "tests/test_distributed.py runs DDP on 2 CPU processes",
              ("trainer", "fsdp"): "FSDP runs on CUDA GPUs only: tests/test_distributed.py composes it and tests the "
                                  "refusal on the CPU",
              ("launcher", "slurm"): "needs a SLURM cluster: tests/test_distributed.py composes it",
              ("objective", "distill"):
                  "teacher: ???, see test_objectives_zoo.py::test_teacher_objectives_through_the_cli",
              ("objective", "self_evolution"):
                  "scorer: ???, see test_objectives_zoo.py::test_teacher_objectives_through_the_cli"}
SMOKE_ARGS.update({("data", "dna"): [], ("data", "protein"): [],
                   ("data", "hf"): ["data.name=text", f"data.data_files={ROOT / 'lmlab/data/sample/tiny_corpus.txt'}"]})
# model-based selection: tiny auxiliary models (tests/test_selection_methods.py runs them at their real sizes)
SMOKE_ARGS.update({
    ("selection", "color_filter"): [*TINY, "selection.prior_steps=5", "selection.finetune_steps=3"],
    ("selection", "miniplm"): [*TINY, "selection.teacher_steps=5", "selection.ref_steps=5"],
    ("selection", "preselect"): [*TINY, "selection.prior_steps=10", "selection.family_steps=[0,3,6]",
                                 "selection.score_rows=200", "selection.min_positives=20"],
    ("selection", "curriculum"): [*TINY, "selection.reference_steps=5"],
})
SMOKE_ARGS[("experiment", "transfer")] = []  # text data: the bundled corpus is already small
SMOKE_ARGS[("data", "mixture")] = ["data.train_size=400", *[f"data.sources.{s}.{k}={v}" for s in "ab" for k, v in (
    ("train_size", 200), ("validation_size", 20), ("test_size", 40), ("downstream_size", 60))]]  # TINY per source
SMOKE_SKIP.update({("data", "shards"): "tests/test_data_sources.py::test_shards_train_through_the_cli",
                   ("selection", "rephrase"): "tests/test_selection_filters.py::"
                                              "test_rephrase_with_an_lmlab_run_through_the_cli"})


@pytest.mark.parametrize("group,option", [go for go in all_options()])
def test_every_option_runs(lmlab, group, option):
    if (group, option) in SMOKE_SKIP and not ((group, option) == ("trainer", "gpu") and torch.cuda.is_available()):
        pytest.skip(SMOKE_SKIP[(group, option)])
    extra = [*NESTED_IN.get(group, []), *SMOKE_ARGS.get((group, option), [] if group in NESTED_IN else TINY)]
    fast = [a for a in FAST if not (group == "logger" and a.startswith("logger="))]
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):  # one probe seed, if it probes
        composed = compose(config_name="train", overrides=[*NESTED_IN.get(group, []), f"{group}={option}"])
    probe = ["eval.probe.seeds=1"] if "probe" in (composed.get("eval") or {}) else []
    code, out = lmlab("train", f"{group}={option}", *fast, *extra, *probe)
    assert code == 0, out
    run = _only_run(lmlab.runs)
    results = json.loads((run / "results.json").read_text())
    assert (run / "DONE").exists()
    assert results["metrics"]["train/steps"] == 4
    if group == "logger" and option == "wandb":
        assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote no offline run file"
    if group == "logger" and option == "csv":
        assert (run / "logs" / "metrics.csv").exists()


# ----- the default job: run directory contents, skip when done, evaluate later -----

def test_default_job_run_directory_and_rerun(lmlab):
    code, out = lmlab("train", *TINY, "max_steps=6", "val_every=3", "checkpoint_every=3")
    assert code == 0, out
    run = _only_run(lmlab.runs)
    for name in ("config_resolved.yaml", "command.txt", "results.json", "DONE", "model.pt",
                 "checkpoints/last.ckpt", "logs/metrics.csv", ".hydra/overrides.yaml"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    for key in ("train/loss", "perplexity/loss", "perplexity/optimum", "perplexity/gap", "probe/acc",
                "probe/acc_ci95"):
        assert key in metrics, key
    assert metrics["perplexity/gap"] == pytest.approx(metrics["perplexity/loss"] - metrics["perplexity/optimum"])
    assert "perplexity/loss" in out  # the results table was printed
    # the same command again skips the finished job
    stamp = (run / "results.json").stat().st_mtime_ns
    code, out = lmlab("train", *TINY, "max_steps=6", "val_every=3", "checkpoint_every=3")
    assert code == 0 and "already holds DONE" in out
    assert (run / "results.json").stat().st_mtime_ns == stamp
    # evaluations on the finished run, without retraining
    code, out = lmlab("eval", f"run={run}", "eval=finetune")
    assert code == 0, out
    assert "finetune/acc" in json.loads((run / "evals" / "1.json").read_text())["metrics"]  # its own record
    assert json.loads((run / "results.json").read_text())["metrics"] == metrics  # the run's own, unchanged


# ----- sweeps -----

def test_sweep_summary_with_a_failing_job(lmlab, tmp_path):
    # every job passes preflight; the jobs whose quality rules remove every row fail once their data is there
    args = ("train", "-m", "selection=quality", "selection.min_tokens=1,1000", "objective=clm,mlm", *FAST, *TINY,
            "eval=[perplexity]")
    code, out = lmlab(*args)
    assert code != 0  # a failed job makes the sweep's exit status non-zero, after the others ran
    sweep = next(lmlab.runs.glob("default/sweep-*"))
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    assert set(rows[0]) >= {"job", "overrides", "status", "reason", "selection.min_tokens", "objective",
                            "perplexity/loss"}
    status = {(r["selection.min_tokens"], r["objective"]): r for r in rows}
    for objective in ("clm", "mlm"):
        ok = status["1", objective]
        assert ok["status"] == "done" and float(ok["perplexity/loss"]) > 0
        bad = status["1000", objective]
        assert bad["status"] == "failed" and "removed all" in bad["reason"] and "\n" not in bad["reason"]
    md = (sweep / "summary.md").read_text()
    assert md.count("| failed |") == 2 and md.count("| done |") == 2
    # rerunning the sweep skips the finished jobs and retries the failed ones
    code, out = lmlab(*args)
    assert out.count("already holds DONE") == 2


def test_resume_after_kill_matches_uninterrupted(tmp_path, cache_dir):
    """Kill a run hard after its first checkpoint, rerun the same command: it resumes from the
    checkpoint and ends with the same metrics as a run that was never interrupted."""
    common = [*TINY, "max_steps=60", "checkpoint_every=10", "val_every=30", "batch_size=16", "model.d_model=32",
              "logger=none", "eval=[perplexity]", "objective=mlm"]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    straight = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'a'}", *common], env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ledger = tmp_path / "steps"
    common.append(pause_at(step=15, ledger=ledger))  # held after step 15 (a checkpoint at 10): killed there
    proc = subprocess.Popen([LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_pause(ledger, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_b = _only_run(tmp_path / "b")
    assert not (run_b / "DONE").exists()
    resumed = subprocess.run([LMLAB, "train", f"out_dir={tmp_path / 'b'}", *common], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a = json.loads((_only_run(tmp_path / "a") / "results.json").read_text())["metrics"]
    b = json.loads((run_b / "results.json").read_text())["metrics"]
    assert b["train/steps"] == a["train/steps"] == 60
    assert b["perplexity/loss"] == pytest.approx(a["perplexity/loss"], abs=1e-4)
    assert b["perplexity/gap"] == pytest.approx(a["perplexity/gap"], abs=1e-4)


# ----- bad input: one sentence, non-zero exit, no traceback, no DONE -----

@pytest.mark.parametrize("args,expect", [
    (["model=nosuchmodel"], "unknown model option 'nosuchmodel'"),
    (["max_steps=ten"], "max_steps expects a whole number"),
    (["model.d_model=1.5"], "model.d_model expects a whole number"),
    (["model.no_such_key=3"], "model.no_such_key is not a setting"),
    (["eval=[perplexity,nosuch]"], "unknown eval option 'nosuch'"),
    (["data.grammar=/no/such/file.txt"], "/no/such/file.txt"),
    pytest.param(["trainer=gpu"], "use trainer=cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_input_is_one_sentence(lmlab, args, expect):
    code, out = lmlab("train", *FAST, *TINY, *args)
    assert code != 0
    assert expect in out
    assert "Traceback" not in out
    assert not list(lmlab.runs.rglob("DONE"))
    error_lines = [line for line in out.splitlines() if line.startswith("lmlab: error:")]
    assert len(error_lines) == 1 and error_lines[0].rstrip().endswith(".")


def test_bad_grammar_line_names_file_and_line(lmlab, tmp_path):
    grammar = tmp_path / "bad.txt"
    grammar.write_text("S A 1.0\nA a 0.5\nA b oops\n")
    code, out = lmlab("train", *FAST, *TINY, f"data.grammar={grammar}")
    assert code != 0 and "bad.txt" in out and "3" in out and "Traceback" not in out


# ----- installs as a package, runs from any directory -----

def test_non_editable_install_ships_the_config_tree(tmp_path, cache_dir):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "lmlab" / "conf" / "train.yaml").exists()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "LMLAB_CACHE": str(cache_dir)}
    code = ("import lmlab, sys; assert lmlab.__file__.startswith(sys.argv[1]), lmlab.__file__; "
            "from lmlab.cli import main; main(sys.argv[2:])")
    proc = subprocess.run([sys.executable, "-c", code, str(target), "train", *FAST, *TINY, "eval=[perplexity]"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((workdir / "runs").rglob("DONE"))


# ----- a small model gets close to the exact optimum of a tiny grammar -----

TINY_GRAMMAR = ["data.levels=2", "data.nonterminals_per_level=3", "data.vocab_size=12", "data.words_per_preterminal=4",
                "data.start_symbols=2", "model.d_model=32", "eval=[perplexity]", "logger=none"]


@pytest.mark.parametrize("objective,steps,batch", [("clm", 400, 64), ("mlm", 1000, 128)])
def test_small_model_reaches_the_exact_optimum(lmlab, objective, steps, batch):
    code, out = lmlab("train", f"objective={objective}", f"max_steps={steps}", f"batch_size={batch}",
                      "val_every=500", "checkpoint_every=500", *TINY_GRAMMAR)
    assert code == 0, out
    metrics = json.loads((_only_run(lmlab.runs) / "results.json").read_text())["metrics"]
    assert 0 <= metrics["perplexity/gap"] < 0.05, metrics


# ----- the command table: every command a config and a function -----

def _fake_sweep(root: Path) -> Path:
    """A finished sweep over optim.lr and seed, as `lmlab train -m` leaves it, with val/loss chosen by hand."""
    sweep = root / "sweep-optim.lr=0.001,0.003,seed=0,1"
    for (lr, seed), loss in {("0.001", 0): 2.0, ("0.001", 1): 2.2, ("0.003", 0): 1.9, ("0.003", 1): 2.0}.items():
        job = sweep / f"optim.lr={lr},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"optim.lr={lr}", f"seed={seed}"]), job / ".hydra" / "overrides.yaml")
        (job / "results.json").write_text(json.dumps({"status": "done", "metrics": {"val/loss": loss}}))
        (job / "DONE").write_text("2026-01-01T00:00:00\n")
    return sweep


def test_report_settings_are_overrides_and_the_flags_stand_for_them(lmlab, tmp_path):
    sweep = _fake_sweep(tmp_path)
    code, out = lmlab("report", str(sweep), "baseline={optim.lr:0.001}", "metric=[val/loss]", "x=optim.lr")
    assert code == 0, out
    rows = {r["arm"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    # the arm lr=0.003 minus the baseline lr=0.001, seed by seed: (1.9 - 2.0 + 2.0 - 2.2) / 2
    assert float(rows["optim.lr=0.003"]["diff_mean"]) == pytest.approx(-0.15, abs=1e-12)
    assert rows["optim.lr=0.003"]["baseline"] == "optim.lr=0.001" and int(rows["optim.lr=0.003"]["pairs"]) == 2
    written = {name: (sweep / name).read_bytes() for name in ("report.csv", "report.md")}
    for name in written:
        (sweep / name).unlink()
    code, out = lmlab("report", str(sweep), "--baseline", "optim.lr=0.001", "--metric", "val/loss", "--x", "optim.lr")
    assert code == 0, out
    assert {name: (sweep / name).read_bytes() for name in written} == written


@pytest.mark.parametrize("args,expect", [
    (["analysis=paper", "baseline={optim.lr:0.001}"], "the paper report takes no baseline"),
    (["--paper", "--baseline", "optim.lr=0.001"], "the paper report takes no baseline"),
    (["analysis=nosuch"], "analysis=nosuch is not an analysis of lmlab report: choose one of sweep, paper, "
                          "scaling, lineage"),
    (["no_such=1"], "no_such is not a setting of lmlab report"),
    (["data=pcfg"], "data is not a setting of lmlab report"),
    (["metric=val/loss"], "metric expects a list"),
    (["--no-such-flag"], "lmlab report takes no flag --no-such-flag"),
    (["x=optim.lr,seed"], "takes one value per setting"),
    (["analysis=paper", "tolerance=abc"], "tolerance expects a number"),
])
def test_report_refuses_what_would_not_take_effect(lmlab, tmp_path, args, expect):
    sweep = _fake_sweep(tmp_path)
    code, out = lmlab("report", str(sweep), *args)
    assert code == 2 and expect in out, out
    assert len([line for line in out.splitlines() if line.startswith("lmlab: error:")]) == 1
    assert not (sweep / "report.md").exists()


def test_every_command_has_a_config_help_and_a_composed_config(lmlab, tmp_path):
    from lmlab.cli import COMMANDS

    code, out = lmlab("--help")
    assert code == 0 and all(f"  {name} " in out for name in COMMANDS)
    for name, command in COMMANDS.items():
        assert (ROOT / "lmlab" / "conf" / f"{name}.yaml").is_file(), name
        code, out = lmlab(name, "--help")
        assert code == 0 and out.startswith(f"usage: {command.usage}"), out
    code, out = lmlab("export", "--cfg", "job", f"run={tmp_path}")
    assert code == 0 and OmegaConf.create(out) == {"run": str(tmp_path), "out": None}, out
    code, out = lmlab("report", str(tmp_path), "metric=[val/loss]", "--cfg", "job")
    assert code == 0 and OmegaConf.create(out).paths == [str(tmp_path)] and "baseline: null" in out, out


def test_python_dash_m_lmlab_is_the_command(tmp_path, cache_dir):
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "lmlab", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "export" in proc.stdout and "report" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "lmlab", "export", "format=gguf"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("lmlab: error: format is not a setting of lmlab export")


def test_lmlab_uses_hydras_public_api_only():
    private = [str(p.relative_to(ROOT)) for p in (ROOT / "lmlab").rglob("*.py") if "hydra._internal" in p.read_text()]
    assert private == []


@pytest.mark.parametrize("overrides", [[], ["a=1"], ["a=1,2", "b=x,y,z"], ["a=1,2", "c=3", "a=4,5,6"],
                                       ["+c=range(0,3)", "d=choice(p,q)", "~e"], ["e=[1,2]", "f='x,y'", "g=1,2"],
                                       ["++h=glob(*)"]])
def test_sweep_jobs_are_the_basic_sweepers(overrides):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference; lmlab itself avoids it
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from lmlab.errors import UserError
    from lmlab.run_dir import sweep_jobs

    parsed = OverridesParser.create().parse_overrides(overrides)
    try:
        expected = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except HydraException:  # a sweep that is not a list of values: lmlab refuses it in one sentence
        with pytest.raises(UserError, match="is not a list of values"):
            sweep_jobs(parsed)
        return
    assert sweep_jobs(parsed) == expected


def test_a_hydra_job_sees_the_command_as_typed(tmp_path, monkeypatch):
    """hydra.main reads the overrides from sys.argv; the job sees the command line as typed again (Lightning
    reruns it for the other ranks of a multi-device job), and so does the caller afterwards."""
    from lmlab import cli

    typed = ["lmlab", "eval", f"run={tmp_path}", "eval=perplexity"]
    monkeypatch.setattr(sys, "argv", list(typed))
    seen = {}

    def task(cfg):
        seen.update(argv=list(sys.argv), run=cfg.run, evals=list(cfg.eval))

    cli._hydra_main("eval", task, [f"run='{tmp_path}'", "eval=perplexity"])
    assert seen == {"argv": typed, "run": str(tmp_path), "evals": ["perplexity"]}
    assert sys.argv == typed
