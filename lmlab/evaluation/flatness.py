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

``estimator`` may also be a list (``[fisher, hutchinson]``): every estimator runs on the same batches and
parameters, the first is the primary.

``blocks`` (a regular expression over parameter names, default ``blocks\\.``; null = off): a second trace
over the counted parameters it matches, ``tr(H_BB)`` of the diagonal block of those parameters, read off the
*same* samples (no second pass). Fisher: each example's squared gradient norm is a sum over parameters, and
the block trace is its partial sum over the block parameters. Hutchinson: for a probe ``v = (v_A, v_B)`` over
all counted parameters, ``E[v_B . (Hv)_B] = E[v_B^T H_BB v_B] + E[v_B^T H_BA v_A] = tr(H_BB)`` (the cross term
has mean 0: ``v_A`` and ``v_B`` are independent and zero-mean), so the block sample is the probe's
``v . Hv`` summed over the block parameters only (a noisier estimate than a probe over the block alone, but
free). A pattern that matches no counted parameter gives a block of 0 parameters and a block trace of 0.

Speed: Fisher's per-example gradients are reduced to per-parameter squared norms inside the vmap,
``chunk_size`` examples at a time (memory holds one chunk of per-example gradients). A model whose forward
branches on the data (MoE routing, HAT's word split) cannot be vmapped: there the examples run one at a
time (same numbers, slower). Hutchinson's probes run one double backward each (about twice a forward and
backward; batching the probes was no faster on a CPU). Fused scan kernels without a double backward or a
vmap rule (Mamba's chunked selective scan, the CUDA/Triton kernels) are replaced by their plain-PyTorch
references during the evaluation (``lmlab.models.scan.reference_scan``). With a fixed ``seed`` the results
repeat exactly on one device.

Returns ``flatness/{e}/trace`` (the mean estimate), ``flatness/{e}/trace_se`` (its standard error: over the
batch means when ``batches >= 2``, which includes the batch-to-batch noise; over the probes of the single
batch otherwise; for ``fisher``, over the per-example estimates), ``flatness/{e}/samples`` (number of probe
or example estimates) and, with ``blocks``, ``flatness/{e}/blocks_trace`` and ``flatness/{e}/blocks_trace_se``
(the same statistics of the block samples) for every estimator ``e``; the primary's values again as
``flatness/trace``, ``flatness/trace_se``, ``flatness/samples`` (and ``flatness/blocks_trace``,
``flatness/blocks_trace_se``); ``flatness/params`` (number of counted parameters) and, with ``blocks``,
``flatness/blocks_params``; ``flatness/params_id`` (and ``flatness/blocks_params_id``): ``parameterisation_id``
of the counted parameters' names and shapes, so that two traces can be checked to count the same parameters.
"""

from __future__ import annotations

import hashlib
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
from lmlab.models.scan import reference_scan
from lmlab.readout import model_device, pad_rows
from lmlab.settings import NonNegative, Optional, Positive
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


def hutchinson_terms(loss: torch.Tensor, params: Sequence[torch.Tensor], probes: int, distribution: str,
                     generator: torch.Generator) -> torch.Tensor:
    """(probes, len(params)) float64: entry [i, j] is ``v_j . (Hv)_j`` for probe i and parameter j, for the
    Hessian of the scalar ``loss`` w.r.t. ``params`` (its graph must still be alive); a row sums to
    ``v^T H v``. Hv by double backprop, one probe at a time (batching the probes through
    ``is_grads_batched`` or forward-over-reverse ``jvp`` measured no faster on a CPU)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = torch.empty(probes, len(params), dtype=torch.float64)
    for i in range(probes):
        vs = [probe_vector(p, distribution, generator) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < probes - 1)
        out[i] = torch.stack([(v * h).sum(dtype=torch.float64) for v, h in zip(vs, hv)]).cpu()
    return out


def hutchinson_samples(loss: torch.Tensor, params: Sequence[torch.Tensor], probes: int, distribution: str,
                       generator: torch.Generator) -> list[float]:
    """``probes`` samples of ``v^T H v`` (``hutchinson_terms`` summed over the parameters)."""
    return hutchinson_terms(loss, params, probes, distribution, generator).sum(1).tolist()


def per_example_sq_grads(fn: Callable, params: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor],
                         chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Name -> (examples,) ``||grad_param fn(params, *example)||^2`` for every example (the first axis of each
    of ``inputs``), vectorised: ``vmap`` over the examples of ``grad(fn)`` reduced to squared norms (so only
    ``chunk_size`` examples' gradients are held at once), ``params`` shared. ``fn`` returns a scalar. If the
    model cannot be vmapped (its forward branches on the data), one ``grad`` per example."""

    def sq(ps, *example):
        return {n: g.pow(2).sum() for n, g in grad(fn)(ps, *example).items()}

    n = len(inputs[0])
    step = int(chunk_size) if chunk_size else max(n, 1)
    batched = vmap(sq, in_dims=(None,) + (0,) * len(inputs))
    try:
        # one chunk at a time, its result copied and its own outputs dropped at once: holding them (as vmap's own
        # chunk_size does until it concatenates) kept ~250 KB per example alive at 0.1M parameters (measured
        # on a d_model-64 transformer, 16,384 examples: peak 4.6 GB with vmap's chunk_size, 0.85 GB here)
        chunks = [{name: v.clone() for name, v in batched(params, *(x[i:i + step] for x in inputs)).items()}
                  for i in range(0, n, step)]
        return {name: torch.cat([c[name] for c in chunks]) for name in params}
    except RuntimeError:
        rows = [sq(params, *(x[i] for x in inputs)) for i in range(n)]
        return {name: torch.stack([r[name] for r in rows]) for name in params}


def per_example_sq_grad_norms(fn: Callable, params: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor],
                              chunk_size: int | None = None) -> torch.Tensor:
    """``||grad_params fn(params, *example)||^2`` for every example (``per_example_sq_grads`` summed)."""
    return sum(per_example_sq_grads(fn, params, inputs, chunk_size).values())


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


def parameterisation_id(params: dict[str, torch.Tensor]) -> float:
    """The sorted (name, shape) pairs of ``params`` as a number (the first 48 bits of their SHA-1, exact in a
    float): equal for two traces exactly when, but for a collision, they count the same parameters."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in sorted(params.items()))
    return float(int(hashlib.sha1(text.encode()).hexdigest()[:12], 16))


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

    def __init__(self, estimator: str | Sequence[str] = "hutchinson", probes: Positive = 10,
                 distribution: str = "rademacher", batches: Positive = 4, batch_size: Positive = 64,
                 examples: Positive = 256, params: str = "all", blocks: str | None = "blocks\\.",
                 reduction: str = "mean", embed_width: Optional[Positive] = None, split: str = "validation",
                 seed: NonNegative = 0, chunk_size: Positive = 64) -> None:
        estimators = [estimator] if isinstance(estimator, str) else [str(e) for e in estimator]
        if not estimators or len(set(estimators)) < len(estimators):
            raise UserError(f"eval.flatness.estimator={estimator!r} must name each estimator once: give one or "
                            f"a list of {', '.join(ESTIMATORS)}.")
        for key, values, allowed in (("estimator", estimators, ESTIMATORS), ("distribution", [distribution],
                                     DISTRIBUTIONS), ("reduction", [reduction], REDUCTIONS)):
            for value in values:
                if value not in allowed:
                    raise UserError(f"unknown eval.flatness.{key}={value!r}: choose one of {', '.join(allowed)}.")
        for key, value in (("probes", probes), ("batches", batches), ("batch_size", batch_size),
                           ("examples", examples), ("chunk_size", chunk_size)):
            if int(value) < 1:
                raise UserError(f"eval.flatness.{key} must be at least 1, got {value}: raise it.")
        if blocks is not None:
            try:
                re.compile(blocks)
            except re.error as e:
                raise UserError(f"eval.flatness.blocks={blocks!r} is not a valid regular expression ({e}): fix "
                                "it or set it to null.") from None
        self.estimators, self.probes, self.distribution = estimators, int(probes), distribution
        self.batches, self.batch_size, self.examples = int(batches), int(batch_size), int(examples)
        self.params, self.blocks, self.reduction, self.embed_width = params, blocks, reduction, embed_width
        self.split, self.seed, self.chunk_size = split, int(seed), int(chunk_size)

    @property
    def estimator(self) -> str:
        """The primary estimator."""
        return self.estimators[0]

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
        results = {}
        try:
            with one_thread(device.type == "cpu"):
                prepared = [_to(p, device) for p in self._prepared_batches(objective, datamodule.splits[self.split])]
                params = select_parameters(model, self.params)
                pattern = re.compile(self.blocks) if self.blocks is not None else None
                in_block = {id(p): pattern is not None and bool(pattern.search(n)) for n, p in params.items()}
                with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), reference_scan():
                    for e in self.estimators:
                        if e == "hutchinson":
                            results[e] = self._hutchinson(model, prepared, list(params.values()), in_block)
                        else:
                            results[e] = self._fisher(model, objective.attention, prepared, params, in_block)
        finally:
            module.model.train(was_training)
        out = {}
        for prefix, e in [(f"{e}/", e) for e in self.estimators] + [("", self.estimator)]:  # primary: again
            out.update({f"{self.name}/{prefix}{k}": v for k, v in results[e].items()
                        if pattern is not None or "blocks" not in k})
        out[f"{self.name}/params"] = float(sum(p.numel() for p in params.values()))
        out[f"{self.name}/params_id"] = parameterisation_id(params)
        if pattern is not None:
            out[f"{self.name}/blocks_params"] = float(sum(p.numel() for p in params.values() if in_block[id(p)]))
            out[f"{self.name}/blocks_params_id"] = parameterisation_id(
                {n: p for n, p in params.items() if in_block[id(p)]})
        return out

    def _hutchinson(self, model, prepared, params, in_block: dict[int, bool]) -> dict[str, float]:
        g = torch.Generator().manual_seed(self.seed)
        block = torch.tensor([in_block[id(p)] for p in params])
        totals, blocks = [], []  # per batch: (probes,) samples
        for p in prepared:
            terms = hutchinson_terms(self._loss(model, p), params, self.probes, self.distribution, g)
            totals.append(terms.sum(1).numpy())
            blocks.append(terms[:, block].sum(1).numpy())

        def stats(per_batch):
            if len(per_batch) > 1:
                return mean_and_se([np.mean(s) for s in per_batch])
            return mean_and_se(per_batch[0])

        trace, se = stats(totals)
        blocks_trace, blocks_se = stats(blocks)
        return {"trace": trace, "trace_se": se, "samples": float(sum(len(s) for s in totals)),
                "blocks_trace": blocks_trace, "blocks_trace_se": blocks_se}

    def _fisher(self, model, kind: str, prepared, params: dict[str, torch.Tensor],
                in_block: dict[int, bool]) -> dict[str, float]:
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
        block_names = [names[id(p)] for p in params.values() if in_block[id(p)]]
        frozen = {n: p.detach() for n, p in wrapper.named_parameters() if n not in counted}

        def fn(counted_params, *example):
            return functional_call(wrapper, (counted_params, frozen), example)

        sq = per_example_sq_grads(fn, counted, (ids, pads, prefixes, select, labels), self.chunk_size)
        scale = positions_seen / rows_seen if self.reduction == "sum" else 1.0
        total = sum(v.double() for v in sq.values()) * scale
        block = sum((sq[n].double() for n in block_names), torch.zeros_like(total)) * scale
        trace, se = mean_and_se(total.cpu().numpy())
        blocks_trace, blocks_se = mean_and_se(block.cpu().numpy())
        return {"trace": trace, "trace_se": se, "samples": float(len(total)), "blocks_trace": blocks_trace,
                "blocks_trace_se": blocks_se}


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
