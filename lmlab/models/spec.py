"""What the rest of lmlab needs to know about a model, declared by the model beside its code.

Each architecture class sets ``spec = ModelSpec(...)`` in its own module (a torchtitan-style model spec): its
block class (the unit of FSDP sharding and of activation checkpointing), its default peft adapter targets
(LoRA, (IA)^3 and (IA)^3's feed-forward layers), how it widens function-preservingly (or ``None``: it does not),
and its Hugging Face adapter (``HFAdapter``: lmlab weights to the ``transformers`` class that computes the same
function, and back). ``lmlab.export``, ``lmlab.evaluation.peft``, ``lmlab.models.widen``,
``lmlab.training.init_from`` and the FSDP trainer (``wrap_policy``) read it; no table elsewhere names models.

A spec belongs to the class that declares it: a subclass (a mixture of experts over the Transformer, say) has
other blocks or other weights, so it declares its own (``dataclasses.replace`` of its parent's where they
agree) and ``spec_of`` never hands it its parent's. ``transformers`` is imported lazily, inside the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.vocab import BOS_ID, EOS_ID, PAD_ID

State = dict[str, torch.Tensor]
HF_SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}  # in every config


class Unmappable(UserError):
    """Raised by ``HFAdapter.to_hf`` for a setting without an exact ``transformers`` counterpart; ``reason`` is
    the phrase (``"the run's mamba2 has ngroups=2"``) that ``lmlab.export`` completes into its sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HFAdapter:
    """A model's two-way mapping to ``transformers`` causal LMs.

    ``to_hf(model, context) -> (config, state)``: a ``transformers`` config (its ``architectures`` names the
    class; ``context`` is the number of positions to advertise) and the state dict of that class, computed from
    the lmlab model; a setting without an exact counterpart raises ``UserError`` (see ``refuse``).
    ``from_hf(config, state) -> (kwargs, state)``: the constructor arguments of the lmlab model (all those that
    fix its architecture; not ``vocab_size`` or ``attention``) and its state dict, from a ``transformers``
    config and state dict of one of ``architectures`` (a checkpoint the model does not compute exactly is a
    ``UserError`` naming the setting). ``exports``: one phrase saying which settings export, without a full
    stop (``model=mamba with norm=rmsnorm``)."""

    architectures: tuple[str, ...]
    to_hf: Callable[[nn.Module, int], tuple[Any, State]]
    from_hf: Callable[[Any, State], tuple[dict[str, Any], State]]
    exports: str


@dataclass(frozen=True)
class ModelSpec:
    """See the module docstring. ``block``: the class of the model's repeated blocks (``None``: the model is one
    unit); ``lora``, ``ia3``, ``ia3_feedforward``: names of layers (a part of their dotted path, as peft's
    ``target_modules``); ``widen(model, d_model) -> wider model``; ``hf``: the Hugging Face adapter."""

    block: type[nn.Module] | None = None
    lora: tuple[str, ...] = ()
    ia3: tuple[str, ...] = ()
    ia3_feedforward: tuple[str, ...] = ()
    widen: Callable[[nn.Module, int], nn.Module] | None = None
    hf: HFAdapter | None = None


def spec_of(model: nn.Module | type) -> ModelSpec:
    """The spec the model's own class declares; a ``UserError`` naming the fix for a class that declares none."""
    cls = model if isinstance(model, type) else type(model)
    spec = cls.__dict__.get("spec")
    if not isinstance(spec, ModelSpec):
        raise UserError(f"model {cls.__name__} declares no spec: set `spec = ModelSpec(...)` in its class "
                        "(lmlab/models/spec.py, docs/adding-a-recipe.md).")
    return spec


def hf_adapter(model: nn.Module | type) -> HFAdapter:
    """The model's Hugging Face adapter; a ``UserError`` in one sentence for a model that has none."""
    spec = spec_of(model)
    if spec.hf is None:
        cls = model if isinstance(model, type) else type(model)
        mapped = ", ".join(c.__module__.rsplit(".", 1)[-1] for c in declared_models() if c.spec.hf is not None)
        raise UserError(f"model {cls.__name__} has no Hugging Face mapping: give its spec an HFAdapter "
                        f"(lmlab/models/spec.py) or use a model that has one ({mapped}).")
    return spec.hf


def wrap_policy(model: str):
    """FSDP's auto-wrap policy for the model class ``model`` (a dotted path, the model config's ``_target_``):
    one FSDP unit per block of its spec (``torch.distributed.fsdp.wrap.ModuleWrapPolicy``); a model without a
    block class is a UserError."""
    from hydra.utils import get_class
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cls = get_class(str(model))
    block = spec_of(cls).block
    if block is None:
        raise UserError(f"model {cls.__name__} declares no block class to shard: set its spec's block, or use "
                        "trainer=ddp.")
    return ModuleWrapPolicy({block})


def declared_models() -> list[type]:
    """Every model class of ``lmlab.models`` that declares a spec, in module order: found by importing the
    package's modules (nothing to register)."""
    import importlib
    import pkgutil

    import lmlab.models as package

    found: dict[type, None] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and value.__module__ == module.__name__
                    and isinstance(value.__dict__.get("spec"), ModelSpec)):
                found[value] = None
    return list(found)


def importers(architecture: str) -> list[type]:
    """The model classes of ``lmlab.models`` whose Hugging Face adapter reads ``architecture``."""
    return [cls for cls in declared_models() if cls.spec.hf is not None and architecture in cls.spec.hf.architectures]
