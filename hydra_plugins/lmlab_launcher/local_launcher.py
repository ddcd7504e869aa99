"""A Hydra launcher that runs the jobs of a sweep in parallel processes on one machine, with a GPU pool.

Each job is an ordinary ``lmlab train <its overrides>`` in a child process, pointed at the job's directory in
the sweep (resolved here, in the parent, so the child needs no environment of the parent's), its output in
``<job dir>/launcher.log``. At most ``n_jobs`` run at a time. A job that another process is training (the same
sweep started twice) waits until that process lets it go, then counts as done or starts again. On a machine
with GPUs each job gets ``gpus_per_job`` of them through ``CUDA_VISIBLE_DEVICES`` (the GPU-pool idea of NeMo's
process launcher; Hydra's joblib launcher shares every GPU between its jobs); on the CPU each job gets
``cpus_per_job`` threads (``OMP_NUM_THREADS``). A job that fails leaves ``FAILED`` with its last error line
and the sweep goes on; the sweep summary is written by lmlab's ``SweepSummary`` callback as with any launcher.
"""

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from lmlab.run_dir import failure, is_done, is_held, mark_failed

log = logging.getLogger(__name__)


@dataclass
class LocalLauncherConf:
    _target_: str = "hydra_plugins.lmlab_launcher.local_launcher.LocalLauncher"
    n_jobs: Optional[int] = None  # jobs at a time; null: one per gpus_per_job GPUs, or cores // cpus_per_job
    gpus_per_job: int = 1  # GPUs per job where there are GPUs (CUDA_VISIBLE_DEVICES)
    cpus_per_job: Optional[int] = None  # threads per job on the CPU; null: cores // n_jobs (at least 1)
    poll_s: float = 0.2


ConfigStore.instance().store(group="hydra/launcher", name="lmlab_local", node=LocalLauncherConf, provider="lmlab")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, or no driver
        return []


def plan(n_jobs: Optional[int], gpus: list[str], gpus_per_job: int, cpus: int,
         cpus_per_job: Optional[int]) -> tuple[int, list[list[str]], int]:
    """``(jobs at a time, GPU slots, threads per job)``: with GPUs, the slots partition the GPUs in groups of
    ``gpus_per_job`` and jobs at a time is at most their number; without, ``n_jobs`` (default
    ``cpus // cpus_per_job``) jobs share the cores."""
    if gpus:
        per = max(1, gpus_per_job)
        slots = [gpus[i: i + per] for i in range(0, len(gpus) - per + 1, per)]
        if not slots:
            raise ValueError(f"gpus_per_job={gpus_per_job} but only {len(gpus)} GPUs are visible: lower "
                             "hydra.launcher.gpus_per_job.")
        at_once = min(n_jobs or len(slots), len(slots))
        return at_once, slots[:at_once], max(1, cpus // at_once)
    at_once = n_jobs or max(1, cpus // (cpus_per_job or 1))
    return at_once, [[] for _ in range(at_once)], cpus_per_job or max(1, cpus // at_once)


class LocalLauncher(Launcher):
    def __init__(self, n_jobs: Optional[int] = None, gpus_per_job: int = 1, cpus_per_job: Optional[int] = None,
                 poll_s: float = 0.2) -> None:
        self.n_jobs, self.gpus_per_job, self.cpus_per_job, self.poll_s = n_jobs, gpus_per_job, cpus_per_job, poll_s
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _job_dir(self, overrides: Sequence[str], idx: int) -> Path:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} in the sweep dir resolve for this job
        return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        at_once, slots, threads = plan(self.n_jobs, visible_gpus(), self.gpus_per_job, os.cpu_count() or 1,
                                       self.cpus_per_job)
        jobs = [(initial_job_idx + i, list(o), self._job_dir(o, initial_job_idx + i))
                for i, o in enumerate(job_overrides)]
        HydraConfig.instance().set_config(self.config)
        where = f"GPUs {', '.join(','.join(s) for s in slots)}" if slots[0] else f"{threads} threads each"
        print(f"[lmlab] local launcher: {len(jobs)} jobs, {at_once} at a time ({where})", flush=True)
        pending, running, free, held = list(jobs), {}, list(slots), []
        returns: dict[int, JobReturn] = {}
        while pending or running or held:
            while pending and free:
                idx, overrides, job_dir = pending.pop(0)
                if is_held(job_dir):  # another process trains it: wait for it rather than fail on its lock
                    held.append((idx, overrides, job_dir))
                    continue
                slot = free.pop(0)
                running[idx] = (self._start(overrides, job_dir, slot, threads), slot, overrides, job_dir)
            time.sleep(self.poll_s)
            for idx in [i for i, (proc, *_) in running.items() if proc.poll() is not None]:
                proc, slot, overrides, job_dir = running.pop(idx)
                free.append(slot)
                if proc.returncode != 0 and not is_done(job_dir) and is_held(job_dir):
                    held.append((idx, overrides, job_dir))  # it lost the race for the lock to another process
                else:
                    returns[idx] = self._finish(idx, proc, overrides, job_dir)
            released = [job for job in held if not is_held(job[2])]
            held = [job for job in held if job not in released]
            pending += released  # done by the other process (the rerun skips it), or to be trained here
        return [returns[idx] for idx, _, _ in jobs]

    def _start(self, overrides: list[str], job_dir: Path, slot: list[str], threads: int) -> subprocess.Popen:
        job_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if slot:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "lmlab.cli", "train", *overrides, f"hydra.run.dir='{job_dir}'"]
        log_file = open(job_dir / "launcher.log", "w")  # noqa: SIM115 (closed by the child's exit)
        where = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if slot else f"OMP_NUM_THREADS={threads}"
        log_file.write(f"[lmlab] {where} {' '.join(command)}\n")
        log_file.flush()
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def _finish(self, idx: int, proc: subprocess.Popen, overrides: list[str], job_dir: Path) -> JobReturn:
        status = "done" if is_done(job_dir) else "failed"
        if proc.returncode != 0 and failure(job_dir) is None and status != "done":
            boilerplate = ("Set the environment variable HYDRA_FULL_ERROR", "See https://hydra.cc")
            lines = [ln for ln in (job_dir / "launcher.log").read_text(errors="replace").splitlines()
                     if ln.strip() and not ln.startswith(boilerplate)]
            errors = [ln for ln in lines if ln.startswith("lmlab: error:")] or lines[-1:] or ["no output"]
            reason = errors[-1].removeprefix("lmlab: error:").strip()
            mark_failed(job_dir, f"exit code {proc.returncode}: {reason}")
        print(f"[lmlab] job {idx} ({' '.join(filter_overrides(overrides))}): {status}", flush=True)
        # failures are reported through FAILED and the summary, as with the other launchers, not raised
        return JobReturn(overrides=overrides, working_dir=str(job_dir), task_name="train",
                         status=JobStatus.COMPLETED, _return_value=None)
