"""Growth operators: a finished model's weights as the start of a model of another shape or vocabulary.

Each operator is a pure function of state dicts (or of a module, for widening) and returns a new state dict;
``lmlab.training.init_from`` chooses and composes them when a run starts with ``init_from.run=<run dir>``.

* **New vocabulary** (Yao, Yu, Zhang, Narasimhan, Tenenbaum, Gan, "Linking Emergent and Natural Languages via
  Corpus Transfer", ICLR 2022, arXiv 2203.13344: pretrain on an emergent-language corpus, keep the body, learn new
  embeddings for natural language). ``revocab(parent, child, rows)`` keeps every weight of the parent except
  the token embedding and the LM head, which come from the child's own initialisation; ``rows`` maps a child
  token id to the parent id of the same token (the special tokens, and tokens with the same bytes where both
  runs have text tokenizers), whose embedding and head rows are copied. The body stays bit-identical.
* **Depth up-scaling** (Kim et al., "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective
  Depth Up-Scaling", arXiv 2312.15166). ``solar_layers(n, n_new)`` is SOLAR's layer map: two copies of the
  ``n`` layers, the first keeping its first ``ceil(n_new / 2)`` layers and the second its last
  ``floor(n_new / 2)`` (SOLAR: 32 -> 48 keeps layers 0..23 then 8..31). ``deepen(state, layers, zero)``
  builds block ``i`` of the grown model from the parent's block ``layers[i]``. With ``zero`` (the
  function-preserving variant, in the sense of the growth operators of Shen et al. 2022, "Staged Training
  for Transformer Language Models", arXiv 2203.06211), every block that repeats a layer already placed has
  its residual outputs (attention ``out``, MLP ``down``) set to zero, so it adds nothing to the residual
  stream: when the first occurrences of the parent's layers come in order (SOLAR's map does) the grown model
  computes the parent's function.
* **Widening**: ``lmlab.models.widen.widen`` (function-preserving: the residual stream tiled ``k`` times).

A state dict's blocks are the keys ``blocks.<i>.<rest>``; everything else (embeddings, final norm, head,
learned positions) is left to the caller.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from lmlab.errors import UserError

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
EMBED = "embed.weight"
HEAD = "head.weight"


def n_blocks(state: dict[str, torch.Tensor]) -> int:
    """The number of blocks ``blocks.<i>.*`` in a state dict."""
    found = [int(m.group(1)) for m in map(BLOCK_KEY.match, state) if m]
    return max(found) + 1 if found else 0


def solar_layers(n: int, n_new: int) -> list[int]:
    """SOLAR's layer map from ``n`` to ``n_new`` layers (``n <= n_new <= 2n``): the first ``ceil(n_new/2)``
    layers of one copy, then the last ``floor(n_new/2)`` of a second."""
    first, second = math.ceil(n_new / 2), n_new // 2
    if not n <= n_new <= 2 * n:
        raise UserError(f"depth up-scaling duplicates the parent's {n} layers at most once, so model.n_layers must "
                        f"be between {n} and {2 * n}, got {n_new}: change model.n_layers or list the parent "
                        "layer of every new layer in init_from.layers.")
    return list(range(first)) + list(range(n - second, n))


def is_repeat(layers: list[int]) -> list[bool]:
    """For each position of a layer map, whether its parent layer was already placed earlier."""
    seen: set[int] = set()
    out = []
    for i in layers:
        out.append(i in seen)
        seen.add(i)
    return out


def residual_outputs(block: nn.Module) -> list[str]:
    """The parameter names (within a block) of its residual output projections: the linear layers tagged
    ``is_residual_proj`` (attention ``out``, MLP ``down``)."""
    names = []
    for name, module in block.named_modules():
        if getattr(module, "is_residual_proj", False):
            names += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names


def deepen(state: dict[str, torch.Tensor], layers: list[int], zero: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A state dict whose block ``i`` is a copy of ``state``'s block ``layers[i]``; in every block that repeats
    a layer already placed, the parameters named in ``zero`` (within a block, e.g. ``attn.out.weight``) are set
    to 0. Keys outside the blocks are kept as they are."""
    n = n_blocks(state)
    if any(not 0 <= i < n for i in layers):
        raise UserError(f"init_from.layers={list(layers)} names a layer the parent lacks (it has layers 0..{n - 1}): "
                        "list parent layers only.")
    out = {k: v.clone() for k, v in state.items() if not BLOCK_KEY.match(k)}
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = BLOCK_KEY.match(key)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for new, (old, repeat) in enumerate(zip(layers, is_repeat(layers))):
        for rest, value in by_layer.get(old, {}).items():
            value = value.clone()
            if repeat and rest in zero:
                value.zero_()
            out[f"blocks.{new}.{rest}"] = value
    return out


def revocab(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor], rows: dict[int, int],
            reset_head_only: bool = False) -> dict[str, torch.Tensor]:
    """The parent's weights with the child's token embedding and LM head (its own initialisation, of the
    child's vocabulary), except the rows ``rows`` (child id -> parent id), copied from the parent.

    ``reset_head_only``: keep the parent's token embedding and re-initialise the LM head alone (an untied
    model with the same vocabulary)."""
    out = {k: v.clone() for k, v in parent.items()}
    for key in (EMBED, HEAD):
        if key not in child:
            continue
        if reset_head_only and key == EMBED:
            continue
        new = child[key].clone()
        if key in parent and rows:
            ids = sorted(rows)
            src = torch.tensor([rows[i] for i in ids], dtype=torch.long)
            dst = torch.tensor(ids, dtype=torch.long)
            new[dst] = parent[key][src].to(new.dtype)
        out[key] = new
    return out


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tied model's weights for the same model untied: the LM head starts as a copy of the embedding (the
    function is unchanged)."""
    out = dict(state)
    out[HEAD] = state[EMBED].clone()
    return out
