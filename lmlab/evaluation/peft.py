"""``eval=peft``: parameter-efficient tuning of a frozen backbone with a linear head on pooled features, through
the Hugging Face ``peft`` library (Mangrulkar et al., https://github.com/huggingface/peft).

For each seed the backbone is deep-copied (the trained model is never modified, nor its mode), every one of its
parameters is frozen, and ``peft.inject_adapter_in_model`` adds the adapters to the layers named by
``target_modules``: every linear layer (for LoRA also every embedding) with one of these names in its dotted
path (``qkv`` adapts every ``blocks.<i>.attn.qkv``, ``cross`` the layers ``cross.<i>`` of a list). The copy
reads the downstream rows with the objective's attention pattern and a padding mask, pooled like the probe and
``eval=finetune`` (``mean`` over real tokens or ``concat``), and the adapters are trained together with a fresh
linear head with AdamW for ``epochs`` epochs of shuffled minibatches.
Only the adapters and the head train: after training every frozen weight of the copy is compared with the
trained model's, and a difference (a bug, never a setting) raises ``RuntimeError``.

Methods (``method``):

* ``lora``: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685). An
  adapted linear layer W (out x in) computes ``W x + (alpha / r) B A dropout(x)`` with A (r x in) drawn at
  random (peft's default, Kaiming-uniform) and B (out x r) zero, so the adapted copy starts exactly equal to
  the frozen model; it trains ``r (in + out)`` parameters per layer. An adapted embedding (V x d) trains
  ``r (V + d)``.
* ``ia3``: (IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
  In-Context Learning", arXiv 2205.05638): a learned vector, ones at initialisation, scales the output of each
  target layer (``out`` parameters), or its input for the layers in ``feedforward_modules`` (``in``
  parameters: the paper scales the feed-forward block's inner activations, which are the input of ``down``).
  peft applies it to linear layers only.

Prompt tuning is not offered: peft's prompt learning wraps a Transformers-style model and feeds it
``inputs_embeds`` with the virtual tokens prepended, and lmlab's backbones read token ids (and an attention
record), so it would need a second forward path in every model rather than peft alone.

Default targets (``target_modules: null``; ``feedforward_modules: null`` is the default ones among the
targets) are the model's own: its spec (``lmlab.models.spec.ModelSpec``: ``lora``, ``ia3``, ``ia3_feedforward``)
names them beside its code. The Transformer's are ``qkv, out, up, gate, down`` for LoRA and ``qkv, down`` for
(IA)^3 with ``down`` as its feed-forward layer (the paper's choice: the MLP's inner activations); a mixture of
experts adds no router, an LSTM offers its embedding alone (``torch.nn.LSTM`` is no layer peft supports). The
LM head is never a default target (the pooled features do not pass through it). A module that declares no spec
gets every linear layer but the LM head and routers, by full name. A full dotted name
(``blocks.0.attn.qkv``) is also a valid entry of ``target_modules``.

Returns ``peft/acc`` (mean test accuracy over seeds), ``peft/acc_std``, ``peft/acc_ci95`` (95% t-interval
half-width over seeds; NaN for one seed), ``peft/chance`` (majority-class rate on test), ``peft/ece`` (expected
calibration error, Guo et al. 2017, arXiv 1706.04599, 15 equal-width bins, of the test predictions, averaged
over seeds), ``peft/trained_params`` (adapter and head parameters) and ``peft/trained_share`` (trained
parameters / all parameters of the adapted copy and its head; the tied embedding and LM head count once).
Rows whose label is -1 are dropped.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.evaluation.common import DownstreamEvaluator, summarize, tune_and_score
from lmlab.models.spec import ModelSpec
from lmlab.readout import feature_dim, model_device
from lmlab.settings import Fraction, NonNegativeFloat, Positive, PositiveFloat

NEVER = ("head", "router")  # the LM head (not read by pooled features) and routers (a discrete choice)


def default_targets(model, method: str) -> tuple[list[str], list[str]]:
    """The default ``(target_modules, feedforward_modules)`` of ``method`` for ``model``: its spec's; a module
    that declares no spec gets every linear layer but the LM head and routers, by full name."""
    spec = type(model).__dict__.get("spec")
    if isinstance(spec, ModelSpec):
        return (list(spec.lora), []) if method == "lora" else (list(spec.ia3), list(spec.ia3_feedforward))
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not set(name.split(".")) & set(NEVER)], []


def adapt(model: nn.Module, method: str = "lora", target_modules: list[str] | None = None,
          feedforward_modules: list[str] | None = None, r: int = 8, alpha: float = 16.0,
          dropout: float = 0.0) -> nn.Module:
    """A frozen deep copy of ``model`` with peft adapters on ``target_modules`` (default: the model's, see the
    module docstring); only the adapters' parameters require gradients. ``model`` itself is not changed."""
    from peft import IA3Config, LoraConfig, inject_adapter_in_model

    if method not in ("lora", "ia3"):
        raise UserError(f"unknown peft method {method!r}: set eval.peft.method to lora or ia3.")
    name = type(model).__name__
    default_target, default_ff = default_targets(model, method)
    targets = list(target_modules) if target_modules is not None else default_target
    if not targets:
        raise UserError(f"peft {method} has no layer to adapt in model {name}: choose method=lora or set "
                        "eval.peft.target_modules to names of its linear layers.")
    if feedforward_modules is None:
        ff = [t for t in default_ff if t in targets]
    else:
        ff = list(feedforward_modules)
        if method == "ia3" and not set(ff) <= set(targets):
            raise UserError("every name of eval.peft.feedforward_modules must also be in eval.peft.target_modules: "
                            "add it there.")
    layers = matching(model, targets, (nn.Linear, nn.Embedding) if method == "lora" else (nn.Linear,))
    if not layers:
        raise UserError(f"model {name} has no layer peft {method} can adapt under {', '.join(targets)}: set "
                        f"eval.peft.target_modules to some of its linear layers (its default: "
                        f"{', '.join(default_target) or 'none'}).")
    if method == "lora":
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=layers, bias="none")
    else:
        config = IA3Config(target_modules=layers, feedforward_modules=matching(model, ff, (nn.Linear,)))
    copied = copy.deepcopy(model)
    for p in copied.parameters():
        p.requires_grad_(False)
    try:
        adapted = inject_adapter_in_model(config, copied)
    except ValueError as e:  # a target peft cannot adapt (an LSTM, a convolution (IA)^3 does not support)
        raise UserError(f"peft {method} cannot adapt model {name} on {', '.join(targets)} ({e}): set "
                        "eval.peft.target_modules to linear layers of it.") from None
    for pname, p in adapted.named_parameters():
        p.requires_grad_(_is_adapter(pname))
    return adapted


def matching(model: nn.Module, names: list[str], kinds: tuple[type, ...]) -> list[str]:
    """The full names of the layers of ``model`` of one of ``kinds`` named in ``names`` by their full name or by
    one part of their dotted path (``qkv`` -> ``blocks.0.attn.qkv``; ``cross`` -> ``cross.0``, a layer of a list)."""
    wanted = set(names)
    return [full for full, m in model.named_modules()
            if full and isinstance(m, kinds) and (full in wanted or wanted & set(full.split(".")))]


def _is_adapter(name: str) -> bool:
    return any(part.startswith(("lora_", "ia3_")) for part in name.split("."))


def base_weights(adapted: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted copy's frozen parameters under the names they have in the unadapted model (peft moves a
    wrapped layer's weights under ``base_layer``)."""
    return {name.replace(".base_layer", ""): p for name, p in adapted.named_parameters() if not _is_adapter(name)}


def count_parameters(*modules: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of ``modules``, each tensor counted once (a tied embedding and head too)."""
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())


class Peft(DownstreamEvaluator):
    name = "peft"

    def __init__(self, task: str | None = None, method: Literal["lora", "ia3"] = "lora",
                 target_modules: Optional[list[str]] = None, feedforward_modules: Optional[list[str]] = None,
                 r: Positive = 8, alpha: PositiveFloat = 16.0, dropout: Fraction = 0.0, epochs: Positive = 3,
                 lr: PositiveFloat = 1e-3, batch_size: Positive = 64, seeds: Positive = 1,
                 pooling: Literal["mean", "concat"] = "mean", max_train: Optional[Positive] = None,
                 max_test: Optional[Positive] = None, weight_decay: NonNegativeFloat = 0.0) -> None:
        self.task, self.method = task, method
        self.target_modules = None if target_modules is None else [str(t) for t in target_modules]
        self.feedforward_modules = None if feedforward_modules is None else [str(t) for t in feedforward_modules]
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.epochs, self.lr, self.batch_size, self.seeds = epochs, lr, batch_size, seeds
        self.pooling, self.max_train, self.max_test, self.weight_decay = pooling, max_train, max_test, weight_decay

    def adapt(self, model: nn.Module) -> nn.Module:
        return adapt(model, self.method, self.target_modules, self.feedforward_modules, self.r, self.alpha,
                     self.dropout)

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        runs, test_y = self.per_seed(module, datamodule)
        out = summarize(self.name, [acc for acc, _, _ in runs], test_y)
        out[f"{self.name}/ece"] = float(sum(ece for _, ece, _ in runs) / len(runs))
        trained, total = runs[0][2]
        out[f"{self.name}/trained_params"] = float(trained)
        out[f"{self.name}/trained_share"] = trained / total
        return out

    def _run(self, original, kind, train_rows, train_y, test_rows, test_y, n_classes, length,
             seed) -> tuple[float, float, tuple[int, int]]:
        """One adapted copy (``seed``): its test accuracy, expected calibration error and parameter counts."""
        device = model_device(original)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # adapter/head init and dropout without touching global RNG
            torch.manual_seed(seed)
            model = self.adapt(original)
            frozen = {name: p.detach().clone() for name, p in base_weights(model).items()}
            head = nn.Linear(feature_dim(model.d_model, self.pooling, length), n_classes).to(device)
            counts = count_parameters(model, head)
            trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
            acc, ece = tune_and_score(model, head, trainable, kind, self.pooling, length, train_rows, train_y,
                                      test_rows, test_y, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                      weight_decay=self.weight_decay, seed=seed)
            check_frozen(model, frozen, dict(original.named_parameters()))
            del model, head
        return acc, ece, counts


def check_frozen(adapted: nn.Module, before: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    """Raise ``RuntimeError`` unless every frozen weight of ``adapted`` is bit-identical to its copy taken before
    training and to the trained model's parameter of the same name."""
    now = base_weights(adapted)
    if set(now) != set(before) or set(now) != set(original):
        raise RuntimeError("peft changed the backbone's parameter names: the frozen weights cannot be checked")
    changed = [n for n, p in now.items() if not (torch.equal(p, before[n]) and torch.equal(p, original[n]))]
    if changed:
        raise RuntimeError(f"peft tuning changed frozen backbone weights: {', '.join(changed[:5])}")
