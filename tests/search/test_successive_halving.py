"""Multi-objective successive halving: the rung objectives of an epoch, the Ray Tune scheduler's
decisions (real Ray ``Trial`` objects through its public ``on_trial_result``), the records rebuilt
from the study's learning curves after a restart, and end to end: trials stopped at a rung end
PRUNED and off the front, also when the driver is killed while a trial waits at the rung.
"""
from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER
from p3b_search.study.loading import load_study
from p3b_search.study.results import TrialPartWriter, read_epochs
from p3b_search.study.rungs import SuccessiveHalvingRule, epoch_values, rung_objectives
from p3b_search.study.sections import StudyConfig
from tests.driver_kill import killing
from tests.search.test_faults import _kill_session
from tests.search.test_runner import OBJECTIVE, ROOT, live, write_study
from tests.search.test_runner import _cli as cli

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP

# 2 prune + 2 fine-tune epochs; rungs after the prune stage (2) and after the first fine-tune epoch (3)
UNIT = """name: halving
training: {prune: {epochs: 2}, finetune: {epochs: 2}}
objectives: [top1, {name: macs, reference: 3000}]
scheduler: {name: successive-halving, rungs: [3, 2], eta: 2}
"""


def unit_study(folder: Path) -> StudyConfig:
    return load_study(write_study(folder, UNIT))


def ray_trial(number: int) -> Trial:
    return Trial("trainable", config={TRIAL_NUMBER: number, "training.seed": number}, trial_id=f"ray{number}",
                 stub=True)


def result(epoch: int, top1: float, macs: float) -> dict:
    """A trial's per-epoch result as the scheduler gets it from Ray (flattened, not finished)."""
    return {"epoch": float(epoch), "stage": float(epoch >= 2), "top1": top1, "macs": macs, "kept_params": 1e4,
            FINISHED: False, "training_iteration": epoch + 1}


def report(scheduler: SuccessiveHalvingScheduler, trial: Trial, layout, epoch: int, top1: float, macs: float) -> str:
    """What a trial does at an epoch: write its learning-curve part, then Ray hands the result over."""
    row = result(epoch, top1, macs)
    TrialPartWriter(layout.epoch_parts, trial.config[TRIAL_NUMBER]).write([row], epoch)
    return scheduler.on_trial_result(None, trial, row)


# ----------------------------------------------------------------------------- rung objectives

def test_an_epoch_reports_every_objective_but_latency():
    names, directions = rung_objectives(["top1", "latency_ms", "flops", "params"],
                                        ["maximize", "minimize", "minimize", "minimize"])
    assert (names, directions) == (["top1", "flops", "params"], ["maximize", "minimize", "minimize"])
    values = epoch_values({"top1": 81.5, "macs": 1.5e6, "kept_params": 2e4, "keep_ratio": 0.4}, names)
    assert values == (81.5, 3e6, 2e4)  # flops = 2 x the epoch's MACs; params = its kept parameters
    assert all(math.isnan(v) for v in epoch_values({"top1": None, "macs": math.nan}, ["top1", "macs"]))


# ----------------------------------------------------------------------------- the scheduler's decisions

def test_scheduler_stops_a_trial_outside_the_top_of_its_rung_and_says_where(tmp_path):
    study = unit_study(tmp_path)
    layout = study.layout
    scheduler = SuccessiveHalvingScheduler(study)
    assert (scheduler.rungs, scheduler.eta, scheduler.objectives) == ((2, 3), 2, ["top1", "macs"])
    assert not scheduler.supports_buffered_results
    good, bad, star, late = (ray_trial(n) for n in range(4))
    assert report(scheduler, good, layout, 0, 50.0, 2000.0) == CONTINUE   # off a rung: never stopped
    assert report(scheduler, bad, layout, 0, 10.0, 2000.0) == CONTINUE
    # rung 2 (after 2 epochs), top 1/2 continue (at least one), in the order trials arrive
    assert report(scheduler, good, layout, 1, 90.0, 2000.0) == CONTINUE   # alone at the rung
    assert report(scheduler, bad, layout, 1, 60.0, 2000.0) == STOP        # dominated by good
    assert report(scheduler, star, layout, 1, 95.0, 1000.0) == CONTINUE   # dominates both: first of 3
    # late: neither dominates the other with good (rank 2, both ends of that front: the earlier first)
    assert report(scheduler, late, layout, 1, 80.0, 1500.0) == STOP       # third of 4, quota 2
    assert scheduler.reasons == {"ray1": "stopped at rung 2 (rank 2 of 2, eta 2)",
                                 "ray3": "stopped at rung 2 (rank 3 of 4, eta 2)"}
    # rung 3: its own records
    assert report(scheduler, good, layout, 2, 91.0, 2000.0) == CONTINUE
    assert report(scheduler, star, layout, 2, 40.0, 2500.0) == STOP
    assert scheduler.reasons["ray2"] == "stopped at rung 3 (rank 2 of 2, eta 2)"
    assert report(scheduler, good, layout, 3, 92.0, 2000.0) == CONTINUE   # the last epoch is no rung
    finished = {**result(3, 0.0, 9e9), FINISHED: True}
    assert scheduler.on_trial_result(None, good, finished) == CONTINUE     # the final result decides nothing
    assert scheduler.on_trial_result(None, good, {"training_iteration": 5}) == CONTINUE  # no epoch


def test_a_restored_scheduler_rebuilds_the_rungs_from_the_learning_curves(tmp_path):
    """Ray brings the scheduler back from its pickled experiment state; the rungs' records come
    from the study folder's learning curves instead, and a trial resumed from the checkpoint of a
    rung's epoch is decided again there, against every trial recorded at the rung."""
    study = unit_study(tmp_path)
    layout = study.layout
    before = SuccessiveHalvingScheduler(study)
    good, star, bad = ray_trial(0), ray_trial(1), ray_trial(2)
    assert report(before, good, layout, 1, 90.0, 2000.0) == CONTINUE  # alone at rung 2
    assert report(before, star, layout, 1, 95.0, 1000.0) == CONTINUE  # dominates good
    # bad wrote its rung-2 curve row; the driver died before Ray registered its checkpoint
    TrialPartWriter(layout.epoch_parts, 2).write([result(1, 50.0, 2000.0)], 1)

    after = pickle.loads(pickle.dumps(before))  # what Tuner.restore brings back
    with live(study):  # the resumed driver's session
        # bad redoes epoch 1: ranked against the rebuilt records, last of 3
        assert after.on_trial_result(None, bad, result(1, 50.0, 2000.0)) == STOP
        assert after.reasons == {"ray2": "stopped at rung 2 (rank 3 of 3, eta 2)"}
        # good and star resumed from their rung-2 checkpoints: decided again at rung 2 first
        assert after.on_trial_result(None, good, result(2, 91.0, 2000.0)) == STOP
        assert after.reasons["ray0"] == "stopped at rung 2 (rank 2 of 3, eta 2)"
        assert after.on_trial_result(None, star, result(2, 96.0, 1000.0)) == CONTINUE
        assert after.on_trial_result(None, star, result(3, 97.0, 1000.0)) == CONTINUE
    assert after.rule.records == {2: {0: (90.0, 2000.0), 1: (95.0, 1000.0), 2: (50.0, 2000.0)},
                                  3: {1: (96.0, 1000.0)}}


@given(st.lists(st.tuples(st.sampled_from([10.0, 50.0, 80.0, 90.0]), st.sampled_from([1e3, 2e3, 3e3])),
                min_size=1, max_size=8), st.data())
@pytest.mark.slow
@settings(max_examples=25, deadline=None)
def test_a_driver_restart_leaves_every_decision_as_it_would_have_been(rung_values, data):
    """Trials reach rung 2 one after another; a driver restarted after any of them (its scheduler
    restored from the pickle, its records from the learning curves) decides the others as the
    driver that lived through would have."""
    restart = data.draw(st.integers(0, len(rung_values)), label="restart after")
    with tempfile.TemporaryDirectory() as live_dir, tempfile.TemporaryDirectory() as restarted_dir:
        decisions = {}
        for name, folder in (("live", Path(live_dir)), ("restarted", Path(restarted_dir))):
            study = unit_study(folder)
            scheduler = SuccessiveHalvingScheduler(study)
            decisions[name] = []
            with live(study):
                for number, (top1, macs) in enumerate(rung_values):
                    if name == "restarted" and number == restart:
                        scheduler = pickle.loads(pickle.dumps(scheduler))
                    decisions[name].append(report(scheduler, ray_trial(number), study.layout, 1, top1, macs))
        assert decisions["restarted"] == decisions["live"]
        assert decisions["live"][0] == CONTINUE


# ----------------------------------------------------------------------------- end to end

HALVING = """name: halving
method: {name: p3b, config: {prune_ratio: 0.5}}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 2, lr: 0.01}, batch_size: 64}
search_space:
  training.prune.lr: {type: categorical, choices: [0.01, 1.0e-5]}
  training.seed: {type: int, low: 0, high: 1000}
objectives: [top1, {name: macs, reference: 3000}]
sampler: {name: random, seed: 0}   # prune lr: 0.01 (the reference), 1e-5, 0.01, 1e-5
n_trials: 4
concurrency: 1
tracking: {enabled: false}
scheduler: {name: successive-halving, rungs: [2], eta: 2}
"""
N_TRIALS, RUNG, HOPELESS = 4, 2, {1, 3}  # lr 1e-5: far behind trial 0 at the rung, same MACs


def replayed_reasons(study: StudyConfig) -> dict[int, str]:
    """The rule replayed on the learning curves, trials reaching the rung in number order (one
    at a time): the stop reason of each trial it stops."""
    names, directions = rung_objectives(study.metric_names, study.directions)
    rule = SuccessiveHalvingRule([RUNG], 2, directions)
    curves = read_epochs(study.layout)
    reasons = {}
    for number in range(N_TRIALS):
        row = curves[(curves["trial"] == number) & (curves["epoch"] == RUNG - 1)].iloc[0]
        if not rule.decide(number, RUNG, epoch_values(row.to_dict(), names)):
            place, count = rule.standing(number, RUNG)
            reasons[number] = f"stopped at rung {RUNG} (rank {place} of {count}, eta 2)"
    return reasons


def assert_stopped_at_the_rung(study: StudyConfig, every_hopeless_stopped: bool = True) -> None:
    """Optuna, the trials table and the trials' folders agree with the replayed rule: stopped
    trials are PRUNED with their rung in fail_reason, never trained past it, never on the front.
    ``every_hopeless_stopped``: also that the rule stopped both hopeless trials, which holds for
    the order trials reach the rung in one driver (after a restart the rebuilt records are in
    trial-number order, and which trial a rung stops can change with that order)."""
    reasons = replayed_reasons(study)
    assert 0 not in reasons and (HOPELESS <= reasons.keys() if every_hopeless_stopped else reasons)
    records = optuna.load_study(study_name="halving", storage=study.storage_url).trials
    assert [t.number for t in records] == list(range(N_TRIALS))  # each trial once
    assert len({t.user_attrs["ray_trial_id"] for t in records}) == N_TRIALS
    assert [t.state for t in records] == [TrialState.PRUNED if n in reasons else TrialState.COMPLETE
                                          for n in range(N_TRIALS)]
    assert all(t.values is None for t in records if t.number in reasons)
    trials = pd.read_parquet(study.layout.trials_table)
    assert trials["number"].tolist() == list(range(N_TRIALS))
    stopped = trials[trials["state"] == "PRUNED"]
    assert dict(zip(stopped["number"], stopped["fail_reason"])) == reasons
    assert set(stopped["epochs_done"]) == {RUNG} and not stopped["pareto"].any()
    assert (trials.loc[trials["state"] == "COMPLETE", "epochs_done"] == 4).all()
    assert trials["pareto"].any()
    for number in reasons:
        epochs = {int(e) for e in (study.layout.trial_dir(number) / "epochs.log").read_text().split()}
        assert epochs == set(range(RUNG)), (number, epochs)


@pytest.mark.slow
def test_trials_stopped_at_a_rung_end_pruned_and_off_the_front(tmp_path):
    from p3b_search.search.runner import run_study

    study = load_study(write_study(tmp_path, HALVING))
    lines: list[str] = []
    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lines.append)
    assert not outcome.interrupted
    assert_stopped_at_the_rung(study)
    assert not set(outcome.front["number"]) & replayed_reasons(study).keys()
    assert f"{len(replayed_reasons(study))} stopped" in lines[-1]


@pytest.mark.slow
def test_driver_killed_while_a_trial_waits_at_a_rung_resumes_with_the_rung_rebuilt(tmp_path):
    """The driver is SIGKILLed when trial 1's rung result reached it, before the scheduler
    decided; ``resume`` decides it against the rung's records rebuilt from the study folder
    (trial 0's: alone at the rung it would continue), and every trial counts once."""
    study = load_study(write_study(tmp_path, HALVING))
    layout = study.layout
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(killing(cli("run", str(tmp_path / "study.yaml")), "at-rung", 1), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    resumed = None
    try:
        output = driver.communicate(timeout=300)[0]
        assert driver.returncode == -signal.SIGKILL, output
        waiting = read_epochs(layout)
        assert set(waiting.loc[waiting["epoch"] == RUNG - 1, "trial"]) == {0, 1}  # both reached the rung
        time.sleep(3)  # Ray's processes that share the driver's fate are gone by now
        resumed = subprocess.Popen(cli("resume", str(layout.root)), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output = resumed.communicate(timeout=300)[0]
    finally:
        _kill_session(driver.pid)
        if resumed is not None:
            _kill_session(resumed.pid)
    assert resumed.returncode == 0, output
    assert "finished after" in output
    assert replayed_reasons(study)[1] == "stopped at rung 2 (rank 2 of 2, eta 2)"
    assert_stopped_at_the_rung(study, every_hopeless_stopped=False)
