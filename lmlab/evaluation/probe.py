"""``eval=probe``: a linear probe on frozen backbone features (Alain & Bengio 2016, arXiv 1610.01644).

The backbone (eval mode, no gradients) reads the unmasked rows of the ``downstream`` split (to train the
head) and the ``test`` split (to score it) with the objective's attention pattern and a padding mask.
Features are the mean of the final hidden states over real tokens (``pooling=mean``) or their
concatenation, zero-padded to the longest row of both splits (``pooling=concat``); they are computed
once and standardised with the training rows' mean and std. For each seed a linear head (fresh random
init and batch order) is trained with AdamW on minibatches of ``batch_size`` rows for ``epochs``
epochs. Rows whose label is -1 are dropped.

Returns ``probe/acc`` (mean test accuracy over seeds), ``probe/acc_std`` (sample std over seeds),
``probe/acc_ci95`` (half-width of the 95% t-interval over seeds; 0 for one seed) and ``probe/chance``
(majority-class rate on test). The interval covers the head's optimisation noise only: the backbone
and the data are fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmlab.evaluation.common import (
    DownstreamEvaluator,
    check_nonempty,
    features,
    labelled_rows,
    model_device,
    pad_rows,
    resolve_task,
    summarize,
)


class Probe(DownstreamEvaluator):
    name = "probe"

    def __init__(self, task: str | None = None, pooling: str = "mean", seeds: int = 3,
                 epochs: int = 50, lr: float = 1e-2, weight_decay: float = 0.0, batch_size: int = 256,
                 max_train: int | None = None, max_test: int | None = None,
                 encode_batch_size: int = 256) -> None:
        self.task, self.pooling, self.seeds, self.epochs = task, pooling, seeds, epochs
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.max_train, self.max_test = max_train, max_test
        self.encode_batch_size = encode_batch_size

    @torch.no_grad()
    def _encode(self, model, kind: str, rows: list[list[int]], length: int) -> torch.Tensor:
        parts = [features(model, pad_rows(rows[i : i + self.encode_batch_size]), kind, self.pooling,
                          length).float()
                 for i in range(0, len(rows), self.encode_batch_size)]
        return torch.cat(parts)

    def __call__(self, module, datamodule, run_dir=None) -> dict[str, float]:
        model, kind = module.model, module.objective.attention
        task, n_classes = resolve_task(datamodule.source, self.task, self.name)
        train_rows, train_y = labelled_rows(datamodule.splits["downstream"], task, self.max_train)
        test_rows, test_y = labelled_rows(datamodule.splits["test"], task, self.max_test)
        check_nonempty(train_rows, "downstream", task, self.name)
        check_nonempty(test_rows, "test", task, self.name)
        n_classes = max(n_classes, int(train_y.max()) + 1, int(test_y.max()) + 1)
        length = max(len(r) for r in train_rows + test_rows)

        was_training = model.training
        model.eval()
        try:
            x_train = self._encode(model, kind, train_rows, length)
            x_test = self._encode(model, kind, test_rows, length)
        finally:
            model.train(was_training)
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features (e.g. padding) stay
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        device = model_device(model)
        y_train = torch.as_tensor(train_y, device=device)
        y_test = torch.as_tensor(test_y, device=device)

        # the head's matmuls are tiny: on CPU, intra-op threads only add overhead (and thrash when the
        # cores are shared with other jobs of a sweep)
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            accs = [self._fit(x_train, y_train, x_test, y_test, n_classes, seed) for seed in range(self.seeds)]
        finally:
            torch.set_num_threads(threads)
        return summarize(self.name, accs, test_y)

    def _fit(self, x_train, y_train, x_test, y_test, n_classes: int, seed: int) -> float:
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
            pred = F.linear(x_test, weight, bias).argmax(-1)
        return float((pred == y_test).double().mean())


