"""Perplexity, probe and finetune evaluators on tiny synthetic data with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from scipy import stats

from lmlab.data.datamodule import DataModule
from lmlab.data.source import Source
from lmlab.errors import UserError
from lmlab.evaluation.finetune import Finetune
from lmlab.evaluation.perplexity import Perplexity
from lmlab.evaluation.probe import Probe
from lmlab.models.transformer import Transformer
from lmlab.objectives.clm import CLM
from lmlab.objectives.mlm import MLM
from lmlab.stats import t_interval, t_quantile
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL

N_WORDS = 30


class KeySource(Source):
    """Rows of 8 uniform words; the label is (word at position 3) mod 3, -1 on every 10th row."""

    tasks = {"key": 3}

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + N_WORDS

    def _split(self, n: int, seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        words = rng.integers(N_SPECIAL, N_SPECIAL + N_WORDS, size=(n, 8))
        lengths = rng.integers(5, 9, size=n)
        rows = [[BOS_ID, *map(int, w[:k]), EOS_ID] for w, k in zip(words, lengths)]
        labels = [int(r[3] - N_SPECIAL) % 3 if i % 10 else -1 for i, r in enumerate(rows)]
        return Dataset.from_dict({"input_ids": rows, "key": labels})

    def build(self) -> DatasetDict:
        sizes = {"train": 50, "validation": 40, "test": 500, "downstream": 2000}
        return DatasetDict({k: self._split(n, i) for i, (k, n) in enumerate(sizes.items())})

    def sequence_nll(self, rows):
        return np.array([(len(r) - 2) * math.log(N_WORDS) for r in rows])  # EOS length term ignored


class NoLabels(KeySource):
    tasks = {}


def _setup(objective=None, source_cls=KeySource):
    source = source_cls()
    dm = DataModule(source, source.build(), batch_size=16, seed=0)
    objective = objective or CLM()
    torch.manual_seed(0)
    model = Transformer(source.vocab_size, objective.attention, d_model=32, n_layers=1, n_heads=2)
    return SimpleNamespace(model=model, objective=objective), dm


def test_probe_reads_a_token_at_a_fixed_position():
    module, dm = _setup()
    out = Probe(pooling="concat", seeds=2)(module, dm, None)
    assert set(out) == {"probe/acc", "probe/acc_std", "probe/acc_ci95", "probe/chance"}
    assert out["probe/acc"] > 0.9, out
    assert 0.3 < out["probe/chance"] < 0.45
    assert module.model.training  # mode restored


def test_probe_with_mlm_mean_pooling_and_limits():
    module, dm = _setup(MLM())
    out = Probe(seeds=1, epochs=5, max_train=300, max_test=100)(module, dm, None)
    assert math.isnan(out["probe/acc_std"]) and math.isnan(out["probe/acc_ci95"])  # one seed: no spread, no interval
    assert 0.0 <= out["probe/acc"] <= 1.0


class TwoTaskSource(KeySource):
    """KeySource plus a second task: (word at position 5) mod 2."""

    tasks = {"key": 3, "other": 2}

    def _split(self, n: int, seed: int) -> Dataset:
        data = super()._split(n, seed)
        return data.add_column("other", [int(r[5] - N_SPECIAL) % 2 for r in data["input_ids"]])


def test_probe_of_several_tasks_names_each_and_the_first_keeps_the_plain_keys():
    module, dm = _setup(source_cls=TwoTaskSource)
    both = Probe(task=["key", "absent", "other"], pooling="concat", seeds=1, epochs=5, project=16)(module, dm, None)
    assert not any("absent" in k for k in both)  # a task the data lacks is not probed
    with pytest.raises(UserError, match="no task 'absent'"):
        Probe(task=["absent"])(module, dm, None)
    alone = Probe(task="other", pooling="concat", seeds=1, epochs=5, project=16)(module, dm, None)
    first = Probe(task="key", pooling="concat", seeds=1, epochs=5, project=16)(module, dm, None)
    assert both["probe/other/acc"] == alone["probe/acc"] and both["probe/other/proj_acc"] == alone["probe/proj_acc"]
    assert both["probe/acc"] == both["probe/key/acc"] == first["probe/acc"]
    assert both["probe/key/proj_acc"] == first["probe/proj_acc"]


def test_projection_to_the_full_width_keeps_what_a_linear_probe_can_read():
    """A square Gaussian projection is invertible: the probe still reads the token at position 3 (> 0.9),
    while a 2-dimensional projection cannot separate 3 classes of 30 words as well."""
    module, dm = _setup()
    full = Probe(pooling="concat", seeds=1, project=10 * 32)(module, dm, None)
    tiny = Probe(pooling="concat", seeds=1, project=2)(module, dm, None)
    assert full["probe/proj_acc"] > 0.9 and tiny["probe/proj_acc"] < full["probe/proj_acc"] - 0.1, (full, tiny)
    with pytest.raises(UserError, match="positive number of dimensions"):
        Probe(project=0)


def test_probe_without_labels_is_a_user_error():
    module, dm = _setup(source_cls=NoLabels)
    with pytest.raises(UserError, match="has no downstream labels: drop probe from eval"):
        Probe()(module, dm, None)
    with pytest.raises(UserError, match="drop finetune from eval"):
        Finetune()(module, dm, None)
    module, dm = _setup()
    with pytest.raises(UserError, match="no task"):
        Probe(task="nope")(module, dm, None)


def test_t_interval_equals_scipy():
    values = [0.71, 0.74, 0.69, 0.77, 0.72]
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert abs(t_interval(values) - (hi - lo) / 2) < 1e-12
    for df in (1, 2, 3, 7, 30):
        assert abs(t_quantile(0.975, df) - stats.t.ppf(0.975, df)) < 1e-9
        assert abs(t_quantile(0.9, df) - stats.t.ppf(0.9, df)) < 1e-9
    assert math.isnan(t_interval([0.5]))  # one value: no interval (0 would read as certainty)


def test_finetune_leaves_the_original_unchanged():
    module, dm = _setup()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.model.eval()
    out = Finetune(epochs=1, max_train=256, max_test=100, lr=1e-3, seeds=2)(module, dm, None)
    assert set(out) == {"finetune/acc", "finetune/acc_std", "finetune/acc_ci95", "finetune/chance"}
    assert 0.0 <= out["finetune/acc"] <= 1.0
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not module.model.training  # its mode untouched too
    assert module.model.head.weight is module.model.embed.weight


def test_perplexity_keys_and_optimum():
    module, dm = _setup()
    out = Perplexity(max_rows=30, batch_size=8)(module, dm, None)
    assert set(out) == {"perplexity/loss", "perplexity/ppl", "perplexity/optimum", "perplexity/gap", "perplexity/rows"}
    assert out["perplexity/rows"] == 30
    assert abs(out["perplexity/ppl"] - math.exp(out["perplexity/loss"])) < 1e-9
    assert abs(out["perplexity/gap"] - (out["perplexity/loss"] - out["perplexity/optimum"])) < 1e-12
    # an untrained model is near uniform over the vocabulary
    assert abs(out["perplexity/loss"] - math.log(N_SPECIAL + N_WORDS)) < 0.2
