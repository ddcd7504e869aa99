"""The records of a run directory (``lmlab.run_dir``) as data: a recorded config builds only lmlab's classes
(every command that reads a run refuses a crafted one without calling it), damaged ``results.json`` and
``model.pt`` are one sentence with the fix in every reader, and ``lmlab eval`` adds a record of its own
instead of rewriting the run's results."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from lmlab import run_dir
from lmlab.errors import UserError
from tests.conftest import FAST, TINY, train_run

BASE = [*TINY, *FAST, "eval=[perplexity]", "model.d_model=32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """A finished tiny CLM run (its directory has no '=' in its name, so it passes as a value unquoted)."""
    run = train_run(tmp_path_factory.mktemp("finished"), *BASE)
    assert run_dir.is_done(run)
    return run


def _copy(finished, tmp_path, name="run"):
    copy = tmp_path / name
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


# ----- a run directory is data, never code -----

class _Touch:
    """Unpickling it runs ``touch <path>``: what a pickle read with ``weights_only=False`` can do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def _crafted(finished, tmp_path):
    """A copy of a real run whose config would run ``touch <marker>`` while Hydra builds its model: a nested
    node (built before the model's own constructor, whatever that then does with it) unpickles a file with
    ``torch.load(weights_only=False)``, which passes Hydra's own block list."""
    crafted = _copy(finished, tmp_path, "crafted")
    marker = tmp_path / "marker"
    torch.save(_Touch(marker), tmp_path / "payload.pkl")
    cfg = OmegaConf.load(crafted / run_dir.CONFIG)
    cfg.model.d_model = {"_target_": "torch.load", "f": str(tmp_path / "payload.pkl"), "weights_only": False}
    (crafted / run_dir.CONFIG).write_text(OmegaConf.to_yaml(cfg))
    return crafted, marker


REFUSED = r"config_resolved.yaml is refused: its key model.d_model._target_ names 'torch.load'"


@pytest.mark.parametrize("entry", ["eval", "export", "init_from", "teacher"])
def test_a_crafted_run_directory_is_refused_by_every_command_that_reads_a_run(entry, finished, tmp_path, lmlab):
    crafted, marker = _crafted(finished, tmp_path)
    args = {"eval": ["eval", f"run={crafted}", "eval=perplexity"],
            "export": ["export", f"run={crafted}", f"out={tmp_path / 'hf'}"],
            "init_from": ["train", *BASE, f"init_from.run={crafted}"],
            "teacher": ["train", *BASE, "objective=distill", f"objective.teacher={crafted}"]}[entry]
    code, out = lmlab(*args)
    assert not marker.exists()  # nothing was called
    assert code == 2 and "Traceback" not in out, out
    assert len([line for line in out.splitlines() if "is refused" in line]) == 1
    assert re.search(REFUSED, out), out
    assert str(crafted / run_dir.CONFIG) in " ".join(out.split())
    assert not (tmp_path / "hf").exists()


def test_the_allow_list_known_answers(tmp_path):
    """lmlab's classes and the targets of lmlab's configs pass; an lmlab module's import, an lmlab function
    that no config names, a foreign callable, ``_args_`` and a foreign class by value are refused."""
    for target in ("lmlab.models.transformer.Transformer", "lmlab.schedule.cosine", "torch.optim.AdamW",
                   "lightning.Trainer", "lmlab.training.callbacks.progress_bar"):
        assert run_dir.allowed_target(target), target
    for target in ("os.system", "builtins.exec", "torch.load", "subprocess.run", "lmlab.pipeline.os",
                   "lmlab.run_dir.torch.load", "lmlab.io.write_text", "lmlab.export.PreTrainedTokenizerFast",
                   "lmlab.no.such.Thing", None, 3):
        assert not run_dir.allowed_target(target), target
    path = tmp_path / "config_resolved.yaml"
    cases = [
        ({"data": {"sources": {"a": {"_target_": "builtins.exec"}}}}, "data.sources.a._target_"),
        ({"callbacks": [{"_target_": "lmlab.io.write_text", "path": "x", "text": "y"}]}, r"callbacks\[0\]._target_"),
        ({"model": {"_target_": "lmlab.models.lstm.LSTM", "_args_": [1]}}, "model._args_"),
        ({"trainer": {"strategy": {"_target_": "hydra.utils.get_class", "path": "subprocess.Popen"}}},
         "trainer.strategy.path"),
    ]
    for config, key in cases:
        with pytest.raises(UserError, match=f"{path} is refused: its key {key} "):
            run_dir.check_targets(config, path)
    run_dir.check_targets({"model": {"_target_": "lmlab.models.lstm.LSTM", "d_model": 8}, "logger": {"_target_": None},
                           "w": {"_target_": "hydra.utils.get_class", "path": "lmlab.models.transformer.Block"}}, path)


def test_every_target_of_lmlabs_configs_is_allowed():
    """The allow-list reads lmlab's own configs: every option of every group can be recorded and read back."""
    targets = run_dir.conf_targets()
    assert {"torch.optim.AdamW", "lightning.Trainer", "lmlab.models.transformer.Transformer"} <= targets
    assert all(run_dir.allowed_target(t) for t in targets)


def test_the_config_of_every_option_reads_back(tmp_path):
    """What ``lmlab train`` records for any option of any group passes ``read_config`` unchanged."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.test_cli import NESTED_IN, all_options

    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        for group, option in all_options():
            if group == "launcher":  # it sets hydra.launcher only, which is not recorded
                continue
            cfg = compose(config_name="train", overrides=[*NESTED_IN.get(group, []), f"{group}={option}"],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # the ${hydra:...} interpolations resolve as in a run
            with open_dict(cfg):
                del cfg["hydra"]
            run_dir.write_config(tmp_path, cfg)
            read = OmegaConf.to_container(run_dir.read_config(tmp_path))
            assert read == OmegaConf.to_container(cfg, resolve=True), (group, option)
    HydraConfig.instance().cfg = None


def test_an_interpolation_cannot_hide_a_target(tmp_path):
    """``read_config`` checks the resolved config, the one that is built: a node made by a resolver is seen."""
    (tmp_path / run_dir.CONFIG).write_text("x: '{_target_: os.system, command: ls}'\nmodel: ${oc.create:${x}}\n")
    with pytest.raises(UserError, match=r"is refused: its key model._target_ names 'os.system'"):
        run_dir.read_config(tmp_path)
    (tmp_path / run_dir.CONFIG).write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"config_resolved.yaml cannot be read \(.*\): point at a run directory"):
        run_dir.read_config(tmp_path)


# ----- a damaged results.json -----

DAMAGED_RESULTS = r"results.json is damaged \(it is not readable JSON\): delete it and .*DONE, then rerun the run's"


def _damage_results(run):
    path = run / run_dir.RESULTS
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_a_damaged_results_json_is_one_sentence_in_eval_before_the_evaluation(finished, tmp_path, lmlab,
                                                                               monkeypatch):
    from lmlab import pipeline

    run = _copy(finished, tmp_path)
    _damage_results(run)

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation ran before results.json was checked")

    monkeypatch.setattr(pipeline, "rebuild", refuse)
    code, out = lmlab("eval", f"run={run}", "eval=perplexity")
    assert code == 2 and "Traceback" not in out, out
    assert re.search(DAMAGED_RESULTS, " ".join(out.split())), out
    assert not (run / run_dir.EVALS).exists()


def test_a_damaged_results_json_is_one_sentence_in_the_train_rerun_and_the_fix_works(finished, tmp_path, lmlab):
    run = _copy(finished, tmp_path)
    before = run_dir.read_results(run)["metrics"]
    _damage_results(run)
    with pytest.raises(run_dir.DamagedRecord, match=DAMAGED_RESULTS):
        run_dir.read_results(run)
    command = ["train", *BASE, f"hydra.run.dir={run}"]
    code, out = lmlab(*command)
    assert code == 2 and "Traceback" not in out, out
    assert "results.json is damaged" in out
    # the fix the sentence gives: delete results.json and DONE, rerun the same command
    (run / run_dir.RESULTS).unlink()
    (run / run_dir.DONE).unlink()
    code, out = lmlab(*command)
    assert code == 0, out
    after = run_dir.read_results(run)["metrics"]
    assert after["perplexity/loss"] == pytest.approx(before["perplexity/loss"], abs=1e-6)


def _sweep_of(finished, tmp_path):
    """A sweep directory of two jobs (copies of a finished run with their Hydra overrides)."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        job = _copy(finished, sweep, f"seed={seed}")
        (job / ".hydra").mkdir(exist_ok=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    return sweep


def test_a_damaged_results_json_is_a_damaged_job_in_the_report(finished, tmp_path, lmlab):
    from lmlab.report.summary import gather

    sweep = _sweep_of(finished, tmp_path)
    _damage_results(sweep / "seed=1")
    rows = {r["job"]: r for r in gather(sweep)}
    assert rows["seed=0"]["status"] == "done" and "perplexity/loss" in rows["seed=0"]
    assert rows["seed=1"]["status"] == "damaged" and "perplexity/loss" not in rows["seed=1"]
    assert re.search(DAMAGED_RESULTS, rows["seed=1"]["reason"])
    code, out = lmlab("report", str(sweep))
    assert code == 0 and "Traceback" not in out, out
    report = (sweep / "report.md").read_text()
    assert "damaged" in report and "results.json is damaged" in report


# ----- a damaged model.pt -----

def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_model_pt_has_a_checksum_and_flipped_bytes_are_refused(finished, tmp_path, lmlab):
    run = _copy(finished, tmp_path)
    recorded = json.loads((run / run_dir.MODEL_SUM).read_text())["sha256"]
    import hashlib

    assert recorded == hashlib.sha256((run / run_dir.MODEL).read_bytes()).hexdigest()
    size = (run / run_dir.MODEL).stat().st_size
    _flip(run / run_dir.MODEL, size // 2)  # inside a tensor: a zip reader alone may not notice
    for args in (["eval", f"run={run}", "eval=perplexity"], ["export", f"run={run}", f"out={tmp_path / 'hf'}"]):
        code, out = lmlab(*args)
        assert code == 2 and "Traceback" not in out, out
        assert "model.pt is damaged (its sha256 differs from the one recorded in model_sha256.json" in out
        assert "delete" in out and "DONE and rerun the run's `lmlab train` command" in " ".join(out.split())
    with pytest.raises(UserError, match="model.pt is damaged"):
        run_dir.load_backbone(run)
    assert not (tmp_path / "hf").exists() and not (run / run_dir.EVALS).exists()


def test_a_truncated_model_pt_says_damaged_and_the_fix_rewrites_it(finished, tmp_path, lmlab):
    run = _copy(finished, tmp_path)
    good = run_dir.load_weights(run)
    path = run / run_dir.MODEL
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.pt is damaged .*: delete .*DONE and rerun") as e:
        run_dir.load_backbone(run)
    assert "this version" not in str(e.value)
    # the fix it names: delete DONE and rerun the same command, which writes model.pt again from the checkpoint
    (run / run_dir.DONE).unlink()
    code, out = lmlab("train", *BASE, f"hydra.run.dir={run}")
    assert code == 0, out
    again = run_dir.load_weights(run)
    assert all(torch.equal(v, again[k]) for k, v in good.items())


def test_a_missing_model_pt_says_missing_and_an_old_run_without_checksum_still_loads(finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / run_dir.MODEL_SUM).unlink()  # a run written before the checksum existed
    assert run_dir.load_backbone(run) is not None
    path = run / run_dir.MODEL
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.pt is damaged \(it does not read back as a whole archive\)"):
        run_dir.load_weights(run)
    path.unlink()
    with pytest.raises(UserError, match="model.pt is missing") as e:
        run_dir.load_weights(run)
    assert "damaged" not in str(e.value)


def test_save_model_replaces_the_checksum_with_the_model(tmp_path):
    from lmlab.models.lstm import LSTM

    for seed in (0, 1):  # a second save (a rerun after a kill) leaves a checksum of the new file
        torch.manual_seed(seed)
        run_dir.save_model(tmp_path, LSTM(20, "causal", d_model=8, n_layers=1), vocab_size=20, attention="causal")
        run_dir.check_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_args.json", "model_sha256.json"]


# ----- lmlab eval writes a record of its own -----

def test_a_second_eval_keeps_the_first_and_the_runs_own_metrics(finished, tmp_path, lmlab):
    from lmlab.report.summary import gather

    sweep = _sweep_of(finished, tmp_path)
    run = sweep / "seed=0"
    results = (run / run_dir.RESULTS).read_bytes()
    code, out = lmlab("eval", f"run={run}", "eval=perplexity", "eval.perplexity.max_rows=8")
    assert code == 0, out
    assert (run / run_dir.RESULTS).read_bytes() == results  # its 8-row numbers did not replace the run's own
    code, out = lmlab("eval", f"run={run}", "eval=perplexity")
    assert code == 0, out
    assert (run / run_dir.RESULTS).read_bytes() == results  # the training-time results are untouched
    first, second = run_dir.read_evaluations(run)
    assert (first["number"], second["number"]) == (1, 2)
    assert first["eval"]["perplexity"]["max_rows"] == 8 and "eval.perplexity.max_rows=8" in first["command"]
    assert first["command"].startswith("lmlab eval") and first["time"]
    trained = json.loads(results)["metrics"]["perplexity/loss"]
    assert second["metrics"]["perplexity/loss"] == pytest.approx(trained, abs=1e-6)  # the same whole split
    assert first["metrics"]["perplexity/loss"] != second["metrics"]["perplexity/loss"]  # 8 rows: its own number
    assert json.loads((run / "evals" / "1.json").read_text())["metrics"] == first["metrics"]
    rows = {r["job"]: r for r in gather(sweep)}
    assert rows["seed=0"]["perplexity/loss"] == trained
    assert rows["seed=0"]["eval:perplexity/loss"] == second["metrics"]["perplexity/loss"]
    assert rows["seed=0"]["evaluations"] == "#2 perplexity"
    assert "eval:perplexity/loss" not in rows["seed=1"]  # never evaluated: the column is empty, not shifted
    code, out = lmlab("report", str(sweep))
    assert code == 0, out
    report = (sweep / "report.md").read_text()
    assert "## eval:perplexity/loss (lower is better)" in report  # beside the run's own (the same in both copies)
    assert "(ask with `--metric`): `perplexity/gap`, `perplexity/loss`" in report
    assert "| (all jobs) | 0 | #2 perplexity | seed=0 |" in report  # which records the eval: numbers come from


def test_eval_metrics_name_the_latest_record_of_each_number():
    from lmlab.report.summary import eval_metrics

    records = [{"number": 1, "eval": {"flatness": {}}, "metrics": {"flatness/trace": 5.0, "flatness/n": 16384.0}},
               {"number": 2, "eval": {"perplexity": {}}, "metrics": {"perplexity/loss": 3.0}},
               {"number": 3, "eval": {"flatness": {}}, "metrics": {"flatness/trace": 7.0}}]
    assert eval_metrics(records) == {"eval:flatness/trace": 7.0, "eval:flatness/n": 16384.0,
                                     "eval:perplexity/loss": 3.0, "evaluations": "#1 flatness; #2 perplexity; "
                                                                                 "#3 flatness"}
    assert eval_metrics([]) == {}


def test_two_records_written_at_once_take_different_numbers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda i: run_dir.write_evaluation(tmp_path, {"metrics": {"m": float(i)}}), range(8)))
    assert sorted(int(p.stem) for p in paths) == list(range(1, 9))
    assert sorted(r["metrics"]["m"] for r in run_dir.read_evaluations(tmp_path)) == [float(i) for i in range(8)]
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == sorted(f"{i}.json" for i in range(1, 9))
    (tmp_path / "evals" / "3.json").write_text("{")
    with pytest.raises(run_dir.DamagedRecord, match=r"evals/3.json is damaged .*: it holds one `lmlab eval` record"):
        run_dir.read_evaluations(tmp_path)


def test_a_text_run_recorded_before_the_documents_setting_reads_its_txt_files_by_line(tmp_path):
    """A run recorded before ``data.documents`` existed read each line of a .txt file as a document: reading its
    config back keeps that, and leaves other formats (where the setting would be refused) and the bundled sample
    corpora (still read by line) alone."""
    from lmlab.run_dir import CONFIG, read_config

    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n')
    for paths, expected in [(str(tmp_path / "a.txt"), "line"), (str(tmp_path / "*.txt"), "line"),
                            (str(tmp_path), "line"), (None, None), ([str(tmp_path / "b.jsonl")], None)]:
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run.mkdir()
        OmegaConf.save(OmegaConf.create({"data": {"_target_": "lmlab.data.text.TextSource", "paths": paths}}),
                       run / CONFIG)
        assert read_config(run).data.get("documents") == expected, paths
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    OmegaConf.save(OmegaConf.create({"data": {"_target_": "lmlab.data.text.TextSource", "paths": None,
                                              "documents": "file"}}), recorded / CONFIG)
    assert read_config(recorded).data.documents == "file"
