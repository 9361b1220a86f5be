"""RetryingStorage: each storage method exactly once across an unreachable database, on a real
Optuna RDBStorage (SQLite) behind an injector that drops the connection before a call is sent
or after it committed."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from p3b_search.search.optuna_storage import DUPLICATE_KEY, RetryingStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)

BEFORE, AFTER = "drop before commit", "commit then drop"
DROPPED = "server closed the connection unexpectedly"
TINY = {"first_wait_s": 0.001, "max_wait_s": 0.002, "patience_s": 5.0}


class Faults:
    """``storage``'s methods, but call n of method m first does ``plan[m](n)``: :data:`BEFORE`
    raises without calling, :data:`AFTER` calls and then raises (None: calls)."""

    def __init__(self, storage: Any, plan: dict[str, Callable[[int], str | None]]):
        self.storage, self.plan, self.calls = storage, plan, Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.storage, name)
        if name not in self.plan:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            fault = self.plan[name](self.calls[name])
            if fault == BEFORE:
                raise StorageInternalError(DROPPED)
            result = method(*args, **kwargs)
            if fault == AFTER:
                raise StorageInternalError(DROPPED)
            return result

        return call


def at(*calls: int, fault: str = AFTER) -> Callable[[int], str | None]:
    return lambda n: fault if n in calls else None


def rdb() -> RDBStorage:
    return RDBStorage("sqlite:///:memory:")


def study_on(inner: Any, **kwargs: Any) -> optuna.Study:
    return optuna.create_study(storage=RetryingStorage(inner, **TINY), study_name="s",
                               sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)


def summary(storage: Any) -> list[tuple]:
    """Number, state, values and params of every trial of study ``s``."""
    study_id = storage.get_study_id_from_name("s")
    return [(t.number, t.state, t.values, t.params) for t in storage.get_all_trials(study_id)]


@pytest.mark.parametrize("fault", [AFTER, BEFORE])
def test_create_new_trial_after_a_drop_creates_one_trial(fault):
    inner = rdb()
    study = study_on(Faults(inner, {"create_new_trial": at(1, fault=fault)}))
    first = study.ask()
    study.tell(first, first.suggest_float("x", 0, 1))
    second = study.ask()
    assert (first.number, second.number) == (0, 1)
    assert [(t.number, t.state) for t in inner.get_all_trials(inner.get_study_id_from_name("s"))] == [(0, TrialState.COMPLETE),
                                                                      (1, TrialState.RUNNING)]


def test_set_trial_state_values_committed_then_dropped_is_true_and_stores_once():
    inner = rdb()
    study = study_on(Faults(inner, {"set_trial_state_values": at(1)}))
    trial = study.ask()
    study.tell(trial, 2.0)
    assert summary(inner) == [(0, TrialState.COMPLETE, [2.0], {})]
    # a retry of a committed tell: True, not UpdateFinishedTrialError
    faulty = RetryingStorage(Faults(inner, {"set_trial_state_values": at(1)}), **TINY)
    trial_id = faulty.create_new_trial(inner.get_study_id_from_name("s"))
    assert faulty.set_trial_state_values(trial_id, TrialState.COMPLETE, [3.0]) is True
    assert faulty.get_trial(trial_id).values == [3.0]


def test_popping_an_enqueued_trial_committed_then_dropped_asks_it_once():
    inner = rdb()
    study = study_on(Faults(inner, {"set_trial_state_values": at(1)}))  # the pop: WAITING -> RUNNING
    study.enqueue_trial({"x": 0.25})
    trial = study.ask()
    assert trial.number == 0 and trial.suggest_float("x", 0, 1) == 0.25
    study.tell(trial, 1.0)
    assert summary(inner) == [(0, TrialState.COMPLETE, [1.0], {"x": 0.25})]


def test_create_and_delete_study_committed_then_dropped_take_effect_once():
    inner = rdb()
    storage = RetryingStorage(Faults(inner, {"create_new_study": at(1, 2), "delete_study": at(1)}), **TINY)
    direction = [optuna.study.StudyDirection.MINIMIZE]
    named = storage.create_new_study(direction, "named")
    unnamed = storage.create_new_study(direction)
    assert [s.study_name for s in inner.get_all_studies()] == ["named", inner.get_study_name_from_id(unnamed)]
    assert inner.get_study_id_from_name("named") == named
    storage.delete_study(named)
    assert len(inner.get_all_studies()) == 1
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):  # not created by this call
        storage.create_new_study(direction, inner.get_study_name_from_id(unnamed))


def test_a_trial_created_twice_by_the_storages_own_retry_is_failed():
    class CreatesTwice(RDBStorage):
        """RDBStorage whose first attempt committed, unseen, before its own retry succeeded."""

        def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
            super().create_new_trial(study_id, template_trial)
            return super().create_new_trial(study_id, template_trial)

    inner = CreatesTwice("sqlite:///:memory:")
    study = study_on(inner)
    trial = study.ask()
    study.tell(trial, 1.0)
    assert [(t.number, t.state) for t in inner.get_all_trials(inner.get_study_id_from_name("s"))] == [(0, TrialState.COMPLETE), (1, TrialState.FAIL)]
    assert inner.get_trial(2).system_attrs[DUPLICATE_KEY] == 0


@pytest.mark.parametrize("error", [ValueError("connection"), StorageInternalError("value too long for column")])
def test_an_error_other_than_an_unreachable_database_is_raised_at_once(error):
    calls = Counter()

    class Failing:
        def get_trial(self, trial_id: int) -> None:
            calls["get_trial"] += 1
            raise error

    with pytest.raises(type(error)):
        RetryingStorage(Failing(), **TINY).get_trial(0)
    assert calls["get_trial"] == 1


def test_the_error_is_raised_once_the_patience_is_spent():
    inner = Faults(rdb(), {"get_all_studies": lambda n: BEFORE})
    with pytest.raises(StorageInternalError, match=DROPPED):
        RetryingStorage(inner, first_wait_s=0.001, max_wait_s=0.004, patience_s=0.05).get_all_studies()
    assert 5 < inner.calls["get_all_studies"] < 50


def run(program: list[tuple[bool, str]], inner: Any) -> None:
    """Per step: maybe enqueue x = 0.25, ask, sample x, tell ``outcome``."""
    study = study_on(inner)
    for enqueue, outcome in program:
        if enqueue:
            study.enqueue_trial({"x": 0.25})
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        if outcome == "complete":
            study.tell(trial, x)
        else:
            study.tell(trial, state=TrialState.FAIL if outcome == "fail" else TrialState.PRUNED)


FAULTY = ["create_new_study", "create_new_trial", "set_trial_state_values", "set_trial_param", "get_all_trials",
          "set_trial_system_attr"]


@settings(max_examples=30, deadline=None)
@given(program=st.lists(st.tuples(st.booleans(), st.sampled_from(["complete", "fail", "pruned"])), min_size=1,
                        max_size=5),
       plan=st.dictionaries(st.sampled_from(FAULTY),
                            st.dictionaries(st.integers(1, 8), st.sampled_from([BEFORE, AFTER]), max_size=3)))
@pytest.mark.slow
def test_any_drops_leave_the_trials_of_a_fault_free_run(program, plan):
    clean, faulty = rdb(), rdb()
    run(program, clean)
    run(program, Faults(faulty, {name: calls.get for name, calls in plan.items()}))
    assert summary(faulty) == summary(clean)
