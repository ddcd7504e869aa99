"""The resumable Optuna search (hydra_plugins/lmlab_optuna): the study in the sweep directory sets how many
trials a rerun still runs; failed and diverged jobs are failed trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

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
    killed = study.ask({"optim.lr": optuna.distributions.LogUniformDistribution(1e-4, 1e-1)})

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
