"""``eval=flatness``: the trace of the Hessian of the pre-training loss (sharpness; lower = flatter).

Liu, Xie, Li, Ma, "Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models",
ICML 2023, arXiv 2210.14199: among models with the same, minimal pre-training loss, flatter ones (smaller
Tr(H)) transfer better. The paper's text and its released code estimate the trace differently; both are
here (``estimator``):

* ``hutchinson`` (the released code, PyHessian-style): ``Tr(H) = E_v[v^T H v]`` with Rademacher (or
  Gaussian) probes ``v`` over the counted parameters; ``Hv`` by double backprop
  (``g = grad(L, create_graph=True)``, ``Hv = grad(g, v)``), ``probes`` probes on each of ``batches``
  batches, averaged. Valid anywhere (the estimate of an indefinite Hessian can be negative).
* ``fisher`` (the paper's text): ``Tr(F) = E_x E_{y ~ p_theta(.|x)} ||grad log p_theta(y|x)||^2``: at each
  loss position the label is *sampled from the model's own prediction*, and the per-example gradients
  of ``log p(sampled label)`` are computed at once with ``torch.func`` (``functional_call`` + ``vmap`` +
  ``grad``). An "example" is one loss position (one masked token for MLM, one next token for CLM) with
  the whole (prepared) row as its context. ``examples`` positions are taken in order from the same
  batches as Hutchinson's. Always >= 0; equal to the Hessian trace at a minimiser of the expected loss.

The loss is the *pre-training* cross-entropy of ``module.objective``: its ``prepare`` on rows of
``split`` (default validation), with fixed seeds (batch ``b`` uses seed ``seed + b``, so an MLM masks the
same positions every time), then the cross-entropy over the prepared loss positions. Objective-specific
extra terms (the adversarial head of ``adversarial_mlm``, a model's ``aux_loss``) are *not* included, so
models trained by different algorithms are compared on the same loss. ``reduction``: ``mean`` = mean
over the loss positions of a batch (what training minimises); ``sum`` = sum over the loss positions of
a row, averaged over rows (per-sequence loss; its trace is ``mean`` times the average number of loss
positions per row). The model is in eval mode (no dropout), float32, attention through the math kernel
(the fused kernels have no double backward); its mode is restored afterwards. On a CPU the evaluator runs
with one intra-op thread (as ``eval=probe``'s head): tiny matmuls thrash on shared cores.

``params``: which parameters count — ``all`` (the paper's code counts all but the pooler and the output
bias; our models have neither), ``no_embeddings`` (drop the token and position embeddings and the LM head,
shared or not), or any other string, read as a regular expression that must match (``re.search``) the
parameter names to count (``blocks\\.`` = the Transformer blocks only). The trace is *not* normalised by
the number of parameters.

``embed_width``: if set, the model is first widened function-preservingly to ``d_model = embed_width``
(``lmlab.models.widen``: tile the weights, divide by the width ratio; the copy is always untied), so that
the traces of models of different sizes are measured in the same parameterisation.

Returns ``flatness/trace`` (the mean estimate), ``flatness/trace_se`` (its standard error: over the batch
means when ``batches >= 2``, which includes the batch-to-batch noise; over the probes of the single batch
otherwise; for ``fisher``, over the per-example estimates), ``flatness/samples`` (number of probe or
example estimates) and ``flatness/params`` (number of counted parameters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.attention import Attention
from lmlab.errors import UserError
from lmlab.evaluation.base import Evaluator
from lmlab.readout import model_device, pad_rows
from lmlab.threads import one_thread

ESTIMATORS = ("hutchinson", "fisher")
DISTRIBUTIONS = ("rademacher", "gaussian")
REDUCTIONS = ("mean", "sum")


# ----- the estimators, on any loss / model (tests call these directly) -----

def probe_vector(like: torch.Tensor, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """A probe with E[v v^T] = I: Rademacher (+-1) or standard Gaussian entries, drawn on the CPU from
    ``generator`` (so the probes do not depend on the device)."""
    if distribution == "rademacher":
        v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int64).to(like.dtype) * 2 - 1
    elif distribution == "gaussian":
        v = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    else:
        raise UserError(f"unknown probe distribution {distribution!r}: choose rademacher or gaussian.")
    return v.to(like.device)


def hutchinson_samples(loss: torch.Tensor, params: Sequence[torch.Tensor], probes: int, distribution: str,
                       generator: torch.Generator) -> list[float]:
    """``probes`` samples of ``v^T H v`` for the Hessian of the scalar ``loss`` w.r.t. ``params`` (its graph
    must still be alive), Hv by double backprop."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for i in range(probes):
        vs = [probe_vector(p, distribution, generator) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < probes - 1)
        out.append(float(sum((v * h).sum() for v, h in zip(vs, hv))))
    return out


def per_example_sq_grad_norms(fn: Callable, params: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor],
                              chunk_size: int | None = None) -> torch.Tensor:
    """``||grad_params fn(params, *example)||^2`` for every example (the first axis of each of ``inputs``),
    vectorised: ``vmap(grad(fn))`` over the examples, ``params`` shared. ``fn`` returns a scalar."""
    dims = (None,) + (0,) * len(inputs)
    grads = vmap(grad(fn), in_dims=dims, chunk_size=chunk_size)(params, *inputs)
    return sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())


def mean_and_se(values) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


# ----- parameter selection -----

def embedding_parameters(model: nn.Module) -> set[int]:
    """ids of the token/position embeddings and of the LM head (tied or not)."""
    out = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        out.add(id(head.weight))
        if head.bias is not None:
            out.add(id(head.bias))
    return out


def select_parameters(model: nn.Module, which: str) -> dict[str, torch.Tensor]:
    """Name -> parameter of those that count (see the module docstring), each shared tensor once."""
    named = dict(model.named_parameters())  # deduplicated: a tied weight appears under its first name
    if which == "all":
        chosen = named
    elif which == "no_embeddings":
        skip = embedding_parameters(model)
        chosen = {n: p for n, p in named.items() if id(p) not in skip}
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise UserError(f"eval.flatness.params={which!r} is not all, no_embeddings or a valid regular "
                            f"expression ({e}): fix it.") from None
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    if not chosen:
        raise UserError(f"eval.flatness.params={which!r} matches no parameter of the model: use all, "
                        "no_embeddings or a regular expression over parameter names (e.g. blocks\\.).")
    return chosen


class _PositionLogProb(nn.Module):
    """One example for ``torch.func``: a prepared row, a one-hot of the loss position and a label ->
    ``log p(label | row)`` at that position."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, ids, padding, prefix_len, select, label):
        att = Attention(self.kind, padding=padding[None], prefix_len=prefix_len[None])
        hidden = select @ self.model(ids[None], att)[0]
        logp = torch.log_softmax(self.model.logits(hidden).float(), dim=-1)
        return logp.gather(0, label.view(1)).squeeze(0)


class Flatness(Evaluator):
    name = "flatness"

    def __init__(self, estimator: str = "hutchinson", probes: int = 10, distribution: str = "rademacher",
                 batches: int = 4, batch_size: int = 64, examples: int = 256, params: str = "all",
                 reduction: str = "mean", embed_width: int | None = None, split: str = "validation",
                 seed: int = 0, chunk_size: int = 64) -> None:
        for key, value, allowed in (("estimator", estimator, ESTIMATORS), ("distribution", distribution,
                                    DISTRIBUTIONS), ("reduction", reduction, REDUCTIONS)):
            if value not in allowed:
                raise UserError(f"unknown eval.flatness.{key}={value!r}: choose one of {', '.join(allowed)}.")
        for key, value in (("probes", probes), ("batches", batches), ("batch_size", batch_size),
                           ("examples", examples), ("chunk_size", chunk_size)):
            if int(value) < 1:
                raise UserError(f"eval.flatness.{key} must be at least 1, got {value}: raise it.")
        self.estimator, self.probes, self.distribution = estimator, int(probes), distribution
        self.batches, self.batch_size, self.examples = int(batches), int(batch_size), int(examples)
        self.params, self.reduction, self.embed_width = params, reduction, embed_width
        self.split, self.seed, self.chunk_size = split, int(seed), int(chunk_size)

    def _prepared_batches(self, objective, split) -> list:
        """The objective's prepared batches of consecutive rows of ``split``, seeds ``seed + b``."""
        rows = [list(r) for r in split.with_format(None)[: self.batches * self.batch_size]["input_ids"]]
        if not rows:
            raise UserError(f"the {self.split} split is empty: choose another eval.flatness.split.")
        out = []
        for b in range(self.batches):
            chunk = rows[b * self.batch_size : (b + 1) * self.batch_size]
            if not chunk:
                break
            prepared = objective.prepare({"input_ids": pad_rows(chunk), "seed": self.seed + b})
            if bool(prepared.loss_mask.any()):
                out.append(prepared)
        if not out:
            raise UserError(f"the {self.split} split gives no loss positions: choose another eval.flatness.split.")
        return out

    def _loss(self, model, prepared) -> torch.Tensor:
        hidden = model(prepared.inputs, prepared.attention)
        logits = model.logits(hidden[prepared.loss_mask]).float()
        nll = F.cross_entropy(logits, prepared.targets[prepared.loss_mask], reduction="sum")
        denom = prepared.inputs.shape[0] if self.reduction == "sum" else int(prepared.loss_mask.sum())
        return nll / denom

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        if self.split not in datamodule.splits:
            raise UserError(f"data has no split {self.split!r}: set eval.flatness.split to one of "
                            f"{', '.join(datamodule.splits)}.")
        model, objective = module.model, module.objective
        was_training = model.training
        if self.embed_width is not None:
            from lmlab.models.widen import widen

            model = widen(model, int(self.embed_width))
        device = model_device(model)
        model.eval()
        try:
            with one_thread(device.type == "cpu"):
                prepared = [_to(p, device) for p in self._prepared_batches(objective, datamodule.splits[self.split])]
                params = select_parameters(model, self.params)
                with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                    if self.estimator == "hutchinson":
                        trace, se, n = self._hutchinson(model, prepared, list(params.values()))
                    else:
                        trace, se, n = self._fisher(model, objective.attention, prepared, params)
        finally:
            module.model.train(was_training)
        return {f"{self.name}/trace": trace, f"{self.name}/trace_se": se, f"{self.name}/samples": float(n),
                f"{self.name}/params": float(sum(p.numel() for p in params.values()))}

    def _hutchinson(self, model, prepared, params) -> tuple[float, float, int]:
        g = torch.Generator().manual_seed(self.seed)
        per_batch = []
        for p in prepared:
            per_batch.append(hutchinson_samples(self._loss(model, p), params, self.probes, self.distribution, g))
        if len(per_batch) > 1:
            trace, se = mean_and_se([np.mean(s) for s in per_batch])
        else:
            trace, se = mean_and_se(per_batch[0])
        return trace, se, sum(len(s) for s in per_batch)

    def _fisher(self, model, kind: str, prepared, params: dict[str, torch.Tensor]) -> tuple[float, float, int]:
        # the examples: loss positions of the prepared batches, in order, up to ``examples``
        ids, pads, prefixes, selects, rows_seen, positions_seen = [], [], [], [], 0, 0
        length = max(p.inputs.shape[1] for p in prepared)
        for p in prepared:
            rows_seen += p.inputs.shape[0]
            positions_seen += int(p.loss_mask.sum())
            b, t = p.loss_mask.nonzero(as_tuple=True)
            inputs = _pad_to(p.inputs, length)
            padding = p.attention.padding
            if padding is None:
                padding = torch.ones_like(p.inputs, dtype=torch.bool)
            padding = _pad_to(padding, length)
            prefix = p.attention.prefix_len if p.attention.prefix_len is not None else torch.zeros(
                p.inputs.shape[0], dtype=torch.long)
            ids.append(inputs[b])
            pads.append(padding[b])
            prefixes.append(prefix.to(inputs.device)[b])
            selects.append(t)
        ids, pads = torch.cat(ids)[: self.examples], torch.cat(pads)[: self.examples]
        prefixes, t = torch.cat(prefixes)[: self.examples], torch.cat(selects)[: self.examples]
        select = (torch.arange(length, device=t.device)[None] == t[:, None]).float()

        wrapper = _PositionLogProb(model, kind)
        # labels sampled from the model's own prediction at each example's position
        with torch.no_grad():
            probs = []
            for i in range(0, len(ids), self.chunk_size):
                sl = slice(i, i + self.chunk_size)
                att = Attention(kind, padding=pads[sl], prefix_len=prefixes[sl])
                hidden = (select[sl].unsqueeze(1) @ model(ids[sl], att)).squeeze(1)
                probs.append(torch.softmax(model.logits(hidden).float(), dim=-1))
            probs = torch.cat(probs)
        g = torch.Generator().manual_seed(self.seed)
        labels = torch.multinomial(probs.cpu().double(), 1, generator=g).squeeze(1).to(t.device)

        names = {id(p): n for n, p in wrapper.named_parameters()}
        counted = {names[id(p)]: p.detach() for p in params.values()}
        frozen = {n: p.detach() for n, p in wrapper.named_parameters() if n not in counted}

        def fn(counted_params, *example):
            return functional_call(wrapper, (counted_params, frozen), example)

        sq = per_example_sq_grad_norms(fn, counted, (ids, pads, prefixes, select, labels), self.chunk_size)
        scale = positions_seen / rows_seen if self.reduction == "sum" else 1.0
        trace, se = mean_and_se((sq.double() * scale).cpu().numpy())
        return trace, se, len(sq)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] >= length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1])], dim=1)


def _to(prepared, device):
    att = prepared.attention
    att = Attention(att.kind, padding=None if att.padding is None else att.padding.to(device),
                    prefix_len=None if att.prefix_len is None else att.prefix_len.to(device))
    return type(prepared)(inputs=prepared.inputs.to(device), targets=prepared.targets.to(device),
                          loss_mask=prepared.loss_mask.to(device), attention=att)
