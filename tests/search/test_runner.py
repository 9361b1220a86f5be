"""The runner: Optuna's records, the Parquet tables, the front, early stopping, retries, resume.

The end-to-end tests run real local Ray (2 CPUs) with a small real objective
(``tests/search_objective.py``: an MLP on scikit-learn's digits, pruned and fine-tuned).
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from ray import cloudpickle
from ray.tune import Experiment
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter

from p3b_search.search.early_stopping import DominatedTrialStopper, StudyBudget
from p3b_search.search.generator import StudySearchGenerator
from p3b_search.search.progress import StudyProgress, StudySession
from p3b_search.search.searcher import FrontSafeOptunaSearch, open_optuna_study
from p3b_search.search.session import close_session, open_session
from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER, objective_key
from p3b_search.study.layout import StudyLayout
from p3b_search.study.loading import load_study, with_overrides
from p3b_search.study.messages import StudyError
from p3b_search.study.pareto import pareto_mask
from p3b_search.study.results import TrialPartWriter, read_trials
from p3b_search.study.sections import EarlyStopping
from p3b_search.study.trials import trial_budget
from tests.paths import REPO_ROOT as ROOT

OBJECTIVE = "tests.search_objective:run_trial"


def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{text}")
    return path


@contextmanager
def live(study) -> Iterator[StudySession]:
    """The driver's session of ``study``, open as ``run_study`` holds it while Ray runs (where
    the searcher, scheduler, stopper and callback Ray restores read their study)."""
    session = StudySession(study, open_optuna_study(study), {}, printer=lambda line: None)
    open_session(session)
    try:
        yield session
    finally:
        close_session(session)


# ----------------------------------------------------------------------------- the searcher's tell

SEARCHED = """name: tell
method: {name: p3b, config: {prune_finalize_epoch: 8}}
training: {prune: {epochs: 8}}
search_space:
  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}
  method_config.prune_start_epoch: {type: int, low: 0, high: 7}
  method_config.prune_sparse_epoch: {type: int, low: 0, high: 8}
sampler: {name: random, seed: 0}
n_trials: 6
"""


def finished(values: list[float], done: bool) -> dict:
    return {FINISHED: done, objective_key("top1"): values[0], objective_key("macs"): values[1],
            "top1": values[0], "macs": values[1], "top5": 99.0, "params": 5e5}


def test_searcher_tells_complete_only_for_a_finished_trial(tmp_path):
    study = load_study(write_study(tmp_path, SEARCHED))
    optuna_study = open_optuna_study(study)
    searcher = FrontSafeOptunaSearch(study)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c", "d")}
    assert configs["a"][TRIAL_NUMBER] is not None
    assert configs["a"]["method_config.prune_ratio"] == 0.5  # the reference trial comes first
    # a trial stopped early whose last result holds finite objective-like values: PRUNED, no values
    searcher.on_trial_complete("a", finished([95.0, 1e6], done=False))
    searcher.on_trial_complete("b", finished([80.0, 2e6], done=True))
    searcher.on_trial_complete("c", finished([float("nan"), 2e6], done=True))
    searcher.on_trial_complete("d", None, error=True)
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in optuna_study.get_trials() if "ray_trial_id" in t.user_attrs}
    assert by_ray["a"].state == TrialState.PRUNED and by_ray["a"].values is None
    assert by_ray["b"].state == TrialState.COMPLETE and by_ray["b"].values == [80.0, 2e6]
    assert by_ray["b"].user_attrs["final_top5"] == 99.0 and by_ray["b"].user_attrs["final_params"] == 5e5
    assert by_ray["c"].state == TrialState.FAIL
    assert by_ray["c"].user_attrs["fail_reason"] == "the objective returned no finite value for top1"
    assert by_ray["d"].state == TrialState.FAIL
    assert [t.number for t in optuna_study.best_trials] == [by_ray["b"].number]


def test_searcher_rejects_invalid_samples_before_compute(tmp_path):
    study = load_study(write_study(tmp_path, SEARCHED))
    optuna_study = open_optuna_study(study)
    searcher = FrontSafeOptunaSearch(study)
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        start, sparse = config["method_config.prune_start_epoch"], config["method_config.prune_sparse_epoch"]
        assert start <= sparse  # what reached Ray is valid
    failed = optuna_study.get_trials(states=(TrialState.FAIL,))
    assert failed, "the random sampler should have drawn invalid start/sparse pairs"
    assert all(t.user_attrs["fail_reason"].startswith("invalid sample: method_config: prune_sparse_epoch=")
               for t in failed)


def test_reopening_a_study_with_other_objectives_is_refused(tmp_path):
    study = load_study(write_study(tmp_path, SEARCHED))
    open_optuna_study(study)
    other = with_overrides(study, objectives=["top1", "params"])
    with pytest.raises(StudyError, match="objectives: the stored study 'tell' optimizes"):
        open_optuna_study(other)


@dataclass
class RayTrial:
    """What the driver's callback reads of a Ray Tune trial."""

    trial_id: str
    config: dict
    status: str = "RUNNING"
    RUNNING = "RUNNING"


def test_the_progress_line_counts_the_trials_ray_runs(tmp_path):
    """The running count comes from the trials the callback saw start and not end (a paused or
    ended trial is not running), not from a scan of every trial of the experiment."""
    study = load_study(write_study(tmp_path, SEARCHED))
    searcher, progress = FrontSafeOptunaSearch(study), StudyProgress(study.name)
    with live(study) as session:
        lines: list[str] = []
        session.printer = lines.append
        trials = [RayTrial(tid, searcher.suggest(tid)) for tid in ("a", "b", "c")]
        for trial in trials:
            progress.on_trial_start(0, [], trial)
        trials[1].status = "PAUSED"
        searcher.on_trial_complete("a", finished([90.0, 1e6], done=True))
        trials[0].status = "TERMINATED"
        progress.on_trial_complete(1, [], trials[0])
        assert ", 1 running," in lines[-1] and "1/6 done" in lines[-1]
        trials[1].status = "RUNNING"
        progress.on_trial_error(2, [], trials[2])
        assert ", 1 running," in lines[-1]
        assert set(session.live) == {"b"}


# ----------------------------------------------------------------------------- resume: state and lost trials

RATIO = """name: lost
search_space:
  method_config.prune_ratio: {type: float, low: 0.2, high: 0.9}
sampler: {name: random, seed: 0}
n_trials: 4
"""


def _run_to_end(searcher: FrontSafeOptunaSearch, trial_id: str) -> dict:
    config = searcher.suggest(trial_id)
    searcher.on_trial_complete(trial_id, finished([90.0, 1e6], done=True))
    return config


def test_restored_searcher_keeps_in_flight_trials_under_their_numbers(tmp_path):
    """``Tuner.restore``: the pickled searcher, then its saved state: the trials in flight are
    told under their own numbers and are not mistaken for lost ones."""
    study = load_study(write_study(tmp_path, RATIO))
    first = FrontSafeOptunaSearch(study)
    in_flight = {tid: first.suggest(tid) for tid in ("a", "b")}
    first.save(str(tmp_path / "searcher.pkl"))
    resumed = pickle.loads(pickle.dumps(first))  # as Ray keeps it in the experiment folder
    resumed.restore(str(tmp_path / "searcher.pkl"))
    with live(study):  # the resumed driver's session
        new = resumed.suggest("c")
        resumed.on_trial_complete("a", finished([80.0, 2e6], done=True))
    assert new[TRIAL_NUMBER] not in {c[TRIAL_NUMBER] for c in in_flight.values()}
    records = optuna.load_study(study_name="lost", storage=study.storage_url).trials
    assert records[in_flight["a"][TRIAL_NUMBER]].values == [80.0, 2e6]
    assert [t.state for t in records] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING]


@pytest.mark.parametrize("ray_saved", [True, False], ids=["tuner-restored", "ray-saved-nothing"])
def test_a_trial_ray_never_recorded_runs_again_with_its_parameters(tmp_path, ray_saved):
    """Exactly once: Optuna asked (the trial is RUNNING in the storage) but the driver stopped
    before Ray recorded the trial. On resume the next suggestion is that trial, same number and
    parameters, and the study ends with ``n_trials`` trials, not one more."""
    study = load_study(write_study(tmp_path, RATIO))
    first = FrontSafeOptunaSearch(study)
    _run_to_end(first, "a")
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save of its experiment state
    lost = first.suggest("b")  # ... and the driver dies here: Ray never records trial "b"

    resumed = FrontSafeOptunaSearch(study)  # a new driver, same storage
    if ray_saved:
        resumed.restore(str(tmp_path / "searcher.pkl"))
    assert _run_to_end(resumed, "c") == lost
    for trial_id in ("d", "e"):  # n_trials - 2 more
        _run_to_end(resumed, trial_id)
    records = optuna.load_study(study_name="lost", storage=study.storage_url).trials
    assert [t.number for t in records] == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in records)
    rerun = records[lost[TRIAL_NUMBER]]
    assert rerun.user_attrs["ray_trial_id"] == "c"
    assert rerun.params["method_config.prune_ratio"] == lost["method_config.prune_ratio"]


def test_a_tuner_restored_from_an_older_save_gets_no_more_than_n_trials(tmp_path):
    """Ray saves its experiment state every few seconds: restored from a save older than the
    last trials, a Tuner asks for trials that started (they run again as lost ones) or even
    ended after it; once ``n_trials`` trials were handed out to Ray the searcher says FINISHED."""
    from ray.tune.search import Searcher

    study = load_study(write_study(tmp_path, RATIO))
    first = FrontSafeOptunaSearch(study)
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save: before any trial
    for trial_id in ("a", "b", "c"):  # three trials end after it ...
        _run_to_end(first, trial_id)
    running = first.suggest("d")  # ... and the fourth is running when the driver dies

    resumed = pickle.loads(pickle.dumps(first))
    resumed.restore(str(tmp_path / "searcher.pkl"))  # Ray asks for all 4 trials again
    with live(study):  # the resumed driver's session
        assert resumed.suggest("e") == running  # the one that never ended runs again ...
        assert [resumed.suggest(tid) for tid in ("f", "g", "h")] == [Searcher.FINISHED] * 3  # ... no new one
    records = optuna.load_study(study_name="lost", storage=study.storage_url).trials
    assert len(records) == 4 and records[running[TRIAL_NUMBER]].user_attrs["ray_trial_id"] == "e"


def test_optunas_trial_of_a_stored_running_trial_continues_its_sampling(tmp_path):
    """Pins the Optuna behaviour the searcher's lost trials rest on. ``optuna.Trial(study,
    trial_id)`` is public, but Optuna does not recommend building one directly, and no public
    call hands out a trial that another driver asked: an Optuna release that changes what it does
    fails here. A Trial of the storage's RUNNING trial, built on another Study object (a new
    driver, which has read the study's trials, as the searcher does when it looks for lost ones:
    Optuna's cached storage knows only the trials it read): its own number, the recorded value
    of a parameter sampled before (a different range is ignored, a different kind is a
    ValueError), new parameters sampled and stored, no trial created."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = optuna.create_study(study_name="s", storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
    first.ask()
    asked = first.ask()
    x = asked.suggest_float("x", 0.0, 1.0)
    storage = optuna.storages.RDBStorage(url)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), asked.number)
    resumed = optuna.load_study(study_name="s", storage=url, sampler=optuna.samplers.RandomSampler(seed=1))
    assert [t.number for t in resumed.get_trials(deepcopy=False, states=(TrialState.RUNNING,))] == [0, 1]
    trial = optuna.Trial(resumed, trial_id)
    assert trial.number == asked.number == 1
    assert trial.suggest_float("x", 0.0, 1.0) == x
    with pytest.warns(RuntimeWarning):  # another range: the recorded value all the same
        assert trial.suggest_float("x", 2.0, 3.0) == x
    with pytest.raises(ValueError):
        optuna.Trial(resumed, trial_id).suggest_int("x", 0, 10)
    y = trial.suggest_int("y", 0, 10)
    record = resumed.trials[asked.number]
    assert record.state == TrialState.RUNNING and record.params == {"x": x, "y": y}
    assert len(resumed.trials) == 2
    resumed.tell(asked.number, 1.0)
    assert optuna.load_study(study_name="s", storage=url).trials[asked.number].values == [1.0]


def _no_trial(config: dict) -> None:
    """A trainable that is never run (an Experiment needs one)."""


def test_what_ray_pickles_holds_no_study_folder_and_reads_the_folder_it_moved_to(tmp_path):
    """The search algorithm (with the searcher), stopper, scheduler and progress callback,
    pickled as Ray pickles them into its experiment state, hold no path of the study folder;
    restored beside the session of the study loaded from the folder it moved to, they read and
    write there only, and the search algorithm's saved experiment is re-created there."""
    study = load_study(write_study(tmp_path, RATIO + "training: {prune: {epochs: 2}, finetune: {epochs: 2}}\n"
                                   "scheduler: {name: successive-halving, rungs: [2], eta: 2}\n"))
    study.layout.root.mkdir(parents=True)
    searcher = FrontSafeOptunaSearch(study)
    in_flight = searcher.suggest("a")
    stopper = DominatedTrialStopper(study.early_stopping, budget_of=StudyBudget(study))
    scheduler = SuccessiveHalvingScheduler(study)
    generator = StudySearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2), study)
    curve = {"epoch": 1.0, "stage": 0.0, "top1": 80.0, "macs": 1000.0, FINISHED: False}
    TrialPartWriter(study.layout.epoch_parts, in_flight[TRIAL_NUMBER]).write([curve], 1)
    pickled = cloudpickle.dumps((generator, stopper, scheduler, StudyProgress(study.name, stopper, scheduler)))
    assert str(tmp_path).encode() not in pickled and tmp_path.name.encode() not in pickled
    # Ray's own state of the search algorithm: its experiment, in the folder of the time
    generator.add_configurations(Experiment(study.layout.ray_experiment.name, _no_trial,
                                            storage_path=str(study.layout.ray_storage)))
    generator_state = cloudpickle.dumps(generator.get_state())

    old_root, new_parent = study.layout.root, tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.move(old_root, new_parent / old_root.name)
    moved = with_overrides(study, output_dir=new_parent)
    with live(moved):
        generator, stopper, scheduler, callback = cloudpickle.loads(pickled)
        generator.set_state(cloudpickle.loads(generator_state))
        assert generator.get_state()["experiment"].path == str(moved.layout.ray_experiment)
        searcher = generator.searcher.searcher
        searcher.on_trial_complete("a", finished([80.0, 2e6], done=True))
        assert stopper.budget_of({"method_config.prune_ratio": 0.75}) == pytest.approx(0.25)
        assert scheduler.rule.records == {2: {in_flight[TRIAL_NUMBER]: (80.0, 1000.0)}}
        trial = Trial("trainable", config={TRIAL_NUMBER: in_flight[TRIAL_NUMBER]}, trial_id="a", stub=True)
        callback.on_trial_start(0, [trial], trial)
    assert not old_root.exists()
    assert read_trials(moved.layout)["state"].tolist() == ["COMPLETE"]
    records = optuna.load_study(study_name="lost", storage=moved.storage_url).trials
    assert [(t.number, t.values) for t in records] == [(in_flight[TRIAL_NUMBER], [80.0, 2e6])]


def test_a_trial_lost_while_sampled_is_sampled_to_the_end_and_run(tmp_path):
    """A trial asked but not fully sampled (the driver stopped in between) keeps what was
    sampled, gets the rest, and runs under its own number: no new trial replaces it."""
    study = load_study(write_study(tmp_path, SEARCHED))
    optuna_study = open_optuna_study(study)
    optuna_study.ask()  # the reference trial, still held by ... nobody: lost as well
    half = optuna_study.ask()
    ratio = half.suggest_float("method_config.prune_ratio", 0.3, 0.8)  # the other knobs never sampled
    searcher = FrontSafeOptunaSearch(study)
    reference, completed = searcher.suggest("a"), searcher.suggest("b")
    assert reference[TRIAL_NUMBER] == 0 and reference["method_config.prune_ratio"] == 0.5
    assert completed[TRIAL_NUMBER] == half.number and completed["method_config.prune_ratio"] == ratio
    assert {"method_config.prune_start_epoch", "method_config.prune_sparse_epoch"} <= set(completed)
    record = optuna_study.trials[half.number]
    assert record.state == TrialState.RUNNING and record.params == {
        k: v for k, v in completed.items() if k != TRIAL_NUMBER}
    assert len(optuna_study.trials) == 2


def test_dominated_trial_stopper():
    stopper = DominatedTrialStopper(EarlyStopping(enabled=True, grace_epochs=1, margin=2.0))
    prune = {"stage": 0.0, "epoch": 1.0, "top1": 50.0, "macs": 1e6, FINISHED: False}
    for trial in ("good", "bad", "cheap"):
        assert not stopper(trial, dict(prune, macs=5e5 if trial == "cheap" else 1e6))
    ft = {"stage": 1.0, FINISHED: False}  # fine-tune epochs carry no MACs: the prune stage's count
    assert not stopper("good", dict(ft, epoch=2.0, top1=90.0))
    assert not stopper("bad", dict(ft, epoch=2.0, top1=70.0))    # within the grace epoch
    assert not stopper("good", dict(ft, epoch=3.0, top1=92.0))
    assert not stopper("cheap", dict(ft, epoch=2.0, top1=60.0))
    assert not stopper("cheap", dict(ft, epoch=3.0, top1=61.0))  # fewer MACs: not dominated
    assert stopper("bad", dict(ft, epoch=3.0, top1=80.0))        # same MACs, 12 points worse
    assert stopper.reasons["bad"].startswith("stopped at fine-tune epoch 1: trial good had top-1 92.00%")
    assert not DominatedTrialStopper(EarlyStopping(enabled=False))("bad", dict(ft, epoch=3.0, top1=0.0))
    assert not stopper("late", dict(prune, epoch=1.0, top1=0.0))  # prune stage not asked for


def test_dominated_trial_stopper_in_the_prune_stage():
    """Prune-stage epochs compare the budget (from the trial's config) and the kept fraction now."""
    budgets = {0.5: 0.5, 0.75: 0.25}
    stopper = DominatedTrialStopper(EarlyStopping(enabled=True, stages=["prune"], grace_epochs=1, margin=2.0),
                                    budget_of=lambda params: budgets[params["method_config.prune_ratio"]])

    def result(ratio: float, epoch: int, top1: float, keep: float) -> dict:
        return {"stage": 0.0, "epoch": float(epoch), "top1": top1, "keep_ratio": keep, FINISHED: False,
                "config": {"method_config.prune_ratio": ratio, "trial_number": 7 if ratio == 0.75 else 8}}

    assert not stopper("lean", result(0.75, 0, 90.0, 0.6))
    assert not stopper("wide", result(0.5, 0, 70.0, 0.8))     # dominated, but within the grace epoch
    assert not stopper("late", result(0.75, 0, 95.0, 1.0))    # not pruning yet
    assert not stopper("lean", result(0.75, 1, 88.0, 0.4))
    assert not stopper("late", result(0.75, 1, 87.0, 0.9))    # within the margin of "lean"; better than
                                                              # "wide" by 7 points but keeps more now
    assert stopper.reasons == {}
    assert stopper("wide", result(0.5, 1, 80.0, 0.7))         # larger budget, keeps more now, 8 points worse
    assert stopper.reasons["wide"] == ("stopped at prune-stage epoch 1: trial 7 had top-1 88.00% with budget 0.25, "
                                       "kept 0.400 now there (this trial: 80.00%, budget 0.5, kept 0.700 now)")
    assert not stopper("lean", {"stage": 1.0, "epoch": 2.0, "top1": 0.0, FINISHED: False})  # fine-tune not asked for



def test_trial_budget_is_the_kept_fraction_its_configuration_asks_for(tmp_path):
    study = load_study(write_study(tmp_path, SEARCHED))
    assert trial_budget(study, {"method_config.prune_ratio": 0.6}) == pytest.approx(0.4)
    fixed = load_study(write_study(tmp_path, "name: fixed\nmethod: {name: p3b, config: {prune_ratio: 0.75}}\n"))
    assert trial_budget(fixed, {}) == pytest.approx(0.25)
    assert trial_budget(fixed, {"method": "dense"}) == 1.0


# ----------------------------------------------------------------------------- end to end

E2E = """name: e2e
method: {name: p3b, config: {prune_ratio: 0.5}}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 2, lr: 0.01}, batch_size: 64}
search_space:
  method_config.alpha: {type: categorical, choices: [0.5, 0.0]}
  training.seed: {type: int, low: 0, high: 1000}
objectives:
  - {name: top1}
  - {name: macs, reference: 3000}
sampler: {name: random, seed: 2}   # alpha: 0.5 (reference), 0.5, 0.5, 0.0
n_trials: 4
concurrency: 1
max_failures: 1
early_stopping: {enabled: true, grace_epochs: 0, margin: 10.0}
"""


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    from mlflow import MlflowClient

    from p3b_search.launch import run_study

    study = load_study(write_study(tmp_path, E2E))
    layout = study.layout
    layout.root.mkdir(parents=True)
    (layout.root / "fail-once-2").touch()  # trial 2 raises once after epoch 1: a retry from its checkpoint
    lines: list[str] = []
    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lines.append)
    assert not outcome.interrupted

    # Optuna's records: every trial ended; the hopeless one (alpha = 0: no fine-tuning) was stopped
    records = optuna.load_study(study_name="e2e", storage=study.storage_url)
    assert records.metric_names == ["top1", "macs"]
    states = [t.state for t in records.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert records.trials[0].params["method_config.alpha"] == 0.5 and records.trials[0].user_attrs["reference"]
    assert records.trials[3].params["method_config.alpha"] == 0.0 and records.trials[3].values is None

    # the trials table agrees with Optuna
    trials = pd.read_parquet(layout.trials_table)
    assert trials["number"].tolist() == [0, 1, 2, 3]
    assert trials["state"].tolist() == ["COMPLETE"] * 3 + ["PRUNED"]
    for record, (_, row) in zip(records.trials[:3], trials.iterrows()):
        assert [row["top1"], row["macs"]] == pytest.approx(record.values)
        assert row["param.training.seed"] == record.params["training.seed"]
    assert trials.loc[3, "fail_reason"].startswith("stopped at fine-tune epoch 0: trial ")
    assert trials.loc[2, "retries"] == 1 and trials["retries"].sum() == 1
    assert trials["epochs_done"].tolist()[:3] == [4, 4, 4]
    assert trials["mlflow_run_id"].notna().all() and trials["ray_trial_id"].nunique() == 4

    # the retried trial resumed from its checkpoint: no epoch trained twice
    epochs = (layout.trial_dir(2) / "epochs.log").read_text().split()
    assert epochs == ["0", "1", "2", "3"]

    # the front: the project's own Pareto set of the COMPLETE trials, never the stopped one
    complete = trials[trials["state"] == "COMPLETE"]
    expected = pareto_mask(complete[["top1", "macs"]].to_numpy(), ["maximize", "minimize"])
    assert complete["pareto"].tolist() == expected.tolist()
    assert not trials.loc[3, "pareto"]
    assert set(outcome.front["number"]) == set(complete.loc[expected, "number"])
    assert outcome.reference == [0.0, 3000.0]
    best = complete.loc[expected]
    assert outcome.hypervolume == pytest.approx(best["top1"].max() * (3000 - best["macs"].min()))

    # allocation rows: one per update per trial, the retried trial's rows not duplicated
    allocations = pd.read_parquet(layout.allocations_table)
    per_trial = allocations.groupby("trial").size().to_dict()
    assert per_trial == {0: 3, 1: 3, 2: 3, 3: 3}  # 2 prune epochs + the finalize row
    assert not allocations.duplicated(["trial", "step"]).any()

    # MLflow: a child run per trial, the front tagged, the stopped trial's run ended as stopped
    client = MlflowClient(study.tracking_uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    children = [r for r in runs.values() if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    tagged = {r.info.run_id for r in children if r.data.tags.get("pareto") == "true"}
    assert tagged == set(trials.loc[trials["pareto"], "mlflow_run_id"])
    stopped = runs[trials.loc[3, "mlflow_run_id"]]
    assert stopped.data.tags["state"] == "stopped" and stopped.info.status == "KILLED"
    assert lines[-1].startswith("[") and "3/4 done" in lines[-1] and "1 stopped" in lines[-1]


NEVER_RAN_STUDY = """name: unrun
method: {name: p3b, config: {prune_finalize_epoch: 2, prune_ratio: 0.5}}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 1, lr: 0.01}, batch_size: 64}
search_space:
  method_config.prune_start_epoch: {type: int, low: 0, high: 1}
  method_config.prune_sparse_epoch: {type: int, low: 0, high: 1}
objectives: [top1, {name: macs, reference: 3000}]
sampler: {name: random, seed: 4}   # samples 2 and 3 draw a start epoch after the sparse one
n_trials: 3
concurrency: 1
tracking: {enabled: false}
"""


def test_samples_that_never_ran_are_no_failures_and_every_reader_agrees_the_study_finished(tmp_path, capsys):
    """Invalid samples (a start epoch after the sparse one) are told FAIL before Ray runs them: the
    trials table shows them as NEVER_RAN with their reason, the runner, ``study_finished``,
    ``study_summary`` and ``search.py status`` all count the 3 trials that ran, and none fails."""
    import search
    from p3b_search.launch import run_study
    from p3b_search.study.summary import study_finished, study_summary

    study = load_study(write_study(tmp_path, NEVER_RAN_STUDY))
    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lambda line: None)
    trials = read_trials(study.layout)
    never_ran = trials[trials["state"] == "NEVER_RAN"]
    assert never_ran["number"].tolist() == [2, 3]
    assert never_ran["fail_reason"].str.startswith("invalid sample: method_config: prune_sparse_epoch=").all()
    assert never_ran["ray_trial_id"].isna().all() and (never_ran["epochs_done"] == 0).all()
    assert not never_ran["pareto"].any()
    ran = trials[trials["state"] != "NEVER_RAN"]
    assert ran["state"].tolist() == ["COMPLETE"] * 3 and ran["ray_trial_id"].notna().all()
    # every reader: the runner, the folder's summary and finished flag, the history, status
    assert not outcome.interrupted and not study_summary(study).interrupted and study_finished(study)
    assert study_summary(study).pareto.history["number"].tolist() == sorted(ran["number"].tolist(), key=lambda n: (
        trials.set_index("number").loc[n, "end"], n))
    assert search.main(["status", str(study.layout.root)]) == 0
    out = capsys.readouterr().out
    assert f"3 trials planned, 3 ended (finished); 3 complete, 0 running, 0 pruned, 0 failed, " \
           f"{len(never_ran)} never ran" in out


RESUMABLE = """name: resumable
method: {name: p3b}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 2, lr: 0.01}, batch_size: 64}
search_space:
  method_config.prune_ratio: {type: float, low: 0.2, high: 0.9}
objectives: [top1, {name: macs, reference: 3000}]
n_trials: 4
concurrency: 2
tracking: {enabled: false}
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), *args, "--objective", OBJECTIVE, "--cpus", "2"]


def _wait_for(layout: StudyLayout, condition, timeout_s: float) -> pd.DataFrame:
    """The trials table once ``condition`` holds, read as ``status`` reads it while the study
    runs (``trials.parquet`` itself is rewritten only every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = read_trials(layout)
        if len(frame) and condition(frame):
            return frame
        time.sleep(0.3)
    raise AssertionError("the study did not reach the expected state in time")


@pytest.mark.slow
def test_interrupted_study_resumes_without_losing_or_repeating_trials(tmp_path):
    study = load_study(write_study(tmp_path, RESUMABLE))
    layout = study.layout
    layout.root.mkdir(parents=True)
    (layout.root / "epoch-seconds").write_text("1.0")  # slow enough to interrupt trials mid-way
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(_cli("run", str(tmp_path / "study.yaml")), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(layout, lambda f: ((f["state"] == "RUNNING") & (f["epochs_saved"] >= 1)).any(), 400)
        first.send_signal(signal.SIGINT)  # Ctrl-C: Ray Tune stops gracefully and saves its state
        output, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 130, output
    assert f"continue with: python search.py resume {layout.root}" in output
    before = pd.read_parquet(layout.trials_table)
    interrupted = before.loc[before["state"] == "RUNNING", ["number", "epochs_saved"]]
    assert len(interrupted) and (interrupted["epochs_saved"] >= 1).any() and len(before) < 4

    second = subprocess.run(_cli("resume", str(layout.root)), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "finished after" in second.stdout

    records = optuna.load_study(study_name="resumable", storage=study.storage_url).trials
    assert [t.number for t in records] == list(range(4))  # none lost, none duplicated
    assert all(t.state == TrialState.COMPLETE for t in records)
    assert len({t.user_attrs["ray_trial_id"] for t in records}) == 4
    after = pd.read_parquet(layout.trials_table)
    assert after["state"].tolist() == ["COMPLETE"] * 4 and after["number"].tolist() == list(range(4))
    for number, saved in interrupted.itertuples(index=False):
        epochs = [int(e) for e in (layout.trial_dir(number) / "epochs.log").read_text().split()]
        assert set(epochs) == set(range(4)) and epochs[-1] == 3
        if saved >= 1:  # a checkpoint was saved: continued from it, not from scratch
            assert epochs.count(0) == 1, epochs
        ratio = "param.method_config.prune_ratio"
        assert after.loc[after["number"] == number, ratio].item() == before.loc[before["number"] == number, ratio].item()


@pytest.mark.slow
def test_resume_runs_a_trial_asked_before_ray_saved_anything(tmp_path):
    """The driver died after asking Optuna and before Ray saved any state: ``resume`` starts a
    new Tuner whose first trial is the asked one (same number, same parameters), and the
    study still ends with ``n_trials`` trials."""
    from p3b_search.search.runner import run_study

    study = load_study(write_study(tmp_path, RESUMABLE.replace("n_trials: 4", "n_trials: 2")
                                   .replace("concurrency: 2", "concurrency: 1")))
    lost = FrontSafeOptunaSearch(study).suggest("never-recorded")
    outcome = run_study(study, resume=True, objective=OBJECTIVE, num_cpus=2, printer=lambda line: None)
    assert not outcome.interrupted
    records = optuna.load_study(study_name="resumable", storage=study.storage_url).trials
    assert [t.number for t in records] == [0, 1] and all(t.state == TrialState.COMPLETE for t in records)
    rerun = records[lost[TRIAL_NUMBER]]
    assert rerun.params["method_config.prune_ratio"] == lost["method_config.prune_ratio"]
    assert rerun.user_attrs["ray_trial_id"] != "never-recorded"


def test_trial_reporter_forwards_epochs_and_writes_allocation_and_curve_parts_once(tmp_path):
    from p3b_search.reporting import TrialReporter
    from p3b_search.search.trainable import TuneTrialReporter
    from p3b_search.study.results import TrialPartWriter, read_allocations, read_epochs

    layout = StudyLayout(tmp_path)
    sent: list[tuple[dict, object]] = []
    downstream = TrialReporter()

    def attempt(epochs: range, objectives: dict | None = None) -> None:
        reporter = TuneTrialReporter(lambda result, folder: sent.append((result, folder)), ["top1", "macs"],
                                     TrialPartWriter(layout.allocation_parts, 7), downstream,
                                     epoch_writer=TrialPartWriter(layout.epoch_parts, 7))
        for epoch in epochs:
            reporter.report_allocations([{"step": epoch, "layer": 0, "kind": "attn", "keep_ratio": 0.9}])
            reporter.report_epoch({"epoch": float(epoch), "top1": 50.0 + epoch, "macs": 1e6}, tmp_path / "ckpt")
        if objectives is not None:
            reporter.report_allocations([{"step": 99, "layer": 0, "kind": "attn", "keep_ratio": 0.5}])
            reporter.finish(objectives)

    attempt(range(3))               # fails after epoch 2 ...
    attempt(range(2, 4), {"top1": 61.0, "macs": 5e5, "top5": 90.0})  # ... restarts from epoch 1's checkpoint
    results = [result for result, _ in sent]
    assert [r[FINISHED] for r in results] == [False] * 5 + [True]
    assert all(math.isnan(r[objective_key("top1")]) for r in results[:5])
    assert results[-1][objective_key("top1")] == 61.0 and results[-1][objective_key("macs")] == 5e5
    assert sent[0][1] == tmp_path / "ckpt" and sent[-1][1] is None
    table = read_allocations(layout)
    assert table["step"].tolist() == [0, 1, 2, 3, 99]  # epoch 2 redone once, not twice
    curve = read_epochs(layout)
    assert curve["epoch"].tolist() == [0, 1, 2, 3] and curve["trial"].tolist() == [7] * 4
    assert curve["top1"].tolist() == [50.0, 51.0, 52.0, 53.0]
    assert len(downstream.epochs) == 5 and downstream.allocations[-1]["step"] == 99


def test_a_trial_keeps_the_newest_checkpoint_the_driver_accepted(tmp_path):
    """Each epoch's checkpoint folder is saved once its report returned; a copy cut short is
    never taken for one; a retry starts from the newest and saves on from there."""
    from p3b_search.search.saved_checkpoints import SavedCheckpoints

    saved = SavedCheckpoints(tmp_path / "saved")
    assert saved.latest() is None
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for epoch in range(3):
        (checkpoint / "state.pt").write_text(f"epoch {epoch}")
        saved.save(checkpoint, epoch)
    epoch, folder = saved.latest()
    assert epoch == 2 and (folder / "state.pt").read_text() == "epoch 2"
    assert [p.name for p in (tmp_path / "saved").iterdir()] == ["epoch-00002"]  # one copy per trial
    (tmp_path / "saved" / ".partial-00003").mkdir()  # a worker killed while copying epoch 3
    assert saved.latest()[0] == 2
    (checkpoint / "state.pt").write_text("epoch 3, retried")
    saved.save(checkpoint, 3)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["epoch-00003"]
