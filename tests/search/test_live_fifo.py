"""LiveFIFOScheduler chooses as Ray's FIFOScheduler does, from the trials that have not ended."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from p3b_search.search.live_fifo import LiveFIFOScheduler

ENDED = (Trial.TERMINATED, Trial.ERROR)


@dataclass(eq=False)
class FakeTrial:
    """What a scheduler reads of a Ray trial: its id and status."""

    trial_id: str
    status: str = Trial.PENDING

    def is_finished(self) -> bool:
        return self.status in ENDED


#: (operation, trial index, new status): "add" a PENDING trial, "set" a trial's status without a
#: callback (Ray starts, pauses, retries or finishes it), "complete" / "error" / "remove" it with
#: the callback. An ended trial stays ended in a run (a restored run adds its trials again).
operations = st.lists(st.tuples(st.sampled_from(["add", "add", "set", "complete", "error", "remove"]),
                                st.integers(0, 30),
                                st.sampled_from([Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED])),
                      max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_it_chooses_as_fifo_after_any_sequence_of_events(ops):
    trials: list[FakeTrial] = []
    controller = SimpleNamespace(get_trials=lambda: trials)
    live, fifo = LiveFIFOScheduler(), FIFOScheduler()
    for op, index, status in ops:
        if op == "add" or not trials:
            trials.append(FakeTrial(f"t{len(trials)}"))
            live.on_trial_add(controller, trials[-1])
        else:
            trial = trials[index % len(trials)]
            if trial.is_finished():
                continue
            if op == "set":
                trial.status = status
            elif op == "complete":
                trial.status = Trial.TERMINATED
                live.on_trial_complete(controller, trial, {})
            elif op == "error":
                trial.status = Trial.ERROR
                live.on_trial_error(controller, trial)
            else:  # Ray removes a trial it will not run (it is never chosen again)
                trial.status = Trial.TERMINATED
                live.on_trial_remove(controller, trial)
        assert live.choose_trial_to_run(controller) is fifo.choose_trial_to_run(controller)
    assert len(live._live) <= sum(not t.is_finished() for t in trials)


def test_it_forgets_ended_trials_and_pickles_without_them():
    trials = [FakeTrial(f"t{i}", status) for i, status in
              enumerate([Trial.TERMINATED, Trial.RUNNING, Trial.PAUSED, Trial.PENDING])]
    controller = SimpleNamespace(get_trials=lambda: trials)
    live = LiveFIFOScheduler()
    for trial in trials:
        live.on_trial_add(controller, trial)
    assert live.choose_trial_to_run(controller) is trials[3]  # PENDING before PAUSED
    trials[3].status = Trial.RUNNING
    assert live.choose_trial_to_run(controller) is trials[2]
    restored = pickle.loads(pickle.dumps(live))  # as Ray keeps it in its experiment state
    assert restored.choose_trial_to_run(controller) is None  # a restored run adds its trials again
    for trial in trials:
        restored.on_trial_add(controller, trial)
    assert restored.choose_trial_to_run(controller) is trials[2]
    trials[1].status = Trial.TERMINATED
    restored.choose_trial_to_run(controller)
    assert set(restored._live) == {"t2", "t3"}
