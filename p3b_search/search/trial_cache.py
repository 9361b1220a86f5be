"""Reads of an Optuna storage served from memory where Optuna's own RDB cache serves them.

Optuna puts a cache in front of a storage only when the storage *is* an ``RDBStorage``; the
storage of a server database here is a :class:`~p3b_search.search.optuna_storage.RetryingStorage`
around one, so without :class:`CachedStorage` every read of a study went to the database (the
whole study's trials at each ``get_all_trials``). It keeps Optuna's semantics, through the
public ``BaseStorage`` interface of the storage behind it:

- a finished trial never changes (the storage refuses writes to it): it is read once and then
  served from memory, as are a study's name and directions and a trial's id by number;
- unfinished trials (RUNNING, WAITING) are read from the storage at every read, so another
  process's writes to them are seen; so are study attrs, study ids by name and the study list;
- every write goes to the storage, and nothing is cached from a write.

``get_all_trials`` reads the study's unfinished trials (one storage call, their rows only) and
adds the finished trials it holds; a trial it has not read finished (one unfinished at the
last read, or numbered after the last one seen: a study's numbers run 0, 1, ... without gaps)
is read on its own, once, and the numbers after the last one seen are tried until one is not
there. Asked for unfinished states only, it reads those through.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

UNFINISHED = tuple(state for state in TrialState if not state.is_finished())
FINISHED = tuple(state for state in TrialState if state.is_finished())


@dataclass
class _StudyCache:
    """What is known of one study: its finished trials by number, name and directions."""

    finished: dict[int, FrozenTrial] = field(default_factory=dict)
    next_number: int = 0  # every trial numbered below it has been read at least once
    name: str | None = None
    directions: list[StudyDirection] | None = None


class CachedStorage(BaseStorage):
    """``inner`` with its finished trials, study names and directions and trial ids cached
    (module docstring); safe to share between threads."""

    def __init__(self, inner: BaseStorage):
        self.inner = inner
        self._studies: dict[int, _StudyCache] = {}
        self._trial_ids: dict[tuple[int, int], int] = {}  # (study id, trial number) -> trial id
        self._places: dict[int, tuple[int, int]] = {}  # trial id -> (study id, trial number)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the lock and what was read (a copy reads again)."""
        return {"inner": self.inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"])

    def _study(self, study_id: int) -> _StudyCache:
        """The cache of ``study_id`` (call with the lock held)."""
        return self._studies.setdefault(study_id, _StudyCache())

    # ------------------------------------------------------------------ studies

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            self._studies.pop(study_id, None)
            for trial_id, place in list(self._places.items()):
                if place[0] == study_id:
                    del self._places[trial_id], self._trial_ids[place]
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        with self._lock:
            name = self._study(study_id).name
        if name is None:
            name = self.inner.get_study_name_from_id(study_id)
            with self._lock:
                self._study(study_id).name = name
        return name

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        with self._lock:
            directions = self._study(study_id).directions
        if directions is None:
            directions = self.inner.get_study_directions(study_id)
            with self._lock:
                self._study(study_id).directions = directions
        return list(directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[Any]:
        """Optuna's FrozenStudy records (a class Optuna does not export)."""
        return self.inner.get_all_studies()

    # ------------------------------------------------------------------ trial writes

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.inner.create_new_trial(study_id, template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self.inner.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.inner.set_trial_system_attr(trial_id, key, value)

    # ------------------------------------------------------------------ trial reads

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            trial_id = self._trial_ids.get((study_id, trial_number))
        if trial_id is None:
            trial_id = self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)
            with self._lock:
                self._trial_ids[study_id, trial_number] = trial_id
                self._places[trial_id] = (study_id, trial_number)
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """A copy of the cached trial once finished; else read from the storage (and kept when
        finished and its study is known: read by number or among the study's trials)."""
        with self._lock:
            place = self._places.get(trial_id)
            trial = None if place is None else self._study(place[0]).finished.get(place[1])
        if trial is not None:
            return copy.deepcopy(trial)
        trial = self.inner.get_trial(trial_id)
        if place is not None:
            self._keep(place[0], trial)
        return trial

    def _keep(self, study_id: int, trial: FrozenTrial) -> None:
        """Cache ``trial`` of ``study_id`` when finished (a copy: callers own what they get)."""
        if trial.state.is_finished():
            with self._lock:
                self._study(study_id).finished[trial.number] = copy.deepcopy(trial)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if states is not None and not any(state in states for state in FINISHED):
            return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = [trial for trial in self._read(study_id) if states is None or trial.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def _read(self, study_id: int) -> list[FrozenTrial]:
        """Every trial of ``study_id`` by number: the unfinished ones and those not known to be
        finished read from the storage, the others from the cache."""
        by_number = {trial.number: trial for trial in self.inner.get_all_trials(study_id, deepcopy=False,
                                                                                  states=UNFINISHED)}
        with self._lock:
            study = self._study(study_id)
            finished, start = dict(study.finished), study.next_number
        end = max(start, max(by_number, default=-1) + 1)
        for number in range(end):  # read before and unfinished then, or created since: finished now
            if number not in finished and number not in by_number:
                by_number[number] = self._read_trial(study_id, number)
        while True:  # created since the unfinished trials were read
            try:
                by_number[end] = self._read_trial(study_id, end)
            except KeyError:
                break
            end += 1
        with self._lock:
            study.next_number = max(study.next_number, end)
        return sorted([*finished.values(), *by_number.values()], key=lambda trial: trial.number)

    def _read_trial(self, study_id: int, number: int) -> FrozenTrial:
        """Trial ``number`` of ``study_id`` from the storage, kept when finished (KeyError: no
        such trial)."""
        trial = self.inner.get_trial(self.get_trial_id_from_study_id_trial_number(study_id, number))
        self._keep(study_id, trial)
        return trial

    def remove_session(self) -> None:
        self.inner.remove_session()


__all__ = ["CachedStorage"]
