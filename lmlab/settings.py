"""The range of every setting, declared once beside it, and checked before any work.

A setting's range is part of the type annotation of the constructor parameter it configures::

    def __init__(self, train_size: Positive = 20000, mask_prob: Probability = 0.15,
                 norm: Literal["rmsnorm", "layernorm"] = "rmsnorm") -> None: ...

A recipe whose settings also name what it builds (a data source, a selector: their cache key) declares them once,
as the fields of a frozen dataclass ``Settings`` on a ``Configured`` class. Its constructor takes exactly those
fields (``inspect.signature`` shows them), records them as ``self.settings`` and as attributes of the same names,
then calls ``setup()``; ``config`` is every field but the ``keyless`` ones (settings that change how the data is
read or stored, not what it is), as plain values: the content of the cache key. Nothing repeats a setting, so
none can be left out of the key.

``check_config`` walks a composed config before anything is built: every node with a ``_target_`` is checked
against its target's annotations with pydantic (its ``TypeAdapter``), the run's own top-level keys against
``RunSettings``, and targets lmlab does not own (torch optimisers, Lightning's Trainer) against ``EXTERNAL``. A
value out of range ends the command with one sentence naming the key, the range and an example. A new option
is checked by annotating its parameters: there is nothing else to register.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal, Optional

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, TypeAdapter, ValidationError

from lmlab.errors import UserError

Positive = Annotated[int, Gt(0)]  # sizes, steps, counts
NonNegative = Annotated[int, Ge(0)]  # seeds, optional counts
PositiveFloat = Annotated[float, Gt(0)]  # learning rates, temperatures, scales
NonNegativeFloat = Annotated[float, Ge(0)]  # weights of extra losses, weight decay
Fraction = Annotated[float, Ge(0), Le(1)]  # probabilities, shares, dropout
PositiveFraction = Annotated[float, Gt(0), Le(1)]  # shares of rows kept (none kept is no data)
Sparsity = Annotated[float, Ge(0), Lt(1)]  # the share of each masked matrix held at zero (all of it is no model)

__all__ = ["Positive", "NonNegative", "PositiveFloat", "NonNegativeFloat", "Fraction", "PositiveFraction", "Sparsity",
           "Literal", "Optional", "Configured", "declared", "keyless", "plain",
           "RunSettings", "EXTERNAL", "MOVED", "check_moved", "check_config", "check_node"]


@dataclasses.dataclass
class RunSettings:
    """The top-level keys of ``lmlab train`` (``conf/train.yaml``) and their ranges."""

    seed: NonNegative = 0
    batch_size: Positive = 64
    max_steps: Positive = 1000
    val_every: Positive = 250
    checkpoint_every: Positive = 250
    eval_every: Optional[Positive] = None
    sparsity: Sparsity = 0.0


# ----- settings declared once: a recipe's constructor, attributes and cache key -----

declared = dataclasses.dataclass(frozen=True, kw_only=True)  # the decorator of every ``Settings`` class
KEY = "cache_key"  # field metadata: False for a keyless setting


def keyless(default: Any) -> Any:
    """A setting left out of the cache key: it changes how the data is read, served or stored, not what it is
    (``data.doc_mask``, the streaming thresholds of ``data=text``, the batch size of a generator)."""
    return dataclasses.field(default=default, metadata={KEY: False})


def plain(value: Any) -> Any:
    """``value`` as plain JSON-able data: Hydra's containers, tuples and paths made lists, dicts and strings."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class _SettingsSignature:
    """``inspect.signature`` of a ``Configured`` class: the fields of its ``Settings``."""

    def __get__(self, obj: Any, owner: type) -> inspect.Signature:
        sig = inspect.signature(owner.Settings)
        keyword = inspect.Parameter.KEYWORD_ONLY  # as the constructor takes them
        return sig.replace(parameters=[p.replace(kind=keyword) for p in sig.parameters.values()])


class Configured:
    """A recipe built from its declared ``Settings`` (see the module docstring). A subclass declares

        @declared
        class Settings(<the base's Settings>):
            seed: NonNegative = 0
            ...

    and derives what it needs from them in ``setup`` (checks across settings, models, files)."""

    @declared
    class Settings:
        pass

    settings: Any  # the instance's own Settings
    __signature__: ClassVar = _SettingsSignature()

    def __init__(self, **values: Any) -> None:
        self.settings = type(self).Settings(**values)
        for field in dataclasses.fields(self.settings):
            if not isinstance(inspect.getattr_static(type(self), field.name, None), property):
                setattr(self, field.name, getattr(self.settings, field.name))
        self.setup()

    def setup(self) -> None:
        """Check and derive what the settings imply (called once, by the constructor)."""

    @property
    def config(self) -> dict[str, Any]:
        """Every setting but the keyless ones, as plain values: what the cache key is made of."""
        return {f.name: plain(getattr(self.settings, f.name)) for f in dataclasses.fields(self.settings)
                if f.metadata.get(KEY, True)}


# settings that moved to another key: the old key -> (the new key, why)
MOVED = {"model.sparsity": ("sparsity", "sparse pretraining is a treatment of training, not a setting of the model")}


def check_moved(overrides: list[str]) -> None:
    """Refuse an override (``key=value``, ``+key=value``, ``~key``) of a setting that moved, naming its new key."""
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in MOVED:
            new, why = MOVED[key]
            raise UserError(f"{key} is now {new} ({why}): pass {new}={value or '<value>'} instead.")


# targets lmlab does not own: the ranges of the settings lmlab's YAMLs give them
_OPTIMISER = {"lr": PositiveFloat, "weight_decay": NonNegativeFloat, "momentum": NonNegativeFloat,
              "eps": PositiveFloat, "betas": tuple[Fraction, Fraction]}
EXTERNAL: dict[str, dict[str, Any]] = {
    "torch.optim.AdamW": _OPTIMISER,
    "torch.optim.Adam": _OPTIMISER,
    "torch.optim.SGD": _OPTIMISER,
    "lightning.Trainer": {"max_steps": Positive, "val_check_interval": Positive, "log_every_n_steps": Positive,
                          "gradient_clip_val": Optional[NonNegativeFloat],
                          "accumulate_grad_batches": Positive},
}


@lru_cache(maxsize=None)
def _declared(target: str) -> dict[str, TypeAdapter]:
    """The annotated parameters of ``target`` (a dotted path), as pydantic adapters; {} where it has none."""
    if target in EXTERNAL:
        hints = EXTERNAL[target]
    else:
        from hydra.utils import get_method

        try:
            obj = get_method(target)
        except Exception:  # not importable here: Hydra reports it when it instantiates
            return {}
        if inspect.isclass(obj) and issubclass(obj, Configured):
            obj = obj.Settings
        func = obj.__init__ if inspect.isclass(obj) and not dataclasses.is_dataclass(obj) else obj
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception:  # annotations this module cannot resolve: nothing declared to check
            return {}
        params = inspect.signature(func).parameters
        hints = {k: v for k, v in hints.items() if k in params and k != "return"}
    config = ConfigDict(arbitrary_types_allowed=True, strict=False)
    adapters = {}
    for name, hint in hints.items():
        try:
            adapters[name] = TypeAdapter(hint, config=config)
        except Exception:  # a type pydantic cannot check (a tensor, a callable): left to the constructor
            continue
    return adapters


def _describe(error: dict) -> str:
    ctx = error.get("ctx") or {}
    kind = error.get("type", "")
    if "gt" in ctx:
        return f"greater than {ctx['gt']}"
    if "ge" in ctx:
        return f"at least {ctx['ge']}"
    if "lt" in ctx:
        return f"less than {ctx['lt']}"
    if "le" in ctx:
        return f"at most {ctx['le']}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected', '')}"
    if kind.startswith("int"):
        return "a whole number"
    if kind.startswith(("float", "decimal")):
        return "a number"
    if kind.startswith("bool"):
        return "true or false"
    return error.get("msg", "valid").lower()


def check_node(path: str, target: str, values: dict[str, Any], example: dict[str, Any] | None = None) -> None:
    """Check the settings ``values`` of the node at ``path`` against the ranges declared for ``target``."""
    adapters = _declared(target)
    for key, value in values.items():
        if key.startswith("_") or key not in adapters or isinstance(value, str) and value.startswith("${"):
            continue
        if isinstance(value, dict) and "_target_" in value:  # a nested object: checked as its own node
            continue
        try:
            adapters[key].validate_python(value)
        except ValidationError as e:
            where = f"{path}.{key}" if path else key
            wanted = _describe(e.errors()[0])
            hint = (example or {}).get(key)
            fix = f"pass e.g. {where}={_show(hint)}" if hint is not None and hint != value else \
                f"set {where} to a value {wanted}"
            raise UserError(f"{where} must be {wanted}, got {_show(value)}: {fix}.") from None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _values(node) -> dict[str, Any]:
    """The node's keys and values, each resolved where it can be (``${hydra:...}`` needs a running job: such a
    value is left out)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out = {}
    for key in node.keys():
        try:
            value = node[key]
        except Exception:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except Exception:
                value = node._get_node(key)  # checked key by key further down
        out[str(key)] = value
    return out


def check_config(cfg, defaults=None, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Check every setting of a composed config (see the module docstring). ``defaults``: the config composed
    without the user's overrides, whose values serve as examples in the messages."""
    from omegaconf import DictConfig, ListConfig

    top = {f.name for f in dataclasses.fields(RunSettings)}
    base = _values(defaults) if defaults is not None else {}
    values = _values(cfg)
    check_node("", "lmlab.settings.RunSettings", {k: v for k, v in values.items() if k in top}, base)

    def walk(node, example, path: str) -> None:
        if isinstance(node, DictConfig):
            values = _values(node)
            target = values.get("_target_")
            if isinstance(target, str):
                check_node(path, target, values, _values(example) if isinstance(example, DictConfig) else None)
            for key in node.keys():
                if path == "" and key in skip:
                    continue
                try:
                    child = node[key]
                except Exception:
                    continue
                sub = example.get(key) if isinstance(example, DictConfig) else None
                walk(child, sub, f"{path}.{key}" if path else str(key))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                try:
                    walk(node[i], None, f"{path}[{i}]")
                except Exception:
                    continue

    walk(cfg, defaults, "")
