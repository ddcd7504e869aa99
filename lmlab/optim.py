"""Optimiser parameter groups shared by every training loop (the pipeline's and the selectors' own)."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import UserError


def lr_multipliers(module: nn.Module) -> dict[str, float]:
    """The learning-rate multipliers that ``module`` and its submodules name (``lr_multipliers()``, e.g. a
    backbone's under muP), by the parameter's name in ``module``."""
    out: dict[str, float] = {}
    for prefix, sub in module.named_modules():
        get = getattr(sub, "lr_multipliers", None)
        if callable(get):
            out.update({f"{prefix}.{name}" if prefix else name: float(m) for name, m in get().items()})
    return out


def decay_groups(module: nn.Module) -> list[dict]:
    """Parameter groups for an AdamW-style optimiser: weight matrices (``ndim >= 2``, embeddings excepted: a
    parameter whose name holds ``embed``) get the optimiser's weight decay; biases, norms and embeddings get
    none. Frozen parameters (``requires_grad`` False) are left out.

    The first two groups (with decay, without) hold the parameters at the optimiser's learning rate; a parameter
    with a learning-rate multiplier other than 1 (``lr_multipliers``: muP's hidden weights) goes into a further
    group per (decay, multiplier) that records it as ``lr_mult``, which ``scale_lr`` applies once the optimiser
    exists. Weight decay is the optimiser's in every decayed group. A multiplier whose parameter is not found
    (renamed by a wrapper) is refused, never dropped."""
    mults = lr_multipliers(module)
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    named = dict(module.named_parameters())
    lost = sorted(set(mults) - set(named))
    if lost:
        raise UserError(f"the learning-rate multipliers of {lost[0]} (and {len(lost) - 1} more) find no parameter "
                        "of that name: train without the wrapper that renames them, or with model.parametrization=sp.")
    for name, p in named.items():
        if p.requires_grad:
            decay = p.ndim >= 2 and "embed" not in name
            groups.setdefault((decay, mults.get(name, 1.0)), []).append(p)
    out = []
    for (decay, mult), params in groups.items():
        group = {"params": params} if decay else {"params": params, "weight_decay": 0.0}
        if mult != 1.0:
            group["lr_mult"] = mult
        out.append(group)
    return out


def scale_lr(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Multiplies the learning rate of each group that records an ``lr_mult`` (``decay_groups``) by it; call it
    once, before a scheduler is attached (schedules then multiply each group's own rate)."""
    for group in optimizer.param_groups:
        if "lr_mult" in group:
            group["lr"] = group["lr"] * group["lr_mult"]
    return optimizer
