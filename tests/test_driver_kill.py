"""The driver SIGKILLed at each moment of a trial's life, then ``search.py resume``.

For every moment (see ``tests/driver_kill.py``: while the trial is sampled, asked, started,
reporting, finishing) the resumed study must end as an undisturbed one would:

- every sampled configuration runs to its end exactly once: Optuna holds ``n_trials`` trials,
  all COMPLETE, the killed trial under its own number with the parameters it had been given
  (a half-sampled one keeps those it had); no epoch is trained twice except the one whose
  checkpoint Ray had not registered when the driver died;
- concurrency is never exceeded, the dead driver's trials included (the attempts the test
  objective logs never overlap more than ``concurrency`` at a time), and the resumed driver's
  progress lines never show more running trials than that;
- MLflow: one child run per trial, none left RUNNING, the parent FINISHED;
- no process of the dead driver's local Ray session is alive after ``resume``: resume ended
  them by their recorded ids (the test never kills them itself before that).

Real local Ray, real SQLite Optuna storage and MLflow store, the small real objective of
``tests/search_objective.py``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from p3b_search.search.driver_record import DriverRecord
from p3b_search.study.loading import load_study
from p3b_search.tracking.client import TRIAL_TAG
from tests.driver_kill import MOMENTS, killing
from tests.search_objective import most_running
from tests.test_faults import STUDY, _children, _kill_session, _session_processes
from tests.test_runner import ROOT, write_study
from tests.test_runner import _cli as cli

pytestmark = pytest.mark.slow

N_TRIALS, CONCURRENCY, KILLED_TRIAL, EPOCHS = 4, 2, 2, 4
KILLED = f"""name: killed
search_space:
  method_config.prune_ratio: {{type: float, low: 0.2, high: 0.9}}
  method_config.alpha: {{type: float, low: 0.3, high: 0.7}}
sampler: {{name: random, seed: 3}}
n_trials: {N_TRIALS}
concurrency: {CONCURRENCY}
""" + STUDY


@pytest.mark.parametrize("moment", MOMENTS)
def test_driver_killed_at_each_moment_resumes_every_trial_exactly_once(tmp_path, moment):
    study = load_study(write_study(tmp_path, KILLED))
    layout = study.layout
    layout.root.mkdir(parents=True)
    (layout.root / "epoch-seconds").write_text("0.5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        killing(cli("run", str(tmp_path / "study.yaml")), moment, KILLED_TRIAL),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    resumed_pid = None
    try:
        output = driver.communicate(timeout=300)[0]
        assert driver.returncode == -signal.SIGKILL, output
        time.sleep(3)  # Ray's processes that share the driver's fate are gone by now
        leftovers = _session_processes(driver.pid)
        assert "stopped without ending" in DriverRecord(layout.driver_record).driver_state()
        given = optuna.load_study(study_name="killed", storage=study.storage_url).trials[KILLED_TRIAL].params

        resumed = subprocess.Popen(cli("resume", str(layout.root)),
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        resumed_pid = resumed.pid
        output = resumed.communicate(timeout=300)[0]
        alive_after = [pid for pid in leftovers if pid in _session_processes(driver.pid)]
    finally:
        _kill_session(driver.pid)
        if resumed_pid is not None:
            _kill_session(resumed_pid)
    assert resumed.returncode == 0, output
    assert "finished after" in output

    # the dead driver's Ray session: every leftover ended by resume, and named there
    assert not alive_after, (leftovers, output)
    for pid in leftovers:
        assert f"(pid {pid})" in output, output

    # Optuna: n_trials trials, each once, all complete; the killed one kept what it was given
    records = optuna.load_study(study_name="killed", storage=study.storage_url).trials
    assert [t.number for t in records] == list(range(N_TRIALS))
    assert [t.state for t in records] == [TrialState.COMPLETE] * N_TRIALS
    assert given.items() <= records[KILLED_TRIAL].params.items()
    assert set(records[KILLED_TRIAL].params) == {"method_config.prune_ratio", "method_config.alpha"}
    trials = pd.read_parquet(layout.trials_table)
    assert trials["number"].tolist() == list(range(N_TRIALS)) and set(trials["state"]) == {"COMPLETE"}
    assert trials["epochs_done"].tolist() == [EPOCHS] * N_TRIALS  # the driver's notes outlive the kill

    # each trial trained every epoch; only an epoch whose checkpoint Ray missed ran twice
    for number in range(N_TRIALS):
        epochs = [int(e) for e in (layout.trial_dir(number) / "epochs.log").read_text().split()]
        assert sorted(set(epochs)) == list(range(EPOCHS)), (number, epochs)
        repeated = [e for e in set(epochs) if epochs.count(e) > 1]
        assert len(repeated) <= 1 and all(epochs.count(e) == 2 for e in repeated), (number, epochs)

    # allocation rows: each mask update once (2 prune epochs + the finalize row per trial)
    allocations = pd.read_parquet(layout.allocations_table)
    assert allocations.groupby("trial").size().to_dict() == {n: 3 for n in range(N_TRIALS)}
    assert not allocations.duplicated(["trial", "step"]).any()

    # concurrency, across the kill and the resume
    assert most_running(layout.root) <= CONCURRENCY
    shown = [int(n) for n in re.findall(r"(\d+) running", output)]
    assert shown and max(shown) <= CONCURRENCY, output

    # MLflow: one child run per trial, none left RUNNING
    parent, children = _children(study.tracking_uri, "killed")
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == list(range(N_TRIALS))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert set(trials["mlflow_run_id"]) == {r.info.run_id for r in children}
    assert not layout.driver_record.exists()
