"""Multi-objective successive halving as a Ray Tune scheduler (asynchronous, as MO-ASHA).

At each rung of the study's ``scheduler`` section (an epoch count over both stages) a trial's
objectives at that epoch (:func:`~p3b_search.study.rungs.epoch_values` of its result) are
ranked against those of every trial that reached the rung before it, and the trial continues
only when it is in the top ``1 / eta``: the decision is
:class:`~p3b_search.study.rungs.SuccessiveHalvingRule`'s, the one the replay simulator of the
tabular benchmark takes. A stopped trial's last result carries ``trial_finished = False``, so
the searcher records it as PRUNED (:class:`~p3b_search.search.searcher.FrontSafeOptunaSearch`),
never as a point of the front; ``reasons`` says where and why, for the trials table.

Resume: Ray keeps the scheduler in its experiment state and ``Tuner.restore`` brings back that
copy, so the rungs' records are never taken from it: the first time the scheduler acts in a
driver process it rebuilds them from the learning curves in the study folder (``epochs/``,
written by each trial before Ray hears of the epoch; the folder as it is now, see
:class:`~p3b_search.search.session.LiveStudy`), by Optuna trial number (the
``trial_number`` of the Ray config). A trial whose first result in this process comes right
after a rung resumed from the checkpoint of that rung's epoch (the driver that took, or was
about to take, its decision stopped): it is decided again at that rung, on its recorded
objectives, before the new result is.
"""
from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from p3b_search.search.live_fifo import LiveFIFOScheduler
from p3b_search.search.session import LiveStudy
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER
from p3b_search.study.results import read_epochs
from p3b_search.study.rungs import SuccessiveHalvingRule, epoch_values, rung_objectives
from p3b_search.study.sections import StudyConfig


class SuccessiveHalvingScheduler(LiveFIFOScheduler):
    """Stops a trial at a rung of ``study.scheduler`` unless it ranks in the top ``1 / eta`` there
    (see the module docstring). Trials run in the order they come (:class:`LiveFIFOScheduler`).

    ``reasons`` maps the Ray trial id of each stopped trial to a one-line explanation.
    """

    def __init__(self, study: StudyConfig):
        super().__init__()
        section = study.scheduler
        if section is None:
            raise ValueError(f"study {study.name!r} has no scheduler section")
        self.study = LiveStudy(study)  # pickled as the study's name: see search.session
        self.rungs = tuple(sorted(section.rungs))
        self.eta = section.eta
        self.objectives, self.directions = rung_objectives(study.metric_names, study.directions)
        self.reasons: dict[str, str] = {}
        self._rule: SuccessiveHalvingRule | None = None  # rebuilt in each driver process
        self._seen: set[int] = set()  # trial numbers that reported to this process

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the rungs' records (rebuilt from the study folder, see the module docstring)."""
        return {**super().__getstate__(), "_rule": None, "_seen": set()}

    @property
    def supports_buffered_results(self) -> bool:
        """No: each epoch's result must be decided before the trial trains the next one."""
        return False

    @property
    def rule(self) -> SuccessiveHalvingRule:
        """The rungs' records and decisions (rebuilt from the study's learning curves on first use)."""
        if self._rule is None:
            self._rule = SuccessiveHalvingRule(self.rungs, self.eta, self.directions)
            self._rule.record_curves(read_epochs(self.study.config.layout), self.objectives)
        return self._rule

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        number, epoch = (trial.config or {}).get(TRIAL_NUMBER), result.get("epoch")
        if result.get(FINISHED) or number is None or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            return TrialScheduler.CONTINUE
        number, epochs_done = int(number), int(epoch) + 1
        rule = self.rule
        resumed_at = epochs_done - 1
        if number not in self._seen and number in rule.records.get(resumed_at, {}):
            if not self._continues(trial, number, resumed_at, rule.records[resumed_at][number]):
                return TrialScheduler.STOP
        self._seen.add(number)
        if not self._continues(trial, number, epochs_done, epoch_values(result, self.objectives)):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _continues(self, trial: Trial, number: int, epochs_done: int, values: tuple[float, ...]) -> bool:
        """The rule's decision for trial ``number`` at ``epochs_done``; a stop's reason is kept."""
        if self.rule.decide(number, epochs_done, values):
            return True
        place, count = self.rule.standing(number, epochs_done)
        self.reasons[trial.trial_id] = f"stopped at rung {epochs_done} (rank {place} of {count}, eta {self.eta})"
        return False

    def debug_string(self) -> str:
        return f"Using multi-objective successive halving: rungs {list(self.rungs)}, eta {self.eta}."
