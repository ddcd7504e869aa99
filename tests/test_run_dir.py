"""The run directory (``lmlab.run_dir``): status and results round trips, building another run's model alone
(``load_backbone``: bit-identical to the trained model, without its data), and refusals in one sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from lmlab import run_dir
from lmlab.attention import BIDIRECTIONAL, CAUSAL, PREFIX, Attention
from lmlab.errors import UserError
from lmlab.io import atomic_dir, config_hash
from lmlab.models.lstm import LSTM
from lmlab.vocab import BOS_ID, EOS_ID, N_SPECIAL
from tests.conftest import FAST, TINY

# ----- status, results, config -----


def test_done_failed_and_results_round_trip(tmp_path):
    assert not run_dir.is_done(tmp_path) and run_dir.failure(tmp_path) is None
    results = {"status": "done", "metrics": {"a/b": 1.5, "n": 3}, "history": [{"step": 2, "a/b": 2.0}]}
    run_dir.write_results(tmp_path, results)
    run_dir.mark_done(tmp_path)
    assert run_dir.is_done(tmp_path) and (tmp_path / "DONE").read_text().endswith("\n")
    assert run_dir.read_results(tmp_path) == results
    assert json.loads((tmp_path / "results.json").read_text()) == results
    run_dir.mark_failed(tmp_path, "data pcfg produced no training rows: add data.")
    assert (tmp_path / "FAILED").read_text() == "data pcfg produced no training rows: add data.\n"
    assert run_dir.failure(tmp_path) == "data pcfg produced no training rows: add data."
    run_dir.clear_failed(tmp_path)
    assert run_dir.failure(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE", "results.json"]  # no temporary file left


def test_config_and_command_round_trip(tmp_path):
    cfg = OmegaConf.create({"seed": 3, "name": "x", "out": "${name}/y"})
    run_dir.write_config(tmp_path, cfg)
    assert run_dir.read_config(tmp_path) == OmegaConf.create({"seed": 3, "name": "x", "out": "x/y"})  # resolved
    run_dir.write_command(tmp_path, "lmlab train seed=3")
    assert (tmp_path / run_dir.COMMAND).read_text() == "lmlab train seed=3\n"


def test_run_name_known_answers():
    assert run_dir.run_name([]) == "default"
    assert run_dir.run_name(["b=2", "a=1", "out_dir=/x", "launcher=local"]) == "a=1,b=2"
    assert run_dir.run_name(["data.grammar=/a/b.txt"]) == "data.grammar=_a_b.txt"
    long = run_dir.run_name([f"model.key{i}=value{i}" for i in range(20)])
    # too long: whole items with abbreviated keys, then the hash of the full list
    assert long == "m.key0=value0,m.key10=value10,m.key11=value11,m.key12=value12,m.key13=value13-" \
        + config_hash(sorted(f"model.key{i}=value{i}" for i in range(20)), 8)
    # a shortened list keeps its items' words, not brackets (written as _ in a name)
    text = ["data=text", "data.paths=/tmp/walk/corpus", "data.tokenizer.vocab_size=512", "max_steps=150",
            "model.d_model=32", "eval=[perplexity]"]
    assert run_dir.run_name(text) == ("d.paths=corpus,d.t.vocab_size=512,data=text,eval=perplexity,max_steps=150,"
                                      "m.d_model=32-" + config_hash(sorted(text), 8))


def test_a_directory_that_is_not_a_finished_run_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"is not a finished lmlab run \(it lacks config_resolved.yaml, model.pt, "
                                        r"model_args.json\).*`lmlab train` finished"):
        run_dir.load_backbone(tmp_path)
    with pytest.raises(UserError, match="is not a finished lmlab run"):
        run_dir.load_backbone(tmp_path / "no" / "such" / "run")
    with pytest.raises(UserError, match="holds no results.json"):
        run_dir.read_results(tmp_path)
    run_dir.write_config(tmp_path, OmegaConf.create({"model": {"_target_": "lmlab.models.lstm.LSTM"}}))
    assert not run_dir.holds_model(tmp_path)
    with pytest.raises(UserError, match=r"it lacks model.pt, model_args.json"):
        run_dir.model_args(tmp_path)


# ----- a hand-made run: the model alone, other attention patterns -----

def _lstm_run(path, attention=CAUSAL):
    torch.manual_seed(0)
    model = LSTM(N_SPECIAL + 10, attention, d_model=8, n_layers=1).eval()
    data = {"_target_": "lmlab.data.pcfg.PCFGSource", "no_such_setting": 1}  # fails if it were built
    run_dir.write_config(path, OmegaConf.create({"model": {"_target_": "lmlab.models.lstm.LSTM", "d_model": 8,
                                                          "n_layers": 1}, "data": data}))
    run_dir.save_model(path, model, vocab_size=N_SPECIAL + 10, attention=attention)
    return model


def test_load_backbone_builds_the_recorded_model(tmp_path):
    model = _lstm_run(tmp_path)
    assert run_dir.model_args(tmp_path) == {"vocab_size": N_SPECIAL + 10, "attention": CAUSAL}
    state = torch.random.get_rng_state()
    loaded = run_dir.load_backbone(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert type(loaded) is LSTM and not loaded.training and loaded.vocab_size == N_SPECIAL + 10
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_backbone_for_another_attention_pattern(tmp_path):
    _lstm_run(tmp_path)
    with pytest.raises(UserError, match=r"the LSTM model of the run .* cannot attend 'prefix': use a run whose "
                                        r"model supports 'prefix' attention\."):
        run_dir.load_backbone(tmp_path, attention=PREFIX)
    # a bidirectional LSTM has other weights than the causal one it was trained as
    with pytest.raises(UserError, match=r"trained for 'causal' attention\) do not fit its model built for "
                                        r"'bidirectional' attention: use a run trained with 'bidirectional'"):
        run_dir.load_backbone(tmp_path, attention=BIDIRECTIONAL)


# ----- a run trained through the real CLI -----

@pytest.fixture
def trained(lmlab, tmp_path, monkeypatch):
    """A tiny finished run, trained with its own data cache, and the model it had in memory at the end."""
    from lmlab import pipeline

    kept = {}
    save = pipeline.save_model

    def keep(directory, model, **kwargs):
        kept["model"] = model
        save(directory, model, **kwargs)

    monkeypatch.setattr(pipeline, "save_model", keep)
    cache = tmp_path / "own_cache"
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]", "model.d_model=32", f"cache_dir={cache}")
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    return run, kept["model"], cache


def test_load_backbone_matches_the_trained_model_without_its_data(trained, monkeypatch):
    run, model, cache = trained
    assert run_dir.is_done(run) and run_dir.holds_model(run)
    vocab = run_dir.model_args(run)["vocab_size"]
    assert run_dir.model_args(run) == {"vocab_size": model.vocab_size, "attention": CAUSAL}
    # no data source, data module, objective binding or Lightning module may be built
    from lmlab.data.datamodule import DataModule
    from lmlab.data.source import Source
    from lmlab.training.module import LMModule

    def refuse(*args, **kwargs):
        raise AssertionError("load_backbone built more than the model")

    shutil.rmtree(cache)
    for cls, name in ((Source, "__init__"), (Source, "load"), (DataModule, "__init__"), (LMModule, "__init__")):
        monkeypatch.setattr(cls, name, refuse)
    loaded = run_dir.load_backbone(run)
    assert not cache.exists()
    assert type(loaded) is type(model) and not loaded.training
    ids = torch.tensor([[BOS_ID, *range(N_SPECIAL, min(vocab, N_SPECIAL + 12)), EOS_ID]])
    with torch.no_grad():
        expected = model.eval().logits(model(ids, Attention(CAUSAL)))
        got = loaded.logits(loaded(ids, Attention(CAUSAL)))
    assert torch.equal(got, expected)  # bit-identical
    # built for bidirectional attention (a masked-LM student's teacher), the same weights read both ways
    both = run_dir.load_backbone(run, attention=BIDIRECTIONAL)
    with torch.no_grad():
        assert not torch.equal(both.logits(both(ids, Attention(BIDIRECTIONAL))), expected)
        assert torch.equal(both.logits(both(ids, Attention(CAUSAL))), expected)


# ----- building a directory in a temporary folder -----

def test_atomic_dir_merges_into_an_existing_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "selected").mkdir(parents=True)
    (run / "selected" / "old").write_text("old")
    (run / "keep.txt").write_text("kept")
    with atomic_dir(run, merge=True) as tmp:
        (tmp / "selected").mkdir()
        (tmp / "selected" / "new").write_text("new")
        (tmp / "selection.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt", "selected", "selection.json"]
    assert [p.name for p in (run / "selected").iterdir()] == ["new"]  # a directory is replaced whole
    with pytest.raises(OSError), atomic_dir(run, merge=True) as tmp:
        (tmp / "keep.txt").write_text("half")
        raise OSError("disk full")
    assert (run / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt", "selected", "selection.json"]
