"""lmlab's Optuna search, a Hydra sweeper on Optuna's ask-and-tell interface (Akiba et al., "Optuna: A
Next-generation Hyperparameter Optimization Framework", KDD 2019; optuna >= 4):
``lmlab train -m hydra/sweeper=optuna 'optim.lr=tag(log,interval(1e-4,1e-1))' hydra.sweeper.n_trials=20``.

- The search space is written in Hydra's sweep syntax, on the command line or in ``hydra.sweeper.params`` (the
  command line wins for a key in both): ``interval(a,b)`` (uniform), ``tag(log,interval(a,b))`` (log-uniform),
  ``tag(int,interval(a,b))`` (whole numbers; ``tag(int,log,...)`` both), ``range(a,b[,step])`` (the values of
  Python's ``range``, searched as numbers), ``choice(a,b,...)`` or ``a,b,...`` (categories). Other overrides are
  passed unchanged to every trial.
- The study lives in the sweep directory (``sqlite:///<sweep dir>/optuna.db``, study ``lmlab``; ``storage`` and
  ``study_name`` move it), and ``n_trials`` is the size of the whole study: a rerun of the same command counts
  the trials the study already finished (complete or failed) and runs only the rest. A trial left running by a
  killed search is run again with its parameters under its own number (its job directory is the same, so lmlab
  resumes it from its checkpoint). The jobs are numbered by the study (``hydra.job.num`` is the trial number).
- A trial's values are read from its job directory's ``results.json`` under every launcher (in-process,
  ``launcher=local``, ``launcher=slurm``): the metric ``hydra.sweeper.metric`` (``val/loss`` unless set), or the
  metrics ``hydra.sweeper.metrics=[a,b]`` of a multi-objective search, each optimised in its
  ``hydra.sweeper.direction`` (one, or a list with one per metric). A job that failed, diverged or stopped, or
  whose metric is missing or not finite, is a failed trial.
- ``<sweep dir>/optimization_results.yaml`` holds the best trial, or the Pareto front of a multi-objective search
  (Optuna's ``Study.best_trials``).
- Samplers: ``hydra/sweeper/sampler=tpe`` (the default), ``random``, ``cmaes``, ``gp``, ``nsgaii``, ``qmc`` or
  ``grid`` (every combination of ``choice``/``range`` values; ``n_trials`` is at most their number). A sampler
  setting left null takes the installed Optuna's default.
"""

import logging
import math
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lmlab.errors import UserError

log = logging.getLogger(__name__)

STUDY = "lmlab"
DB = "optuna.db"
RESULTS_FILE = "optimization_results.yaml"
DEFAULT_METRIC = "val/loss"
GRID = "optuna.samplers.GridSampler"


# ----- configs: hydra/sweeper=optuna and hydra/sweeper/sampler=<name> -----

@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: Optional[int] = None
    n_ei_candidates: Optional[int] = None
    multivariate: Optional[bool] = None
    group: Optional[bool] = None
    constant_liar: Optional[bool] = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None
    sigma0: Optional[float] = None
    n_startup_trials: Optional[int] = None
    popsize: Optional[int] = None
    use_separable_cma: Optional[bool] = None
    with_margin: Optional[bool] = None
    lr_adapt: Optional[bool] = None


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: Optional[int] = None
    deterministic_objective: Optional[bool] = None


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Optional[int] = None
    population_size: Optional[int] = None
    mutation_prob: Optional[float] = None
    crossover_prob: Optional[float] = None
    swapping_prob: Optional[float] = None


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None
    qmc_type: Optional[str] = None
    scramble: Optional[bool] = None


@dataclass
class GridSamplerConf:
    _target_: str = GRID  # its grid is the search space's choice/range values
    seed: Optional[int] = None


SAMPLERS = {"tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf, "gp": GPSamplerConf,
            "nsgaii": NSGAIISamplerConf, "qmc": QMCSamplerConf, "grid": GridSamplerConf}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lmlab_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler is built by the sweeper (its null settings left to Optuna)
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    metric: Optional[str] = None  # the key of results.json's metrics that the search optimises (val/loss if unset)
    metrics: Optional[List[str]] = None  # several keys: a multi-objective search
    direction: Any = "minimize"  # minimize or maximize, or a list of them (one per metric of `metrics`)
    n_trials: int = 20  # the trials of the whole study, those of earlier runs of the command included
    n_jobs: int = 1  # trials launched at a time
    max_failure_rate: float = 1.0  # failed and diverged trials are results of a search, not a reason to stop it
    storage: Optional[str] = None  # an Optuna storage URL; null: sqlite:///<sweep dir>/optuna.db
    study_name: str = STUDY
    params: Optional[Dict[str, str]] = None  # the search space, as overrides (key: 'interval(1e-4,1e-1)')


def _store() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lmlab")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="lmlab")


class LmlabOptunaConfig(SearchPathPlugin):
    """Where Hydra's own ``hydra-optuna-sweeper`` is installed too, its module, imported by Hydra's plugin scan
    in an order of its own, stores configs under the same names: storing lmlab's again here, after the scan and
    before any config is composed, keeps ``hydra/sweeper=optuna`` this sweeper."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        _store()


_store()


# ----- the search space -----

def search_space(overrides: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(distributions, fixed)``: Optuna's distribution of each sweep override and the value of every other one,
    by key (of a key given twice, the last)."""
    parser = OverridesParser.create()
    space: Dict[str, Any] = {}
    fixed: Dict[str, str] = {}
    for override in parser.parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def _distribution(override: Override) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    written = override.input_line
    try:
        if override.is_interval_sweep():
            unknown = set(value.tags) - {"log", "int"}
            if unknown:
                raise UserError(f"{written}: unknown tag {sorted(unknown)[0]!r}: tag an interval with log, int "
                                "or both, e.g. tag(log,interval(1e-4,1e-1)).")
            log_scale = "log" in value.tags
            if "int" in value.tags:
                return IntDistribution(math.ceil(value.start), math.floor(value.end), log=log_scale)
            return FloatDistribution(float(value.start), float(value.end), log=log_scale)
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if override.is_range_sweep() and not value.shuffle and values:
            low, step = min(values), abs(value.step)
            if all(isinstance(v, int) for v in values) and isinstance(step, int):
                return IntDistribution(low, max(values), step=step)
            high = Decimal(str(low)) + (len(values) - 1) * Decimal(str(step))  # no float drift at the top
            return FloatDistribution(float(low), float(high), step=float(step))
        bad = [v for v in values if not isinstance(v, (str, int, float, bool))]
        if bad or not values:
            raise UserError(f"{written}: a choice needs at least one value, each a string, number or boolean: "
                            "change the choice.")
        return CategoricalDistribution(values)
    except ValueError as e:  # Optuna's check of the range: empty, or a log scale from 0 or below
        raise UserError(f"{written} is not a search range ({str(e).rstrip('.')}): change its ends.") from None


def grid_values(name: str, distribution: Any) -> List[Any]:
    """The values of a distribution on a grid: a choice's, or a range's."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        n = round((distribution.high - distribution.low) / distribution.step) + 1
        return [distribution.low + i * distribution.step for i in range(n)]
    raise UserError(f"hydra/sweeper/sampler=grid searches a grid, but {name} is an interval: give it as "
                    "choice(...) or range(...), or use another sampler.")


# ----- a trial's values -----

def job_dir(ret: JobReturn) -> Optional[Path]:
    """The directory of a launched job: Hydra's runtime output directory where the launcher ran ``run_job``
    (in-process, submitit), else the working directory the launcher reports (lmlab's local launcher)."""
    if ret.hydra_cfg is not None:
        return Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    return Path(ret.working_dir) if ret.working_dir else None


def trial_values(ret: JobReturn, metrics: Sequence[str]) -> Tuple[Optional[List[float]], str]:
    """``(values, why not)``: the metrics of a finished job from its ``results.json``; ``None`` (a failed
    trial) and the reason where the job did not finish, or a metric is missing or not finite."""
    from lmlab.run_dir import failure, read_results, status

    if ret.status == JobStatus.FAILED:
        try:
            ret.return_value  # noqa: B018  (raises the job's error)
        except Exception as e:
            return None, f"its job raised {type(e).__name__}: {e}"
    where = job_dir(ret)
    if ret.status != JobStatus.COMPLETED or where is None:
        return None, "its job did not run"
    state = status(where)
    if state != "done":
        reason = failure(where)
        return None, f"its job in {where} is {state}" + (f" ({reason})" if reason else "")
    try:
        recorded = read_results(where).get("metrics") or {}
    except UserError as e:
        return None, str(e)
    missing = [m for m in metrics if not isinstance(recorded.get(m), (int, float))]
    if missing:
        return None, (f"{missing[0]} is not a metric of its job: set hydra.sweeper.metric(s) to some of "
                      f"{', '.join(sorted(recorded))}")
    values = [float(recorded[m]) for m in metrics]
    if not all(math.isfinite(v) for v in values):
        return None, f"its metrics {dict(zip(metrics, values))} are not all finite"
    return values, ""


# ----- the sweeper -----

class OptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, metric: Optional[str] = None, metrics: Optional[List[str]] = None,
                 direction: Any = "minimize", n_trials: int = 20, n_jobs: int = 1, max_failure_rate: float = 1.0,
                 storage: Optional[str] = None, study_name: str = STUDY,
                 params: Optional[DictConfig] = None) -> None:
        self.sampler_conf = sampler
        self.metric, self.metrics, self.direction = metric, metrics, direction
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.storage, self.study_name, self.params = storage, study_name, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: List[str]) -> None:
        try:
            self._sweep(arguments)
        except UserError as e:  # lmlab's refusal: one sentence, exit 2 (Hydra would print a traceback)
            print(f"lmlab: error: {e}", file=sys.stderr)
            sys.exit(2)

    def _objectives(self) -> Tuple[List[str], List[str]]:
        """``(metrics, directions)``, checked."""
        if self.metric is not None and self.metrics is not None:
            raise UserError("hydra.sweeper.metric and hydra.sweeper.metrics are both set: set metric for one "
                            "objective or metrics for several.")
        metrics = list(self.metrics) if self.metrics is not None else [self.metric or DEFAULT_METRIC]
        directions = list(self.direction) if isinstance(self.direction, (list, ListConfig)) else [self.direction]
        directions = [str(d).lower() for d in directions]
        if not metrics or len(set(metrics)) != len(metrics):
            raise UserError(f"hydra.sweeper.metrics={metrics} needs distinct metrics: list each once.")
        if len(directions) != len(metrics) or not set(directions) <= {"minimize", "maximize"}:
            raise UserError(f"hydra.sweeper.direction={directions} does not fit the metrics {metrics}: give one "
                            "minimize or maximize per metric.")
        return metrics, directions

    def _sampler(self, space: Dict[str, Any]) -> Tuple[Any, int]:
        """The sampler (null settings left to Optuna) and the trials to run in all (a grid's size at most)."""
        settings = {k: v for k, v in OmegaConf.to_container(self.sampler_conf).items() if v is not None}
        if settings["_target_"] != GRID:
            return instantiate(settings), self.n_trials
        grid = {name: grid_values(name, d) for name, d in space.items()}
        size = math.prod(len(v) for v in grid.values())
        if size < self.n_trials:
            log.info(f"The grid has {size} points: n_trials={self.n_trials} lowered to {size}")
        return instantiate(settings, search_space=grid), min(self.n_trials, size)

    def _study(self, sampler: Any, metrics: List[str], directions: List[str]) -> Any:
        """The study of the sweep directory (made on the first run), checked to optimise the same metrics."""
        import optuna

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{self.sweep_dir.resolve() / DB}"
        tables = optuna.storages.RDBStorage(storage, skip_compatibility_check=True)
        if tables.get_current_version() != tables.get_head_version():  # a study of an older Optuna (e.g. 2.10)
            raise UserError(f"the study in {storage} was stored by an older Optuna: upgrade it with `optuna storage "
                            f"upgrade --storage {storage}`, then rerun the command.")
        study = optuna.create_study(storage=storage, study_name=self.study_name, sampler=sampler,
                                    directions=directions, load_if_exists=True)
        stored = [d.name.lower() for d in study.directions]
        if "metrics" not in study.user_attrs:
            study.set_user_attr("metrics", metrics)
        if (study.user_attrs.get("metrics"), stored) != (metrics, directions):
            raise UserError(f"the study {self.study_name} in {storage} optimises {study.user_attrs.get('metrics')} "
                            f"({', '.join(stored)}), not {metrics} ({', '.join(directions)}): rerun with its "
                            "metrics and directions, or search in a new sweep directory.")
        return study

    def _sweep(self, arguments: List[str]) -> None:
        from optuna.trial import TrialState

        metrics, directions = self._objectives()
        given = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space([*given, *arguments])
        if not space:
            raise UserError("hydra/sweeper=optuna has nothing to search: give a setting a search space, e.g. "
                            "'optim.lr=tag(log,interval(1e-4,1e-1))'.")
        sampler, n_trials = self._sampler(space)
        study = self._study(sampler, metrics, directions)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        stale = [t for t in trials if t.state == TrialState.RUNNING]  # left running by a killed search
        if trials:  # a seeded sampler would draw the first run's parameters again
            study.sampler.reseed_rng()
        to_go = max(0, n_trials - finished)
        log.info(f"Study {study.study_name} in {self.sweep_dir}: {finished} trials finished, {to_go} to run of "
                 f"n_trials={n_trials}; {' and '.join(f'{d} {m}' for m, d in zip(metrics, directions))}")
        while to_go > 0:
            if stale:  # one at a time: its job number is its own trial number
                trial = stale.pop(0)
                if trial.distributions != space:
                    self._tell(study, trial.number, None, "its parameters are not of this search space")
                    to_go -= 1
                    continue
                batch = [(trial.number, trial.params)]
            else:
                asked = [study.ask(space) for _ in range(min(to_go, self.n_jobs))]
                batch = [(t.number, t.params) for t in asked]
            overrides = [tuple(f"{k}={v}" for k, v in {**params, **fixed}.items()) for _, params in batch]
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0][0])
            failed = 0
            for (number, _), ret in zip(batch, returns):
                values, why = trial_values(ret, metrics)
                failed += values is None
                self._tell(study, number, values, why)
            if failed / len(returns) > self.max_failure_rate:
                raise UserError(f"{failed} of {len(returns)} trials failed, more than hydra.sweeper."
                                f"max_failure_rate={self.max_failure_rate} allows: see their job directories in "
                                f"{self.sweep_dir}, fix the cause and rerun the same command.")
            to_go -= len(batch)
        self._save(study, metrics, directions)

    def _tell(self, study: Any, number: int, values: Optional[List[float]], why: str) -> None:
        from optuna.trial import TrialState

        if values is None:
            log.warning(f"Trial {number} failed: {why}")
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        try:
            study.tell(number, values, state=state)
        except RuntimeError:
            # the grid sampler stops the study when its last point is told, which Optuna allows only inside
            # Study.optimize; the trial is stored before it tries
            if self.sampler_conf._target_ != GRID or study.trials[number].state != state:
                raise

    def _save(self, study: Any, metrics: List[str], directions: List[str]) -> None:
        from optuna.trial import TrialState

        from lmlab.io import write_text

        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("No trial finished with a value: no best parameters")
            return
        results: Dict[str, Any] = {"name": "optuna", "study": study.study_name, "metrics": metrics,
                                   "directions": directions}
        if len(metrics) == 1:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info(f"Best parameters: {best.params} (trial {best.number}, {metrics[0]} {best.value})")
        else:
            front = sorted(study.best_trials, key=lambda t: t.number)
            results["solutions"] = [{"trial": t.number, "params": t.params, "values": dict(zip(metrics, t.values))}
                                    for t in front]
            log.info(f"Pareto front: trials {[t.number for t in front]}")
        write_text(self.sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(results)))
