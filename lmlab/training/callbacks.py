"""Callbacks of the training loop: the progress bar, the divergence guard, the training loss over the last
steps, evaluations along the way, the kept checkpoints of a trajectory, and weight averages.

Weight averages are evaluated beside the trained weights: an exponential moving average of the weights during
training (``EMA``; Polyak and Juditsky 1992 averaging in its exponential form, as studied for language-model
pretraining by Sanyal et al. 2023, "Early Weight Averaging meets High Learning Rates for LLM Pre-training"), and
at evaluation time the uniform average of the last k kept checkpoints (``average_weights``: LAWA, Kaddour 2022,
"Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest Weight Averaging")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import lightning as L
import torch
from annotated_types import Ge, Lt
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf


def progress_bar(refresh_rate: int = 50) -> L.Callback:
    """A rich progress bar on a terminal; a plain one that prints every ``refresh_rate`` steps otherwise (logs)."""
    return RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=refresh_rate)


class Diverged(Exception):
    """Training produced a non-finite loss at ``step``; raised from the training loop by ``DivergenceGuard``."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training diverged at step {step} (loss {loss})")
        self.step, self.loss = step, loss


class DivergenceGuard(L.Callback):
    """Stops training at the first non-finite training loss it sees, by raising ``Diverged``.

    The loss is read back from the device only on the steps where it matters (every ``every`` steps and the
    last step), not on every step. On the steps a checkpoint is written the weights are checked too (one
    reduction): Lightning runs checkpoint callbacks after the others, so the guard stops the run before a
    checkpoint with non-finite weights is written, and the last checkpoint on disk is a finite one."""

    def __init__(self, every: int, checkpoint_every: int | None = None) -> None:
        self.every, self.checkpoint_every = max(1, every), checkpoint_every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        checkpoint = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
        if not (checkpoint or step % self.every == 0 or step >= (trainer.max_steps or 0)):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # none: a skipped update
        finite = [] if loss is None else [torch.isfinite(loss.detach()).all()]
        if checkpoint:
            finite += [torch.isfinite(p.detach()).all() for p in pl_module.parameters()]
        if finite and not bool(torch.stack(finite).all()):
            raise Diverged(step, float("nan") if loss is None else float(loss.detach().float().mean()))


LOSS_WINDOW = 50  # steps: ``train/loss`` is the mean batch loss of the last LOSS_WINDOW training steps


class LossWindow(L.Callback):
    """The mean of the batch losses of the last ``window`` training steps (``train/loss`` of the results; one
    batch's loss is noisy). Each step's loss is copied into a ring on the loss's device (no host sync per step);
    the ring is part of the checkpoint, so a resumed run reports the mean an uninterrupted one does."""

    def __init__(self, window: int = LOSS_WINDOW) -> None:
        self.window = max(1, int(window))
        self.losses = torch.full((self.window,), float("nan"))
        self.count = 0  # steps seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped update (``callbacks.stats.skip``) is left out of the window
            return
        loss = loss.detach().float().mean()
        if self.losses.device != loss.device:
            self.losses = self.losses.to(loss.device)
        self.losses[self.count % self.window] = loss
        self.count += 1

    def steps(self) -> int:
        """How many steps the mean covers: ``window``, or every step of a shorter run."""
        return min(self.count, self.window)

    def mean(self) -> float:
        """The mean loss of the last ``steps()`` steps (NaN before the first step)."""
        return float(self.losses[: self.steps()].double().mean()) if self.count else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.detach().cpu(), "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        losses = state_dict.get("losses")
        if losses is not None and len(losses) == self.window:
            self.losses, self.count = losses.clone(), int(state_dict.get("count", 0))


class LastValidation(L.Callback):
    """The step and ``val/loss`` of the last validation during fit, so that a validation at the last step is
    not run twice."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss = float("nan")

    def on_validation_end(self, trainer, pl_module) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and "val/loss" in trainer.callback_metrics:
            self.step, self.loss = trainer.global_step, float(trainer.callback_metrics["val/loss"])


class SaveOnTerm(L.Callback):
    """On a termination signal (SIGTERM: a preempted or cancelled job; Lightning finishes the current step and
    raises ``SIGTERMException``), save the resumable checkpoint at the current step to ``path``, so that
    rerunning the job resumes where it stopped."""

    def __init__(self, path) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


class EvaluateEvery(L.Callback):
    """Runs the evaluations every ``every`` steps (on rank 0), logs their metrics and keeps a history
    (``[{"step": s, metric: value, ...}]``) that survives a resume through the checkpoint.

    ``evaluate(module) -> {metric: value}`` runs the configured evaluators on the module's model."""

    def __init__(self, evaluate: Callable[[Any], dict[str, float]], every: int) -> None:
        self.run, self.every = evaluate, every
        self.history: list[dict[str, Any]] = []

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or any(h["step"] == step for h in self.history):
            return
        was_training = pl_module.model.training
        metrics = self.run(pl_module)
        pl_module.model.train(was_training)
        self.history.append({"step": step, **metrics})
        if trainer.logger:
            trainer.logger.log_metrics({f"along/{k}": v for k, v in metrics.items()}, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every == 0:  # step 0: the starting point (a parent's weights, say)
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


KEPT = "step-{step}.ckpt"  # in the run's checkpoints folder: the kept checkpoint of a step


def kept_checkpoint(run_dir: str | Path, step: int) -> Path:
    from lmlab.run_dir import CHECKPOINTS

    return Path(run_dir) / CHECKPOINTS / KEPT.format(step=step)


def planned_steps(max_steps: int, steps: list[int] | None = None, log: int | None = None,
                  every: int | None = None) -> list[int]:
    """The steps whose checkpoints a run keeps: the listed ``steps`` (those within the run), ``log`` log-spaced
    steps from 1 to ``max_steps`` (round(max_steps^(i / (log - 1))), i = 0 .. log - 1, duplicates merged, as
    Pythia's early log-spaced checkpoints), and every ``every``-th step; sorted, each once."""
    planned = {int(s) for s in (steps or []) if 0 <= int(s) <= max_steps}
    if log:
        planned |= {1, max_steps} if log > 1 else {max_steps}
        if log > 1:
            planned |= {int(round(max_steps ** (i / (log - 1)))) for i in range(log)}
    if every:
        planned |= set(range(every, max_steps + 1, every))
    return sorted(planned)


class KeepCheckpoints(L.Callback):
    """Keeps the full resumable checkpoint of each planned step (``planned_steps``) as
    ``<run dir>/checkpoints/step-<n>.ckpt``, for evaluations along a trajectory and cooldown branches.

    The plan is a function of the settings and ``max_steps`` only, so a run killed and resumed keeps exactly the
    planned steps: a step replayed after a resume whose checkpoint is already on disk, whole, is not written again
    (training is deterministic in the step, so it would be the same state), and a checkpoint cut short by a kill
    is written again when its step is replayed. Step 0 (the initial weights) is kept when listed."""

    def __init__(self, steps: list[int] | None = None, log: int | None = None, every: int | None = None) -> None:
        from lmlab.errors import UserError

        for name, value in (("log", log), ("every", every)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UserError(f"callbacks.trajectory.{name}={value!r} must be a positive integer: fix it or set "
                                "it to null.")
        if not (steps or log or every):
            raise UserError("the kept checkpoints need a plan: set steps (a list), log (how many log-spaced steps) "
                            "or every (a step interval).")
        self.listed, self.log_count, self.interval = list(steps or []), log, every
        self.planned: set[int] = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.planned = set(planned_steps(int(trainer.max_steps), self.listed, self.log_count, self.interval))

    def _keep(self, trainer) -> None:
        step = trainer.global_step
        if step not in self.planned:
            return
        from lmlab.io import zip_intact

        path = kept_checkpoint(trainer.default_root_dir, step)
        # decided on rank 0 for every rank: saving is collective
        if not trainer.strategy.broadcast(not (path.exists() and zip_intact(path))):
            return
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # a damaged one: replaced, not kept as the "previous" of the new one
        trainer.save_checkpoint(path)

    def on_train_start(self, trainer, pl_module) -> None:
        self._keep(trainer)  # step 0, or a resumed step already kept (then nothing is written)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._keep(trainer)


def kept_steps(run_dir: str | Path) -> list[int]:
    """The steps of the checkpoints a run kept (``checkpoints/step-<n>.ckpt``), sorted."""
    folder = kept_checkpoint(run_dir, 0).parent
    names = (p.name for p in folder.glob(KEPT.format(step="*"))) if folder.is_dir() else ()
    return sorted(int(n[len("step-"):-len(".ckpt")]) for n in names if n[len("step-"):-len(".ckpt")].isdigit())


def start_branch(cfg, run_dir: str | Path) -> Path | None:
    """A cooldown branch (``branch.run``, ``branch.step``): the run starts from the parent's kept checkpoint of
    that step (``callbacks=trajectory`` kept it), weights, optimiser state, step and data order included, written
    as this run's ``last.ckpt`` so that training resumes from it with this run's ``max_steps`` and schedule
    (``schedule=wsd`` with ``decay_steps``: only the decay). Returns the parent's checkpoint, or None when the run
    is no branch or already holds its own checkpoint (an interrupted branch resumes from that)."""
    from lmlab.errors import UserError
    from lmlab.io import torch_save, zip_intact
    from lmlab.run_dir import CHECKPOINTS, CONFIG, LAST_CHECKPOINT, previous_checkpoint, read_config

    node = cfg.get("branch")
    if node is None or not node.get("run"):
        return None
    last = Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT
    if last.exists() or previous_checkpoint(last).exists():
        return None
    parent, step = Path(str(node.run)).expanduser(), node.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"branch.step={step!r} must be the step of one of the parent's kept checkpoints: set it.")
    if parent.resolve() == Path(run_dir).resolve():
        raise UserError(f"branch.run={parent} is this run's own directory: point it at the parent run.")
    source = kept_checkpoint(parent, step)
    if not source.exists():
        kept = kept_steps(parent)
        raise UserError(f"the run {parent} kept no checkpoint of step {step} (it kept {kept or 'none'}): branch at a "
                        "kept step, or train the parent with callbacks=trajectory keeping that step.")
    if not zip_intact(source):
        raise UserError(f"{source} is damaged: branch at another kept step of {parent}.")
    if step >= int(cfg.max_steps):
        raise UserError(f"branch.step={step} is not before max_steps={cfg.max_steps}: a branch trains on from its "
                        "step, so set max_steps to the step plus the decay.")
    if (parent / CONFIG).exists():
        theirs = read_config(parent)
        def plain(value):
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

        for key in ("model", "objective", "data", "optim", "batch_size", "seed"):
            if plain(theirs.get(key)) != plain(cfg.get(key)):
                raise UserError(f"the branch's {key} differs from its parent's ({parent}): a cooldown branch "
                                f"continues the same training, so leave {key} as the parent set it.")
    torch_save(torch.load(source, map_location="cpu", weights_only=True), last)
    return source


# ----- weight averages -----

EMA_MODEL = "model_ema.pt"  # in the run directory, beside model.pt: the EMA's weights as a state_dict
Decay = Annotated[float, Ge(0), Lt(1)]


class EMA(L.Callback):
    """An exponential moving average of the model's weights: ``ema_0`` = the weights when training starts (step 0,
    or a branch's first step), then after each optimiser step t ``ema_t = decay * ema_(t-1) + (1 - decay) * w_t``
    (kept in float32; a skipped update, which does not advance the step, is not averaged in). The average is part
    of every checkpoint (``state_dict``: it is brought up to the checkpoint's step before it is saved, whichever
    order the callbacks run in), so a resumed run averages as an uninterrupted one and each kept checkpoint holds
    the average at its step. When fit ends it is written as ``model_ema.pt`` (``EMA_MODEL``): the model's
    ``state_dict`` with the averaged parameters in place of the trained ones (buffers as trained).

    The model's parameters are averaged (an objective's own head is not), on every rank alike; a sparse run
    (``sparsity`` > 0) and FSDP (sharded parameters) are refused."""

    def __init__(self, decay: Decay = 0.99) -> None:
        from lmlab.errors import UserError

        if isinstance(decay, bool) or not 0 <= decay < 1:
            raise UserError(f"callbacks.ema.decay={decay!r} must lie in [0, 1): e.g. 0.99 (an average over about 100 "
                            "steps).")
        self.decay = float(decay)
        self.weights: dict[str, torch.Tensor] | None = None  # by parameter name, tied names each
        self.step: int | None = None  # the step ``weights`` average up to

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lmlab.errors import UserError

        if getattr(pl_module, "sparsity", 0):
            raise UserError(f"callbacks.ema averages dense weights and this run trains with sparsity="
                            f"{pl_module.sparsity}: drop callbacks.ema or set sparsity=0.")
        if "fsdp" in type(trainer.strategy).__name__.lower():
            raise UserError("callbacks.ema averages whole parameters and FSDP shards them: use trainer=ddp or "
                            "trainer=gpu with callbacks.ema.")

    def update(self, trainer, pl_module) -> None:
        """Average in the weights of the trainer's current step (once per step; the first call starts the average)."""
        step = trainer.global_step
        params = pl_module.model.named_parameters(remove_duplicate=False)
        with torch.no_grad():
            if self.weights is None:
                self.weights = {n: p.detach().float().clone() for n, p in params}
            elif step != self.step:
                for name, p in params:
                    average = self.weights[name]
                    if average.device != p.device:
                        average = self.weights[name] = average.to(p.device)
                    average.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)
        self.step = step

    def on_train_start(self, trainer, pl_module) -> None:
        self.update(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.update(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # a checkpoint written by a callback that ran before this one at this step holds this step's average too
        if trainer.state.fn == "fit":
            self.update(trainer, pl_module)
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.weights is not None and trainer.is_global_zero:
            from lmlab.io import torch_save

            torch_save(self.averaged(pl_module.model), Path(trainer.default_root_dir) / EMA_MODEL)

    def averaged(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s ``state_dict`` on the CPU with the averaged parameters in place of its own."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for name, average in (self.weights or {}).items():
            state[name] = average.detach().cpu().to(state[name].dtype)
        return state

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in (self.weights or {}).items()}
        return {"decay": self.decay, "step": self.step, "weights": weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("weights"):
            self.weights = {k: v.clone() for k, v in state_dict["weights"].items()}
            self.step = state_dict.get("step")


def checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(model weights, EMA weights or None)`` of one of lmlab's Lightning checkpoints, read as tensors only
    (``weights_only``): the model's entries of its ``state_dict`` under the names ``model.pt`` uses (a sparse
    run's masked matrices as ``original * mask``, as ``densify`` leaves them), and, where the run averaged its
    weights (``EMA``), the same with the averaged parameters in place."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    prefix, masked = "model.", ".parametrizations.weight."
    own = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    state = {}
    for key, value in own.items():
        if key.endswith(masked + "original"):
            module = key[: -len(masked + "original")]
            state[f"{module}.weight"] = value * own[f"{module}{masked}0.mask"]
        elif masked not in key:
            state[key] = value
    ema = (checkpoint.get("callbacks") or {}).get(EMA.__qualname__)
    if not ema or not ema.get("weights"):
        return state, None
    return state, {**state, **{k: v.to(state[k].dtype) for k, v in ema["weights"].items()}}


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` (``state_dict``s of one model): each floating-point tensor the mean of
    its values (computed in float64, returned in its dtype), any other (integer counters) the last one's."""
    if not states:
        raise ValueError("no weights to average")
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(last.dtype)
        else:
            out[key] = last
    return out
