"""Everything is checked before the work: every job of a command is composed, range-checked and dry-built
(data source, objective, model, evaluators, selector, optimiser, schedule, Trainer, parent runs) before any
data is generated; a refusal is one sentence, exit 2, and leaves no run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmlab.io import config_hash
from lmlab.run_dir import run_name
from tests.conftest import FAST, TINY


def _fake_run(path: Path, model: dict, done: bool = True) -> Path:
    """A run directory as `lmlab train` leaves it (config, model files, DONE), without training one."""
    path.mkdir(parents=True)
    (path / "config_resolved.yaml").write_text(OmegaConf.to_yaml({"model": model}))
    if done:
        torch.save({}, path / "model.pt")
        (path / "model_args.json").write_text(json.dumps({"vocab_size": 34, "attention": "causal"}))
        (path / "DONE").write_text("2026-01-01T00:00:00\n")
    return path


# (overrides, what the sentence names); {missing}, {unfinished} and {lstm_run} are run directories
BAD = [
    (["eval.perplexity.batch_size=0"], "eval.perplexity.batch_size"),
    (["eval.perplexity.batch_size=-1"], "eval.perplexity.batch_size"),
    (["eval.perplexity.max_rows=-1"], "eval.perplexity.max_rows"),
    (["eval.perplexity.max_rows=0"], "eval.perplexity.max_rows"),
    (["eval.probe.epochs=0"], "eval.probe.epochs"),
    (["eval.probe.seeds=0"], "eval.probe.seeds"),
    (["eval.probe.lr=0"], "eval.probe.lr"),
    (["eval=[finetune]", "eval.finetune.batch_size=0"], "eval.finetune.batch_size"),
    (["eval=[zeroshot]", "eval.zeroshot.choices=1"], "eval.zeroshot.choices"),
    (["eval=[flatness]", "eval.flatness.probes=0"], "eval.flatness.probes"),
    (["eval_every=2", "eval_along=[nosuch]"], "eval_along"),
    (["objective=distill"], "objective.teacher must be set"),
    (["objective=self_evolution"], "objective.scorer must be set"),
    (["objective=distill", "objective.teacher={missing}"], "is not a directory"),
    (["objective=distill", "objective.teacher={unfinished}"], "has not finished"),
    (["objective=distill", "objective.teacher={unfinished}", "objective.temperature=0"], "objective.temperature"),
    (["objective=distill", "objective.teacher={lstm_run}", "data.vocab_size=20"], "same tokenizer"),
    (["objective=span", "objective.mean_span_length=0"], "objective.mean_span_length"),
    (["objective=ngram_mlm", "objective.fine_weight=-1"], "objective.fine_weight"),
    (["objective=adversarial_mlm", "objective.lam=-1"], "objective.lam"),
    (["optim=sgd", "optim.nesterov=true", "optim.momentum=0"], "Nesterov momentum"),
    (["optim=sgd", "optim.lr=-0.1"], "optim.lr"),
    (["optim.eps=0"], "optim.eps"),
    (["trainer.precision=bogus"], "Precision 'bogus' is invalid"),
    (["trainer.precision=8"], "Precision 8 is invalid"),
    (["trainer.devices=0"], "devices=0"),
    (["trainer.devices=-2"], "`devices`"),
    (["trainer.accelerator=bogus"], "accelerator='bogus'"),
    (["+trainer.strategy=bogus"], "bogus"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["model.d_ff=-4"], "model.d_ff"),
    (["model.d_ff=0"], "model.d_ff"),
    (["model.n_heads=3"], "n_heads=3"),
    (["model.head_dim=5"], "head_dim=5"),
    (["model=moe", "model.capacity_factor=0"], "model.capacity_factor"),
    (["model=mamba", "model.dt_min=0"], "model.dt_min"),
    (["model=mamba2", "model.headdim=0"], "model.headdim"),
    (["model=mom", "model.num_memories=0"], "model.num_memories"),
    (["model=hyena", "model.order=0"], "model.order"),
    (["selection=quality", "selection.max_top_token_fraction=7"], "selection.max_top_token_fraction"),
    (["selection=quality", "selection.max_top_token_fraction=-0.1"], "selection.max_top_token_fraction"),
    (["selection=quality", "selection.min_stop_words=-1"], "selection.min_stop_words"),
    (["selection=random", "selection.fraction=0"], "selection.fraction"),
    (["selection=random", "selection.fraction=1.5"], "selection.fraction"),
    (["selection=dedup", "selection.threshold=0"], "selection.threshold"),
    (["selection=dedup", "selection.num_perm=0"], "selection.num_perm"),
    (["selection=miniplm", "selection.fraction=0"], "selection.fraction"),
    (["selection=curriculum", "selection.start=0"], "selection.start"),
    (["selection=color_filter", "selection.tau=0.5"], "selection.tau"),
    (["data=planted", "data.target_share=2"], "data.target_share"),
    (["data=hmm", "data.alpha_emission=0"], "data.alpha_emission"),
    (["init_from.run={missing}"], "is not a directory"),
    (["init_from.run={unfinished}"], "has not finished"),
    (["init_from.run={lstm_run}"], "trained a LSTM"),
    (["name=../../x"], "name=../../x"),
    (["name=a/../../b"], "name=a/../../b"),
    (["name=/tmp/elsewhere"], "name=/tmp/elsewhere"),
    (["-m", "model.n_heads=4,3"], "n_heads=3"),
    (["-m", "seed=0,-1"], "seed"),
    # an evaluation that cannot read the model (Evaluator.check_model)
    (["model=lstm", "eval=probe", "eval.probe.layer=all"], "no block list"),
    (["model=lstm", "objective=mlm", "eval=parse"], "no block list"),
    (["model=lstm", "eval=length", "eval.length.window=8"], "no attention window"),
]


def _one_sentence(out: str) -> str:
    # under pytest's warning filters (not in a plain `lmlab` process), Hydra's first plugin scan of the process
    # reports the Optuna sweeper's import warnings on stderr
    lines = [line for line in out.strip().splitlines() if not line.startswith("[Hydra plugins scanner]")]
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), out
    message = lines[0][len("lmlab: error: "):]
    assert message.endswith(".") and "Traceback" not in out, out
    assert ". " not in message.replace("e.g. ", "").replace("i.e. ", ""), f"more than one sentence: {message}"
    return message


@pytest.mark.parametrize("args,expect", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_mistake_is_one_sentence_before_any_data_and_leaves_no_directory(lmlab, tmp_path, args, expect):
    runs = {"missing": tmp_path / "no_such_run",
            "unfinished": _fake_run(tmp_path / "parents" / "unfinished", {"_target_": "x"}, done=False),
            "lstm_run": _fake_run(tmp_path / "parents" / "lstm", {"_target_": "lmlab.models.lstm.LSTM",
                                                                  "d_model": 64, "n_layers": 2})}
    args = [a.format(**runs) for a in args]
    cache = tmp_path / "cache"
    given = {a.split("=")[0] for a in args}
    defaults = [a for a in [*FAST, *TINY, "eval=[perplexity]"] if a.split("=")[0] not in given]
    code, out = lmlab("train", *defaults, f"cache_dir={cache}", *args)
    assert code == 2, out
    assert expect in _one_sentence(out)
    assert not cache.exists() or not any(cache.iterdir()), "data was generated before the refusal"
    assert not lmlab.runs.exists(), "the refused command left a directory"
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "b").exists()


def test_enough_new_mistakes():
    assert len(BAD) >= 40


def test_a_refusal_after_the_data_removes_the_directory_it_created(lmlab):
    """A refusal that needs the data (every row filtered out) comes after the job started: the run directory
    that this command created goes again."""
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]", "selection=quality", "selection.min_tokens=1000")
    assert code == 2 and "removed all" in _one_sentence(out.splitlines()[-1]), out
    assert not lmlab.runs.exists()


def test_eval_refuses_overrides_that_would_not_take_effect(lmlab):
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]")
    assert code == 0, out
    (run,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    before = (run / "results.json").read_text()
    for override, names in [("+data.paths=other.jsonl", "data.paths"), ("data.paths=other.jsonl", "data.paths"),
                            ("+data.labels_csv=labels.csv", "data.labels_csv"), ("+foo=1", "foo"),
                            ("optim.lr=0.1", "optim.lr"), ("+eval.perplexity.no_such=1", "eval.perplexity.no_such")]:
        code, out = lmlab("eval", f"run={run}", "eval=perplexity", override)
        assert code == 2, (override, out)
        message = _one_sentence(out)
        assert names in message and "would not take effect" in message, message
        assert "+" not in message, message  # no hint to add the key with +
        assert re.search(r"eval\.perplexity\.\w+", message), message  # the settings that do work
    assert (run / "results.json").read_text() == before
    code, out = lmlab("eval", "eval=perplexity")
    assert code == 2 and _one_sentence(out) == "run must be set (this config leaves it ???): pass run=<run dir>."


def test_run_directories_pass_back_unquoted(lmlab):
    """A run directory exactly as lmlab printed it (with '=' and ',') is a value of init_from.run and
    objective.teacher; the child's own directory name shows the parent's last path part."""
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]", "model.d_model=32")
    assert code == 0, out
    (parent,) = {p.parent for p in lmlab.runs.rglob("DONE")}
    assert "=" in parent.name and "," in parent.name
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]", "model.d_model=32", f"init_from.run={parent}")
    assert code == 0, out
    child = next(p.parent for p in lmlab.runs.rglob("parent.json"))
    assert json.loads((child / "parent.json").read_text())["run"] == str(parent)
    code, out = lmlab("train", *FAST, *TINY, "eval=[perplexity]", "objective=distill",
                      f"objective.teacher={parent}")
    assert code == 0, out


def test_sweep_jobs_keep_the_swept_keys_and_seed(lmlab):
    code, out = lmlab("train", "-m", *FAST, *TINY, "eval=[perplexity]", "model.d_model=32,48", "seed=3")
    assert code == 0, out
    jobs = sorted(p.parent.name for p in lmlab.runs.rglob("DONE"))
    assert len(jobs) == 2 and all(len(j) <= 96 for j in jobs)
    for job, width in zip(jobs, (32, 48)):
        assert job.startswith(f"model.d_model={width},seed=3,"), job


def test_run_name_known_answers_for_long_overrides():
    overrides = [*FAST, *TINY, "eval=[perplexity]", "model.d_model=64", "seed=3"]
    digest = config_hash(sorted(overrides), 8)
    assert run_name(overrides, ["model.d_model"]) == ("model.d_model=64,seed=3,batch_size=16,checkpoint_every=2,"
                                                      f"d.downstream_size=120-{digest}")
    # a run directory as a value: its last path part, the middle elided
    parent = "/tmp/runs/default/data.train_size=400,model.d_model=32,seed=0"
    name = run_name([*overrides, f"init_from.run='{parent}'"], ["init_from.run", "model.d_model"])
    assert name.startswith("init_from.run=data._=32,seed=0,model.d_model=64,seed=3,"), name
    assert run_name([f"init_from.run='{parent}'"]) == "init_from.run=" + re.sub(r"[^A-Za-z0-9=.,_+\-]", "_", parent)


def test_run_directory_values_are_quoted_for_hydra(tmp_path):
    from lmlab.cli import _quote_run_dirs

    run = tmp_path / "a=1,b=2"
    run.mkdir()
    assert _quote_run_dirs([f"init_from.run={run}", f"+data.paths={run}", "objective.teacher=x/seed=0",
                            "init_from.run=null", "model.d_model=32,64", "init_from.run=choice(a,b)",
                            f"run='{run}'"]) == \
        [f"init_from.run='{run}'", f"+data.paths='{run}'", "objective.teacher='x/seed=0'", "init_from.run=null",
         "model.d_model=32,64", "init_from.run=choice(a,b)", f"run='{run}'"]


def test_eval_refusal_points_at_the_same_named_setting_of_an_evaluation():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lmlab.cli import _check_eval_override
    from lmlab.errors import UserError

    base = OmegaConf.create({"run": "x", "eval": {"perplexity": {"_target_": "p", "batch_size": 64, "paths": None},
                                                  "probe": {"_target_": "q", "labels_csv": None}}})
    parser = OverridesParser.create()
    for override, fix in [("+data.paths=other.jsonl", "use eval.perplexity.paths instead."),
                          ("+data.labels_csv=l.csv", "use eval.probe.labels_csv instead.")]:
        with pytest.raises(UserError) as e:
            _check_eval_override(parser.parse_override(override), base)
        assert str(e.value).endswith(fix), str(e.value)
    _check_eval_override(parser.parse_override("eval.perplexity.paths=[a.jsonl]"), base)  # takes effect

