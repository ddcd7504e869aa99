"""Function-preserving widening: embed a small model into a wider architecture (the Transformer's construction).

Liu, Xie, Li, Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models",
ICML 2023, arXiv 2210.14199: the trace of the Hessian depends on the parameterisation, so models of
different widths are compared only after embedding the smaller one into the larger architecture without
changing its function ("tile the weights, divide by the width ratio").

``widen(model, d_model)`` widens any model whose spec (``lmlab.models.spec``) declares how; the others are
refused in one sentence. ``tile_transformer`` is our construction for ``lmlab.models.transformer.Transformer``
(the paper gives no code for it): with an integer ratio ``k = d_model / model.d_model`` it returns a new
Transformer
whose residual stream is the original one tiled ``k`` times, ``x' = [x, x, .., x]``:

* token (and learned position) embeddings: columns tiled, not divided (a lookup sums nothing);
* every linear layer whose input is a tiled vector (attention ``qkv`` and ``out``, MLP ``up``/``gate``/
  ``down``, the LM head): the weight tiled along both axes (only along the input axis for the LM head) and
  divided by ``k``, since the tiled input sums ``k`` copies of every term;
* attention heads: ``n_heads' = k * n_heads`` with the same ``head_dim`` (so a model built with ``head_dim``
  widens to exactly the shapes of ``Transformer(d_model=d_model, head_dim=head_dim)``); the query/key/value of head
  ``j' `` is that of head ``j' mod n_heads`` (the ``qkv`` layout tiles each of q, k and v), so the
  scores, the 1/sqrt(head_dim) scale and rotary positions are unchanged and the concatenated heads are
  the original output tiled;
* ``d_ff' = k * d_ff``: the MLP's hidden vector is tiled too (GELU and SwiGLU act elementwise);
* RMSNorm / LayerNorm: the mean square (and mean, variance) of a tiled vector equal those of the
  vector, so with the *same* ``eps`` the norm of a tiled vector is the tiled norm; gains (and LayerNorm
  biases) are tiled.

Tied embeddings cannot stay tied: the embedding is tiled while the LM head is tiled and divided by ``k``.
The widened model is therefore always untied (``tie_embeddings=False``), also for ``k = 1``, where
``widen`` returns an untied copy — so that every model compared at one width has the same
parameterisation. Untying changes the Hessian of the embedding parameters (a tied model's trace adds the
cross term ``2 tr(H_in,out)``); a trace over ``params=no_embeddings`` does not depend on tying.
Dropout, norms, positions and the MLP kind are copied; the copy lives on the original's device and dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import UserError
from lmlab.models.spec import spec_of


def _tile(weight: torch.Tensor, k: int, rows: bool, cols: bool) -> torch.Tensor:
    w = weight
    if rows:
        w = w.repeat(k, *([1] * (w.ndim - 1)))
    if cols:
        w = w.repeat(1, k)
    return w


def _tile_qkv(weight: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """(3d, d) -> (3kd, kd): each of the q, k, v blocks tiled k times along its rows (so every head is
    repeated k times), columns tiled, divided by k."""
    q, kk, v = weight.split(d, dim=0)
    return torch.cat([_tile(w, k, rows=True, cols=True) for w in (q, kk, v)]) / k


def widen(model: nn.Module, d_model: int) -> nn.Module:
    """A model of width ``d_model`` that computes the same logits as ``model``, by the construction its spec
    declares; a model that declares none is refused in one sentence."""
    how = spec_of(model).widen
    if how is None:
        raise UserError(f"model {type(model).__name__} declares no widening in its spec: unset "
                        "eval.flatness.embed_width or use a model that widens (model=transformer).")
    return how(model, d_model)


def tile_transformer(model: nn.Module, d_model: int) -> nn.Module:
    """A Transformer (of ``model``'s own class, ``lmlab.models.transformer.Transformer`` or a subclass with its
    constructor) of width ``d_model`` (an integer multiple of ``model.d_model``) that computes the same logits as
    ``model`` for every input and attention pattern (see the module docstring)."""
    d = model.d_model
    if d_model < d or d_model % d:
        raise UserError(f"cannot widen d_model={d} to {d_model}: set embed_width to a multiple of every "
                        "compared model's d_model.")
    k = d_model // d
    first = model.blocks[0] if len(model.blocks) else None
    norm = "layernorm" if isinstance(model.norm, nn.LayerNorm) else "rmsnorm"
    mlp = first.mlp.kind if first is not None else "gelu"
    dropout = first.mlp.dropout.p if first is not None else 0.0
    wide = type(model)(model.vocab_size, model.attention_kind, d_model=d_model, n_layers=model.n_layers,
                       n_heads=k * model.n_heads, d_ff=k * model.d_ff, norm=norm, positions=model.positions,
                       max_len=model.max_len, dropout=dropout, tie_embeddings=False,
                       activation_checkpointing=model.activation_checkpointing, mlp=mlp,
                       rope_base=model.rope_base, sinks=model.sinks)
    ref = next(model.parameters())
    wide = wide.to(device=ref.device, dtype=ref.dtype)

    def norm_copy(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(_tile(src.weight, k, rows=True, cols=False))
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(_tile(src.bias, k, rows=True, cols=False))
        dst.eps = src.eps

    with torch.no_grad():
        wide.embed.weight.copy_(_tile(model.embed.weight, k, rows=False, cols=True))
        if model.pos_embed is not None:
            wide.pos_embed.weight.copy_(_tile(model.pos_embed.weight, k, rows=False, cols=True))
        for wb, b in zip(wide.blocks, model.blocks):
            norm_copy(wb.norm1, b.norm1)
            norm_copy(wb.norm2, b.norm2)
            wb.attn.qkv.weight.copy_(_tile_qkv(b.attn.qkv.weight, k, d))
            wb.attn.out.weight.copy_(_tile(b.attn.out.weight, k, rows=True, cols=True) / k)
            for name in ("up", "gate", "down"):
                src = getattr(b.mlp, name)
                if src is not None:
                    getattr(wb.mlp, name).weight.copy_(_tile(src.weight, k, rows=True, cols=True) / k)
        norm_copy(wide.norm, model.norm)
        wide.head.weight.copy_(_tile(model.head.weight, k, rows=False, cols=True) / k)
    wide.train(model.training)
    return wide
