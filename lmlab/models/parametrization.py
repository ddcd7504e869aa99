"""How a model's initialisation, multipliers and per-parameter learning rates scale with its width and depth.

Three parameterisations, chosen by ``model.parametrization`` (the Transformer and the mixture of experts):

* ``sp``, the standard one: every setting as the model's own paper has it (GPT-2's initialisation, one
  learning rate, attention scaled by ``1/sqrt(d_head)``). The default; nothing below applies.
* ``mup``, the Maximal Update Parameterisation for Adam (Yang et al. 2022, Tensor Programs V, arXiv
  2203.03466, Table 8: the form with an output multiplier, as the ``mup`` package). With ``m = d_model /
  base_width``: hidden (matrix-like) weights, whose fan-in and fan-out both grow with the width, are
  initialised with the standard deviation divided by ``sqrt(m)`` (variance ``∝ 1/fan_in``) and train at the
  learning rate divided by ``m``; input weights (token and position embeddings), norm gains and biases keep
  their initialisation and learning rate; output weights (the LM head and the MoE router: fan-out fixed)
  keep their initialisation and learning rate, and their output is multiplied by ``1/m``. With tied
  embeddings the shared matrix is treated as an input weight (initialisation and rate unchanged) and the
  logits are multiplied by ``1/m`` (the ``mup`` package's ``MuSharedReadout``). Attention scores are
  scaled by ``1/d_head`` instead of ``1/sqrt(d_head)``, as ``sqrt(d_head0) / d_head`` with ``d_head0`` the
  head size at ``base_width`` (so the scale is the standard one at the base width; with ``head_dim`` fixed
  the head size does not change with the width and neither does the scale).
* ``completep``: muP in width plus CompleteP in depth (Dey et al. 2025, arXiv 2505.01618; depth-muP with
  ``alpha = 1``). With ``l = n_layers / base_depth``: every residual branch is multiplied by ``1/l``
  (``x + f(x) / l``); the hidden weights' learning rate is multiplied by ``l^(alpha - 1)``, which is 1 for
  ``alpha = 1``; the residual output projections keep the initialisation of ``base_depth`` layers
  (``0.02 / sqrt(2 * base_depth)``), since the branch multiplier carries the depth. Not applied: the
  paper's scaling of AdamW's epsilon and weight decay with width and depth (the optimiser's settings are
  the same for every group, so a group's decoupled decay per step scales with its learning rate).

At ``d_model == base_width`` (and ``n_layers == base_depth``) every multiplier is exactly one and the
model computes exactly the standard parameterisation's function from the same initial weights.

A model names its per-parameter learning-rate multipliers (``Backbone.lr_multipliers``); ``lmlab.optim.decay_groups``
puts them into the optimiser's groups, where schedules multiply each group's rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from lmlab.errors import UserError

PARAMETRIZATIONS = ("sp", "mup", "completep")
ParametrizationKind = Literal[PARAMETRIZATIONS]  # the ``parametrization`` setting of a model
ALPHA = 1.0  # CompleteP's depth exponent: residual branches scale as depth^-alpha


@dataclass(frozen=True)
class Parametrization:
    """``kind`` with its width multiplier ``width_mult = d_model / base_width`` and depth multiplier
    ``depth_mult = n_layers / base_depth`` (1 where the kind does not scale that dimension)."""

    kind: str = "sp"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    base_depth: Optional[int] = None

    @classmethod
    def of(cls, kind: str, d_model: int, n_layers: int, base_width: Optional[int],
           base_depth: Optional[int]) -> "Parametrization":
        """The parameterisation of a model of ``d_model`` and ``n_layers``; refuses settings that would not
        take effect (a base width under ``sp``, a base depth without ``completep``) or are missing."""
        if kind not in PARAMETRIZATIONS:
            raise UserError(f"unknown model.parametrization {kind!r}: choose one of {', '.join(PARAMETRIZATIONS)}.")
        if kind == "sp":
            if base_width is not None or base_depth is not None:
                raise UserError("model.base_width and model.base_depth only apply to model.parametrization=mup or "
                                "completep: drop them or set model.parametrization.")
            return cls()
        if base_width is None:
            raise UserError(f"model.parametrization={kind} needs model.base_width (the width whose tuned settings "
                            "transfer): set it, e.g. to model.d_model of the tuned model.")
        if kind == "mup":
            if base_depth is not None:
                raise UserError("model.base_depth only applies to model.parametrization=completep: drop it or set "
                                "model.parametrization=completep.")
            return cls(kind, d_model / base_width)
        if base_depth is None:
            raise UserError("model.parametrization=completep needs model.base_depth (the depth whose tuned settings "
                            "transfer): set it, e.g. to model.n_layers of the tuned model.")
        return cls(kind, d_model / base_width, n_layers / base_depth, base_depth)

    @property
    def standard(self) -> bool:
        """Whether every multiplier is one (the standard parameterisation, or muP at its base shape)."""
        return self.width_mult == 1.0 and self.depth_mult == 1.0

    @property
    def hidden_init(self) -> float:
        """The factor on the standard deviation of hidden weights: ``1/sqrt(width_mult)``."""
        return 1.0 / math.sqrt(self.width_mult)

    @property
    def hidden_lr(self) -> float:
        """The factor on the learning rate of hidden weights: ``depth_mult^(alpha-1) / width_mult``."""
        return self.depth_mult ** (ALPHA - 1.0) / self.width_mult

    @property
    def output_mult(self) -> float:
        """The factor on an output weight's result (the logits, the router's scores): ``1/width_mult``."""
        return 1.0 / self.width_mult

    @property
    def branch_mult(self) -> float:
        """The factor on every residual branch: ``depth_mult^-alpha`` under CompleteP, 1 otherwise."""
        return self.depth_mult ** -ALPHA

    def residual_depth(self, n_layers: int) -> int:
        """The depth in GPT-2's ``0.02 / sqrt(2 * depth)`` for residual output projections: the base depth
        under CompleteP (its branch multiplier carries the depth), the model's own otherwise."""
        return self.base_depth if self.base_depth is not None else n_layers

    def attention_scale(self, head_dim: int, base_head_dim: int) -> Optional[float]:
        """The attention scale ``sqrt(base_head_dim) / head_dim`` (muP's ``1/d_head``, equal to the standard
        ``1/sqrt(head_dim)`` at the base width); ``None`` (the kernel's own ``1/sqrt(head_dim)``) where equal."""
        if self.kind == "sp" or head_dim == base_head_dim:
            return None
        return math.sqrt(base_head_dim) / head_dim

