"""``lmlab eval checkpoints=...``: one row per kept checkpoint (and the final model), each checked against the
validation loss of that checkpoint's weights computed here by hand; ``average_last=k``: the mean of the weights of
the last k of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.attention import CAUSAL, Attention
from lmlab.report.scaling import row_tokens
from lmlab.run_dir import read_config, read_evaluations
from lmlab.training.callbacks import average_weights, kept_checkpoint, kept_steps
from tests.conftest import TINY, train_run

KEPT = [2, 4, 8]
FINAL = 10
TRAJECTORY = [*TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]", f"max_steps={FINAL}",
              "checkpoint_every=4", "val_every=10", "callbacks=[trajectory,ema]", "callbacks.ema.decay=0.7",
              "callbacks.trajectory.log=null", f"callbacks.trajectory.steps=[{','.join(map(str, KEPT))}]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> Path:
    """A run of 10 steps that kept the checkpoints of steps 2, 4 and 8 and averaged its weights (EMA)."""
    path = train_run(tmp_path_factory.mktemp("trajectory"), *TRAJECTORY)
    assert kept_steps(path) == KEPT
    return path


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights in a Lightning checkpoint, read by hand: the ``model.`` entries of its state_dict."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def hand_loss(run: Path, weights: dict[str, torch.Tensor]) -> float:
    """The validation loss of ``weights`` in the run's model, by hand: each validation row alone (no padding),
    -log p of every token after the first given the ones before it, summed over rows and divided by the count."""
    # the run's own config, read directly: read_config refuses the test callback that a run of test_ema records
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    model = instantiate(cfg.model, **json.loads((run / "model_args.json").read_text()))
    model.load_state_dict(weights)
    model.eval()
    rows = instantiate(cfg.data).load(cfg.cache_dir)["validation"]["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row)
            hidden = model(ids[None, :-1], Attention(CAUSAL))
            logp = torch.log_softmax(model.logits(hidden[0]).double(), dim=-1)
            total -= float(logp[torch.arange(len(row) - 1), ids[1:]].sum())
            count += len(row) - 1
    return total / count


def _latest(run: Path) -> dict:
    return read_evaluations(run)[-1]


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "trajectory.csv") as f:
        return list(csv.DictReader(f))


def test_every_kept_checkpoint_and_the_final_model_are_one_row_each(lmlab, run):
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "checkpoints=all")
    assert code == 0, out
    table = _csv_rows(run)
    assert [int(r["step"]) for r in table] == [*KEPT, FINAL]
    rows = json.loads((run / "trajectory.json").read_text())["rows"]
    record = _latest(run)
    assert record["trajectory"] == rows and record["checkpoints"] == [*KEPT, FINAL]
    cfg = read_config(run)
    for r, line in zip(rows, table):
        assert r["tokens"] == r["step"] * 16 * row_tokens(cfg.data) == int(line["tokens"])
        assert float(line["perplexity/loss"]) == r["perplexity/loss"]
    # step 4: the kept checkpoint's weights, loaded by hand, give the loss of its row
    by_step = {r["step"]: r for r in rows}
    assert by_step[4]["perplexity/loss"] == pytest.approx(hand_loss(run, model_weights(kept_checkpoint(run, 4))),
                                                          abs=1e-6)
    assert len({round(r["perplexity/loss"], 6) for r in rows}) == len(rows)  # each step its own weights
    # the final row is the plain evaluation of the run (model.pt), number for number
    final = {k: v for k, v in by_step[FINAL].items() if "/" in k}
    assert record["metrics"] == final
    code, out = lmlab("eval", f"run={run}", "eval=perplexity")
    assert code == 0, out
    plain = _latest(run)
    assert "trajectory" not in plain and plain["metrics"] == final
    assert plain["metrics"]["perplexity/loss"] == pytest.approx(hand_loss(run, torch.load(
        run / "model.pt", map_location="cpu", weights_only=True)), abs=1e-6)


def test_a_list_of_kept_steps_and_the_refusals(lmlab, run):
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "checkpoints=[8,4]")
    assert code == 0, out
    assert [r["step"] for r in _latest(run)["trajectory"]] == [4, 8]
    assert _latest(run)["metrics"] == {}  # the final model was not among the steps evaluated
    assert [int(r["step"]) for r in _csv_rows(run)] == [4, 8]
    records = len(read_evaluations(run))
    for override, sentence in [
            ("checkpoints=[3,4]", f"the run {run} kept no checkpoint of step 3: choose among its kept steps 2, 4, 8, "
                                  "10 (or checkpoints=all)."),
            ("checkpoints=latest", "checkpoints='latest' must be all or a list of steps the run kept (2, 4, 8, 10)."),
            ("average_last=5", "average_last=5 asks for more weights than the run has (4: the kept steps 2, 4, 8, "
                               "10): lower average_last."),
            ("average_last=0", "average_last=0 must be a positive number of last kept checkpoints (e.g. 3), or null.")]:
        code, out = lmlab("eval", f"run={run}", "eval=perplexity", override)
        assert code == 2 and out.strip().splitlines()[-1] == f"lmlab: error: {sentence}", (override, out)
    assert len(read_evaluations(run)) == records  # nothing written by a refused evaluation


def _mean(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert a.keys() == b.keys() and all(v.is_floating_point() for v in a.values())
    return {k: (a[k] + b[k]) / 2 for k in a}


def test_the_average_of_the_last_k_checkpoints(lmlab, run):
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "checkpoints=all", "average_last=2")
    assert code == 0, out
    rows = {r["step"]: r for r in _latest(run)["trajectory"]}
    assert "avg2/perplexity/loss" not in rows[2]  # one point only up to step 2
    mean_4_8 = _mean(model_weights(kept_checkpoint(run, 4)), model_weights(kept_checkpoint(run, 8)))
    assert rows[8]["avg2/perplexity/loss"] == pytest.approx(hand_loss(run, mean_4_8), abs=1e-6)
    final = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    mean_8_10 = _mean(model_weights(kept_checkpoint(run, 8)), final)
    assert rows[FINAL]["avg2/perplexity/loss"] == pytest.approx(hand_loss(run, mean_8_10), abs=1e-6)
    # without checkpoints=: the final model, its EMA and the same average of the last two
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "average_last=2")
    assert code == 0, out
    plain = _latest(run)
    assert plain["average_last"] == {"k": 2, "steps": [8, FINAL]}
    assert plain["metrics"] == {k: v for k, v in rows[FINAL].items() if "/" in k}


def test_average_weights_is_the_mean_of_the_state_dicts():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).half(),
               "count": torch.tensor([i])} for i in range(3)]
    mean = average_weights(states)
    by_hand = (states[0]["w"].double() + states[1]["w"].double() + states[2]["w"].double()) / 3
    assert torch.allclose(mean["w"].double(), by_hand, atol=1e-7) and mean["w"].dtype == torch.float32
    assert mean["b"].dtype == torch.float16
    assert torch.allclose(mean["b"].float(), sum(s["b"].float() for s in states) / 3, atol=1e-3)
    assert mean["count"].item() == 2  # not floating point: the last one's


def test_a_sparse_runs_checkpoints_are_read_as_its_dense_weights(lmlab, tmp_path):
    """A sparse run's checkpoints hold each masked matrix as a parametrization (original, mask): its row is that
    of original * mask, as model.pt holds it."""
    run = train_run(tmp_path, *TINY, "batch_size=16", "model.d_model=32", "logger=none", "eval=[perplexity]",
                    "max_steps=4", "checkpoint_every=2", "val_every=4", "sparsity=0.5", "callbacks=trajectory",
                    "callbacks.trajectory.log=null", "callbacks.trajectory.steps=[2]")
    raw = model_weights(kept_checkpoint(run, 2))
    masked = sorted(k.removesuffix(".parametrizations.weight.original") for k in raw if k.endswith(".original"))
    assert masked  # the checkpoint holds masked matrices
    dense = {k: v for k, v in raw.items() if ".parametrizations." not in k}
    for module in masked:
        original = raw[f"{module}.parametrizations.weight.original"]
        mask = raw[f"{module}.parametrizations.weight.0.mask"]
        assert 0 < int(mask.sum()) < mask.numel()
        dense[f"{module}.weight"] = original * mask
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "checkpoints=all")
    assert code == 0, out
    rows = {r["step"]: r for r in _latest(run)["trajectory"]}
    assert sorted(rows) == [2, 4]
    assert rows[2]["perplexity/loss"] == pytest.approx(hand_loss(run, dense), abs=1e-6)
