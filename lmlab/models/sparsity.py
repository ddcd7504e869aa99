"""Sparse pretraining, dense fine-tuning (SPDF: Thangarasa et al. 2023, arXiv 2303.10464).

Variant: the paper's static unstructured sparsity. Before the first training step every weight matrix of the
blocks gets one fixed random mask with exactly ``round(sparsity * n)`` zeros out of its ``n`` entries (the same
sparsity in every matrix, as the paper's uniform random masks); the token embedding, the LM head, norms,
convolutions and the recurrent/SSM parameters stay dense. Training keeps the masked entries at zero; after
pretraining the masks are removed and the model is an ordinary dense model whose masked entries hold zeros, so
a fine-tune (``eval=finetune``) starts from exactly the sparse model's function and may move every weight.

Sparsity is a treatment of training, not a setting of any model: ``lmlab train sparsity=0.75`` (the top-level
``sparsity`` of ``conf/train.yaml``, 0 by default) has ``lmlab.training.module.LMModule`` put the masks on when
fit starts and take them off when it ends. Which matrices count as "the blocks" is each backbone's
``sparse_targets()`` (``lmlab.models.base``): every ``nn.Linear`` under ``self.blocks`` unless the model says
otherwise (a mixture of experts, for instance, states how often a token uses each expert's matrices, for the FLOP
count); a model with none refuses a sparsity above 0 (``check_sparsity``).

The masks are masked parametrizations (``torch.nn.utils.parametrize``): the module's ``weight`` becomes
``original * mask``, recomputed wherever it is read, so gradients reach only the kept entries. The masked
entries of ``original`` are also set to zero when the mask is applied; with zero gradients there, AdamW's
decoupled weight decay (``w -= lr * wd * w``) and its moment estimates leave them at exactly zero, so the
parameter itself equals the weight the model uses. A checkpoint of a model under masks holds
``...parametrizations.weight.original`` and ``...parametrizations.weight.0.mask``: a resumed run gets its
masks back from the checkpoint. ``densify`` removes the parametrizations, leaving plain ``weight``
parameters with zeros in place.

FLOPs: on dense kernels the zeros are multiplied like any other weight, so the wall-clock cost of a step does
not drop. ``Backbone.flops_per_token`` stays the FLOPs the kernels execute (what MFU divides by the device's
dense peak); ``Backbone.sparse_flops_per_token`` is the sparse-ideal count, the paper's accounting of the
pretraining budget: each masked entry saves 6 FLOPs per token that uses it (2 forward, 2 for the input
gradient, 2 for the weight gradient).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmlab.errors import UserError


class Mask(nn.Module):
    """The parametrization ``weight = original * mask`` (``mask``: a bool buffer of the weight's shape)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


def draw_mask(shape: torch.Size | tuple[int, ...], sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``round(sparsity * n)`` False entries, placed uniformly at random."""
    n = int(torch.Size(shape).numel())
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[: round(sparsity * n)]] = False
    return mask.view(shape)


def masked_module(module: nn.Module) -> Mask | None:
    """The ``Mask`` parametrizing ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, Mask)), None)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: bool mask}`` for every masked weight of ``model`` (empty when it is dense)."""
    out = {}
    for name, module in model.named_modules():
        mask = masked_module(module)
        if mask is not None:
            out[name] = mask.mask
    return out


def is_sparse(model: nn.Module) -> bool:
    return bool(masks(model))


def sparsify(model: nn.Module, sparsity: float, seed: int) -> int:
    """Mask every matrix of ``model.sparse_targets()`` at ``sparsity``: masks drawn in order from a private
    generator seeded with ``seed`` (the global random stream is not touched), masked entries of each weight
    zeroed, ``Mask`` registered as its parametrization. Matrices already masked are left as they are. Returns
    the number of masked (zero) entries."""
    generator = torch.Generator().manual_seed(int(seed))
    zeros = 0
    for _, module, _ in model.sparse_targets():
        mask = draw_mask(module.weight.shape, sparsity, generator)  # drawn for every target: the order is fixed
        if masked_module(module) is not None:
            continue
        with torch.no_grad():
            module.weight.mul_(mask.to(module.weight.device))
        parametrize.register_parametrization(module, "weight", Mask(mask.to(module.weight.device)))
        zeros += int((~mask).sum())
    return zeros


def densify(model: nn.Module) -> nn.Module:
    """Remove every ``Mask``: each masked module keeps a plain ``weight`` parameter (the same parameter object,
    so an optimiser holding it is unaffected) equal to ``original * mask``, zeros in place. Returns ``model``."""
    for _, module in model.named_modules():
        if masked_module(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def masked_entries_per_token(model: nn.Module, sparsity: float) -> float:
    """The masked entries a token multiplies at ``sparsity``: ``round(sparsity * n)`` for each target matrix,
    times the share of tokens that use it (``sparse_targets``). It holds with or without the masks in place."""
    if not sparsity:
        return 0.0
    return float(sum(round(sparsity * module.weight.numel()) * uses for _, module, uses in model.sparse_targets()))


def check_sparsity(model: nn.Module, sparsity: float) -> float:
    """``sparsity`` as a float, refused (one sentence) outside [0, 1) or above 0 for a model with nothing to mask."""
    sparsity = float(sparsity or 0.0)
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity={sparsity} must be at least 0 and below 1: pass e.g. sparsity=0.75.")
    if sparsity and not model.sparse_targets():
        raise UserError(f"model {type(model).__name__} has no weight matrices in its blocks to mask: use "
                        "sparsity=0 or another model.")
    return sparsity
