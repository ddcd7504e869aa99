"""Many devices and machines: DDP through the real CLI, FSDP composition, and the sweep launchers
(``launcher=local``, ``launcher=submitit_local``, ``launcher=slurm``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from tests.conftest import FAST, TINY

LMLAB = str(Path(sys.executable).parent / "lmlab")


def _env(cache_dir: Path) -> dict:
    # tests/conftest.py puts the repository root first on PYTHONPATH (the local launcher plugin is in hydra_plugins/)
    return {**os.environ, "LMLAB_CACHE": str(cache_dir)}


def _run(args: list[str], cache_dir: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run([LMLAB, *args], env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _results(out_dir: Path) -> dict:
    found = list(out_dir.rglob("results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())["metrics"]


# ----- DDP: 2 CPU processes (gloo) against 1 process with the same global batch -----

def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path, cache_dir):
    """``trainer=ddp`` with 2 processes of batch 8 sees the same rows per step as 1 process of batch 16
    (``StepBatches`` shards each global batch), so both runs end at the same model up to float rounding
    (gloo sums the gradients in another order). The data are packed text blocks: every row has the same
    number of tokens, so the mean of the two processes' mean losses is the mean over all 16 rows. With rows
    of different lengths (the PCFG) it is not: each process's tokens weigh by 1 / its own token count, so
    the two runs differ slightly (DDP averages per-process means)."""
    fast = [a for a in FAST if not a.startswith("batch_size=")]
    common = [*fast, "max_steps=6", "data=text", "data/tokenizer=byte", "data.block_size=32",
              "eval=[perplexity]", "model.d_model=32"]
    _run(["train", f"out_dir={tmp_path / 'one'}", "batch_size=16", *common], cache_dir)
    ddp = _run(["train", f"out_dir={tmp_path / 'ddp'}", "trainer=ddp", "trainer.accelerator=cpu",
                "trainer.devices=2", "batch_size=8", *common], cache_dir)
    one, two = _results(tmp_path / "one"), _results(tmp_path / "ddp")
    assert two["train/steps"] == one["train/steps"] == 6
    assert two["perplexity/loss"] == pytest.approx(one["perplexity/loss"], abs=1e-4)
    assert two["val/loss"] == pytest.approx(one["val/loss"], abs=1e-4)
    # the run directory is resolved once: rank 1 writes no Hydra directory of its own
    assert len(list((tmp_path / "ddp").rglob(".hydra"))) == 1
    assert len(list((tmp_path / "ddp").rglob("config_resolved.yaml"))) == 1
    assert not list(Path.cwd().glob("outputs")) and "Traceback" not in ddp.stderr


def test_ddp_inside_a_sweep_reruns_only_its_job(tmp_path, cache_dir):
    """With -m, rank 1 must run this one job in this job's directory, not the whole sweep again."""
    _run(["train", "-m", f"out_dir={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
          *FAST, *TINY, "eval=[perplexity]", "model.d_model=32"], cache_dir)
    sweep = _sweep_dir(tmp_path)
    assert (sweep / "summary.csv").read_text().count(",done,") == 1
    assert len(list(tmp_path.rglob(".hydra"))) == 1 and len(list(tmp_path.rglob("DONE"))) == 1


# ----- FSDP: composes; Lightning runs it on GPUs only -----

def test_fsdp_composes_and_wraps_each_block():
    from lmlab.models.transformer import Block

    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose("train", ["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert cfg.trainer.accelerator == "gpu"


def test_fsdp_on_the_cpu_is_refused_with_one_sentence(lmlab):
    code, out = lmlab("train", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", *TINY, *FAST)
    assert code == 2, out
    assert ("FSDP runs on CUDA GPUs only (Lightning's FSDPStrategy refuses accelerator='cpu' and PyTorch's FSDP "
            "needs an accelerator device): on the CPU use trainer=ddp instead") in out
    assert "Traceback" not in out and not list(lmlab.runs.rglob("results.json"))


FSDP_WRAP = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    FullyShardedDataParallel(torch.nn.Linear(4, 4))
    print("wrapped")
except RuntimeError as e:
    print("refused:", e)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: FSDP runs on it")
def test_pytorch_fsdp_itself_refuses_the_cpu(tmp_path):
    """Why trainer=fsdp has no CPU test: even past Lightning's check (a subclass of FSDPStrategy passes it), this
    PyTorch's FSDP refuses a machine with no accelerator. When this test fails, FSDP runs on the CPU: give
    trainer=fsdp a 2-process gloo test and drop the refusal in lmlab/pipeline.py."""
    proc = subprocess.run([sys.executable, "-c", FSDP_WRAP, str(tmp_path / "rendezvous")], capture_output=True,
                          text=True, timeout=300)
    assert "refused: FSDP needs a non-CPU accelerator device" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# ----- launchers -----

def _compose_hydra(*overrides: str):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        return compose("train", list(overrides), return_hydra_config=True)


def test_launchers_compose():
    slurm = _compose_hydra("launcher=slurm", "hydra.launcher.partition=gpu")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.partition == "gpu" and slurm.hydra.launcher.max_num_timeout == 3
    assert slurm.hydra.launcher.gpus_per_node == 1
    assert _compose_hydra("launcher=submitit_local").hydra.launcher._target_.endswith("LocalLauncher")
    local = _compose_hydra("launcher=local", "hydra.launcher.n_jobs=3")
    assert local.hydra.launcher._target_ == "hydra_plugins.lmlab_launcher.local_launcher.LocalLauncher"
    assert local.hydra.launcher.n_jobs == 3
    # the launcher does not name the run: a job lands in the same directory whichever launcher runs it
    from lmlab.cli import run_name

    assert run_name(["launcher=slurm", "model.d_model=32"]) == run_name(["model.d_model=32"])


def test_local_launcher_plan():
    from hydra_plugins.lmlab_launcher.local_launcher import plan

    assert plan(None, ["0", "1", "2", "3"], 1, 16, None) == (4, [["0"], ["1"], ["2"], ["3"]], 4)
    assert plan(None, ["0", "1", "2", "3"], 2, 16, None) == (2, [["0", "1"], ["2", "3"]], 8)
    assert plan(1, ["4", "5"], 1, 16, None) == (1, [["4"]], 16)
    assert plan(None, [], 1, 2, None) == (2, [[], []], 1)
    assert plan(1, [], 1, 2, None) == (1, [[]], 2)
    with pytest.raises(ValueError, match="gpus_per_job"):
        plan(None, ["0"], 2, 16, None)


SWEEP = [*FAST, *TINY, "eval=[perplexity]", "model.d_model=32,48"]


def _sweep_dir(out_dir: Path) -> Path:
    found = list(out_dir.rglob("summary.csv"))
    assert len(found) == 1, found
    return found[0].parent


def test_local_launcher_runs_jobs_in_parallel_one_gpu_each(tmp_path, cache_dir):
    """Two jobs at once, each with its own GPU of the pool (here two fake GPU ids: the jobs train on the CPU,
    the launcher only hands out CUDA_VISIBLE_DEVICES), and the sweep summary lists both."""
    env = {**_env(cache_dir), "CUDA_VISIBLE_DEVICES": "3,5"}
    proc = subprocess.run([LMLAB, "train", "-m", "launcher=local", f"out_dir={tmp_path}", *SWEEP], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 jobs, 2 at a time" in proc.stdout
    sweep = _sweep_dir(tmp_path)
    summary = (sweep / "summary.csv").read_text()
    assert summary.count(",done,") == 2
    jobs = [p.parent for p in sweep.glob("*/DONE")]
    assert len(jobs) == 2
    gpus = sorted((j / "launcher.log").read_text().split()[1] for j in jobs)
    assert gpus == ["CUDA_VISIBLE_DEVICES=3", "CUDA_VISIBLE_DEVICES=5"]


def test_submitit_local_sweep_and_requeue_resume(tmp_path, cache_dir):
    """``launcher=submitit_local`` (the code path of launcher=slurm, on this machine) runs the sweep and writes
    the summary; a job that loses its DONE (as a requeued job that was cut short) resumes from last.ckpt."""
    args = ["train", "-m", "launcher=submitit_local", f"out_dir={tmp_path}", *SWEEP]
    _run(args, cache_dir, timeout=500)
    sweep = _sweep_dir(tmp_path)
    assert (sweep / "summary.csv").read_text().count(",done,") == 2
    job = sorted(p.parent for p in sweep.glob("*/DONE"))[0]
    assert (job / "checkpoints" / "last.ckpt").exists()
    (job / "DONE").unlink()
    (job / "results.json").unlink()
    _run(args, cache_dir, timeout=500)
    assert (job / "DONE").exists()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert "resuming from" in logs and "already holds DONE" in logs
