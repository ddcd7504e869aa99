"""A resumable Optuna search: ``lmlab train -m hydra/sweeper=optuna 'optim.lr=tag(log,interval(1e-4,1e-1))'
hydra.sweeper.n_trials=20``.

It extends ``hydra-optuna-sweeper`` (same search-space syntax and samplers) in three ways:

- the study lives in the sweep directory (``sqlite:///<sweep dir>/optuna.db``, study ``lmlab``), and
  ``n_trials`` is the size of the whole study: a rerun of the same command counts the trials the study already
  finished (complete or failed) and runs only the rest. A trial left running by a killed search is run again with
  its parameters (its job directory is the same, so lmlab resumes it from its checkpoint) under its own number;
- the value of a trial is the metric ``hydra.sweeper.metric`` of the job's results (``hydra.sweeper.direction``:
  minimize or maximize); a job that failed or diverged returns NaN and is recorded as a failed trial. A launcher
  that runs each job in a process of its own (``launcher=local``, ``launcher=slurm``) returns no value: the
  metric is then read from the job directory's ``results.json``;
- the jobs are numbered by the study (``hydra.job.num`` is the trial number).
"""

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import hydra_plugins.hydra_optuna_sweeper.config  # noqa: F401  (registers the stock configs first: ours replace them)
import optuna
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from optuna.trial import Trial, TrialState

log = logging.getLogger(__name__)

STUDY = "lmlab"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


@dataclass
class LmlabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.lmlab_optuna.optuna_sweeper.LmlabOptunaSweeper"
    metric: str = "val/loss"  # the key of results.json's metrics that the search optimises
    n_jobs: int = 1  # trials launched at a time
    max_failure_rate: float = 1.0  # failed and diverged trials are results of a search, not a reason to stop it


class LmlabOptunaSweeper(OptunaSweeper):
    def __init__(self, metric: str = "val/loss", **kwargs: Any) -> None:
        self.metric = metric  # read by the task (lmlab.cli._train) from hydra.sweeper.metric
        self.sweeper = ResumableOptunaSweeperImpl(*(kwargs[k] for k in (
            "sampler", "direction", "storage", "study_name", "n_trials", "n_jobs", "max_failure_rate",
            "search_space", "custom_search_space", "params")))
        self.sweeper.metric = metric


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    metric = "val/loss"  # the metric read from a job's results.json when its launcher returns no value

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        if self.storage is None:
            self.storage = f"sqlite:///{Path(self.sweep_dir).resolve() / 'optuna.db'}"
        if self.study_name is None:
            self.study_name = STUDY

    def sweep(self, arguments: List[str]) -> None:
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        if self.search_space_distributions:
            space = {**self.search_space_distributions, **space}
        for name in fixed:
            space.pop(name, None)
        directions = self._get_directions()
        if isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler:
            self.sampler = self.sampler({k: self._to_grid_sampler_choices(d) for k, d in space.items()})
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        stale = [Trial(study, t._trial_id) for t in trials if t.state == TrialState.RUNNING]
        to_go = max(0, self.n_trials - finished)
        if trials:  # a seeded sampler would draw the first run's parameters again
            study.sampler.reseed_rng()
        log.info(f"Study {self.study_name} in {self.storage}: {finished} trials finished, {to_go} to run "
                 f"of n_trials={self.n_trials}")
        while to_go > 0:
            batch = stale[:1] if stale else [study.ask() for _ in range(min(to_go, self.n_jobs))]
            stale = stale[1:]
            overrides = self._configure_trials(batch, space, fixed)
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            failures = 0
            for trial, ret in zip(batch, returns):
                returned = ret._return_value
                if returned is None and ret.status == JobStatus.COMPLETED:  # the job ran in another process
                    returned = _from_results(ret.working_dir, self.metric)
                values = _values(returned, len(directions)) if ret.status == JobStatus.COMPLETED else None
                if values is None:
                    failures += 1
                    log.warning(f"Trial {trial.number} failed: its job returned {returned!r}")
                study.tell(trial, values=values, state=TrialState.FAIL if values is None else TrialState.COMPLETE)
            if failures / len(returns) > self.max_failure_rate:
                for ret in returns:
                    ret.return_value  # noqa: B018  (raises the job's own error where it raised one)
                raise RuntimeError(f"{failures} of {len(returns)} trials failed (max_failure_rate="
                                   f"{self.max_failure_rate}): see the jobs' logs in {self.sweep_dir}.")
            to_go -= len(batch)
        self._save(study, directions)

    def _save(self, study: optuna.Study, directions: List[str]) -> None:
        from omegaconf import OmegaConf

        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if not complete:
            log.warning("No trial finished with a value: no best parameters")
            return
        if len(directions) < 2:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value,
                       "best_trial": best.number}
            log.info(f"Best parameters: {best.params} (trial {best.number}, value {best.value})")
        else:
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                       for t in study.best_trials]}
        OmegaConf.save(OmegaConf.create(results), f"{self.sweep_dir}/optimization_results.yaml")


def _values(returned: Any, n: int) -> Optional[List[float]]:
    """The trial's values: None (a failed trial) unless the job returned ``n`` finite numbers."""
    try:
        values = [float(returned)] if n == 1 else [float(v) for v in returned]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _from_results(job_dir: Optional[str], metric: str) -> Optional[float]:
    """The metric of a finished job from its directory's results.json (lmlab.run_dir's layout); None (a failed
    trial) where the job did not finish or has no such metric."""
    from lmlab.run_dir import RESULTS, read_results

    if not job_dir or not (Path(job_dir) / RESULTS).exists():
        return None
    results = read_results(job_dir)
    value = (results.get("metrics") or {}).get(metric)
    return float(value) if results.get("status") == "done" and isinstance(value, (int, float)) else None


def _store() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=LmlabOptunaSweeperConf,
                                 provider="lmlab")


class LmlabOptunaConfig(SearchPathPlugin):
    """Hydra imports every plugin module (the stock ``hydra_optuna_sweeper`` one too, in an order of its own)
    before it asks the search-path plugins: storing ``hydra/sweeper=optuna`` here makes it this sweeper's."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        _store()


_store()
