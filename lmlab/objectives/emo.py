"""EMO: Earth Mover Distance Optimization for auto-regressive language modelling (Ren, Wu & Zhu 2023,
"EMO: Earth Mover Distance Optimization for Auto-Regressive Language Modeling", arXiv 2310.04691).

Per target token y with model distribution Q = softmax(logits), the cost of moving mass from token i to
token j is ``C(i, j) = 1 - cos(e_i, e_j)`` for a fixed "cost embedding" e (V x H, rows L2-normalised to
ê). Against a one-hot target the differentiable upper bound DEMD of the paper is exact (the only coupling
sends all of Q to y)::

    emo_t = sum_i Q_i (1 - cos(e_i, e_y)) = 1 - ê_y . (sum_i Q_i ê_i)

Combination with maximum likelihood (``mle_t`` = cross-entropy, ``sg`` = stop-gradient), per token:

* ``mode=1`` (default; the released ``gpt2.py`` / ``EMOLlamaForCausalLM``):
  ``0.5 * (mle_t + sg(mle_t / (emo_t + 1e-10)) * emo_t)`` -- its forward value is exactly ``mle_t``;
  ``ratio_clamp`` (PyPI ``emoloss`` uses 3.0) caps ``sg(mle/emo)``; null (default, the released code) does not.
* ``mode=2`` (``EMOLlama2ForCausalLM``): ``emo_t + sg(emo_t / (mle_t + 1e-10)) * mle_t``.
* ``mode=pure``: ``emo_t`` alone.

The loss is the mean over the target tokens (next-token prediction as in ``CLM``; Q in float32).

Cost embedding (``cost_embedding``): the paper takes a frozen copy of a pretrained LM head. For
pre-training from scratch lmlab offers ``frozen_init_copy`` (a copy of the model's LM-head matrix taken at
the first ``loss`` call, i.e. at initialisation; it is a buffer of this objective, so it is checkpointed
and a resumed run keeps the original copy), ``tied_detached`` (the current LM-head matrix, detached, at
every step) and ``checkpoint`` (``cost_checkpoint``: an lmlab run directory, whose model's LM head is
used, or a ``.pt`` file holding a (V, H) tensor). The LM-head matrix of a backbone is its ``head`` Linear
when it has one, otherwise it is read off ``logits`` as the image of the identity (the head of the
``Backbone`` contract is linear on the final hidden state).

Evaluation: the exact next-token NLL of ``CLM.evaluate`` (EMO trains the same conditionals).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import UserError
from lmlab.objectives.base import Prepared
from lmlab.objectives.clm import CLM
from lmlab.run_dir import load_backbone

MODES = ("1", "2", "pure")
COSTS = ("frozen_init_copy", "tied_detached", "checkpoint")


def head_matrix(model) -> torch.Tensor:
    """The (V, H) output-embedding matrix of a backbone, detached."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head.weight.detach()
    with torch.no_grad():
        d = model.d_model
        dev = next(model.parameters()).device
        eye = torch.eye(d, device=dev)
        return (model.logits(eye) - model.logits(torch.zeros(1, d, device=dev))).T.contiguous()


def emo_per_token(logits: torch.Tensor, targets: torch.Tensor, cost_embedding: torch.Tensor) -> torch.Tensor:
    """``emo_t = sum_i Q_i (1 - cos(e_i, e_y))`` for logits (N, V), targets (N,), cost embedding (V, H)."""
    q = F.softmax(logits.float(), dim=-1)
    e = F.normalize(cost_embedding.float(), dim=-1)
    return 1.0 - ((q @ e) * e[targets]).sum(-1)


def combine(mle: torch.Tensor, emo: torch.Tensor, mode: str, ratio_clamp: float | None = None) -> torch.Tensor:
    """The per-token composite loss of the given mode (see the module docstring)."""
    if mode == "1":
        ratio = (mle / (emo + 1e-10)).detach()
        if ratio_clamp is not None:
            ratio = ratio.clamp(max=ratio_clamp)
        return 0.5 * (mle + ratio * emo)
    if mode == "2":
        return emo + (emo / (mle + 1e-10)).detach() * mle
    return emo


class EMO(CLM, nn.Module):
    """Next-token prediction trained with the EMO loss (see the module docstring)."""

    dense_loss = False  # its loss gathers the masked positions (and reads metrics back): not CLM's dense form

    def __init__(self, mode: str | int = 1, cost_embedding: str = "frozen_init_copy",
                 cost_checkpoint: str | None = None, ratio_clamp: float | None = None) -> None:
        nn.Module.__init__(self)
        self.mode = str(mode)
        if self.mode not in MODES:
            raise UserError(f"unknown EMO mode {mode!r}: set objective.mode to 1, 2 or pure.")
        if cost_embedding not in COSTS:
            raise UserError(f"unknown EMO cost_embedding {cost_embedding!r}: choose one of {', '.join(COSTS)}.")
        if cost_embedding == "checkpoint" and not cost_checkpoint:
            raise UserError("EMO cost_embedding=checkpoint needs a file: set objective.cost_checkpoint to an lmlab "
                            "run directory or a .pt file holding a (vocab, dim) tensor.")
        self.cost_kind, self.cost_checkpoint, self.ratio_clamp = cost_embedding, cost_checkpoint, ratio_clamp
        self.vocab_size: int | None = None
        # empty until taken; resized when a checkpoint that holds it is loaded
        self.register_buffer("cost_embedding", torch.empty(0, 0))

    def bind(self, source, splits) -> None:
        self.vocab_size = source.vocab_size
        if self.cost_kind == "checkpoint" and self.cost_embedding.numel() == 0:
            self.cost_embedding = self._load_checkpoint(Path(self.cost_checkpoint))

    def _load_checkpoint(self, path: Path) -> torch.Tensor:
        if path.is_dir():
            matrix = head_matrix(load_backbone(path)).cpu()
        elif path.is_file():
            matrix = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
                raise UserError(f"{path} does not hold a (vocab, dim) tensor: save one with torch.save or point "
                                "objective.cost_checkpoint at an lmlab run directory.")
        else:
            raise UserError(f"EMO cost checkpoint {path} does not exist: set objective.cost_checkpoint to an "
                            "existing run directory or .pt file.")
        if self.vocab_size is not None and matrix.shape[0] != self.vocab_size:
            raise UserError(f"the EMO cost embedding in {path} has {matrix.shape[0]} rows but the data has "
                            f"{self.vocab_size} tokens: use a checkpoint with the same tokenizer.")
        return matrix.float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "cost_embedding"
        if key in state_dict:
            self.cost_embedding = torch.empty_like(state_dict[key], device=self.cost_embedding.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def cost(self, model) -> torch.Tensor:
        if self.cost_kind == "tied_detached":
            return head_matrix(model)
        if self.cost_embedding.numel() == 0:  # frozen_init_copy: the first call is at initialisation
            self.cost_embedding = head_matrix(model).clone()
        return self.cost_embedding

    def loss(self, model, prepared: Prepared) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model(prepared.inputs, prepared.attention)
        logits = model.logits(hidden[prepared.loss_mask]).float()
        targets = prepared.targets[prepared.loss_mask]
        mle = F.cross_entropy(logits, targets, reduction="none")
        emo = emo_per_token(logits, targets, self.cost(model).to(logits.device))
        loss = combine(mle, emo, self.mode, self.ratio_clamp).mean()
        return loss, {"mle": float(mle.detach().mean()), "emo": float(emo.detach().mean())}
