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

And the same with the study folder moved between the kill and ``resume NEWPATH``: nothing is
written under the old path.

Real local Ray, real SQLite Optuna storage and MLflow store, the small real objective of
``tests/search_objective.py``.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from p3b_search.search.driver_record import DriverRecord
from p3b_search.study.loading import load_study, with_overrides
from p3b_search.study.sections import StudyConfig
from p3b_search.tracking.client import TRIAL_TAG
from tests.driver_kill import MOMENTS, killing
from tests.search.test_faults import STUDY, _children, _kill_session, _session_processes
from tests.search.test_runner import ROOT, write_study
from tests.search.test_runner import _cli as cli
from tests.search_objective import most_running

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


def _kill_then_resume(tmp_path: Path, moment: str, text: str = KILLED,
                      move_to: Path | None = None) -> tuple[StudyConfig, str, dict, int]:
    """Run the study of ``text`` with its driver SIGKILLed at ``moment`` of trial KILLED_TRIAL,
    move the study folder to ``move_to`` when given, then ``search.py resume`` it; returns the
    study (where it is now), the resumed driver's output, the parameters Optuna had given the
    killed trial and how many trials Optuna had been asked for when the driver died. The dead
    driver's local Ray processes must all be ended by the resume."""
    study = load_study(write_study(tmp_path, text))
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
        asked = optuna.load_study(study_name="killed", storage=study.storage_url).trials
        given = asked[KILLED_TRIAL].params
        if move_to is not None:
            move_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(layout.root, move_to)
            study = with_overrides(study, output_dir=move_to.parent, name=move_to.name)

        resumed = subprocess.Popen(cli("resume", str(study.layout.root)),
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
    return study, output, given, len(asked)


def _every_trial_ran_once(study: StudyConfig, output: str, given: dict) -> None:
    """The resumed study ended as an undisturbed one would (see the module docstring)."""
    layout, n_trials = study.layout, study.n_trials
    # Optuna: n_trials trials, each once, all complete; the killed one kept what it was given
    records = optuna.load_study(study_name="killed", storage=study.storage_url).trials
    assert [t.number for t in records] == list(range(n_trials))
    assert [t.state for t in records] == [TrialState.COMPLETE] * n_trials
    assert given.items() <= records[KILLED_TRIAL].params.items()
    assert set(records[KILLED_TRIAL].params) == {"method_config.prune_ratio", "method_config.alpha"}
    trials = pd.read_parquet(layout.trials_table)
    assert trials["number"].tolist() == list(range(n_trials)) and set(trials["state"]) == {"COMPLETE"}
    assert trials["epochs_done"].tolist() == [EPOCHS] * n_trials  # the driver's notes outlive the kill

    # each trial trained every epoch; only an epoch whose checkpoint Ray missed ran twice
    for number in range(n_trials):
        epochs = [int(e) for e in (layout.trial_dir(number) / "epochs.log").read_text().split()]
        assert sorted(set(epochs)) == list(range(EPOCHS)), (number, epochs)
        repeated = [e for e in set(epochs) if epochs.count(e) > 1]
        assert len(repeated) <= 1 and all(epochs.count(e) == 2 for e in repeated), (number, epochs)

    # allocation rows: each mask update once (2 prune epochs + the finalize row per trial)
    allocations = pd.read_parquet(layout.allocations_table)
    assert allocations.groupby("trial").size().to_dict() == {n: 3 for n in range(n_trials)}
    assert not allocations.duplicated(["trial", "step"]).any()

    # concurrency, across the kill and the resume
    assert most_running(layout.root) <= CONCURRENCY
    shown = [int(n) for n in re.findall(r"(\d+) running", output)]
    assert shown and max(shown) <= CONCURRENCY, output

    # MLflow: one child run per trial, none left RUNNING
    parent, children = _children(study.tracking_uri, "killed")
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == list(range(n_trials))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert set(trials["mlflow_run_id"]) == {r.info.run_id for r in children}
    assert not layout.driver_record.exists()


@pytest.mark.parametrize("moment", MOMENTS)
def test_driver_killed_at_each_moment_resumes_every_trial_exactly_once(tmp_path, moment):
    study, output, given, _ = _kill_then_resume(tmp_path, moment)
    _every_trial_ran_once(study, output, given)


def test_a_killed_study_moved_to_another_folder_resumes_there(tmp_path):
    """The driver SIGKILLed while a trial reports, the study folder moved (``mv``, as to another
    disk), then ``search.py resume NEWPATH``: Ray's restored searcher, scheduler, stopper and
    callback find the study where it is now, the trials in flight continue from their
    checkpoints there (trial 2 from its epoch-0 checkpoint), trials Ray creates after the resume
    start there (with one trial more than KILLED, the last is asked only once trial 2 or 3
    ended: after the resume), every trial is counted once, MLflow's runs keep their artifacts in
    the new folder, and nothing is written under the old path."""
    old_root = tmp_path / "runs" / "killed"
    text = KILLED.replace(f"n_trials: {N_TRIALS}", f"n_trials: {N_TRIALS + 1}")
    study, output, given, asked = _kill_then_resume(tmp_path, "reporting", text,
                                                    move_to=tmp_path / "elsewhere" / "killed")
    assert asked < study.n_trials == N_TRIALS + 1
    assert not old_root.exists() and not any((tmp_path / "runs").iterdir())
    assert study.layout.root == tmp_path / "elsewhere" / "killed"
    _every_trial_ran_once(study, output, given)
    assert str(old_root) not in study.layout.study_file.read_text()
    parent, children = _children(study.tracking_uri, "killed")
    artifacts = study.layout.mlflow_artifacts.as_uri()
    assert all(run.info.artifact_uri.startswith(f"{artifacts}/") for run in [parent, *children])
