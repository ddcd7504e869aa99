"""Known answers for behaviour that a plausible one-line bug (a mutant) would change while every other test
still passes, each checked against a reference that does not use the code under test:

* ``eval=finetune`` trains the backbone: on a backbone whose output is zero, a frozen readout is at most chance
  and fine-tuning is far above it;
* the divergence guard checks the weights on checkpoint steps: a run whose weights turn non-finite in the update
  that ends at a checkpoint step (its loss was computed before, and is finite) stops there, and the last
  checkpoint on disk is the previous, finite one;
* a tied pair of seeds is neither a win nor a loss (``lmlab.stats.paired_difference`` and ``seeds won`` in
  ``lmlab report``), counted by hand;
* the standard error of a trace is the sample standard deviation (n - 1) over root n, by hand;
* dedup removes a pair whose Jaccard similarity equals the threshold, at ``threshold=1.0``;
* the streamed preparation puts each document in validation or test by the documented hash rule, recomputed here
  with unequal fractions.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Sequence, Value
from scipy import stats as sps

from lmlab.data.shards import ShardSource
from lmlab.data.stream import prepare_shards
from lmlab.data.text import TextSource
from lmlab.data.tokenizers import Byte
from lmlab.evaluation.finetune import Finetune
from lmlab.evaluation.flatness import mean_and_se
from lmlab.evaluation.probe import Probe
from lmlab.run_dir import DONE, status
from lmlab.selection.dedup import Dedup
from lmlab.stats import paired_difference
from lmlab.vocab import BOS_ID, EOS_ID
from tests.conftest import TINY
from tests.test_evaluators import _setup
from tests.test_text import documents, write_jsonl

# ----- fine-tuning moves the backbone -----


def test_finetuning_trains_the_backbone_a_frozen_readout_cannot_read():
    """The backbone's final norm gain is zero, so its output is zero for every row: a readout of the frozen
    backbone predicts one class for all rows (accuracy <= the majority rate), while fine-tuning, which also
    trains the gain, reads the label (the token at position 3, mod 3) almost perfectly."""
    module, dm = _setup()
    with torch.no_grad():
        module.model.norm.weight.zero_()
    limits = {"pooling": "concat", "max_train": 512, "max_test": 300}
    probe = Probe(seeds=1, **limits)(module, dm, None)
    tuned = Finetune(epochs=3, lr=1e-2, **limits)(module, dm, None)
    assert probe["probe/chance"] == tuned["finetune/chance"] < 0.4
    assert probe["probe/acc"] <= probe["probe/chance"] + 1e-12, probe
    assert tuned["finetune/acc"] >= tuned["finetune/chance"] + 0.4, tuned
    assert not module.model.norm.weight.any()  # the evaluated model itself is untouched


# ----- the divergence guard on checkpoint steps -----


class PoisonWeights(L.Callback):
    """Makes the weights non-finite in the optimiser step that ends at global step ``step``: the loss of that
    step was computed before the update and is finite."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                next(iter(pl_module.parameters())).fill_(float("inf"))


def test_weights_that_diverge_after_a_checkpoint_stop_the_run_at_the_next_checkpoint_step(lmlab):
    poison = "+callbacks.poison={_target_: tests.test_mutants.PoisonWeights, step: 10}"
    code, out = lmlab("train", *TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]",
                      "max_steps=12", "val_every=4", "checkpoint_every=5", poison)
    assert code == 2 and "training diverged at step 10" in out, out
    (run,) = {p.parent for p in lmlab.runs.rglob("config_resolved.yaml")}
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "diverged" and results["step"] == 10 and status(run) == "diverged"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 5  # the step-10 checkpoint, with infinite weights, was never written
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


# ----- ties in paired per-seed differences -----


def test_a_tied_pair_is_neither_won_nor_lost():
    p = paired_difference([3.0, 2.0, 5.0, 1.0], [3.0, 1.0, 6.0, 1.0])  # differences 0, +1, -1, 0
    assert (p.above, p.below) == (1, 1)
    assert p.differences == (0.0, 1.0, -1.0, 0.0)


def _job(sweep: Path, name: str, overrides: list[str], metrics: dict[str, float]) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "results.json").write_text(json.dumps({"status": "done", "metrics": metrics}))
    (job / DONE).write_text("")


def test_seeds_won_in_the_sweep_report_leave_out_ties(tmp_path, lmlab):
    """Per seed (baseline, arm): val/loss (3.0, 3.0) tie, (3.0, 2.9) won, (3.0, 3.1) lost; probe/acc (0.5, 0.5)
    tie, (0.5, 0.6) won, (0.5, 0.5) tie. By hand: one seed won of three for each metric."""
    sweep = tmp_path / "sweep"
    arm = {0: (3.0, 0.5), 1: (2.9, 0.6), 2: (3.1, 0.5)}
    for seed in range(3):
        _job(sweep, f"base-{seed}", [f"seed={seed}", "optim.lr=0.001"], {"val/loss": 3.0, "probe/acc": 0.5})
        loss, acc = arm[seed]
        _job(sweep, f"arm-{seed}", [f"seed={seed}", "optim.lr=0.003"], {"val/loss": loss, "probe/acc": acc})
    code, out = lmlab("report", str(sweep), "--baseline", "optim.lr=0.001", "--metric", "val/loss", "probe/acc")
    assert code == 0, out
    with open(sweep / "report.csv") as f:
        won = {r["metric"]: r["seeds_won"] for r in csv.DictReader(f) if r["arm"] == "optim.lr=0.003"}
    assert won == {"val/loss": "1", "probe/acc": "1"}
    text = (sweep / "report.md").read_text()
    assert sum("| 1 of 3 |" in line for line in text.splitlines()) == 2, text


# ----- the standard error of a trace -----


def test_trace_standard_error_is_the_sample_deviation_over_root_n():
    values = [1.0, 2.0, 4.0, 7.0]
    mean = sum(values) / 4  # 3.5
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / 3 / 4)  # sqrt(21 / 12)
    got_mean, got_se = mean_and_se(values)
    assert got_mean == 3.5 and got_se == pytest.approx(math.sqrt(21 / 12), rel=1e-12)
    assert got_se == pytest.approx(se, rel=1e-12) and got_se == pytest.approx(sps.sem(values), rel=1e-12)
    assert mean_and_se([2.0]) == (2.0, 0.0)


# ----- dedup at the threshold -----


def test_dedup_at_threshold_one_removes_a_pair_of_equal_shingle_sets(tmp_path):
    """``5 6 7 5 6 7`` and ``5 6 7 5 6 7 5 6 7`` are different rows with the same 3-token shingles {567, 675, 756}:
    Jaccard exactly 1.0, so at threshold=1.0 the second is a near duplicate of the first; a row that shares two
    of the three shingles (Jaccard 2/4) is kept."""
    rows = [[BOS_ID, *[5, 6, 7] * 2, EOS_ID], [BOS_ID, 9, 10, 11, 12, 13, EOS_ID], [BOS_ID, *[5, 6, 7] * 3, EOS_ID],
            [BOS_ID, 5, 6, 7, 5, 8, EOS_ID]]
    features = Features({"input_ids": Sequence(Value("int32")), "label": Value("int64")})
    pool = Dataset.from_dict({"input_ids": rows, "label": list(range(4))}, features=features)
    selection = Dedup(threshold=1.0).select(pool, None, tmp_path)
    assert selection.report == {"pool_rows": 4, "kept_rows": 3, "removed_exact": 0, "removed_near": 1}
    assert selection.dataset["label"] == [0, 1, 3]


# ----- the streamed preparation's splits -----


def _split_by_hash(text: str, seed: int, validation: float, test: float) -> str:
    """The rule of lmlab/data/stream.py's docstring, written out: u = the first 8 bytes of
    blake2b(text, key=f"lmlab-{seed}") (big-endian) / 2^64; validation below ``validation``, test below
    ``validation + test``, train otherwise."""
    digest = hashlib.blake2b(text.encode(), digest_size=16, key=f"lmlab-{seed}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "validation" if u < validation else "test" if u < validation + test else "train"


def test_streamed_splits_follow_unequal_fractions(tmp_path):
    docs = documents(600)
    val, test = 0.3, 0.05
    source = TextSource(paths=str(write_jsonl(tmp_path / "c.jsonl", docs)), tokenizer=Byte(), block_size=16,
                        validation_fraction=val, test_fraction=test)
    out = prepare_shards(source, tmp_path / "s", rows_per_shard=50, batch_bytes=700)
    splits = ShardSource(path=str(out)).load(None)
    want = {name: [d for d in docs if _split_by_hash(d, 0, val, test) == name] for name in ("validation", "test")}
    assert len(want["validation"]) > 3 * len(want["test"]) > 0  # about 180 and 30 of 600
    for name in ("validation", "test"):
        blocks = np.array(splits[name]["input_ids"], dtype=np.int64)
        assert (blocks[:, 0] == BOS_ID).all()
        stream = blocks[:, 1:].ravel()
        got = [Byte().decode(part.tolist()) for part in np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)[:-1]]
        # the stream d_1 [EOS] d_2 [EOS] ... in file order; its remainder (< 15 tokens: at most 2 documents) is dropped
        assert got == want[name][:len(got)] and len(got) >= len(want[name]) - 2, name
