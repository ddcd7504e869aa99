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
  ``CONFIG``'s ``model`` node alone, without the data, the objective or the optimiser;
* ``results.json`` (``RESULTS``): metrics, history, timings, versions and config;
* ``parent.json`` (``PARENT``), only for a run started from another run's weights (``init_from.run``): the
  parent's directory, command and status, and the growth operators applied (``write_parent``, ``read_parent``;
  ``lineage`` follows these records back to the first run);
* ``DONE`` (a timestamp), written last when the job finished; ``FAILED`` (one line, the reason) when it
  stopped with an error. A directory that holds ``DONE`` is skipped by a rerun. A run that stopped on its
  own terms without finishing writes ``results.json`` with its ``status`` (``diverged``: a non-finite loss, with
  the step; ``interrupted``: a termination signal, with the step of the checkpoint it saved) and no ``DONE``;
* ``.lock``: held (``flock``) by the one process that trains the job, released by the kernel when that
  process ends, however it ends: a second process on the same job stops at once (``hold``).

Every file is written atomically (``lmlab.io``): a reader never sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
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

UNNAMED_KEYS = ("hydra.", "cache_dir=", "out_dir=", "launcher=", "retry=")  # overrides that do not name a run


def run_name(overrides: list[str] | ListConfig) -> str:
    """A readable, deterministic directory name for a list of overrides (order-independent)."""
    items = sorted(str(o) for o in overrides if not str(o).startswith(UNNAMED_KEYS))
    if not items:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=.,_+\-]", "_", ",".join(items))
    if len(name) > 96:
        name = f"{name[:72]}-{config_hash(items)}"
    return name


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


# ----- results and config -----

def read_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        raise UserError(f"{run_dir} holds no {RESULTS}: delete its {DONE} (if any) and rerun the job to write it.")
    return json.loads(path.read_text())


def write_results(run_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RESULTS, results)


def write_config(run_dir: str | os.PathLike, cfg: DictConfig) -> None:
    write_text(Path(run_dir) / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: str | os.PathLike) -> DictConfig:
    path = Path(run_dir).expanduser() / CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} is not an lmlab run directory (no {CONFIG}): point at a directory that "
                        "`lmlab train` wrote.")
    return OmegaConf.load(path)


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
    return json.loads(path.read_text()) if path.exists() else None


def lineage(run_dir: str | os.PathLike) -> list[Path]:
    """The run and its ancestors, newest first (run, parent, grandparent, ...), following ``parent.json``."""
    chain = [Path(run_dir)]
    while (record := read_parent(chain[-1])) is not None:
        parent = Path(record["run"])
        if parent in chain:  # a directory retrained from itself: stop rather than loop
            break
        chain.append(parent)
    return chain


# ----- the trained model -----

def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, vocab_size: int, attention: str) -> None:
    """Write ``MODEL_ARGS`` and then ``MODEL`` (so a directory that holds ``MODEL`` also describes it)."""
    write_json(Path(run_dir) / MODEL_ARGS, {"vocab_size": int(vocab_size), "attention": str(attention)})
    torch_save(model.state_dict(), Path(run_dir) / MODEL)


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
    return json.loads((run_dir / MODEL_ARGS).read_text())


def load_weights(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trained ``state_dict`` in ``MODEL``, on the CPU (tensors only: ``weights_only``)."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / MODEL).is_file():
        raise UserError(f"{run_dir} is not a finished lmlab run (no {MODEL}): point at a run directory that "
                        f"`lmlab train` finished (it holds {DONE}).")
    return torch.load(run_dir / MODEL, map_location="cpu", weights_only=True)


def load_backbone(run_dir: str | os.PathLike, attention: str | None = None) -> torch.nn.Module:
    """The trained backbone of a finished run, on the CPU, in eval mode: built from ``CONFIG``'s ``model``
    node with the recorded ``MODEL_ARGS`` and loaded from ``MODEL``. Nothing else is built (no data, no
    objective, no optimiser), and the caller's random state is left as it was.

    ``attention`` builds it for another pattern than the one it was trained with (a distillation teacher
    reads the student's batches); a model that cannot honour it refuses with a ``UserError``."""
    run_dir = Path(run_dir).expanduser()
    args = model_args(run_dir)
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
        model.load_state_dict(load_weights(run_dir))
    except RuntimeError as e:
        if kind != trained:
            raise UserError(f"the weights of the run {run_dir} (trained for {trained!r} attention) do not fit its "
                            f"model built for {kind!r} attention: use a run trained with {kind!r} attention.") from e
        raise UserError(f"the weights in {run_dir / MODEL} do not fit the model that its {CONFIG} builds: retrain "
                        "the run with this version of lmlab.") from e
    return model.eval()


