"""The ``lmlab`` command: one table (``COMMANDS``) of commands, each a config (``conf/<name>.yaml``) and a
function. ``train`` (one run or a ``-m`` sweep), ``eval`` (evaluations on a finished run) and ``select`` (the
data-selection stage) are Hydra jobs run by ``hydra.main``; ``report`` and ``export`` compose their config once
with Hydra's compose API and run here. A mistake the user can fix ends any command the same way
(``_refusals``): one sentence, exit 2.

Before Hydra starts, every job of a command is composed, range-checked and built without its data once
(``preflight``): an unknown option or key, a value of the wrong type or out of its range, a ``???`` value, a
setting a constructor refuses, a parent run that is missing or unfinished, or a name outside ``out_dir`` stops
the command with one sentence, before any job runs or any data is generated.
Run directories are deterministic: ``<out_dir>/<name>/<the overrides>``, so rerunning a command skips
finished jobs and resumes interrupted ones.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from lmlab.errors import UserError, user_error
from lmlab.run_dir import run_name, sweep_jobs
from lmlab.settings import check_config, check_moved

CONF = "lmlab.conf"
HYDRA_OWN = ("hydra.", "hydra/", "+hydra", "++hydra", "~hydra")  # Hydra's own settings and groups: Hydra checks them
log = logging.getLogger("lmlab")


# ----- run names -----

def _register_resolvers() -> None:
    from lmlab.io import config_hash

    OmegaConf.register_new_resolver("lmlab_run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("lmlab_hash", lambda s: config_hash(str(s), 16), replace=True)


_register_resolvers()


# ----- help -----

def _yaml_options(folder) -> list[str]:
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _chosen_groups(folder) -> set[str]:
    """The nested groups that the YAMLs of a group folder choose from in their defaults lists."""
    chosen = set()
    for f in folder.iterdir():
        if f.name.endswith(".yaml"):
            for entry in OmegaConf.create(f.read_text()).get("defaults") or []:
                if isinstance(entry, (dict, DictConfig)):
                    chosen.update(str(k).split("@")[0] for k in entry)
    return chosen


def config_groups() -> dict[str, list[str]]:
    """Every config group and its options, read from the packaged config tree. A folder inside a group that
    the group's YAMLs choose from (``data/tokenizer``) is a group of its own; other folders hold options
    (``experiment=same_loss/size``)."""
    root = resources.files(CONF)
    groups = {}
    for group in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        chosen = _chosen_groups(group)
        options = _yaml_options(group)
        for sub in sorted(d for d in group.iterdir() if d.is_dir() and not d.name.startswith("_")):
            if sub.name in chosen:
                groups[f"{group.name}/{sub.name}"] = _yaml_options(sub)
            else:
                options += [f"{sub.name}/{name}" for name in _yaml_options(sub)]
        groups[group.name] = options
    return dict(sorted(groups.items()))


def _groups_text() -> str:
    lines = ["Config groups (choose with group=option):"]
    groups = config_groups()
    width = max(map(len, groups)) + 1
    for group, options in groups.items():
        lines.append(f"  {group:<{width}} {', '.join(options) or '(none yet)'}")
    return "\n".join(lines)


MAIN_HELP = """usage: lmlab <command> [overrides...]   (or python -m lmlab <command> ...)

Commands:
{commands}

Every command is a config (conf/<command>.yaml) that its overrides change: key=value, group=option.

Examples:
  lmlab train                                         # the default job, on the CPU
  lmlab train model.d_model=128 objective=mlm data=hmm eval='[perplexity,probe]' optim=sgd
  lmlab train -m objective=clm,mlm model.d_model=64,128
  lmlab eval run=runs/default/objective=mlm eval=probe
  lmlab report runs/default/sweep-objective=clm,mlm baseline={{objective:clm}} metric=[perplexity/loss]
  lmlab export run=runs/default/objective=mlm out=hf_model

{groups}

`lmlab <command> --help` for its settings, `lmlab <command> --cfg job` prints its composed config.
"""

TRAIN_HELP = """Composes conf/train.yaml with your overrides, pretrains, runs the evaluations in `eval`, writes
<out_dir>/<name>/<overrides>/results.json and DONE, and prints a results table.
With -m, comma-separated values sweep: one job per combination, summary.csv/summary.md in the
sweep directory. Rerunning a command skips finished jobs and resumes interrupted ones.

{groups}

Top-level keys: name, out_dir, cache_dir, seed, batch_size, max_steps, val_every, checkpoint_every,
compile. Any key of the composed config can be set with dotted paths (model.d_model=128).
Hydra flags pass through: --cfg job (print the config), --info.
"""

SELECT_HELP = """Runs only the selection stage (cached, the same as inside `lmlab train`) on the data's train split
(the pool), with its validation split as the target, and writes <out_dir>/select/<overrides>/: selected/ (the selected
dataset, datasets.save_to_disk), scores.npy (one score per pool row), selection.json (sizes, precision on
planted data, the method's report) and DONE.

{groups}
"""

EVAL_HELP = """Runs evaluations on a finished run (it must hold model.pt) and writes them, with their settings and
command, as the run's next evaluation record evals/<n>.json; its results.json is left as training wrote it.
A run trained with callbacks=ema is evaluated with its averaged weights too (metrics under ema/).
  checkpoints=all        each kept checkpoint (callbacks=trajectory) and the final model: one row per step in
                         the run's trajectory.csv and trajectory.json (checkpoints=[100,1000]: those kept steps)
  average_last=3         also the mean of the weights of the last 3 kept checkpoints (metrics under avg3/)

{groups}
"""

REPORT_HELP = """One analysis of finished runs (conf/report.yaml); the sweep and paper reports write report.md (with
report.csv or report.json, and PNG plots) into the first directory:
  analysis=sweep    sweep directories (they hold multirun.yaml and one folder per job): per arm (the jobs
                    sharing every swept setting but the seed) the mean, sd and 95% t-interval of each metric,
                    and the paired per-seed difference to a baseline arm
                      baseline={{selection:random}}     the baseline arm (one or more swept settings)
                      metric=[val/loss,probe/acc]     the metrics (default: every metric that differs)
                      x=optim.lr                      a numeric swept setting: each metric plotted against it
  analysis=paper    the directory of a paper's experiment: the report of the study that its runs declare (the
                    experiment's study: _target_, a class of lmlab/studies/), e.g. a claim-by-claim report
                      tolerance=0.05                  the largest gap to the optimum (nats) that is the same loss
                      compare=<dir>                   another rerun: whether each decided verdict agrees
  analysis=scaling  sweeps of model sizes x budgets (experiment=ladder): Chinchilla fits and, with compare,
                    the compute multiplier between two recipes (docs/scaling.md)
                      metric=[val/loss]               the loss fitted (default: perplexity/loss, else val/loss)
                      compare=objective=clm,mlm       the two recipes, one swept setting and its two values
  analysis=lineage  one run's directory: its chain of init_from parents
analysis=null (the default) chooses from the directories: one run's, lineage; runs that declare a study, paper.
The flags --baseline k=v, --metric a b, --x k, --paper, --scaling, --tolerance t and --compare v stand for these
overrides.
Quote a value with a comma for the shell: baseline='{{selection:random,seed:0}}'.
"""

EXPORT_HELP = """Writes the finished run's model as a Hugging Face transformers checkpoint (config.json,
model.safetensors, the tokenizer files) that computes the same logits (conf/export.yaml): out defaults
to <run dir>/hf.
"""

# ----- preflight: compose every job before anything runs -----

def _group_of(key: str, groups: dict[str, list[str]]) -> str | None:
    key = key.lstrip("+~")
    return key if key in groups else None


def _check_type(key: str, raw: str, new, old) -> None:
    if old is None or isinstance(old, str) or new is None:
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    for typ, test in ok.items():
        if type(old) is typ and not test(new):
            word = {bool: "true or false", int: "a whole number", float: "a number"}[typ]
            example = str(old).lower() if typ is bool else old
            raise UserError(f"{key} expects {word}, got {raw!r}: pass e.g. {key}={example}.")
    if isinstance(old, (list, ListConfig)) and not isinstance(new, list):
        raise UserError(f"{key} expects a list, got {raw!r}: pass e.g. {key}='[a,b]'.")


def _parsed(overrides: list[str]) -> list:
    """The overrides (Hydra's own settings aside, Hydra checks them) as Hydra's parser reads them."""
    try:
        return OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith(HYDRA_OWN)])
    except HydraException as e:
        raise UserError(f"cannot parse the overrides ({str(e).splitlines()[0]}): write them as key=value.") from None


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a command (``run_dir.sweep_jobs``); a search space (``interval(a,b)``, for a sweeper that
    optimises) stands for both of its ends, which are checked."""
    parser = OverridesParser.create()
    parsed = [parser.parse_override(f"{o.get_key_element()}={o.value().start},{o.value().end}")
              if o.is_interval_sweep() else o for o in _parsed(overrides)]
    return sweep_jobs(parsed)


def preflight(config_name: str, overrides: list[str], here: bool = True) -> list[list[str]]:
    """Compose, check and dry-build every job of the command (``_dry_build``); raise UserError on the first
    mistake. Returns the jobs. ``here=False``: the jobs are meant for another machine (a GPU profile composed on
    a CPU), so the Trainer, which checks this machine's accelerator, is not built."""
    return _preflight(config_name, overrides, here)[0]


def _preflight(config_name: str, overrides: list[str], here: bool = True) -> tuple[list[list[str]], DictConfig]:
    """``preflight``, and the first job's composed config."""
    from hydra import initialize_config_module

    check_moved(overrides)
    jobs = _jobs(overrides)
    first = None
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        for job in jobs:
            cfg = _composed(config_name, job)
            _check_place(cfg)
            _check_along(cfg)
            _check_runs(cfg)
            _dry_build(cfg, here)
            first = first if first is not None else cfg
    return jobs, first


def _not_a_setting(name: str, key: str, add: str = "") -> UserError:
    return UserError(f"{key} is not a setting of lmlab {name} ({COMMANDS[name].usage}): check the spelling "
                     f"(`lmlab {name} --cfg job` lists every key){add}.")


def _composed(config_name: str, job: list[str]) -> DictConfig:
    """One job's config, composed (inside ``initialize_config_module``) and checked: every group option exists,
    every key is a setting of the command, every value has its setting's type and range, nothing is ``???``."""
    from hydra import compose

    groups = config_groups()
    parsed = _parsed(job)
    selections = []
    for o in parsed:
        group = _group_of(o.key_or_group, groups)
        if group is None:
            continue
        values = o.value() if isinstance(o.value(), list) else [o.value()]
        for v in values:
            if v is not None and str(v) not in groups[group]:
                raise UserError(f"unknown {group} option {v!r}: choose one of {', '.join(groups[group])}.")
        selections.append(o.input_line)
    try:
        base = compose(config_name=config_name, overrides=selections)
    except HydraException as e:
        raise UserError(f"{str(e).splitlines()[0].rstrip('.')}: check the override.") from None
    for o in parsed:
        key = o.key_or_group
        if config_name == "eval":
            _check_eval_override(o, base)
        if _group_of(key, groups) or o.is_add() or o.is_force_add() or o.is_delete():
            continue  # +key=, ++key=, ~key: Hydra checks them when it composes
        try:
            old = OmegaConf.select(base, key, throw_on_missing=False)
            exists = old is not None or _has_key(base, key)
        except Exception:  # an interpolation that needs a running job (hydra:...): skip
            continue
        if not exists:
            raise _not_a_setting(config_name, key, f", or add it with +{key}=<value>" if _accepts(base, key) else "")
        _check_type(key, o.input_line.split("=", 1)[1], o.value(), old)
    try:
        cfg = compose(config_name=config_name, overrides=job)
    except HydraException as e:
        raise UserError(f"{str(e).splitlines()[0].rstrip('.')}: check the override.") from None
    _check_missing(cfg)
    check_config(cfg, defaults=base)
    return cfg


# settings whose value is the directory of a finished run: lmlab prints such directories with '=' and ','
# (``run_name``), and they are passed back as printed, unquoted (``_quote_run_dirs``)
RUN_KEYS = ("run", "init_from.run", "objective.teacher", "objective.scorer", "selection.teacher")
DIR_KEYS = (*RUN_KEYS, "out", "compare")  # settings that take a directory (quoted for Hydra: ``_quote_run_dirs``)
SAME_VOCABULARY = ("objective.teacher", "objective.scorer", "selection.teacher")  # runs read on this run's data


def _check_missing(cfg: DictConfig) -> None:
    """A ``???`` value (a setting with no default, e.g. ``objective.teacher``) is a mistake before any work."""
    missing = _missing_keys(cfg)
    if missing:
        key = missing[0]
        value = "<run dir>" if key in RUN_KEYS else "<value>"
        raise UserError(f"{key} must be set (this config leaves it ???): pass {key}={value}.")


def _missing_keys(node, path: str = "") -> list[str]:
    """The dotted keys whose value is ``???``, without resolving interpolations (``${hydra:...}`` needs a job)."""
    found = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        where = f"{path}.{key}" if path and isinstance(node, DictConfig) else f"{path}[{key}]" if path else str(key)
        if where == "hydra":
            continue
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            found.append(where)
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            found += _missing_keys(child, where)
    return found


def _check_place(cfg: DictConfig) -> None:
    """``name`` names a folder inside ``out_dir``: an absolute name, or one with ``..``, would write elsewhere."""
    if "name" not in cfg or "out_dir" not in cfg:
        return
    name = str(cfg.name)
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(part in ("..", ".") for part in parts):
        raise UserError(f"name={name or repr(name)} would put the run outside out_dir ({cfg.out_dir}) or directly "
                        "in it: use a relative name without '.' or '..' parts, e.g. name=my_experiment.")


def _finished_run(key: str, value) -> Path:
    """The directory of a finished run that ``key`` names, or a UserError saying what it is instead."""
    from lmlab import run_dir

    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={value} is not a directory: pass the directory of a finished run as lmlab "
                        "printed it.")
    if not (path / run_dir.CONFIG).is_file():
        raise UserError(f"{key}={value} is not an lmlab run directory (it holds no {run_dir.CONFIG}): pass the "
                        "directory of a finished `lmlab train` run.")
    if key == "run":  # lmlab eval: a run with a model (pipeline.rebuild says which file is missing)
        return path
    state = run_dir.status(path)
    if state != "done" or not run_dir.holds_model(path):
        raise UserError(f"{key}={value} has not finished (its status is {state}): rerun its command to finish it, "
                        f"or pass a run that holds {run_dir.DONE}.")
    return path


def _check_along(cfg: DictConfig) -> None:
    """``eval_along`` names evaluations of ``eval`` (``pipeline.evaluations_along``'s check, before the work)."""
    from lmlab.pipeline import evaluations_along

    evaluations_along(cfg, dict.fromkeys(cfg.get("eval") or {}))


def _check_runs(cfg: DictConfig) -> None:
    """The runs this job reads (parent, teacher, scorer) exist and are finished; a parent's model settings can
    grow into this run's (``init_from``'s own check, made before any data is generated)."""
    from lmlab.run_dir import read_config
    from lmlab.training.init_from import InitFrom

    for key in RUN_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value in (None, ""):
            continue
        path = _finished_run(key, value)
        if key == "init_from.run" and "model" in cfg:
            InitFrom.from_config(cfg.init_from)._check_settings(read_config(path).model, cfg.model)


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _built(what: str, build):
    """``build()``, with whatever it raises (Hydra wraps a constructor's error) as one sentence naming ``what``."""
    try:
        return build()
    except Exception as e:
        user = user_error(e)
        if user is not None:
            raise UserError(str(user)) from None
        cause = _root_cause(e)
        reason = " ".join(str(cause).split()).rstrip(".").replace(". ", "; ") or type(cause).__name__
        raise UserError(f"the {what} settings are refused ({reason}): change them (`lmlab train --cfg job` shows "
                        f"the {what} node).") from None


def _dry_build(cfg: DictConfig, here: bool = True) -> None:
    """Build what the job will build, without its data: the data source (cheap by contract, it knows its
    vocabulary), the objective, the model (on the meta device: no memory, no initialisation cost), the
    evaluators, the selector, the optimiser (on a dummy parameter), the schedule and the Trainer (which checks
    its accelerator, devices, strategy and precision without starting anything)."""
    import torch
    from hydra.utils import instantiate

    from lmlab.run_dir import model_args

    recipe = OmegaConf.to_yaml({k: cfg._get_node(k) for k in cfg if k not in ("hydra", "seed")})
    if recipe in _dry_built:  # the same recipe with another seed (a sweep over seeds): built once
        return
    source = _built("data", lambda: instantiate(cfg.data)) if "data" in cfg else None
    objective = None
    if "objective" in cfg:
        width = {"d_model": cfg.model.d_model} if "d_model" in cfg.objective and cfg.objective.d_model is None \
            and "model" in cfg else {}
        objective = _built("objective", lambda: instantiate(cfg.objective, **width))
    model = None
    if "model" in cfg and source is not None and objective is not None:
        with torch.device("meta"):
            model = _built("model", lambda: instantiate(cfg.model, vocab_size=source.vocab_size,
                                                        attention=objective.attention))
    for key in SAME_VOCABULARY:
        value = OmegaConf.select(cfg, key, default=None)
        if value not in (None, "") and source is not None:
            vocab = model_args(value)["vocab_size"]
            if vocab != source.vocab_size:
                raise UserError(f"{key}={value} was trained on a vocabulary of {vocab} tokens and this run's data "
                                f"has {source.vocab_size}: pass a run trained with the same tokenizer.")
    for name, node in (cfg.get("eval") or {}).items():
        evaluator = _built(f"eval.{name}", lambda node=node: instantiate(node))
        if model is not None and not _built(f"eval.{name}", lambda e=evaluator: e.skip_reason(source, objective)):
            _built(f"eval.{name}", lambda e=evaluator: e.check_model(model))
    if "selection" in cfg:
        _built("selection", lambda: instantiate(cfg.selection))
    if "optim" in cfg:
        _built("optim", lambda: instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(1))]))
    if "schedule" in cfg:
        _built("schedule", lambda: instantiate(cfg.schedule)(0, int(cfg.get("max_steps") or 1)))
    if "trainer" in cfg and here:
        _built("trainer", lambda: _dry_trainer(cfg))
    if here:  # built whole: a later job of the same recipe need not be built again
        _dry_built.add(recipe)


_dry_built: set[str] = set()  # the recipes (configs without their seed) built in this process


def _dry_trainer(cfg: DictConfig) -> None:
    import tempfile

    from hydra.utils import instantiate

    from lmlab.pipeline import quiet, require_accelerator

    require_accelerator(cfg)
    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
                    default_root_dir=tmp)


EVAL_KEYS = ("run", "eval", "checkpoints", "average_last")  # the top-level settings of lmlab eval (conf/eval.yaml)


def _check_eval_override(o, base: DictConfig) -> None:
    """``lmlab eval`` rebuilds the run from its recorded config: only its own settings (``EVAL_KEYS``: ``run``, the
    ``eval`` group, ``checkpoints``, ``average_last``) and the evaluators' own settings take effect; any other
    override is refused, naming the settings that do."""
    key = o.key_or_group.lstrip("+~")
    evaluators = base.get("eval") or {}
    if key in EVAL_KEYS or (key.startswith("eval.") and (o.is_delete() or _has_key(base, key))):
        return
    settings = [f"eval.{name}.{k}" for name, node in evaluators.items() if isinstance(node, DictConfig)
                for k in node if not str(k).startswith("_")]
    if key.startswith("eval."):
        name = key.split(".")[1]
        own = [k for k in settings if k.startswith(f"eval.{name}.")]
        where = f"eval.{name} has the settings {', '.join(own)}" if own else \
            f"{name} is not among this command's evaluations: add it, eval='[{','.join([*evaluators, name])}]'"
        raise UserError(f"{key} is not a setting of lmlab eval and would not take effect: {where}.")
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in settings if k.rsplit(".", 1)[-1] == leaf]
    fix = f"use {' or '.join(same)} instead" if same else \
        f"set {', '.join(f'{k}=' for k in EVAL_KEYS)} or an evaluator's own settings " \
        f"({', '.join(settings[:3]) or 'eval.<name>.<setting>'}, ...)"
    raise UserError(f"lmlab eval evaluates the run with the config it was trained with, so {key} would not take "
                    f"effect: {fix}.")


def _accepts(cfg: DictConfig, key: str) -> bool:
    """Whether the object that ``key``'s node builds takes a parameter named like ``key``'s last part (so that
    adding it with ``+key=`` would take effect)."""
    import inspect

    from hydra.utils import get_method

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else None
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        return False
    try:
        params = inspect.signature(get_method(target)).parameters
    except Exception:  # not importable or no signature: Hydra says what is wrong when it builds it
        return False
    return leaf in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in list(node.keys())  # "in" is False for ??? values


# ----- the one handler of a user's mistakes -----


@contextmanager
def _refusals(run_dir: Path | None = None):
    """A mistake the user can fix (a ``UserError``, or one behind a wrapper such as Hydra's ``instantiate``),
    wherever a command makes it, ends the command: one sentence on stderr, exit 2. ``run_dir``: the job's run
    directory, removed with the folders this command created for it when nothing of the job's own was written
    (a run held by another process, or stopped with its status recorded, keeps it)."""
    try:
        yield
    except Exception as e:
        user = user_error(e)
        if user is None:
            raise
        from lmlab.pipeline import RunStopped
        from lmlab.run_dir import RunHeld

        if run_dir is not None and not isinstance(user, (RunHeld, RunStopped)):
            _remove_refused(run_dir)
        print(f"lmlab: error: {user}", file=sys.stderr)
        sys.exit(2)


# ----- the Hydra jobs: train, eval, select -----


def _command(name: str, overrides) -> str:
    """The command line that reruns this one job (recorded in its run directory)."""
    return " ".join(["lmlab", name, *(shlex.quote(str(o)) for o in overrides)])


def _relaunch_as_this_job(hc, run_dir: Path) -> None:
    """Lightning starts the ranks > 0 of a multi-device run by re-running ``sys.argv`` with
    ``hydra.run.dir=<hydra.run.dir>`` added. Inside a sweep that would be the whole sweep again: make it this one
    job, in this job's directory."""
    sys.argv = [sys.argv[0], "train", *hc.overrides.task]
    with open_dict(hc), read_write(hc):
        hc.run.dir = str(run_dir)


def _sweep_value(results: dict | None, hc) -> float | None:
    """The value of a job to a sweeper that optimises a metric (``hydra.sweeper.metric``, e.g. the Optuna
    sweeper): the metric of a finished run; NaN (a failed trial) for a run that failed, diverged or stopped."""
    metric = hc.sweeper.get("metric") if "sweeper" in hc else None
    if metric is None:
        return None
    metrics = (results or {}).get("metrics") or {}
    if (results or {}).get("status", "done") != "done" or metric not in metrics:
        if results and metric not in metrics:
            log.error("hydra.sweeper.metric=%s is not a metric of this run: set it to one of %s.", metric,
                      ", ".join(sorted(metrics)))
        return float("nan")
    return float(metrics[metric])


def _train(cfg: DictConfig) -> float | None:
    """``lmlab train``: one job of ``conf/train.yaml`` (a sweep's jobs record their failure and go on)."""
    from rich.console import Console

    from lmlab import pipeline
    from lmlab.report.summary import metrics_table
    from lmlab.run_dir import RunHeld, mark_failed

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.trainer.get("devices", 1) != 1 and "train" in sys.argv[1:2]:
        _relaunch_as_this_job(hc, run_dir)
    command = _command("train", hc.overrides.task)
    if not multirun:
        with _refusals(run_dir):
            results = pipeline.train(cfg, run_dir, command=command)
        if results:
            Console().print(metrics_table(results["metrics"], title=f"results: {run_dir}"))
        return None
    try:
        results = pipeline.train(cfg, run_dir, command=command)
    except Exception as e:
        user = user_error(e)
        if isinstance(user, (RunHeld, pipeline.RunStopped)):  # its status is the lock or results.json's
            log.error("job %s: %s", run_dir.name, user)
            return _sweep_value(None, hc)
        reason = " ".join((str(user) if user is not None else f"{type(e).__name__}: {e}").split())
        log.error("job failed: %s\n%s", reason, traceback.format_exc())
        mark_failed(run_dir, reason)
        return _sweep_value(None, hc)
    return _sweep_value(results, hc)


def _eval(cfg: DictConfig) -> None:
    """``lmlab eval``: evaluations on a finished run (``conf/eval.yaml``)."""
    from rich.console import Console

    from lmlab import pipeline
    from lmlab.report.summary import metrics_table

    with _refusals():
        out = pipeline.evaluate(cfg, command=_command("eval", HydraConfig.get().overrides.task))
    Console().print(metrics_table(out["metrics"], title=f"evaluations: {cfg.run}"))


def _select(cfg: DictConfig) -> None:
    """``lmlab select``: only the data-selection stage (``conf/select.yaml``)."""
    from rich.console import Console

    from lmlab import pipeline
    from lmlab.report.summary import metrics_table

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    with _refusals(run_dir):
        out = pipeline.select(cfg, run_dir, command=_command("select", hc.overrides.task))
    Console().print(metrics_table(out["metrics"], title=f"selection: {run_dir}"))


VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
               "-cd", "--experimental-rerun")
PASSTHROUGH = ("--cfg", "-c", "--info", "-p", "--package", "--hydra-help")  # Hydra prints and runs nothing


def _flags_first(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) apart from the overrides: Hydra's parser wants the flags first, and
    `lmlab train a=1 -m b=2,3` or `lmlab train a=1 --cfg job` are accepted too."""
    flags, rest, i = [], [], 0
    while i < len(args):
        if args[i].startswith("-"):
            takes = args[i] in VALUE_FLAGS and i + 1 < len(args)
            flags += args[i:i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(args[i])
            i += 1
    return flags, rest


def _hydra_main(config_name: str, task, args: list[str]) -> None:
    """Run ``task`` as ``@hydra.main`` does, on ``args`` (Hydra's flags and the overrides). ``hydra.main`` reads
    its command line from ``sys.argv``; while the task runs, ``sys.argv`` is the command as typed again, which
    Lightning reruns for the ranks > 0 of a multi-device job."""
    import hydra

    typed = sys.argv

    def job(cfg: DictConfig):
        sys.argv = typed
        return task(cfg)

    sys.argv = [typed[0] if typed else "lmlab", *args]
    try:
        hydra.main(config_path=f"pkg://{CONF}", config_name=config_name, version_base="1.3")(job)()
    finally:
        sys.argv = typed


def _sweep_dir(config_name: str, job: list[str], overrides: list[str], cfg: DictConfig | None = None) -> Path:
    """``<out_dir>/<name>/sweep-<the command's overrides>``: one sweep directory per command (``out_dir`` and
    ``name`` as the sweep's first job composes them: ``cfg``, or composed here)."""
    from hydra import compose, initialize_config_module

    if cfg is None:
        with initialize_config_module(config_module=CONF, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=job)
    return Path(str(cfg.out_dir)) / str(cfg.name) / ("sweep-" + run_name(overrides))


def _job_names(overrides: list[str]) -> str:
    """The override that names a sweep's job directories with its swept keys first (``run_name``'s ``first``):
    a long name keeps them, and the seed, in full."""
    swept = sorted({o.key_or_group for o in _parsed(overrides) if o.is_sweep_override()})
    return f"hydra.sweep.subdir='${{lmlab_run_name:${{hydra:overrides.task}},[{','.join(swept)}]}}'"


# the first folder a single job's run directory will create (``<out_dir>``, ``<out_dir>/<name>`` or the run
# directory itself): a job refused before it wrote anything removes what it created, up to this folder
_new_folder: Path | None = None


def _first_new_folder(place: Path) -> Path | None:
    place = place.absolute()
    new = None
    for folder in [place, *place.parents]:
        if folder.exists():
            break
        new = folder
    return new


def _remove_refused(run_dir: Path) -> None:
    """Remove the directory of a job refused before it wrote anything of its own (Hydra's ``.hydra`` and the
    files lmlab writes at the start), and the empty folders above it that this command created."""
    import shutil

    from lmlab import run_dir as rd

    run_dir = run_dir.absolute()
    if _new_folder is None or not run_dir.is_relative_to(_new_folder) or (run_dir / rd.CHECKPOINTS).exists() \
            or (run_dir / rd.RESULTS).exists() or (run_dir / rd.MODEL).exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in run_dir.parents:
        if not folder.is_relative_to(_new_folder):
            break
        try:
            folder.rmdir()
        except OSError:  # not empty: another job's
            break


def _start_jobs(name: str, args: list[str]) -> None:
    """A Hydra command: preflight every job, then run them under ``hydra.main`` (with ``-m``, a sweep into its
    own directory, and a non-zero exit when a job did not finish)."""
    flags, overrides = _flags_first(args)
    passthrough = any(a in args for a in PASSTHROUGH)
    jobs, first = [overrides], None
    if not passthrough and not os.environ.get("LOCAL_RANK"):  # DDP child ranks were checked by rank 0
        jobs, first = _preflight(name, overrides)
    sweep = COMMANDS[name].sweeps and ("-m" in args or "--multirun" in args)
    sweep_dir = _sweep_dir(name, jobs[0], overrides, first) if sweep else None
    global _new_folder
    _new_folder = _first_new_folder(Path(str(first.out_dir)) / str(first.name) / run_name(overrides)) \
        if first is not None and not sweep and "name" in first else None
    extra = [f"hydra.sweep.dir='{sweep_dir}'", _job_names(overrides)] if sweep_dir else []
    _hydra_main(name, COMMANDS[name].run, [*flags, *overrides, *extra])
    if sweep_dir is not None and not passthrough:
        from lmlab.report.summary import gather

        rows = gather(sweep_dir)
        failed = [r for r in rows if r["status"] != "done"]
        if failed:
            raise UserError(f"{len(failed)} of {len(rows)} jobs did not finish: see the summary above, "
                            "fix the cause and rerun the same command to run only those.")


# ----- the commands composed once and run here: report, export -----


def _is_override(arg: str) -> bool:
    """``key=value`` with a plain dotted key, and not an existing path (a run directory's name is ``a=1,b=2``)."""
    return re.match(r"[+~]*[A-Za-z_][\w.]*=", arg) is not None and not Path(arg).expanduser().exists()


def _run_here(name: str, args: list[str]) -> None:
    """A command without a job of its own: its config composed and checked once with the overrides (the bare
    arguments are the values of its ``positional`` setting), then its function called; ``--cfg job`` prints the
    config instead."""
    from hydra import compose, initialize_config_module

    command = COMMANDS[name]
    flags, rest = _flags_first(args)
    show = flags in (["--cfg", "job"], ["-c", "job"])
    if flags and not show:
        raise UserError(f"lmlab {name} takes no flag {flags[0]}: write {command.usage}.")
    overrides = [a for a in rest if _is_override(a)]
    bare = [a for a in rest if not _is_override(a)]
    if bare and command.positional is None:
        raise UserError(f"unexpected argument {bare[0]!r}: write {command.usage}.")
    jobs = _jobs(overrides)
    if len(jobs) > 1:
        raise UserError(f"lmlab {name} takes one value per setting: quote a value with commas, e.g. key='a,b'.")
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        keys = set(compose(config_name=name).keys())
        for o in _parsed(jobs[0]):  # no config groups here: a group option would be composed in and not read
            if re.split(r"[./]", o.key_or_group.lstrip("+~"))[0] not in keys:
                raise _not_a_setting(name, o.key_or_group)
        cfg = _composed(name, jobs[0])
    if bare:
        with open_dict(cfg):
            cfg[command.positional] = [*(cfg.get(command.positional) or []), *bare]
    if show:
        print(OmegaConf.to_yaml(cfg))
        return
    command.run(cfg)


def _lineage(cfg: DictConfig, paths: list[Path]) -> None:
    """One run's directory: its chain of ``init_from`` parents, newest first, each with its status and command."""
    from lmlab import run_dir

    if len(paths) != 1 or not (paths[0] / run_dir.CONFIG).exists():
        raise UserError(f"the lineage report reads one run's directory (it holds {run_dir.CONFIG}): pass one.")
    chain = run_dir.lineage(paths[0])
    for depth, run in enumerate(chain):
        record = run_dir.read_parent(chain[depth - 1]) if depth else {}
        command = (run / run_dir.COMMAND).read_text().strip() if (run / run_dir.COMMAND).exists() else "?"
        how = f"  init_from: {'; '.join(record.get('operators', ['?']))}" if depth else ""
        # an imported transformers checkpoint (init_from.hf) is not a run: it has no status of its own
        state = f"transformers checkpoint, {record.get('architecture')}" if record.get("hf") else run_dir.status(run)
        print(f"{'  ' * depth}{'<- ' if depth else ''}{run}  [{state}]  {command}{how}")


def _paper(cfg: DictConfig, paths: list[Path]) -> None:
    """The study (a paper's analysis, ``lmlab.studies``) that the runs' experiment declares: its report."""
    from lmlab import studies

    if len(paths) > 1:
        raise UserError("the paper report reads one directory: pass the one experiment directory, or "
                        "analysis=sweep for a sweep report.")
    if cfg.tolerance is not None and (isinstance(cfg.tolerance, bool) or not isinstance(cfg.tolerance, (int, float))
                                      or cfg.tolerance < 0):
        raise UserError(f"tolerance expects a number of nats at least 0, got {cfg.tolerance!r}: pass e.g. "
                        "tolerance=0.05.")
    if cfg.compare is not None and not Path(str(cfg.compare)).is_dir():
        raise UserError(f"{cfg.compare} is not a directory: compare takes the directory of another rerun of the "
                        "paper.")
    node = studies.declared(paths[0])
    if node is None:
        raise UserError(f"the runs under {paths[0]} declare no study (their experiment has study: null): pass the "
                        "directory of a paper's experiment (e.g. experiment=same_loss/size), or analysis=sweep.")
    report = studies.build(node, paths[0], tolerance=cfg.tolerance)(paths[0], compare=cfg.compare)
    print(f"[lmlab] report: {report}")


def _as_text(value) -> str:
    """A setting's value as an override writes it (``true``, ``null``, ``0.001``)."""
    return "true" if value is True else "false" if value is False else "null" if value is None else str(value)


def _sweep_report(cfg: DictConfig, paths: list[Path]) -> None:
    """Sweep directories: the statistics of every arm over seeds, against a baseline arm (``lmlab.report.sweep``)."""
    from lmlab.report import sweep, sweep_render

    for p in paths:
        if not sweep.is_sweep_dir(p):
            raise UserError(f"{p} is not a sweep directory (no multirun.yaml, summary.csv or job folders): pass the "
                            "directory that `lmlab train -m` printed as its sweep.")
    baseline = {str(k): _as_text(v) for k, v in cfg.baseline.items()} if cfg.baseline else None
    report = sweep_render.write_report(paths, baseline, list(cfg.metric or []) or None, cfg.x)
    out = report.sweeps[0]
    unfinished = sum(j.status != "done" for j in report.jobs)
    print(f"[lmlab] report: {out / 'report.md'} and {out / 'report.csv'} ({len(report.jobs)} jobs, {len(report.arms)} "
          f"arms, {unfinished} not finished){f', {len(report.plots)} plots' if report.plots else ''}")


def _scaling(cfg: DictConfig, paths: list[Path]) -> None:
    """Sweeps of sizes x budgets: scaling-law fits and compute multipliers (``lmlab.report.scaling``)."""
    from lmlab.report import scaling

    if len(cfg.metric or []) > 1:
        raise UserError("the scaling report fits one loss: pass one metric, e.g. metric=[val/loss].")
    out = scaling.write_report(paths, cfg.compare, cfg.metric[0] if cfg.metric else None)
    print(f"[lmlab] scaling report: {out}")


@dataclass(frozen=True)
class Analysis:
    run: Callable[[DictConfig, list[Path]], None]
    settings: tuple[str, ...]  # the settings of conf/report.yaml it reads (beside paths)


# the analyses of `lmlab report`, chosen with analysis=<name> (``_analysis_of`` chooses when it is null)
ANALYSES = {"sweep": Analysis(_sweep_report, ("baseline", "metric", "x")),
            "paper": Analysis(_paper, ("tolerance", "compare")),
            "scaling": Analysis(_scaling, ("metric", "compare")),
            "lineage": Analysis(_lineage, ())}
REPORT_SETTINGS = ("baseline", "metric", "x", "tolerance", "compare")


def _declares_study(paths: list[Path]) -> bool:
    """Whether the first job under ``paths`` declares a study (``study:`` in its config, ``lmlab.studies``)."""
    from lmlab import studies

    return any(studies.declared(path, first_only=True) is not None for path in paths)


def _analysis_of(cfg: DictConfig, given: list[str], paths: list[Path]) -> str:
    """The analysis that ``analysis: null`` means: one run's directory, its lineage; the paper's settings, or
    runs that declare a study without the sweep report's settings, the paper report (their study); otherwise the
    sweep report."""
    from lmlab import run_dir

    if len(paths) == 1 and (paths[0] / run_dir.CONFIG).exists():
        return "lineage"
    if any(k in given for k in ANALYSES["paper"].settings):
        return "paper"
    if not any(k in given for k in ANALYSES["sweep"].settings) and _declares_study(paths):
        return "paper"
    return "sweep"


def _report(cfg: DictConfig) -> None:
    """``lmlab report <dir> [<dir> ...] [key=value ...]``: one of ``ANALYSES`` on the directories."""
    paths = [Path(str(p)).expanduser() for p in cfg.paths or []]
    if not paths:
        raise UserError(f"lmlab report needs a directory: write {COMMANDS['report'].usage}.")
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p} is not a directory: pass the sweep or experiment directory of the runs.")
    given = [k for k in REPORT_SETTINGS if cfg.get(k) not in (None, [], {})]
    name = cfg.analysis or _analysis_of(cfg, given, paths)
    if name not in ANALYSES:
        raise UserError(f"analysis={name} is not an analysis of lmlab report: choose one of {', '.join(ANALYSES)}.")
    unread = [k for k in given if k not in ANALYSES[name].settings]
    if unread:
        raise UserError(f"the {name} report takes no {', '.join(unread)}, which would not take effect: drop "
                        f"{', '.join(unread)}, or choose the analysis that reads it (analysis=<name>).")
    ANALYSES[name].run(cfg, paths)


def _report_flags(args: list[str]) -> list[str]:
    """The report's flags (``--baseline k=v``, ``--metric a b``, ``--x k``, ``--paper``, ``--tolerance t``,
    ``--compare dir``) as the overrides they stand for."""
    out, baseline, metrics, i = [], [], [], 0
    while i < len(args):
        flag = args[i]
        values = []
        while i + 1 < len(args) and not args[i + 1].startswith("-") and (flag == "--metric" or not values) \
                and flag in ("--baseline", "--metric", "--x", "--tolerance", "--compare"):
            values.append(args[i + 1])
            i += 1
        i += 1
        if flag in ("--baseline", "--metric", "--x", "--tolerance", "--compare") and not values:
            raise UserError(f"{flag} needs a value: write e.g. {flag} <value>, or the override "
                            f"{flag[2:]}=<value>.")
        if flag == "--baseline":
            for pair in values[0].split():
                key, sep, value = pair.partition("=")
                if not (key and sep and value):
                    raise UserError(f"--baseline {values[0]!r} is not key=value: write the swept setting of the "
                                    "baseline arm, e.g. --baseline selection=random.")
                baseline.append(f"{key}:{_quoted(value)}")
        elif flag == "--metric":
            metrics += values
        elif flag == "--x":
            out.append(f"x={_quoted(values[0])}")
        elif flag == "--tolerance":
            out.append(f"tolerance={values[0]}")
        elif flag == "--compare":
            out.append(f"compare={_quoted(values[0])}")
        elif flag in ("--paper", "--scaling"):
            out.append(f"analysis={flag[2:]}")
        else:
            out.append(flag)
    if baseline:
        out.append(f"baseline={{{','.join(baseline)}}}")
    if metrics:
        out.append(f"metric=[{','.join(map(_quoted, metrics))}]")
    return out


def _quoted(value: str) -> str:
    quote = next((q for q in ("'", '"') if q not in value), None)
    if quote is None:
        raise UserError(f"{value!r} holds both kinds of quotes: rename it, or write the override by hand.")
    return f"{quote}{value}{quote}"


def _export(cfg: DictConfig) -> None:
    """``lmlab export run=<run dir> [out=<dir>]``: the run as a Hugging Face ``transformers`` checkpoint
    (default ``<run dir>/hf``)."""
    if cfg.run is None:
        raise UserError("lmlab export needs run=<run dir>: pass the directory of a finished run.")
    from lmlab.export import describe, export_run

    out = export_run(str(cfg.run), None if cfg.out is None else str(cfg.out))
    print(f"[lmlab] export: {out} ({describe(out)})")


# ----- the command table -----


@dataclass(frozen=True)
class Command:
    """One ``lmlab`` command: its config (``conf/<name>.yaml``) and its function."""
    run: Callable[[DictConfig], object]
    summary: str                        # its line in `lmlab --help`
    usage: str
    help: str                           # `lmlab <name> --help` ({groups}: the config groups)
    job: bool = False                   # a Hydra job (hydra.main: a run directory, -m) or composed once and run here
    sweeps: bool = False                # -m writes a sweep directory and its summary
    positional: str | None = None       # the list setting that takes the bare arguments
    flags: Callable[[list[str]], list[str]] | None = None  # its flags as the overrides they stand for


COMMANDS = {
    "train": Command(_train, "pretrain one recipe, then run its evaluations (add -m to sweep)",
                     "lmlab train [-m] [group=option ...] [key=value ...]", TRAIN_HELP, job=True, sweeps=True),
    "eval": Command(_eval, "run evaluations on a finished run: lmlab eval run=<run dir> eval=probe",
                    "lmlab eval run=<run dir> [eval=<evaluator> | eval='[a,b]']", EVAL_HELP, job=True),
    "select": Command(_select, "run only the data-selection stage: lmlab select selection=color_filter data=planted",
                      "lmlab select selection=<method> [data=<source>] [key=value ...]", SELECT_HELP, job=True),
    "report": Command(_report, "statistics of sweeps over seeds, the same-loss paper report, or one run's lineage",
                      "lmlab report <dir>... [analysis=sweep|paper|lineage] [key=value ...]", REPORT_HELP,
                      positional="paths", flags=_report_flags),
    "export": Command(_export, "write a finished run as a Hugging Face checkpoint",
                      "lmlab export run=<run dir> [out=<dir>]", EXPORT_HELP),
}


def _quote_run_dirs(args: list[str]) -> list[str]:
    """Run directories hold '=' and ',' (``run_name``): the value of a setting that takes a directory
    (``DIR_KEYS``; not a list or a sweep function such as ``choice(...)``), and any value with '=' or ',' that is
    an existing directory, is quoted for Hydra, so that the path is passed back exactly as lmlab printed it."""
    out = []
    for a in args:
        key, sep, value = a.partition("=")
        quote = next((q for q in ("'", '"') if q not in value), None)
        if sep and value not in ("", "null") and not a.startswith("-") and value[0] not in "'\"[" and quote and (
                key.lstrip("+") in DIR_KEYS and not re.match(r"\w+\(", value) or any(c in value for c in "=,")
                and Path(value).expanduser().is_dir()):
            a = f"{key}={quote}{value}{quote}"
        out.append(a)
    return out


def _main_help() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}} {c.summary}" for name, c in COMMANDS.items()]
    return MAIN_HELP.format(commands="\n".join(lines), groups=_groups_text())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return
    name, args = argv[0], argv[1:]
    with _refusals():
        if name not in COMMANDS:
            raise UserError(f"unknown command {name!r}: use one of {', '.join(COMMANDS)} (lmlab --help).")
        command = COMMANDS[name]
        if "-h" in args or "--help" in args:
            print(f"usage: {command.usage}\n\n{command.help.format(groups=_groups_text())}")
            return
        args = _quote_run_dirs(command.flags(args) if command.flags else args)
        (_start_jobs if command.job else _run_here)(name, args)


if __name__ == "__main__":
    main()
