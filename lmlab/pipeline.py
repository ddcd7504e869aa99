"""The whole story of a run, top to bottom: data -> selection -> fit -> evaluations -> results.

``train(cfg, run_dir)`` is one job of ``lmlab train``; ``evaluate(cfg)`` is ``lmlab eval``. The run
directory is deterministic (see ``lmlab.cli``): a job that already holds ``DONE`` is skipped, a job that
holds a checkpoint resumes from it.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

import lmlab
from lmlab.data.datamodule import DataModule
from lmlab.errors import UserError
from lmlab.io import torch_save, write_json, write_text
from lmlab.training.callbacks import EvaluateEvery
from lmlab.training.module import AtomicCheckpointIO, LMModule

DONE, FAILED, RESULTS, MODEL = "DONE", "FAILED", "results.json", "model.pt"


def versions() -> dict[str, str]:
    import datasets
    import hydra

    return {"lmlab": lmlab.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "hydra": hydra.__version__, "datasets": datasets.__version__}


def is_rank_zero() -> bool:
    """Rank 0 of a distributed run: Lightning's child processes set LOCAL_RANK/NODE_RANK, torchrun sets RANK,
    and SLURM's tasks (launcher=slurm with several tasks) carry SLURM_PROCID."""
    return all(int(os.environ.get(key, 0)) == 0 for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def quiet() -> None:
    """Keep the terminal to lmlab's own lines, the progress bar and the results table."""
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # LMModule counts each batch's tokens on the host (on_before_batch_transfer): intended, not a conflict
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")


def build(cfg: DictConfig):
    """Instantiate the recipe: objective, source, model (refusing impossible pairs before any data is
    generated) and evaluators (checked against the data before any compute), then load the data."""
    objective = instantiate(cfg.objective)
    source = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=source.vocab_size, attention=objective.attention)
    evaluators = {}
    for name, ecfg in (cfg.get("eval") or {}).items():
        evaluator = instantiate(ecfg)
        reason = evaluator.skip_reason(source)
        if reason:
            print(f"[lmlab] eval {name} skipped: {reason}")
        else:
            evaluators[name] = evaluator
    splits = source.load(cfg.cache_dir)
    if len(splits["train"]) == 0:
        raise UserError(f"data {source.name} produced no training rows: add data or lower its filters.")
    objective.bind(source, splits)
    return objective, source, model, evaluators, splits


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Pretrain the recipe in ``cfg``, run its evaluations, write ``results.json`` and ``DONE``."""
    if (run_dir / DONE).exists():
        print(f"[lmlab] {run_dir} already holds DONE: skipping (delete DONE to rerun).")
        return _read_results(run_dir)
    quiet()
    if str(cfg.trainer.get("accelerator", "")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("this trainer runs on a CUDA GPU and PyTorch sees none here (torch.cuda.is_available() "
                        "is False): use trainer=cpu, or run where a GPU and a CUDA build of PyTorch are.")
    started = time.time()
    rank0 = is_rank_zero()
    if rank0:
        (run_dir / FAILED).unlink(missing_ok=True)
        write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_text(run_dir / "command.txt", " ".join(["lmlab", *sys.argv[1:]]) + "\n")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    objective, source, model, evaluators, splits = build(cfg)
    selector = instantiate(cfg.selection)
    pool = splits["train"]
    splits["train"] = selector.run(pool, selection_target(splits, selector), cfg.cache_dir, source.cache_key(),
                                   source=source)
    dm = DataModule(source, splits, batch_size=cfg.batch_size, seed=cfg.seed)
    module = LMModule(model, objective, instantiate(cfg.optim), instantiate(cfg.schedule),
                      max_steps=cfg.max_steps, compile=cfg.compile)

    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = last if last.exists() else None
    if resume and rank0:
        print(f"[lmlab] resuming from {resume}")
    logger = instantiate(cfg.logger, save_dir=str(run_dir)) if cfg.logger.get("_target_") else False
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.checkpoint_every),
        RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=50),
    ]
    callbacks += selector.training_callbacks(dm)  # a curriculum's stage release
    along = EvaluateEvery(evaluators, dm, run_dir, cfg.eval_every) if cfg.get("eval_every") else None
    if along is not None:
        callbacks.append(along)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                          default_root_dir=str(run_dir))
    fit_started = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    fit_seconds = time.time() - fit_started
    if not trainer.is_global_zero:
        return {}

    model.eval()
    torch_save(model.state_dict(), run_dir / MODEL)
    metrics: dict[str, float] = {
        "train/loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "train/steps": trainer.global_step,
        "train/rows": len(splits["train"]),
        "model/params": model.num_parameters(),
        **selection_metrics(selector),
    }
    if "val/loss" in trainer.callback_metrics:
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    eval_started = time.time()
    metrics.update(run_evaluations(evaluators, module, dm, run_dir))
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
        "command": " ".join(["lmlab", *sys.argv[1:]]),
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(run_dir / RESULTS, results)
    write_text(run_dir / DONE, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return results


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


def selection_metrics(selector) -> dict[str, float]:
    """``selection/*``: the selection stage's sizes and precision (``Selector.stats``) and the numbers of
    its report."""
    report = {k: v for k, v in (selector.report or {}).items() if isinstance(v, (int, float))}
    return {f"selection/{k}": float(v) for k, v in {**report, **selector.stats}.items()}


def select(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``lmlab select selection=<name> data=<...>``: the selection stage alone. Writes ``selected/`` (the
    selected dataset, ``save_to_disk``), ``scores.npy`` (one score per pool row, where the method scores),
    ``selection.json`` (sizes, precision, report) and ``DONE`` into the run directory, all at the end."""
    import shutil
    import tempfile

    quiet()
    if (run_dir / DONE).exists():
        print(f"[lmlab] {run_dir} already holds DONE: skipping (delete DONE to rerun).")
        return _read_results(run_dir)
    source = instantiate(cfg.data)
    selector = instantiate(cfg.selection)
    splits = source.load(cfg.cache_dir)
    if len(splits["train"]) == 0:
        raise UserError(f"data {source.name} produced no training rows: add data or lower its filters.")
    selected = selector.run(splits["train"], selection_target(splits, selector), cfg.cache_dir, source.cache_key(),
                            source=source)
    results = {"status": "done", "metrics": selection_metrics(selector), "report": selector.report,
               "run_dir": str(run_dir), "command": " ".join(["lmlab", *sys.argv[1:]]),
               "config": OmegaConf.to_container(cfg, resolve=True)}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=run_dir))
    try:
        selected.save_to_disk(str(tmp / "selected"))
        cached = selector.cache_path
        if cached is not None and (cached / "scores.npy").exists():
            shutil.copyfile(cached / "scores.npy", tmp / "scores.npy")
        write_json(tmp / "selection.json", results)
        write_text(tmp / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        for item in tmp.iterdir():
            if (run_dir / item.name).is_dir():
                shutil.rmtree(run_dir / item.name)
            os.replace(item, run_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text(run_dir / DONE, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return results


def run_evaluations(evaluators: dict, module: LMModule, dm: DataModule, run_dir: Path) -> dict[str, float]:
    """Each evaluator, in the order of ``cfg.eval``, on the in-memory model."""
    metrics: dict[str, float] = {}
    module.model.eval()
    for name, evaluator in evaluators.items():
        print(f"[lmlab] eval {name}")
        metrics.update({k: float(v) for k, v in evaluator(module, dm, run_dir).items()})
    return metrics


def load_run(run_dir: str | Path, eval_cfg: DictConfig | None = None):
    """A finished run, rebuilt in memory from its directory: ``(cfg, module, datamodule, evaluators)``.
    The data comes from the cache (rebuilt if it is gone); ``eval_cfg`` replaces the run's evaluations.
    Objectives that need another run (a teacher, a reference model) load it with this."""
    run_dir = Path(run_dir)
    resolved, weights = run_dir / "config_resolved.yaml", run_dir / MODEL
    if not resolved.exists() or not weights.exists():
        raise UserError(f"{run_dir} is not a finished lmlab run (no config_resolved.yaml or {MODEL}): "
                        "point at a run directory that holds DONE.")
    cfg = OmegaConf.load(resolved)
    if eval_cfg is not None:
        cfg.eval = eval_cfg
    objective, source, model, evaluators, splits = build(cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    dm = DataModule(source, splits, batch_size=cfg.batch_size, seed=cfg.seed)
    module = LMModule(model, objective, instantiate(cfg.optim), instantiate(cfg.schedule), max_steps=cfg.max_steps)
    return cfg, module, dm, evaluators


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``lmlab eval run=<dir> eval=...``: evaluations on a finished run, without retraining."""
    quiet()
    run_dir = Path(cfg.run)
    _, module, dm, evaluators = load_run(run_dir, cfg.eval)
    metrics = run_evaluations(evaluators, module, dm, run_dir)
    results = _read_results(run_dir) if (run_dir / RESULTS).exists() else {"metrics": {}}
    results["metrics"].update(metrics)
    write_json(run_dir / RESULTS, results)
    return {"metrics": metrics}


def _read_results(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / RESULTS).read_text())

