"""First-in first-out trial scheduling whose cost does not grow with the study.

Ray Tune's :class:`~ray.tune.schedulers.FIFOScheduler` picks the next trial to start by
scanning every trial of the experiment for a PENDING one, then again for a PAUSED one, on every
step of Ray's event loop: in a long study of short trials that scan over thousands of ended
trials became the driver's largest growing cost (benchmarks/RESULTS.md section 11).
:class:`LiveFIFOScheduler` takes the same decision, in the same order, from the trials that
have not ended: it hears of each trial from Ray's ``on_trial_add`` and forgets it when Ray
reports it complete, errored or removed (or finds it finished), so a step costs O(trials not
ended), at most the concurrency plus the trials waiting to start.
"""
from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler


class LiveFIFOScheduler(FIFOScheduler):
    """:class:`~ray.tune.schedulers.FIFOScheduler`'s choice (the first PENDING trial in the order
    trials were added, else the first PAUSED one) among the trials not ended."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[str, Trial] = {}  # trial id -> trial, in the order Ray added them

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (in Ray's experiment state) without the trials: a restored run adds them again."""
        return {**self.__dict__, "_live": {}}

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not trial.is_finished():
            self._live[trial.trial_id] = trial

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._live.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._live.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._live.pop(trial.trial_id, None)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        for trial in [t for t in self._live.values() if t.is_finished()]:
            del self._live[trial.trial_id]
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in self._live.values():
                if trial.status == status:
                    return trial
        return None
