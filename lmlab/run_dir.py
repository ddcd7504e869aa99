"""The run directory: what one job of ``lmlab train`` leaves behind, named in one place.

A job's directory is ``<out_dir>/<name>/<run_name(overrides)>`` (deterministic, so that rerunning a command
finds its jobs again) and holds:

* ``config_resolved.yaml`` (``CONFIG``): the job's config with every interpolation resolved;
  ``command.txt`` (``COMMAND``): the command line that ran it;
* ``checkpoints/last.ckpt`` (``CHECKPOINTS``, ``LAST_CHECKPOINT``): the resumable Lightning checkpoint, and
  ``checkpoints/previous-last.ckpt`` the one before it (``resume_checkpoint`` falls back to it when the last
  one is damaged);
* ``model.pt`` (``MODEL``): the trained backbone's ``state_dict``, and beside it ``model_args.json``
  (``MODEL_ARGS``): the two constructor arguments that the pipeline adds to ``cfg.model``, ``vocab_size``
  (the data source's) and ``attention`` (the objective's pattern), e.g. ``{"vocab_size": 40, "attention":
  "causal"}``. With them the directory describes its model completely: ``load_backbone`` builds it from
  ``CONFIG``'s ``model`` node alone, without the data, the objective or the optimiser. ``model_sha256.json``
  (``MODEL_SUM``) records the sha256 of ``MODEL`` when it was saved; ``load_weights`` checks it (a run
  written before the checksum existed is checked as a zip archive only);
* ``fit.json`` (``lmlab.pipeline.FIT``): the fit metrics (``train/loss`` over the last steps, ``val/loss`` at the
  last step), written when fit ends, so a run stopped after it finishes its evaluations with the same numbers;
* ``results.json`` (``RESULTS``): metrics, history, timings, versions and config, as training wrote them;
* ``model_ema.pt`` (``lmlab.training.callbacks.EMA_MODEL``), for a run trained with ``callbacks=ema``: the moving
  average of its weights, a ``state_dict`` as ``MODEL`` is; ``trajectory.csv`` and ``trajectory.json``
  (``lmlab.pipeline.TRAJECTORY``): the rows of the latest ``lmlab eval checkpoints=...``, one per step;
* ``evals/<n>.json`` (``EVALS``), one per ``lmlab eval`` on the finished run (``write_evaluation``, numbered
  from 1 in the order they were written): its evaluation settings, command, time and metrics. An evaluation
  never rewrites ``results.json``; ``read_evaluations`` reads them back in order;
* ``parent.json`` (``PARENT``), only for a run started from another run's weights (``init_from.run``): the
  parent's directory, command and status, and the growth operators applied (``write_parent``, ``read_parent``;
  ``lineage`` follows these records back to the first run);
* ``DONE`` (a timestamp), written last when the job finished; ``FAILED`` (one line, the reason) when it
  stopped with an error. A directory that holds ``DONE`` is skipped by a rerun. A run that stopped on its
  own terms without finishing writes ``results.json`` with its ``status`` (``diverged``: a non-finite loss, with
  the step; ``interrupted``: a termination signal, with the step of the checkpoint it saved) and no ``DONE``;
* ``.lock``: held (``flock``) by the one process that trains the job, released by the kernel when that
  process ends, however it ends: a second process on the same job stops at once (``hold``).

Every file is written atomically (``lmlab.io``): a reader never sees half of one. A record that is damaged
nevertheless (cut short or edited) is refused by its reader in one sentence naming the file and the fix
(``DamagedRecord``).

A run directory is data, never code: ``read_config`` refuses a ``config_resolved.yaml`` that would make
Hydra build anything but lmlab's own classes and the targets that lmlab's own configs (``lmlab/conf``) name,
so every command that builds from a recorded run (``lmlab eval``, ``lmlab export``, ``init_from.run``, a
distillation teacher, a selection reference) builds only those.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import importlib
import inspect
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.errors import UserError, user_error
from lmlab.io import config_hash, torch_save, write_json, write_text, zip_intact

DONE = "DONE"
FAILED = "FAILED"
RESULTS = "results.json"
MODEL = "model.pt"
MODEL_ARGS = "model_args.json"
CONFIG = "config_resolved.yaml"
COMMAND = "command.txt"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # inside CHECKPOINTS (Lightning's name for the latest checkpoint)
PREVIOUS = "previous-"  # the checkpoint a new one replaced, kept beside it: previous-last.ckpt
LOCK = ".lock"
PARENT = "parent.json"  # the run whose weights this run started from (init_from.run)
MODEL_SUM = "model_sha256.json"  # the sha256 of MODEL, written after it
EVALS = "evals"  # evals/<n>.json: one record per `lmlab eval`
CONF = Path(__file__).parent / "conf"  # lmlab's own configs: the targets a recorded run may name

UNNAMED_KEYS = ("hydra.", "cache_dir=", "out_dir=", "launcher=", "retry=")  # overrides that do not name a run


NAME_LIMIT = 96  # characters of a run directory's name (file systems allow 255; paths stay readable)


def _unquoted(override: str) -> str:
    """``key='a=1,b'`` -> ``key=a=1,b``: a value quoted for Hydra (a run directory) names the run unquoted."""
    key, sep, value = override.partition("=")
    if sep and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key + sep + value


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,_+\-]", "_", text)


def _short(value: str, width: int) -> str:
    """A long value as its last path part with its middle elided (``/runs/x/model.d_model=64`` ->
    ``mod_d_model=64``); a list as its items joined by ``+``."""
    if value.startswith("[") and value.endswith("]"):  # a list: its items joined by + (``[a,b]`` -> ``a+b``)
        value = "+".join(v.strip() for v in value[1:-1].split(","))
    value = value.rstrip("/").rsplit("/", 1)[-1] or value
    if len(value) <= width:
        return value
    tail = (width - 1) * 2 // 3
    return f"{value[:width - 1 - tail]}_{value[-tail:]}"


def _abbreviated(key: str) -> str:
    parts = key.split(".")
    return ".".join([*(p[:1] for p in parts[:-1]), parts[-1]])


def run_name(overrides: list[str] | ListConfig, first: list[str] | ListConfig = ()) -> str:
    """A readable, deterministic directory name for a list of overrides (order-independent).

    ``key=value`` joined by ``,`` in key order. Where that is longer than ``NAME_LIMIT``: ``seed`` and the keys
    in ``first`` (a sweep's swept keys) come first and keep their names, long values keep their last path part
    with the middle elided, the other keys are abbreviated (``data.train_size`` -> ``d.train_size``) and, if
    that is not enough, the last items are left out; a short hash of the full overrides keeps every name apart."""
    items = sorted(_unquoted(str(o)) for o in overrides if not str(o).startswith(UNNAMED_KEYS))
    if not items:
        return "default"
    name = _safe(",".join(items))
    if len(name) <= NAME_LIMIT:
        return name
    digest = "-" + config_hash(items, 8)
    pairs = [item.partition("=")[::2] for item in items]
    ahead = {"seed", *(str(k) for k in first)}
    pairs = [p for p in pairs if p[0].lstrip("+~") in ahead] + [p for p in pairs if p[0].lstrip("+~") not in ahead]
    for width in (16, 8):  # the narrower values only where the wider ones do not fit
        name = _safe(",".join(f"{k}={_short(v, 16)}" if k.lstrip("+~") in ahead else
                              f"{_abbreviated(k)}={_short(v, width)}" for k, v in pairs))
        if len(name) + len(digest) <= NAME_LIMIT:
            return name + digest
    return name[:NAME_LIMIT - len(digest) + 1].rsplit(",", 1)[0] + digest  # whole items only


def sweep_jobs(overrides: list) -> list[list[str]]:
    """The jobs of a ``-m`` command as Hydra's basic sweeper lists them: one per combination of the swept values
    (``a=1,2``, ``range(...)``, ``choice(...)``), a later override of a key replacing an earlier one.
    ``overrides``: parsed by Hydra's ``OverridesParser``. A sweep that is not a list of values (``interval(a,b)``,
    for a sweeper that optimises; ``glob(...)``, whose options only the running config loader knows) is
    refused."""
    import itertools

    from hydra.core.override_parser.types import ValueType

    axes: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if o.is_discrete_sweep() and o.value_type != ValueType.GLOB_CHOICE_SWEEP:
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        elif o.is_sweep_override():
            raise UserError(f"{o.input_line} is not a list of values: write the values with commas, e.g. key=a,b.")
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*axes.values())]


# ----- status -----

def mark_done(run_dir: str | os.PathLike) -> None:
    write_text(Path(run_dir) / DONE, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def is_done(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).exists()


def mark_failed(run_dir: str | os.PathLike, reason: str) -> None:
    """Record why the job stopped (``reason``: one line)."""
    write_text(Path(run_dir) / FAILED, reason + "\n")


def clear_failed(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def failure(run_dir: str | os.PathLike) -> str | None:
    """The reason recorded by ``mark_failed``, or ``None`` when the job has not failed."""
    path = Path(run_dir) / FAILED
    return path.read_text().strip() if path.exists() else None


def status(run_dir: str | os.PathLike) -> str:
    """``done``, ``diverged``, ``interrupted`` (as its results say), ``failed``, ``running`` (another process holds
    the job) or ``incomplete`` (started, or not, and not running now)."""
    run_dir = Path(run_dir)
    if is_done(run_dir):
        return "done"
    stored = stored_status(run_dir)
    if stored in ("diverged", "interrupted") and not is_held(run_dir):
        return stored
    if failure(run_dir) is not None:
        return "failed"
    return "running" if is_held(run_dir) else "incomplete"


def stored_status(run_dir: str | os.PathLike) -> str | None:
    """The ``status`` of the run's ``results.json``, or None where it has none."""
    path = Path(run_dir) / RESULTS
    try:
        return json.loads(path.read_text()).get("status") if path.exists() else None
    except (OSError, ValueError):
        return None


# ----- one process per job -----

class RunHeld(UserError):
    """Another process is training this job."""


@contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the job's lock while the block runs: an exclusive ``flock`` on ``run_dir/.lock``, which the kernel
    releases when the process ends (killed or preempted included), so a lock is never left stale. Raises
    ``RunHeld`` (one sentence naming the holder's pid and host) when another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunHeld(f"{run_dir} is being trained by {holder}: wait for that process to finish (or stop it), "
                      "then rerun the command.") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_held(run_dir: str | os.PathLike) -> bool:
    """Whether a process holds the job's lock now."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----- checkpoints -----

def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where the checkpoint that ``path`` replaces is kept."""
    path = Path(path)
    return path.with_name(PREVIOUS + path.name)


def resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``last.ckpt`` when it reads back whole, else the previous one (with a
    one-line notice); None when the run has none. Raises a UserError when every checkpoint is damaged."""
    last = Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT
    candidates = [p for p in (last, previous_checkpoint(last)) if p.exists()]
    for path in candidates:
        if zip_intact(path):
            if path != last:
                state = "is damaged" if last.exists() else "is missing"  # a kill between the two renames
                print(f"[lmlab] {last} {state}: resuming from the checkpoint before it, {path.name}.")
            return path
    if candidates:
        raise UserError(f"every checkpoint in {last.parent} is damaged: delete that folder to train the run again "
                        "from the start.")
    return None


# ----- records -----

class DamagedRecord(UserError, ValueError):
    """A record of the run directory that does not read back (cut short, not JSON, edited): a ``UserError``
    whose sentence names the file and the fix (also a ``ValueError``: the content is bad)."""


def _read_record(path: Path, fix: str) -> Any:
    """The JSON in ``path``; a ``DamagedRecord`` saying ``fix`` when it is not readable JSON."""
    try:
        return json.loads(path.read_text())
    except ValueError:  # not JSON, or not UTF-8
        raise DamagedRecord(f"{path} is damaged (it is not readable JSON): {fix}") from None


def _rerun_fix(run_dir: str | os.PathLike, what: str) -> str:
    return (f"delete it and {Path(run_dir) / DONE}, then rerun the run's `lmlab train` command (in {COMMAND}): it "
            f"resumes from its last checkpoint and writes {what} again.")


# ----- results and config -----

def read_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``results.json``; a one-sentence ``UserError`` where it is missing or damaged (a
    ``DamagedRecord``: delete it and ``DONE`` and rerun the command, which writes it again)."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        raise UserError(f"{run_dir} holds no {RESULTS}: delete its {DONE} (if any) and rerun the job to write it.")
    results = _read_record(path, _rerun_fix(run_dir, RESULTS))
    if not isinstance(results, dict):
        raise DamagedRecord(f"{path} is damaged (it holds no record): {_rerun_fix(run_dir, RESULTS)}")
    return results


def write_results(run_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RESULTS, results)


def write_config(run_dir: str | os.PathLike, cfg: DictConfig) -> None:
    write_text(Path(run_dir) / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: str | os.PathLike) -> DictConfig:
    """The run's recorded config, resolved, after ``check_targets``: what a caller instantiates from it is
    what was checked."""
    path = Path(run_dir).expanduser() / CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} is not an lmlab run directory (no {CONFIG}): point at a directory that "
                        "`lmlab train` wrote.")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # not YAML, or an interpolation that does not resolve
        raise UserError(f"{path} cannot be read ({type(e).__name__}): point at a run directory that `lmlab train` "
                        "wrote, with its config as written.") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} holds no config: point at a run directory that `lmlab train` wrote.")
    check_targets(values, path)
    _moved(values)
    _as_recorded(values)
    return OmegaConf.create(values)


TEXT_SOURCE = "lmlab.data.text.TextSource"


def _names_txt(paths: Any) -> bool:
    """Whether a text source's ``paths`` name any ``.txt`` file, as ``lmlab.data.text`` reads them (files,
    directories, globs); null (the bundled sample corpora, still read by line) names none."""
    if paths is None:
        return False
    for entry in [paths] if isinstance(paths, str) else paths:
        entry = os.path.expanduser(str(entry))
        found = glob.glob(entry, recursive=True) if glob.has_magic(entry) else (
            [str(p) for p in Path(entry).iterdir()] if os.path.isdir(entry) else [entry])
        if any(f.lower().endswith(".txt") for f in found):
            return True
    return False


def _moved(values: dict) -> None:
    """Settings that moved since a run was recorded: a model's ``sparsity`` is the run's ``sparsity`` (training
    put the masks on and took them off: ``model.pt`` holds the dense weights)."""
    model = values.get("model")
    if isinstance(model, dict) and "sparsity" in model:
        values.setdefault("sparsity", model.pop("sparsity"))


def _as_recorded(node: Any) -> None:
    """Settings added after a run was recorded, set to the behaviour it was recorded under: a text source
    without ``documents`` read each line of a ``.txt`` file as a document."""
    if isinstance(node, dict):
        if node.get("_target_") == TEXT_SOURCE and "documents" not in node and _names_txt(node.get("paths")):
            node["documents"] = "line"
        for value in node.values():
            _as_recorded(value)
    elif isinstance(node, list):
        for value in node:
            _as_recorded(value)


# ----- a recorded config builds only lmlab's classes -----

GET_CLASS = "hydra.utils.get_class"  # a config's way to name a class as a value (FSDP's wrapped blocks)


@functools.cache
def conf_targets() -> frozenset[str]:
    """Every ``_target_`` that lmlab's own configs (``lmlab/conf``) name: lmlab's recipes and the few
    third-party classes they use (optimisers, the Lightning Trainer, loggers, the FSDP strategy)."""
    found: set[str] = set()
    for path in CONF.rglob("*.yaml"):
        found.update(str(t) for _, t, _ in _targets(OmegaConf.to_container(OmegaConf.load(path)), "")
                     if isinstance(t, str))
    return frozenset(found)


def _targets(node: Any, key: str) -> Iterator[tuple[str, Any, dict]]:
    """``(key, target, node)`` for every mapping holding ``_target_`` in ``node``, at any depth."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node["_target_"], node
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def _lmlab_class(target: Any) -> bool:
    """Whether ``target`` is the dotted path of a class defined in lmlab (by its own module's name: a name
    that lmlab merely imports, such as ``lmlab.pipeline.os``, is not one). Only lmlab's modules are imported."""
    if not isinstance(target, str) or not target.startswith("lmlab."):
        return False
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # no such lmlab module or name
        return False
    return inspect.isclass(cls) and cls.__module__ == module and cls.__qualname__ == name


def allowed_target(target: Any) -> bool:
    """Whether a recorded config may name ``target``: a class defined in lmlab, or a target that lmlab's own
    configs name (its functions such as the schedules, and the third-party classes of ``conf_targets``), and
    ``GET_CLASS`` (runs recorded with ``trainer=fsdp`` before its wrap policy came from the model's spec name their
    block class with it; ``check_targets`` allows it for lmlab's own classes only)."""
    return isinstance(target, str) and (target in conf_targets() or target == GET_CLASS or _lmlab_class(target))


def check_targets(config: Any, path: str | os.PathLike) -> None:
    """Refuse a config (plain containers, resolved) that names a ``_target_`` outside ``allowed_target``, passes
    positional ``_args_``, or names a class by value (``hydra.utils.get_class``) that is not lmlab's: one
    ``UserError`` sentence naming the file and the key. Nothing is called (only lmlab's own modules are
    imported, to look its classes up)."""
    def refuse(key: str, what: str) -> UserError:
        return UserError(f"{path} is refused: its key {key} {what}, and a recorded run may only build lmlab's own "
                         "classes and the ones lmlab's configs name: use a run directory that `lmlab train` wrote "
                         "(a run directory is data, never code).")

    for key, target, node in _targets(config, ""):
        where = f"{key}._target_" if key else "_target_"
        if target is None:  # an option that builds nothing (logger=none)
            continue
        if not allowed_target(target):
            raise refuse(where, f"names {target!r}")
        if "_args_" in node:
            raise refuse(f"{key}._args_" if key else "_args_", "passes positional arguments")
        if target == GET_CLASS and not _lmlab_class(node.get("path")):
            raise refuse(f"{key}.path" if key else "path", f"names the class {node.get('path')!r}")


def write_command(run_dir: str | os.PathLike, command: str) -> None:
    write_text(Path(run_dir) / COMMAND, command + "\n")


def read_command(run_dir: str | os.PathLike) -> str | None:
    path = Path(run_dir) / COMMAND
    return path.read_text().strip() if path.exists() else None


# ----- the parent run (init_from) -----

def write_parent(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    write_json(Path(run_dir) / PARENT, record)


def read_parent(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``parent.json`` record of a run started from another run's weights; None for a run from scratch."""
    path = Path(run_dir) / PARENT
    if not path.exists():
        return None
    return _read_record(path, f"it records which run this one started from; rerun the run's `lmlab train` "
                              f"command (in {COMMAND}) in a new out_dir to write it again.")


def lineage(run_dir: str | os.PathLike) -> list[Path]:
    """The run and its ancestors, newest first (run, parent, grandparent, ...), following ``parent.json``."""
    chain = [Path(run_dir)]
    while (record := read_parent(chain[-1])) is not None:
        parent = Path(record["run"])
        if parent in chain:  # a directory retrained from itself: stop rather than loop
            break
        chain.append(parent)
    return chain


# ----- evaluation records (lmlab eval) -----

def write_evaluation(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Add ``record`` as the run's next ``evals/<n>.json`` and return its path. The file is written whole under
    a temporary name and linked to the first free number, so two evaluations at once never take the same one."""
    folder = Path(run_dir) / EVALS
    pending = folder / f".pending-{uuid.uuid4().hex}.json"
    write_json(pending, record)
    try:
        n = 1 + max((int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()), default=0)
        while True:
            try:
                os.link(pending, folder / f"{n}.json")
                return folder / f"{n}.json"
            except FileExistsError:
                n += 1
    finally:
        pending.unlink(missing_ok=True)


def read_evaluations(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's ``lmlab eval`` records, oldest first, each with ``number`` (its ``n``) added; a
    ``DamagedRecord`` naming the file where one does not read back."""
    folder = Path(run_dir) / EVALS
    paths = sorted((p for p in folder.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem))
    records = []
    for path in paths:
        record = _read_record(path, "it holds one `lmlab eval` record: delete it and rerun that evaluation "
                                    "(its command is in the other records, or choose the evaluations again).")
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise DamagedRecord(f"{path} is damaged (it holds no metrics): delete it and rerun that evaluation.")
        records.append({**record, "number": int(path.stem)})
    return records


# ----- the trained model -----

def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, vocab_size: int, attention: str) -> None:
    """Write ``MODEL_ARGS``, then ``MODEL``, then its checksum ``MODEL_SUM`` (so a directory that holds ``MODEL``
    also describes it, and a checksum always belongs to the ``MODEL`` beside it: the old one is removed first)."""
    run_dir = Path(run_dir)
    (run_dir / MODEL_SUM).unlink(missing_ok=True)
    write_json(run_dir / MODEL_ARGS, {"vocab_size": int(vocab_size), "attention": str(attention)})
    torch_save(model.state_dict(), run_dir / MODEL)
    write_json(run_dir / MODEL_SUM, {"sha256": _sha256(run_dir / MODEL)})


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def holds_model(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds a trained model that ``load_backbone`` can build."""
    return all((Path(run_dir) / name).is_file() for name in (CONFIG, MODEL, MODEL_ARGS))


def _require_model(run_dir: Path) -> None:
    if not holds_model(run_dir):
        missing = ", ".join(n for n in (CONFIG, MODEL, MODEL_ARGS) if not (run_dir / n).is_file())
        raise UserError(f"{run_dir} is not a finished lmlab run (it lacks {missing}): point at a run directory "
                        f"that `lmlab train` finished (it holds {DONE}).")


def model_args(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The recorded constructor arguments of the run's model: ``{"vocab_size": int, "attention": str}``."""
    run_dir = Path(run_dir).expanduser()
    _require_model(run_dir)
    return _read_record(run_dir / MODEL_ARGS, _rerun_fix(run_dir, MODEL_ARGS))


def check_model(run_dir: str | os.PathLike) -> None:
    """Refuse a ``MODEL`` that is missing (one sentence saying so) or damaged: its sha256 differs from the one
    recorded in ``MODEL_SUM`` when it was saved, or (a run without a checksum) its zip archive does not read
    back whole. The fix for damage: delete ``DONE`` and rerun the run's command, which rewrites ``MODEL`` from
    the last checkpoint."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / MODEL
    fix = (f"delete {run_dir / DONE} and rerun the run's `lmlab train` command (in {COMMAND}): it resumes from "
           f"its last checkpoint and writes {MODEL} again.")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a finished lmlab run ({MODEL} is missing): point at a run directory that "
                        f"`lmlab train` finished, or, for this one, {fix}")
    if (run_dir / MODEL_SUM).is_file():
        recorded = _read_record(run_dir / MODEL_SUM, fix)
        if not isinstance(recorded, dict) or recorded.get("sha256") != _sha256(path):
            raise UserError(f"{path} is damaged (its sha256 differs from the one recorded in {MODEL_SUM} when it "
                            f"was saved): {fix}")
    elif not zip_intact(path):
        raise UserError(f"{path} is damaged (it does not read back as a whole archive): {fix}")


def load_weights(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trained ``state_dict`` in ``MODEL``, on the CPU (tensors only: ``weights_only``), after
    ``check_model``."""
    run_dir = Path(run_dir).expanduser()
    check_model(run_dir)
    return torch.load(run_dir / MODEL, map_location="cpu", weights_only=True)


def load_backbone(run_dir: str | os.PathLike, attention: str | None = None) -> torch.nn.Module:
    """The trained backbone of a finished run, on the CPU, in eval mode: built from ``CONFIG``'s ``model``
    node with the recorded ``MODEL_ARGS`` and loaded from ``MODEL``. Nothing else is built (no data, no
    objective, no optimiser), and the caller's random state is left as it was.

    ``attention`` builds it for another pattern than the one it was trained with (a distillation teacher
    reads the student's batches); a model that cannot honour it refuses with a ``UserError``."""
    run_dir = Path(run_dir).expanduser()
    args = model_args(run_dir)
    weights = load_weights(run_dir)  # a damaged model.pt is refused before anything is built
    cfg = read_config(run_dir)
    trained = args["attention"]
    kind = trained if attention is None else attention
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten: keep the caller's stream
        try:
            model = instantiate(cfg.model, vocab_size=args["vocab_size"], attention=kind)
        except Exception as e:
            if kind == trained or user_error(e) is None:
                raise
            name = str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]
            raise UserError(f"the {name} model of the run {run_dir} cannot attend {kind!r}: use a run whose model "
                            f"supports {kind!r} attention.") from e
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        if kind != trained:
            raise UserError(f"the weights of the run {run_dir} (trained for {trained!r} attention) do not fit its "
                            f"model built for {kind!r} attention: use a run trained with {kind!r} attention.") from e
        raise UserError(f"the weights in {run_dir / MODEL} do not fit the model that its {CONFIG} builds: retrain "
                        "the run with this version of lmlab.") from e
    return model.eval()


