"""The resumable Optuna search (hydra_plugins/lmlab_optuna): the study in the sweep directory sets how many
trials a rerun still runs; failed and diverged jobs are failed trials; several metrics make a multi-objective
search whose Pareto front is recorded; the search space is Hydra's sweep syntax."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.lmlab_optuna.optuna_sweeper import grid_values, search_space
from lmlab.errors import UserError
from tests.conftest import FAST, TINY
from tests.signals import pause_at, wait_for_pause

SEARCH = ["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
          "eval=[perplexity]", "hydra.sweeper.metric=perplexity/gap", *TINY, *FAST]


def _study(runs) -> optuna.Study:
    (db,) = runs.rglob("optuna.db")
    return optuna.load_study(study_name="lmlab", storage=f"sqlite:///{db}")


def test_a_rerun_continues_the_stored_study_to_n_trials(lmlab):
    lr = "optim.lr=tag(log,interval(1e-4,1e-1))"
    code, out = lmlab("train", *SEARCH, lr, "hydra.sweeper.n_trials=3")
    assert code == 0, out
    study = _study(lmlab.runs)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # a search killed while a trial ran leaves it RUNNING: the rerun runs it again under its own number
    killed = study.ask({"optim.lr": FloatDistribution(1e-4, 1e-1, log=True)})

    code, out = lmlab("train", *SEARCH, lr, "hydra.sweeper.n_trials=5")
    assert code == 0, out
    trials = _study(lmlab.runs).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert trials[killed.number].params == killed.params
    assert len({t.params["optim.lr"] for t in trials}) == 5
    jobs = {p.parent for p in lmlab.runs.rglob("results.json")}
    assert len(jobs) == 5  # one job directory per trial
    value = {t.number: t.value for t in trials}
    gaps = sorted(json.loads((j / "results.json").read_text())["metrics"]["perplexity/gap"] for j in jobs)
    assert sorted(value.values()) == pytest.approx(gaps)

    code, out = lmlab("train", *SEARCH, lr, "hydra.sweeper.n_trials=5")  # nothing left to run
    assert code == 0, out
    assert len(_study(lmlab.runs).trials) == 5


def test_a_search_killed_after_3_trials_and_rerun_ends_with_n_trials(tmp_path, cache_dir):
    """A real kill: the search runs as its own process and is killed (SIGKILL: no chance to clean up) while its
    4th trial is held at step 2 (``tests.signals.PauseAt``: at a step, not after a time, so the machine's speed
    does not matter); the same command run again finishes the study at exactly n_trials distinct trials."""
    lmlab = Path(sys.executable).with_name("lmlab")
    ledger = tmp_path / "steps"
    args = [str(lmlab), "train", f"out_dir={tmp_path / 'runs'}", *SEARCH, "optim.lr=tag(log,interval(1e-4,1e-1))",
            "hydra.sweeper.n_trials=6", pause_at(step=2, ledger=ledger, run=4)]
    env = {**os.environ, "LMLAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_pause(ledger, proc)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1][-3000:]) from None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _study(tmp_path / "runs").trials
    assert [t.state for t in killed] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]

    again = subprocess.run(args, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    trials = _study(tmp_path / "runs").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert len({t.params["optim.lr"] for t in trials}) == 6
    assert [t.params for t in trials[: len(killed)]] == [t.params for t in killed]  # the killed search's trials kept
    assert len(ledger.read_text().splitlines()) == 4 + 3  # the rerun passed step 2 in trials 4 (again), 5 and 6


def test_with_a_launcher_of_its_own_processes_the_value_comes_from_results_json(lmlab):
    """launcher=local runs each trial in a subprocess and returns no value: the sweeper reads the job's metric."""
    code, out = lmlab("train", *SEARCH, "optim.lr=tag(log,interval(1e-4,1e-1))", "hydra.sweeper.n_trials=2",
                      "launcher=local", "hydra.launcher.n_jobs=1")
    assert code == 0, out
    trials = _study(lmlab.runs).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    jobs = {p.parent for p in lmlab.runs.rglob("results.json")}
    gaps = sorted(json.loads((j / "results.json").read_text())["metrics"]["perplexity/gap"] for j in jobs)
    assert sorted(t.value for t in trials) == pytest.approx(gaps)


def test_a_diverged_trial_is_a_failed_trial(lmlab):
    code, out = lmlab("train", *SEARCH, "optim.lr=tag(log,interval(1e4,1e6))", "hydra.sweeper.n_trials=1")
    assert code != 0, out  # the sweep reports the job that did not finish
    (trial,) = _study(lmlab.runs).trials
    assert trial.state == TrialState.FAIL and trial.value is None
    (results,) = lmlab.runs.rglob("results.json")
    assert json.loads(results.read_text())["status"] == "diverged"


def test_preflight_checks_both_ends_of_an_interval(lmlab):
    code, out = lmlab("train", "-m", "hydra/sweeper=optuna", "optim.lr=interval(-1,1)")
    assert code == 2
    assert "optim.lr" in out and not list(lmlab.runs.rglob("optuna.db"))


def _jobs(runs) -> list[dict]:
    return [json.loads(p.read_text()) for p in runs.rglob("results.json")]


def _pareto(points: dict[int, tuple[float, ...]]) -> set[int]:
    """The trials no other trial dominates (every objective minimised), by brute force."""
    return {n for n, p in points.items()
            if not any(all(a <= b for a, b in zip(q, p)) and q != p for m, q in points.items() if m != n)}


def test_a_multi_objective_search_records_the_pareto_front_of_its_trials(lmlab):
    """Two metrics of results.json (the gap to the optimum and the parameter count, both minimised): each trial's
    values are its job's metrics, and optimization_results.yaml lists the trials no other trial dominates."""
    metrics = ["perplexity/gap", "model/params"]
    code, out = lmlab("train", *[a for a in SEARCH if not a.startswith("hydra.sweeper.metric=")],
                      "model.d_model=choice(32,64)", "optim.lr=tag(log,interval(1e-3,1e-1))",
                      f"hydra.sweeper.metrics=[{','.join(metrics)}]", "hydra.sweeper.direction=[minimize,minimize]",
                      "hydra.sweeper.n_trials=4")
    assert code == 0, out
    study = _study(lmlab.runs)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    jobs = {(j["config"]["model"]["d_model"], j["config"]["optim"]["lr"]): j["metrics"] for j in _jobs(lmlab.runs)}
    assert len(jobs) == 4
    for t in trials:
        job = jobs[(int(t.params["model.d_model"]), t.params["optim.lr"])]
        assert t.values == [pytest.approx(job[m]) for m in metrics]
    assert {t.params["model.d_model"] for t in trials} == {32, 64}  # both sizes drawn: the front is a trade-off
    (recorded,) = lmlab.runs.rglob("optimization_results.yaml")
    saved = yaml.safe_load(recorded.read_text())
    assert saved["metrics"] == metrics and saved["directions"] == ["minimize", "minimize"]
    front = {s["trial"] for s in saved["solutions"]}
    assert front == _pareto({t.number: tuple(t.values) for t in trials})
    for s in saved["solutions"]:
        assert s["values"] == {m: pytest.approx(v) for m, v in zip(metrics, trials[s["trial"]].values)}
        assert s["params"] == trials[s["trial"]].params


def test_pareto_brute_force():
    assert _pareto({0: (1.0, 5.0), 1: (2.0, 2.0), 2: (3.0, 3.0), 3: (1.0, 5.0), 4: (0.5, 9.0)}) == {0, 1, 3, 4}


def test_a_diverged_trial_is_failed_and_counts_towards_n_trials(lmlab):
    """On a grid of two rates, the one that diverges is a failed trial (no value) and the other completes with its
    job's metric; a rerun runs nothing more: the failed trial is a result of the search."""
    grid = [*[a for a in SEARCH if "sampler" not in a], "hydra/sweeper/sampler=grid",
            "optim.lr=choice(1e5,1e-2)", "hydra.sweeper.n_trials=5"]  # n_trials: at most the grid's 2 points
    code, out = lmlab("train", *grid)
    assert code != 0, out  # the sweep reports the job that did not finish
    trials = {t.params["optim.lr"]: t for t in _study(lmlab.runs).trials}
    assert set(trials) == {1e5, 1e-2}
    assert trials[1e5].state == TrialState.FAIL and trials[1e5].values is None
    status = {j["config"]["optim"]["lr"]: j for j in _jobs(lmlab.runs)}
    assert status[1e5]["status"] == "diverged"
    assert trials[1e-2].state == TrialState.COMPLETE
    assert trials[1e-2].value == pytest.approx(status[1e-2]["metrics"]["perplexity/gap"])

    lmlab("train", *grid)
    assert len(_study(lmlab.runs).trials) == 2


def test_the_search_space_is_hydras_sweep_syntax():
    space, fixed = search_space(["optim.lr=tag(log,interval(1e-4,1e-1))", "optim.weight_decay=interval(0,0.1)",
                                 "model.n_layers=tag(int,interval(1,4.5))", "model.d_model=range(32,129,32)",
                                 "optim.beta2=range(0.9,1.0,0.05)", "objective=clm,mlm", "seed=choice(0,1)",
                                 "batch_size=8", "seed=3", "batch_size=range(8,17,8)"])
    assert space == {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True),
                     "optim.weight_decay": FloatDistribution(0.0, 0.1),
                     "model.n_layers": IntDistribution(1, 4),
                     "model.d_model": IntDistribution(32, 128, step=32),
                     "optim.beta2": FloatDistribution(0.9, 0.95, step=0.05),
                     "objective": CategoricalDistribution(["clm", "mlm"]),
                     "batch_size": IntDistribution(8, 16, step=8)}  # of a key given twice, the last counts
    assert fixed == {"seed": "3"}
    assert grid_values("model.d_model", space["model.d_model"]) == list(range(32, 129, 32))
    assert grid_values("optim.beta2", space["optim.beta2"]) == pytest.approx([0.9, 0.95])
    assert grid_values("objective", space["objective"]) == ["clm", "mlm"]
    with pytest.raises(UserError, match="optim.lr is an interval"):
        grid_values("optim.lr", space["optim.lr"])


REFUSED = [
    (["hydra.sweeper.direction=[minimize,maximize]"], "one minimize or maximize per metric"),
    (["hydra.sweeper.direction=down"], "one minimize or maximize per metric"),
    (["hydra.sweeper.metrics=[val/loss,model/params]"], "one minimize or maximize per metric"),
    (["hydra.sweeper.metrics=[val/loss,val/loss]", "hydra.sweeper.direction=[minimize,minimize]"], "distinct"),
    (["hydra.sweeper.metric=val/loss", "hydra.sweeper.metrics=[val/loss]"], "both set"),
    (["hydra/sweeper/sampler=grid"], "optim.lr is an interval"),
    (["optim.weight_decay=tag(log,interval(0,0.1))"], "change its ends"),
    (["optim.weight_decay=tag(loq,interval(0,0.1))"], "unknown tag 'loq'"),
    (["optim.lr=1e-3"], "nothing to search"),  # of a key given twice the last counts: no search space is left
]


@pytest.mark.parametrize("args,expect", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_search_settings_that_cannot_work_are_refused_before_anything_is_written(lmlab, args, expect):
    code, out = lmlab("train", "-m", "hydra/sweeper=optuna", "optim.lr=tag(log,interval(1e-4,1e-1))", *args)
    assert code == 2, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("lmlab: error: ")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in out, out
    assert not lmlab.runs.exists() or not list(lmlab.runs.rglob("*.db")), out


def test_a_rerun_that_optimises_other_metrics_is_refused(lmlab):
    search = ["-m", "hydra/sweeper=optuna", "optim.lr=tag(log,interval(1e-4,1e-1))", "hydra.sweeper.n_trials=0"]
    code, out = lmlab("train", *search)
    assert code == 0, out
    assert _study(lmlab.runs).user_attrs["metrics"] == ["val/loss"]
    code, out = lmlab("train", *search, "hydra.sweeper.metric=perplexity/gap")
    assert code == 2 and "optimises ['val/loss'] (minimize), not ['perplexity/gap']" in out, out
    code, out = lmlab("train", *search, "hydra.sweeper.direction=maximize")
    assert code == 2 and "not ['val/loss'] (maximize)" in out, out


def test_a_study_stored_by_an_older_optuna_is_refused_with_the_upgrade_command(lmlab):
    """A search started under optuna 2.10 (schema v2.6.0.a) is not opened, nor its trials run again: the refusal
    names Optuna's upgrade command. (The study is made here by today's Optuna and its recorded schema set back.)"""
    search = ["-m", "hydra/sweeper=optuna", "optim.lr=tag(log,interval(1e-4,1e-1))", "hydra.sweeper.n_trials=0"]
    code, out = lmlab("train", *search)
    assert code == 0, out
    (db,) = lmlab.runs.rglob("optuna.db")
    with sqlite3.connect(db) as c:
        c.execute("update alembic_version set version_num = 'v2.6.0.a'")
    code, out = lmlab("train", *search)
    assert code == 2 and f"upgrade it with `optuna storage upgrade --storage sqlite:///{db.resolve()}`" in out, out
