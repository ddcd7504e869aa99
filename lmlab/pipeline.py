"""The whole story of a run, top to bottom: data -> selection -> fit -> evaluations -> results.

``train(cfg, run_dir)`` is one job of ``lmlab train``; ``evaluate(cfg)`` is ``lmlab eval``. The run
directory is deterministic (``lmlab.run_dir``): a job that already holds ``DONE`` is skipped, a job that
holds a checkpoint resumes from it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import lmlab
from lmlab.data.datamodule import DataModule, check_doc_mask
from lmlab.data.mixture import SOURCE_COLUMN
from lmlab.errors import UserError
from lmlab.io import atomic_dir, is_write_failure, remove_stale, write_failure, write_json
from lmlab.run_dir import (
    CHECKPOINTS,
    DONE,
    LAST_CHECKPOINT,
    MODEL,
    RESULTS,
    clear_failed,
    hold,
    is_done,
    load_weights,
    mark_done,
    mark_failed,
    read_config,
    read_results,
    resume_checkpoint,
    save_model,
    stored_status,
    write_command,
    write_config,
    write_results,
)
from lmlab.selection.base import Selection
from lmlab.training.callbacks import (
    EMA,
    EMA_MODEL,
    Diverged,
    DivergenceGuard,
    EvaluateEvery,
    LastValidation,
    LossWindow,
    SaveOnTerm,
    average_weights,
    checkpoint_weights,
    kept_checkpoint,
    kept_steps,
    start_branch,
)
from lmlab.training.init_from import hf_settings, start_from
from lmlab.training.module import AtomicCheckpointIO, LMModule


def versions() -> dict[str, str]:
    import datasets
    import hydra

    return {"lmlab": lmlab.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "hydra": hydra.__version__, "datasets": datasets.__version__}


def is_rank_zero() -> bool:
    """Rank 0 of a distributed run: Lightning's child processes set LOCAL_RANK/NODE_RANK, torchrun sets RANK,
    and SLURM's tasks (launcher=slurm with several tasks) carry SLURM_PROCID."""
    return all(int(os.environ.get(key, 0)) == 0 for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def quiet(cfg: DictConfig | None = None) -> None:
    """Keep the terminal to lmlab's own lines, the progress bar and the results table: no notice the user cannot
    act on (the CPU has no known peak FLOP/s, so no MFU; wandb's deprecation notice of the ``anonymous``
    setting that Lightning's ``WandbLogger`` always passes)."""
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r"no \w+ peak known for device 'cpu'")
    if "WandbLogger" in str(OmegaConf.select(cfg, "logger._target_", default="") if cfg is not None else ""):
        from wandb.errors import term  # imported by the logger anyway

        printed = getattr(term, "_printed_messages", None)  # wandb prints a message given repeat=False once
        if isinstance(printed, set):
            printed.add(f"{term.WARN_STRING} The anonymous setting has no effect and will be removed in a future "
                        "version.")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # LMModule counts each batch's tokens on the host (on_before_batch_transfer): intended, not a conflict
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")


def build(cfg: DictConfig):
    """Instantiate the recipe: objective, source, model (refusing impossible pairs before any data is
    generated) and evaluators (checked against the data before any compute), then load the data."""
    # an objective with a head of its own (``d_model: null`` in its YAML) gets the model's width, the way the
    # model gets the data's vocabulary size
    width = {"d_model": cfg.model.d_model} if "d_model" in cfg.objective and cfg.objective.d_model is None else {}
    objective = instantiate(cfg.objective, **width)
    source = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=source.vocab_size, attention=objective.attention)
    check_doc_mask(source.doc_mask, model, objective)
    evaluators = {}
    for name, ecfg in (cfg.get("eval") or {}).items():
        evaluator = instantiate(ecfg)
        reason = evaluator.skip_reason(source, objective)
        if reason:
            print(f"[lmlab] eval {name} skipped: {reason}")
        else:
            evaluator.check_model(model)
            evaluators[name] = evaluator
    splits = source.load(cfg.cache_dir)
    if len(splits["train"]) == 0:
        raise UserError(f"data {source.name} produced no training rows: add data or lower its filters.")
    objective.bind(source, splits)
    return objective, source, model, evaluators, splits


def train(cfg: DictConfig, run_dir: Path, command: str = "lmlab train") -> dict[str, Any]:
    """Pretrain the recipe in ``cfg``, run its evaluations, write ``results.json`` and ``DONE`` (the run
    directory's layout: ``lmlab.run_dir``). One process trains a job at a time (``run_dir.hold``); a run that
    diverges or is stopped by SIGTERM records that in ``results.json`` and raises ``RunStopped``."""
    if is_done(run_dir):
        print(f"[lmlab] {run_dir} already holds {DONE}: skipping (delete {DONE} to rerun).")
        return read_results(run_dir)
    with hold(run_dir) if is_rank_zero() else contextlib.nullcontext():
        try:
            return _train(cfg, run_dir, command)
        except Exception as e:  # every write is atomic and DONE comes last: nothing half-written is left
            if isinstance(e, UserError) or not is_write_failure(e):
                raise
            raise write_failure(run_dir, e) from e


class RunStopped(UserError):
    """The run stopped without finishing (diverged, or interrupted by a termination signal); its
    ``results.json`` says which, at which step."""


def _stopped(run_dir: Path, status: str, step: int, reason: str, cfg: DictConfig, command: str) -> RunStopped:
    write_results(run_dir, {"status": status, "step": step, "reason": reason, "run_dir": str(run_dir),
                            "command": command, "versions": versions(),
                            "config": OmegaConf.to_container(cfg, resolve=True)})
    return RunStopped(reason + ".")


def _retry_or_refuse(cfg: DictConfig, run_dir: Path) -> None:
    """A job that diverged stays diverged on a rerun (resuming would reach the same non-finite loss), unless
    ``retry=true``: then it starts again from scratch."""
    if stored_status(run_dir) != "diverged":
        return
    if not cfg.get("retry"):
        raise RunStopped(f"{read_results(run_dir).get('reason', 'the run diverged')}; rerun with retry=true to "
                         "train it again from the start.")
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    (run_dir / RESULTS).unlink(missing_ok=True)
    (run_dir / FIT).unlink(missing_ok=True)


def require_accelerator(cfg: DictConfig) -> None:
    """A trainer on a CUDA GPU needs one that PyTorch sees; FSDP runs on GPUs only."""
    if str(cfg.trainer.get("accelerator", "")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("this trainer runs on a CUDA GPU and PyTorch sees none here (torch.cuda.is_available() "
                        "is False): use trainer=cpu, or run where a GPU and a CUDA build of PyTorch are.")
    strategy = cfg.trainer.get("strategy")
    strategy = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in strategy.lower() and str(cfg.trainer.get("accelerator", "")) not in ("gpu", "cuda"):
        raise UserError(f"FSDP runs on CUDA GPUs only (Lightning's FSDPStrategy refuses "
                        f"accelerator={cfg.trainer.get('accelerator')!r} and PyTorch's FSDP needs an accelerator "
                        "device): on the CPU use trainer=ddp instead, or keep trainer.accelerator=gpu where a GPU is.")


def _train(cfg: DictConfig, run_dir: Path, command: str) -> dict[str, Any]:
    quiet(cfg)
    require_accelerator(cfg)
    cfg = hf_settings(cfg)  # init_from.hf: the checkpoint's model and tokenizer, recorded as this run's
    started = time.time()
    rank0 = is_rank_zero()
    if rank0:
        _retry_or_refuse(cfg, run_dir)
        for folder in (run_dir, run_dir / CHECKPOINTS):  # what a killed write left (this process holds the job)
            remove_stale(folder)
        clear_failed(run_dir)
        write_config(run_dir, cfg)
        write_command(run_dir, command)
        start_branch(cfg, run_dir)  # a cooldown branch: its parent's kept checkpoint becomes its last.ckpt
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    objective, source, model, evaluators, splits = build(cfg)
    selector = instantiate(cfg.selection)
    pool = splits["train"]
    selection = selector.run(pool, selection_target(splits, selector), cfg.cache_dir, source.cache_key(),
                             source=source, by=selection_by(source))
    splits["train"] = selection.dataset
    dm = DataModule(source, splits, batch_size=cfg.batch_size, seed=cfg.seed, doc_mask=source.doc_mask)
    module = LMModule(model, objective, instantiate(cfg.optim), instantiate(cfg.schedule), compile=cfg.compile,
                      sparsity=cfg.get("sparsity", 0.0))

    ckpt_dir = run_dir / CHECKPOINTS
    last = ckpt_dir / LAST_CHECKPOINT
    resume = resume_checkpoint(run_dir)
    if resume and rank0:
        print(f"[lmlab] resuming from {resume}")
    # init_from.run: the parent's weights, before fit (a resumed run takes its weights from the checkpoint)
    parent = start_from(cfg, run_dir, model, source, objective.attention, resuming=resume is not None, write=rank0)
    logger = instantiate(cfg.logger, save_dir=str(run_dir)) if (cfg.get("logger") or {}).get("_target_") else False
    # the resumable checkpoint belongs to the run directory; the other callbacks are the `callbacks` group's
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every)]
    guard = DivergenceGuard(every=cfg.trainer.get("log_every_n_steps") or 50, checkpoint_every=cfg.checkpoint_every)
    window, validation = LossWindow(), LastValidation()
    callbacks += [guard, window, validation, SaveOnTerm(last)]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += selector.training_callbacks(dm, selection)  # a curriculum's stage release
    along = None
    if cfg.get("eval_every"):  # evaluations along the way (step 0 included), kept in results.json's history
        along = EvaluateEvery(functools.partial(run_evaluations, evaluations_along(cfg, evaluators), dm=dm,
                                                run_dir=run_dir), cfg.eval_every)
        callbacks.append(along)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                          default_root_dir=str(run_dir))
    # the fit metrics recorded when an earlier attempt's fit ended (read before fit: every rank decides alike)
    recorded = read_fit(run_dir) if resume is not None else None
    if resume is None and rank0:
        (run_dir / FIT).unlink(missing_ok=True)
    fit_started = time.time()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    except Diverged as e:
        raise _stopped(run_dir, "diverged", e.step, f"training diverged at step {e.step} (loss {e.loss}): lower "
                       f"optim.lr (it is {cfg.optim.get('lr')}) or lengthen the warmup", cfg, command) from None
    except SIGTERMException:
        step = trainer.global_step
        raise _stopped(run_dir, "interrupted", step, f"interrupted by SIGTERM at step {step}, checkpoint saved: rerun "
                       "the same command to resume", cfg, command) from None
    fit = recorded["metrics"] if recorded is not None and recorded["step"] == trainer.global_step else None
    if fit is None:
        fit = {"train/loss": window.mean(), "train/loss_window": window.steps(), "train/steps": trainer.global_step}
        if validates(trainer, splits):  # the validation loss at the last step (the periodic one may be older)
            if validation.step != trainer.global_step:
                trainer.validate(module, datamodule=dm, verbose=False)
                validation.loss = float(trainer.callback_metrics.get("val/loss", float("nan")))
            fit["val/loss"] = validation.loss
        if trainer.is_global_zero:
            write_json(run_dir / FIT, {"step": trainer.global_step, "metrics": fit})
    fit_seconds = time.time() - fit_started
    if not trainer.is_global_zero:
        return {}
    unfit = [f"{k}={fit.get(k)}" for k in ("train/loss", *(["val/loss"] if validates(trainer, splits) else []))
             if not isinstance(fit.get(k), (int, float)) or not math.isfinite(fit[k])]
    if unfit:
        reason = (f"the run ended without finite fit metrics ({', '.join(unfit)}): delete {run_dir / CHECKPOINTS} "
                  f"and {run_dir / FIT}, then rerun the same command to train it again.")
        mark_failed(run_dir, reason)
        raise UserError(reason)

    model.eval()
    save_model(run_dir, model, vocab_size=source.vocab_size, attention=objective.attention)
    metrics: dict[str, float] = {
        **fit,
        "train/rows": len(splits["train"]),
        "model/params": model.num_parameters(),
        **selection_metrics(selection),
    }
    eval_started = time.time()
    metrics.update(run_evaluations(evaluators, module, dm, run_dir))
    metrics.update({f"objective/{k}": float(v) for k, v in objective.held_out(model).items()})
    if any(isinstance(c, EMA) for c in callbacks):  # the EMA's weights, as written beside model.pt
        averaged = ema_weights(run_dir)
        if averaged is None:  # fit ended without a step the EMA saw (a checkpoint at max_steps without its state)
            raise UserError(f"the run ended without its {EMA_MODEL}: delete {run_dir / CHECKPOINTS} and "
                            f"{run_dir / FIT}, then rerun the same command to train it again.")
        metrics.update(_evaluate_weights(averaged, EMA_PREFIX, run_dir / EMA_MODEL, evaluators, module, dm, run_dir))
    history = along.history if along is not None else []
    if along is not None:
        history = [h for h in history if h["step"] != trainer.global_step]
        history.append({"step": trainer.global_step, **{k: v for k, v in metrics.items() if "/" in k}})
    results = {
        "status": "done",
        "metrics": metrics,
        "history": history,
        "timings": {"fit_s": fit_seconds, "eval_s": time.time() - eval_started, "total_s": time.time() - started},
        "run_dir": str(run_dir),
        "command": command,
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if parent is not None:
        results["init_from"] = parent
    write_results(run_dir, results)
    mark_done(run_dir)
    return results


FIT = "fit.json"  # in the run directory: the fit metrics, written when fit ends (``read_fit``)


def validates(trainer: L.Trainer, splits) -> bool:
    """Whether the run has a validation loss: a validation split with rows, and validation batches allowed."""
    return len(splits.get("validation") or []) > 0 and bool(trainer.limit_val_batches)


def read_fit(run_dir: Path) -> dict[str, Any] | None:
    """``{"step": s, "metrics": {...}}``: the fit metrics recorded when fit ended at step ``s`` (``train/loss``
    over its window, ``val/loss`` at that step, ``train/steps``), so that a run stopped after its last
    checkpoint (while saving the model, evaluating or writing its results) completes its evaluations with the
    numbers of its fit. None when there is no record (or a damaged one: the metrics are then computed again
    from the checkpoint)."""
    import json

    try:
        record = json.loads((run_dir / FIT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or not isinstance(
            record.get("metrics"), dict):
        return None
    return record


def selection_target(splits, selector):
    """The selection stage's target set: the data's own ``target`` split where the source has one (drawn apart
    from the evaluation splits, see ``lmlab.data.source``), else the validation split, with a notice when the
    selector uses the data at all (the validation split is also what ``eval=perplexity`` scores)."""
    from lmlab.data.source import TARGET_SPLIT

    if TARGET_SPLIT in splits:
        return splits[TARGET_SPLIT]
    if not selector.passes_through and is_rank_zero():
        print("[lmlab] the data has no target split: selectors that need a target set use the validation split.")
    return splits["validation"]


def selection_by(source) -> str | None:
    """The pool column the selection runs within group by group: a mixture's ``source`` column with
    ``data.select_per_source=true``, else none (``Selector.run``'s ``by``)."""
    return SOURCE_COLUMN if getattr(source, "select_per_source", False) else None


def selection_metrics(selection: Selection) -> dict[str, float]:
    """``selection/*``: the selection stage's sizes and precision (``Selection.stats``) and the numbers of
    its report."""
    report = {k: v for k, v in (selection.report or {}).items() if isinstance(v, (int, float))}
    return {f"selection/{k}": float(v) for k, v in {**report, **selection.stats}.items()}


def select(cfg: DictConfig, run_dir: Path, command: str = "lmlab select") -> dict[str, Any]:
    """``lmlab select selection=<name> data=<...>``: the selection stage alone. Writes ``selected/`` (the
    selected dataset, ``save_to_disk``; over shards, ``indices.npy``: the kept rows' index), ``scores.npy``
    (one score per pool row, where the method scores),
    ``selection.json`` (sizes, precision, report) and ``DONE`` into the run directory, all at the end."""
    import numpy as np

    from lmlab.selection.base import SCORES, STATS, save_dataset

    quiet()
    if is_done(run_dir):
        print(f"[lmlab] {run_dir} already holds {DONE}: skipping (delete {DONE} to rerun).")
        return read_results(run_dir)
    source = instantiate(cfg.data)
    selector = instantiate(cfg.selection)
    splits = source.load(cfg.cache_dir)
    if len(splits["train"]) == 0:
        raise UserError(f"data {source.name} produced no training rows: add data or lower its filters.")
    selection = selector.run(splits["train"], selection_target(splits, selector), cfg.cache_dir, source.cache_key(),
                             source=source, by=selection_by(source))
    results = {"status": "done", "metrics": selection_metrics(selection), "report": selection.report,
               "run_dir": str(run_dir), "command": command,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    with atomic_dir(run_dir, merge=True) as tmp:
        save_dataset(selection.dataset, tmp)
        if selection.scores is not None:
            np.save(tmp / SCORES, selection.scores)
        write_json(tmp / STATS, results)
        write_config(tmp, cfg)
    mark_done(run_dir)
    return results


def evaluations_along(cfg: DictConfig, evaluators: dict) -> dict:
    """The evaluators that run every ``eval_every`` steps: those named in ``eval_along`` (null: all)."""
    names = cfg.get("eval_along")
    if names is None:
        return evaluators
    unknown = [n for n in names if n not in evaluators]
    if unknown:
        raise UserError(f"eval_along names {', '.join(map(str, unknown))}, which is not among this run's "
                        f"evaluations ({', '.join(evaluators) or 'none'}): name evaluations of the eval group.")
    return {n: evaluators[n] for n in names}


def run_evaluations(evaluators: dict, module: LMModule, dm: DataModule, run_dir: Path) -> dict[str, float]:
    """Each evaluator, in the order of ``cfg.eval``, on the in-memory model."""
    metrics: dict[str, float] = {}
    module.model.eval()
    for name, evaluator in evaluators.items():
        print(f"[lmlab] eval {name}")
        metrics.update({k: float(v) for k, v in evaluator(module, dm, run_dir).items()})
    return metrics


def rebuild(run_dir: Path, eval_cfg: DictConfig | None = None):
    """A finished run, rebuilt whole from its directory for ``lmlab eval``: ``(cfg, module, datamodule,
    evaluators)``. The data comes from the cache (rebuilt if it is gone); ``eval_cfg`` replaces the run's
    evaluations. (Another run's model alone, as a teacher or a reference, is ``lmlab.run_dir.load_backbone``.)"""
    weights = load_weights(run_dir)  # a UserError where the run is not finished
    cfg = read_config(run_dir)
    if eval_cfg is not None:
        cfg.eval = eval_cfg
    objective, source, model, evaluators, splits = build(cfg)
    model.load_state_dict(weights)
    model.eval()
    dm = DataModule(source, splits, batch_size=cfg.batch_size, seed=cfg.seed, doc_mask=source.doc_mask)
    module = LMModule(model, objective, instantiate(cfg.optim), instantiate(cfg.schedule))
    return cfg, module, dm, evaluators


def evaluate(cfg: DictConfig, command: str = "lmlab eval") -> dict[str, Any]:
    """``lmlab eval run=<dir> eval=...``: evaluations on a finished run, without retraining. The run's own
    records are read first (a damaged ``results.json`` or ``model.pt`` is refused before any evaluation runs);
    the result is written as the run's next evaluation record (``evals/<n>.json``: the evaluation settings, the
    command, the time and the metrics), beside ``results.json``, which it never changes.

    The trained weights are evaluated, and beside them the run's weight averages: its EMA (``model_ema.pt``,
    metrics under ``ema/``) and, with ``average_last=k``, the mean of the weights of its last k points (kept
    checkpoints and the final model, under ``avg<k>/``). With ``checkpoints`` (``all``, or a list of kept
    steps), each chosen step is evaluated instead (``evaluate_trajectory``)."""
    from lmlab.run_dir import write_evaluation

    quiet()
    run_dir = Path(cfg.run).expanduser()
    if (run_dir / RESULTS).exists():
        read_results(run_dir)
    average = averaged_count(cfg.get("average_last"))
    points = steps = None
    if cfg.get("checkpoints") is not None or average:  # refused before any data is generated
        points = trajectory_points(run_dir)
        steps = chosen_steps(run_dir, points, cfg.get("checkpoints"))
        if average > len(points):
            raise UserError(f"average_last={average} asks for more weights than the run has ({len(points)}: the "
                            f"kept steps {', '.join(map(str, points))}): lower average_last.")
    run_cfg, module, dm, evaluators = rebuild(run_dir, cfg.eval)
    started = time.time()
    record: dict[str, Any] = {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "command": command}
    if steps is None:
        metrics = run_evaluations(evaluators, module, dm, run_dir)
        ema = ema_weights(run_dir)
        if ema is not None:
            metrics.update(_evaluate_weights(ema, EMA_PREFIX, run_dir / EMA_MODEL, evaluators, module, dm, run_dir))
        if average:
            window = list(points)[-average:]
            variant = average_weights([_point_weights(run_dir, points, s)[0] for s in window])
            metrics.update(_evaluate_weights(variant, f"avg{average}/", run_dir, evaluators, module, dm, run_dir))
            record["average_last"] = {"k": average, "steps": window}
    else:
        rows = evaluate_trajectory(run_dir, run_cfg, points, steps, average, evaluators, module, dm)
        final = max(points)
        metrics = next(({k: v for k, v in r.items() if "/" in k} for r in rows if r["step"] == final), {})
        record.update(checkpoints=steps, average_last=average or None, trajectory=rows)
        table = write_trajectory(run_dir, rows)
        print(f"[lmlab] trajectory of {len(rows)} steps: {table}")
    record.update(time=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  seconds=time.time() - started, metrics=metrics, versions=versions())
    path = write_evaluation(run_dir, record)
    print(f"[lmlab] evaluation record: {path}")
    return {"metrics": metrics, "record": str(path)}


# ----- evaluations along a trajectory (kept checkpoints) and of weight averages -----

EMA_PREFIX = "ema/"  # the metrics of the EMA's weights (callbacks=ema)
TRAJECTORY = "trajectory"  # trajectory.csv and trajectory.json in the run directory: the last per-step evaluation


def averaged_count(value: Any) -> int:
    """``average_last``: 0 (none) or the positive number of last points whose weights are averaged."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"average_last={value!r} must be a positive number of last kept checkpoints (e.g. 3), or "
                        "null.")
    return value


def trajectory_points(run_dir: Path) -> dict[int, Path]:
    """``{step: weights file}`` of a finished run, by step: each kept checkpoint (``callbacks=trajectory``:
    ``checkpoints/step-<n>.ckpt``) and the final model (``model.pt``, at the run's ``train/steps``), which stands
    for the final step even where a checkpoint of that step was kept too."""
    final = read_results(run_dir).get("metrics", {}).get("train/steps")
    if isinstance(final, bool) or not isinstance(final, (int, float)):
        raise UserError(f"{run_dir / RESULTS} records no train/steps, so the step of its final model is unknown: "
                        "evaluate a run that `lmlab train` finished.")
    points = {s: kept_checkpoint(run_dir, s) for s in kept_steps(run_dir)}
    points[int(final)] = run_dir / MODEL
    return dict(sorted(points.items()))


def chosen_steps(run_dir: Path, points: dict[int, Path], checkpoints: Any) -> list[int] | None:
    """The steps ``checkpoints`` chooses among ``points``: None (the final model alone), ``all`` (every kept
    step and the final one), or a list of steps, each kept or the final one."""
    if checkpoints is None:
        return None
    if OmegaConf.is_config(checkpoints):
        checkpoints = OmegaConf.to_container(checkpoints, resolve=True)
    kept = ", ".join(map(str, points))
    if checkpoints == "all":
        if len(points) == 1:
            raise UserError(f"the run {run_dir} kept no checkpoints along its training, only its final model (step "
                            f"{kept}): train it with callbacks=trajectory, or leave out checkpoints=.")
        return list(points)
    steps = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
        raise UserError(f"checkpoints={checkpoints!r} must be all or a list of steps the run kept ({kept}).")
    missing = [s for s in steps if s not in points]
    if missing:
        raise UserError(f"the run {run_dir} kept no checkpoint of step {', '.join(map(str, missing))}: choose among "
                        f"its kept steps {kept} (or checkpoints=all).")
    return sorted(set(steps))


def _point_weights(run_dir: Path, points: dict[int, Path], step: int):
    """``(weights, EMA weights or None)`` at one of ``points``: the final model's from ``model.pt`` (and
    ``model_ema.pt``), a kept step's from its checkpoint (read as tensors only; a damaged one is refused)."""
    from lmlab.io import zip_intact

    path = points[step]
    if path.name == MODEL:
        return load_weights(run_dir), ema_weights(run_dir)
    if not zip_intact(path):
        raise UserError(f"{path} is damaged: leave step {step} out of checkpoints= (or rerun the training to keep it "
                        "again).")
    return checkpoint_weights(path)


def ema_weights(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The EMA's weights that training wrote beside ``model.pt`` (``callbacks=ema``), tensors only; None for a run
    without them."""
    from lmlab.io import zip_intact

    path = run_dir / EMA_MODEL
    if not path.exists():
        return None
    if not zip_intact(path):
        raise UserError(f"{path} is damaged: delete it and {run_dir / DONE}, then rerun the run's `lmlab train` "
                        "command, which resumes from its last checkpoint and writes it again.")
    return torch.load(path, map_location="cpu", weights_only=True)


def _evaluate_weights(weights: dict, prefix: str, source: Path, evaluators: dict, module: LMModule,
                      dm: DataModule, run_dir: Path) -> dict[str, float]:
    """The evaluations of ``weights`` (loaded into the module's model), their keys under ``prefix``."""
    try:
        module.model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"the weights in {source} do not fit the model of the run {run_dir}: evaluate a run "
                        "trained with this version of lmlab.") from e
    return {f"{prefix}{k}": v for k, v in run_evaluations(evaluators, module, dm, run_dir).items()}


def evaluate_trajectory(run_dir: Path, cfg: DictConfig, points: dict[int, Path], steps: list[int], average: int,
                        evaluators: dict, module: LMModule, dm: DataModule) -> list[dict[str, Any]]:
    """One row per chosen step: ``step``, ``tokens`` (step x batch size x row tokens, as the scaling fits count
    D; None where the data records no row length), the evaluations of the weights at that step, of its EMA where
    the run kept one (``ema/``), and with ``average > 0`` of the mean of the weights of the last ``average``
    points up to that step (``avg<k>/``, on the rows that have that many points before them)."""
    from lmlab.report.scaling import row_tokens

    try:
        per_step = int(cfg.batch_size) * row_tokens(cfg.data)
    except UserError:
        per_step = None
        print("[lmlab] the run's data records no row length: the trajectory's tokens are left empty.")
    order = list(points)
    loaded = functools.lru_cache(maxsize=average + 1)(functools.partial(_point_weights, run_dir, points))
    rows = []
    for step in steps:
        print(f"[lmlab] step {step}")
        weights, ema = loaded(step)
        row: dict[str, Any] = {"step": step, "tokens": None if per_step is None else step * per_step}
        row.update(_evaluate_weights(weights, "", points[step], evaluators, module, dm, run_dir))
        if ema is not None:
            source = run_dir / EMA_MODEL if points[step].name == MODEL else points[step]
            row.update(_evaluate_weights(ema, EMA_PREFIX, source, evaluators, module, dm, run_dir))
        at = order.index(step)
        if average and at + 1 >= average:
            window = [loaded(s)[0] for s in order[at + 1 - average: at + 1]]
            row.update(_evaluate_weights(average_weights(window), f"avg{average}/", points[step], evaluators,
                                         module, dm, run_dir))
        rows.append(row)
    return rows


def write_trajectory(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """``trajectory.csv`` (one row per step: step, tokens, every metric; empty where a row lacks one) and
    ``trajectory.json`` (the same rows), each written atomically. Returns the CSV's path."""
    import csv
    import io

    from lmlab.io import write_text

    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    write_json(run_dir / f"{TRAJECTORY}.json", {"rows": rows})
    write_text(run_dir / f"{TRAJECTORY}.csv", text.getvalue())
    return run_dir / f"{TRAJECTORY}.csv"
