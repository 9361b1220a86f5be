"""Every kind of Optuna storage a study may get (``open_storage``: SQLite as Optuna opens it; a
server database behind the retries and the trial cache) through the same contract, as Optuna's
own tests run every storage through one suite. ``storages()`` opens a new storage object on the
same database each call: two objects stand for two processes (the driver and a ``status``
reader, or two drivers). PostgreSQL runs the same tests in
``tests/cluster/test_storage_contract_postgres.py``."""
from __future__ import annotations

from typing import Callable

import optuna
import pytest
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from p3b_search.search.optuna_storage import RetryingStorage, open_storage
from p3b_search.search.trial_cache import CachedStorage

Storages = Callable[[], BaseStorage]
DIRECTIONS = ["maximize", "minimize"]


@pytest.fixture(params=["sqlite", "sqlite behind retries and the trial cache"])
def storages(request, tmp_path) -> Storages:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    if request.param == "sqlite":
        return lambda: open_storage(url)
    return lambda: CachedStorage(RetryingStorage(RDBStorage(url)))


def _trial(study: optuna.Study, x: float, state: TrialState) -> optuna.trial.FrozenTrial:
    """One trial of ``study``: parameters of each kind, user attributes, ended in ``state``."""
    trial = study.ask()
    trial.suggest_float("ratio", 0.0, 1.0)
    trial.suggest_int("update", 8, 32, step=8)
    trial.suggest_categorical("method", ["p3b", "dense"])
    trial.set_user_attr("epochs_done", 2)
    trial.set_user_attr("curve", [x, 2 * x])
    if state == TrialState.COMPLETE:
        study.tell(trial, [x, 1e9 * x])
    elif state != TrialState.RUNNING:
        study.tell(trial, state=state)
    return study.trials[trial.number]


def _same(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    keys = ("number", "state", "values", "params", "distributions", "user_attrs")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def test_a_study_reads_back_as_written_from_another_storage_object(storages: Storages):
    study = optuna.create_study(storage=storages(), study_name="s", directions=DIRECTIONS,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("source", "study.yaml")
    written = [_trial(study, 0.1 * (i + 1), state) for i, state in
               enumerate([TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING])]
    other = optuna.load_study(study_name="s", storage=storages())
    assert other.directions == study.directions and other.user_attrs == {"source": "study.yaml"}
    read = other.get_trials(deepcopy=False)
    assert len(read) == len(written) and all(_same(a, b) for a, b in zip(read, written))
    complete = other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.number for t in complete] == [0, 2]
    assert [s.study_name for s in optuna.get_all_study_summaries(storages())] == ["s"]


def test_what_one_storage_object_writes_the_other_reads_next(storages: Storages):
    driver = optuna.create_study(storage=storages(), study_name="s", directions=DIRECTIONS)
    reader = optuna.load_study(study_name="s", storage=storages())
    running = _trial(driver, 0.5, TrialState.RUNNING)
    assert [t.state for t in reader.get_trials()] == [TrialState.RUNNING]  # read while running
    driver.tell(running.number, [0.5, 5e8])
    assert [t.state for t in reader.get_trials()] == [TrialState.COMPLETE]
    assert reader.get_trials()[0].values == [0.5, 5e8]
    _trial(reader, 0.7, TrialState.COMPLETE)  # the other way round, a new trial
    assert [(t.number, t.state) for t in driver.get_trials()] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]


def test_a_finished_trial_refuses_writes(storages: Storages):
    study = optuna.create_study(storage=storages(), study_name="s", directions=DIRECTIONS)
    done = _trial(study, 0.3, TrialState.COMPLETE)
    with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):
        study.tell(done.number, [0.9, 1.0])
    storage = storages()  # nor a user attribute, through the storage itself
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), done.number)
    with pytest.raises(RuntimeError):
        storage.set_trial_user_attr(trial_id, "late", 1)
    assert optuna.load_study(study_name="s", storage=storages()).trials[0].values == [0.3, 3e8]


def test_a_second_study_of_the_same_name_is_refused_and_a_deleted_one_is_gone(storages: Storages):
    optuna.create_study(storage=storages(), study_name="s", directions=DIRECTIONS)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(storage=storages(), study_name="s", directions=DIRECTIONS)
    optuna.delete_study(study_name="s", storage=storages())
    with pytest.raises(KeyError):
        optuna.load_study(study_name="s", storage=storages())
