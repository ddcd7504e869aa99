"""``eval=probe``: a linear probe on frozen backbone features (Alain & Bengio 2016, arXiv 1610.01644).

The backbone (eval mode, no gradients) reads the unmasked rows of the ``downstream`` split (to train the
head) and the ``test`` split (to score it) with the objective's attention pattern and a padding mask.
Features are the mean of the final hidden states over real tokens (``pooling=mean``) or their
concatenation, zero-padded to the longest row of both splits (``pooling=concat``); they are computed
once and standardised with the training rows' mean and std. For each seed a linear head (fresh random
init and batch order) is trained with AdamW on minibatches of ``batch_size`` rows for ``epochs``
epochs. Rows whose label is -1 are dropped.

``task``: one task (default: the data's first) or a list of tasks, of which those the data has are probed (at
least one must be; so one list can name the tasks of several sources, e.g. ``[task_b, task_z]`` for the PCFG and
the HMM). Every task is probed on its own labelled rows; the first one's metrics carry the keys below, and with a
list every task's also carry its name,
``probe/<task>/acc``, ``probe/<task>/acc_ci95``, ``probe/<task>/lookup_acc`` (and ``probe/<task>/proj_acc``).

Returns ``probe/acc`` (mean test accuracy over seeds), ``probe/acc_std`` (sample std over seeds),
``probe/acc_ci95`` (half-width of the 95% t-interval over seeds; NaN for one seed) and ``probe/chance``
(majority-class rate on test). The interval covers the head's optimisation noise only: the backbone
and the data are fixed.

Lookup-table baseline (``lookup=true``, the "optimal-loss model" of Liu, Xie, Li, Ma, "Same Pre-training
Loss, Better Downstream", ICML 2023, arXiv 2210.14199): where the source knows the exact single-mask
conditionals (``single_mask_conditionals``: PCFG by inside-outside, HMM by forward-backward), the same
probe is also trained on *their* features instead of the backbone's: for every word position t of a
row the vector p(. | x_-t) over the words (the special-token columns, always zero, are dropped).
``pooling=mean``: the mean of these vectors over the row's word positions (BOS/EOS have none);
``pooling=concat``: the vector of each row position t (zeros at BOS, EOS and padding), concatenated and
zero-padded to the same ``length`` as the backbone's features. Same standardisation, head, seeds and
epochs. Adds ``probe/lookup_acc``, ``probe/lookup_acc_std`` and ``probe/lookup_acc_ci95``. These do not
depend on the model, so they are computed once per evaluator and reused (e.g. by ``eval_every``).

Prefix-table ceiling (sources whose labels are a function of a row's first words, ``source.task_prefix_words``:
the PCFG's tasks B and C): ``probe/table_acc`` (``probe/<task>/table_acc``) is the test accuracy of a lookup
table from those words to the majority label of the training rows that start with them (ties: the smallest
label), the training rows' majority label for a prefix never seen (``prefix_table_accuracy``). It measures how
much of a task a model can solve by memorising prefixes of the probe's training rows: a task whose table
scores near 100% leaves no room for a better representation to show.

Calibration (``ece=true``): ``probe/ece`` is the expected calibration error (Guo et al.
2017, arXiv 1706.04599; 15 equal-width bins, ``lmlab.stats.expected_calibration_error``) of each head's test
predictions (confidence: the softmax probability of the predicted class), averaged over seeds, and
``probe/lookup_ece`` the same for the lookup-table probe, the reference a probe of the exact conditionals
reaches. Computing it reads the trained heads only, so every other number is unchanged.

Fixed random projection (``project: <dims>``): the probe is also trained on the standardised features
multiplied by one fixed Gaussian matrix (``dims`` x feature width, entries N(0, 1/dims), drawn from seed 0 of
its own generator, so the same for every model of the same feature width). Models of different widths are then
probed through features of one width: ``probe/proj_acc`` (``probe/<task>/proj_acc``).

Layer by layer (``layer``; the probes after every layer of Alain & Bengio 2016): ``last`` (the default) probes
the backbone's output as above; an int ``i`` probes layer ``i`` instead; ``all`` probes every layer and returns
the curve ``probe/layer<i>/acc``, ``probe/layer<i>/acc_std`` and ``probe/layer<i>/acc_ci95`` for ``i = 0 .. L``
(same seeds, heads and t-intervals) beside the keys above, which stay those of the last layer (with a list of
tasks, also ``probe/<task>/layer<i>/acc`` etc.). Layer 0 is the input of the first block (the token embedding,
with learned positions where the model adds them), layer ``i`` (0 < i < L) the residual stream after block
``i``, and layer ``L`` the backbone's output (after the last block and the final norm: the states the default
reads, so its row equals ``eval=probe``). The states are read with forward hooks on the model's block list
``model.blocks`` (``layer_states``); a model without one (the LSTM, HAT) is refused for any layer but
``last``. The lookup baseline reads the source's exact conditionals, not the model, so it does not depend on
the layer: it is reported once, ``probe/lookup_acc``, the reference for every layer's row. ``ece`` and
``project`` apply to the probed layer (``all``: the last).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import UserError
from lmlab.evaluation.common import DownstreamEvaluator, head_calibration, summarize
from lmlab.readout import features, model_device, pad_rows, pool, reading_attention
from lmlab.settings import NonNegativeFloat, Optional, Positive, PositiveFloat
from lmlab.stats import sample_std, t_interval
from lmlab.threads import one_thread
from lmlab.vocab import N_SPECIAL

LAYER_CHOICES = ("last", "all")


def block_list(model, setting: str) -> torch.nn.ModuleList:
    """The backbone's block list ``model.blocks`` (unwrapped from ``torch.compile``), read layer by layer;
    a ``UserError`` naming ``setting`` for a model without one."""
    blocks = getattr(getattr(model, "_orig_mod", model), "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise UserError(f"model {type(getattr(model, '_orig_mod', model)).__name__} has no block list to read "
                        f"layer by layer: set {setting}=last, or use a model with blocks (e.g. the Transformer).")
    return blocks


def layer_states(model, ids: torch.Tensor, kind: str, setting: str = "eval.probe.layer") -> list[torch.Tensor]:
    """The (B, T, d) hidden states of a batch of padded ids at every layer, L + 1 in all (see the module
    docstring): the input of the first block, the output of each block but the last (forward hooks on
    ``model.blocks``), and the backbone's output, read as ``lmlab.readout.features`` reads it."""
    model = getattr(model, "_orig_mod", model)  # eager: hooks on a compiled graph's submodules may not fire
    blocks = block_list(model, setting)
    ids = ids.to(model_device(model))
    states: list[torch.Tensor] = []

    def keep_input(_module, args):
        states.append(args[0])

    def keep_output(_module, _args, out):
        states.append(out[0] if isinstance(out, tuple) else out)

    handles = [blocks[0].register_forward_pre_hook(keep_input)]
    handles += [block.register_forward_hook(keep_output) for block in blocks[:-1]]
    try:
        out = model(ids, reading_attention(kind, ids))
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != len(blocks):
        raise RuntimeError(f"read {len(states)} block states of {len(blocks)} blocks: the model does not run its "
                           "block list once per forward pass")
    return [*states, out]


def lookup_features(source, rows: list[list[int]], pooling: str, length: int) -> torch.Tensor | None:
    """The lookup-table features of ``rows`` (see the module docstring): (n, V') for ``mean`` or
    (n, length * V') for ``concat``, V' = vocab_size - N_SPECIAL; ``None`` when the source does not know
    its exact conditionals."""
    conds = source.single_mask_conditionals(rows)
    if conds is None:
        return None
    width = source.vocab_size - N_SPECIAL
    if pooling == "mean":
        out = torch.zeros(len(rows), width, dtype=torch.float64)
        for i, c in enumerate(conds):
            c = np.asarray(c, dtype=np.float64)
            if len(c):
                out[i] = torch.from_numpy(c[:, N_SPECIAL:].mean(0))
        return out.float()
    if pooling == "concat":
        out = torch.zeros(len(rows), length, width, dtype=torch.float64)
        for i, (row, c) in enumerate(zip(rows, conds)):
            c = np.asarray(c, dtype=np.float64)
            word_pos = [t for t, tok in enumerate(row[:length]) if tok >= N_SPECIAL]
            if word_pos:
                out[i, word_pos] = torch.from_numpy(c[: len(word_pos), N_SPECIAL:])
        return out.reshape(len(rows), length * width).float()
    raise UserError(f"unknown pooling {pooling!r}: choose mean or concat.")


def prefix_table_accuracy(train_rows: list[list[int]], train_y: np.ndarray, test_rows: list[list[int]],
                          test_y: np.ndarray, words: int) -> float:
    """The test accuracy of the lookup table from a row's first ``words`` words (``row[1 : 1 + words]``, after
    BOS) to the majority training label of that prefix (ties: the smallest label); a prefix absent from the
    training rows gets the training rows' majority label (same tie rule)."""
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if not len(test_y):
        raise ValueError("no test rows to score the prefix table on")
    counts: dict[tuple, np.ndarray] = {}
    n_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    for row, y in zip(train_rows, train_y):
        counts.setdefault(tuple(row[1 : 1 + words]), np.zeros(n_classes, dtype=np.int64))[y] += 1
    table = {key: int(c.argmax()) for key, c in counts.items()}
    default = int(np.bincount(train_y, minlength=n_classes).argmax()) if len(train_y) else 0
    pred = np.array([table.get(tuple(row[1 : 1 + words]), default) for row in test_rows], dtype=np.int64)
    return float((pred == test_y).mean())


class Probe(DownstreamEvaluator):
    name = "probe"

    def __init__(self, task: str | list[str] | None = None, pooling: str = "mean", seeds: Positive = 3,
                 epochs: Positive = 50, lr: PositiveFloat = 1e-2, weight_decay: NonNegativeFloat = 0.0,
                 batch_size: Positive = 256, max_train: Optional[Positive] = None, max_test: Optional[Positive] = None,
                 encode_batch_size: Positive = 256, lookup: bool = True, ece: bool = False,
                 project: Optional[Positive] = None, layer: str | int = "last") -> None:
        if isinstance(layer, bool) or not (layer in LAYER_CHOICES or (isinstance(layer, int) and layer >= 0)):
            raise UserError(f"eval.probe.layer must be last, all or a layer number 0..n_layers, got {layer!r}: "
                            "set one of those.")
        self.layer = layer
        if project is not None and int(project) < 1:
            raise UserError(f"eval.probe.project must be a positive number of dimensions or null, got {project}: "
                            "set it to e.g. 512, or null for no projection.")
        self.task = task if task is None or isinstance(task, str) else [str(t) for t in task]
        self.pooling, self.seeds, self.epochs = pooling, seeds, epochs
        self.project = None if project is None else int(project)
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.max_train, self.max_test = max_train, max_test
        self.encode_batch_size = encode_batch_size
        self.lookup, self.ece = lookup, ece
        self._lookup_cache: dict = {}

    @torch.no_grad()
    def _encode(self, model, kind: str, rows: list[list[int]], length: int) -> torch.Tensor:
        parts = [features(model, pad_rows(rows[i : i + self.encode_batch_size]), kind, self.pooling,
                          length).float()
                 for i in range(0, len(rows), self.encode_batch_size)]
        return torch.cat(parts)

    @torch.no_grad()
    def _encode_layers(self, model, kind: str, rows: list[list[int]], length: int) -> list[torch.Tensor]:
        """The pooled features of ``rows`` at every layer (``layer_states``), one (n, F) tensor per layer."""
        per_batch = []
        for i in range(0, len(rows), self.encode_batch_size):
            ids = pad_rows(rows[i : i + self.encode_batch_size])
            states = layer_states(model, ids, kind)
            ids = ids.to(states[-1].device)
            per_batch.append([pool(h, ids, self.pooling, length).float() for h in states])
        return [torch.cat(parts) for parts in zip(*per_batch)]

    def check_model(self, model) -> None:
        if self.layer != "last":
            block_list(model, "eval.probe.layer")

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        if not isinstance(self.task, list):
            return self._probe(module, datamodule, self.task)
        out: dict[str, float] = {}
        present = [t for t in self.task if t in (getattr(datamodule.source, "tasks", None) or {})]
        for i, task in enumerate(present or self.task[:1]):  # none present: the first raises, naming the fix
            metrics = self._probe(module, datamodule, task)
            if i == 0:
                out.update(metrics)
            out.update({f"{self.name}/{task}/{k.split('/', 1)[1]}": v for k, v in metrics.items()
                        if k.split("/", 1)[1] in ("acc", "acc_ci95", "lookup_acc", "proj_acc", "table_acc")
                        or k.split("/", 1)[1].startswith("layer")})
        return out

    def _probe(self, module, datamodule, task: str | None) -> dict[str, float]:
        model, kind = module.model, module.objective.attention
        task, train_rows, train_y, test_rows, test_y, n_classes, length = self.labelled_splits(datamodule, task)

        was_training = model.training
        model.eval()
        try:
            if self.layer == "last":
                x_train = self._encode(model, kind, train_rows, length)
                x_test = self._encode(model, kind, test_rows, length)
            else:
                layers_train = self._encode_layers(model, kind, train_rows, length)
                layers_test = self._encode_layers(model, kind, test_rows, length)
        finally:
            model.train(was_training)
        device = model_device(model)
        out: dict[str, float] = {}
        if self.layer == "all":  # the loop ends on the last layer: the keys below are its
            for i, (x_train, x_test) in enumerate(zip(layers_train, layers_test)):
                accs, eces = self._accuracies(x_train, train_y, x_test, test_y, n_classes, device)
                out.update({k: v for k, v in summarize(f"{self.name}/layer{i}", accs, test_y).items()
                            if not k.endswith("/chance")})
        elif self.layer != "last":
            if self.layer >= len(layers_train):
                raise UserError(f"eval.probe.layer={self.layer} but the model has layers 0..{len(layers_train) - 1}: "
                                "choose one of those, last or all.")
            x_train, x_test = layers_train[self.layer], layers_test[self.layer]
        if self.layer != "all":
            accs, eces = self._accuracies(x_train, train_y, x_test, test_y, n_classes, device)
        out.update(summarize(self.name, accs, test_y))
        if self.ece:
            out[f"{self.name}/ece"] = float(np.mean(eces))
        if self.project is not None:
            accs, _ = self._accuracies(x_train, train_y, x_test, test_y, n_classes, device, project=self.project)
            out[f"{self.name}/proj_acc"] = float(np.mean(accs))
        words = (getattr(datamodule.source, "task_prefix_words", None) or {}).get(task)
        if words:
            out[f"{self.name}/table_acc"] = prefix_table_accuracy(train_rows, train_y, test_rows, test_y, words)
        if self.lookup:
            key = (id(datamodule.source), task, len(train_rows), len(test_rows), length)
            if key not in self._lookup_cache:
                self._lookup_cache[key] = self._lookup(datamodule.source, train_rows, train_y, test_rows, test_y,
                                                       n_classes, length, device)
            out.update(self._lookup_cache[key])
        return out

    def _lookup(self, source, train_rows, train_y, test_rows, test_y, n_classes, length, device) -> dict[str, float]:
        """The probe's accuracy on the lookup-table features; {} where the source has no exact conditionals."""
        x_train = lookup_features(source, train_rows, self.pooling, length)
        if x_train is None:
            return {}
        x_test = lookup_features(source, test_rows, self.pooling, length)
        accs, eces = self._accuracies(x_train, train_y, x_test, test_y, n_classes, device)
        accs = np.asarray(accs, dtype=np.float64)
        out = {f"{self.name}/lookup_acc": float(accs.mean()),
               f"{self.name}/lookup_acc_std": sample_std(accs),
               f"{self.name}/lookup_acc_ci95": t_interval(accs)}
        if self.ece:
            out[f"{self.name}/lookup_ece"] = float(np.mean(eces))
        return out

    def _accuracies(self, x_train, train_y, x_test, test_y, n_classes, device,
                    project: int | None = None) -> tuple[list[float], list[float]]:
        """Standardise with the training rows' statistics (then, with ``project``, multiply by the fixed random
        projection), then one head per seed: test accuracies and expected calibration errors."""
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features (e.g. padding) stay
        x_train, x_test = ((x_train - mean) / std).to(device), ((x_test - mean) / std).to(device)
        if project is not None:
            g = torch.Generator().manual_seed(0)
            matrix = (torch.randn(x_train.shape[1], project, generator=g) / math.sqrt(project)).to(device)
            x_train, x_test = x_train @ matrix, x_test @ matrix
        y_train = torch.as_tensor(train_y, device=device)
        y_test = torch.as_tensor(test_y, device=device)

        with one_thread(device.type == "cpu"):  # the head's matmuls are tiny
            fits = [self._fit(x_train, y_train, x_test, y_test, n_classes, seed) for seed in range(self.seeds)]
        return [acc for acc, _ in fits], [ece for _, ece in fits]

    def _fit(self, x_train, y_train, x_test, y_test, n_classes: int, seed: int) -> tuple[float, float]:
        """One head trained with ``seed``: its test accuracy and expected calibration error."""
        g = torch.Generator().manual_seed(seed)
        n, dim = x_train.shape
        weight = (torch.randn(n_classes, dim, generator=g) / math.sqrt(dim)).to(x_train.device)
        weight.requires_grad_(True)
        bias = torch.zeros(n_classes, device=x_train.device, requires_grad=True)
        opt = torch.optim.AdamW([weight, bias], lr=self.lr, weight_decay=self.weight_decay)
        b = min(self.batch_size, n)
        with torch.enable_grad():
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=g).to(x_train.device)
                for i in range(0, n, b):
                    idx = perm[i : i + b]
                    loss = F.cross_entropy(F.linear(x_train[idx], weight, bias), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            logits = F.linear(x_test, weight, bias)
            pred = logits.argmax(-1)
        return float((pred == y_test).double().mean()), head_calibration(logits, y_test)


