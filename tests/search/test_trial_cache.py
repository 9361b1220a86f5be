"""CachedStorage on a real Optuna RDBStorage (SQLite file): finished trials are read from the
storage once, then served from memory; what another process writes (a trial asked, an attr
set, a trial told, a trial created finished) is seen at the next read."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from p3b_search.search.trial_cache import CachedStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Reads:
    """``storage``'s methods, counting the finished trials its reads return (``finished``) and
    its calls by name (``calls``)."""

    def __init__(self, storage: Any):
        self.storage, self.finished, self.calls = storage, 0, Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.storage, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            result = method(*args, **kwargs)
            read = [result] if isinstance(result, FrozenTrial) else result if isinstance(result, list) else []
            self.finished += sum(1 for trial in read if isinstance(trial, FrozenTrial) and trial.state.is_finished())
            return result

        return call


def view(storage: Any) -> list[tuple]:
    """Number, state, values, params and user attrs of every trial of study ``s``."""
    study_id = storage.get_study_id_from_name("s")
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in storage.get_all_trials(study_id)]


def other_process(url: str, code: str) -> None:
    """Run ``code`` in another Python process with ``study``: study ``s`` at ``url``, and
    ``storage``: that database's RDBStorage, ``study_id``: the study's id in it."""
    script = (f"import optuna\nstudy = optuna.load_study(study_name='s', storage={url!r})\n"
              f"storage = optuna.storages.RDBStorage({url!r})\nstudy_id = storage.get_study_id_from_name('s')\n{code}")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


def test_finished_trials_are_read_once_then_served_from_memory(tmp_path: Path):
    inner = RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    reads = Reads(inner)
    storage = CachedStorage(reads)
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=12)
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    assert view(storage) == view(inner)  # the first read reads what it lacks

    study_id = storage.get_study_id_from_name("s")
    pruned_id = storage.get_trial_id_from_study_id_trial_number(study_id, pruned.number)
    reads.finished = 0
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(13)) and all(t.state.is_finished() for t in trials)
    assert [study.get_trials(states=(state,)) for state in (TrialState.COMPLETE, TrialState.PRUNED)] == [
        trials[:12], trials[12:]]
    assert storage.get_trial(pruned_id) == trials[12]
    assert study.best_trial == inner.get_best_trial(study_id)
    assert reads.finished == 0  # not one finished trial read again
    assert storage.get_study_directions(study_id) == study.directions
    calls = reads.calls.copy()
    storage.get_study_name_from_id(study_id)
    storage.get_trial_id_from_study_id_trial_number(study_id, 3)
    assert reads.calls == calls  # names, directions and trial ids: from memory


def test_what_another_process_writes_is_seen_at_the_next_read(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = CachedStorage(RDBStorage(url))
    fresh = RDBStorage(url)  # no cache: what the database holds
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=2)
    assert len(view(storage)) == 2  # both cached

    # a trial asked there, with an attr; then one created finished (numbered after the last one seen here)
    other_process(url, "trial = study.ask(); trial.suggest_float('x', -1, 1); trial.set_user_attr('by', 'other')\n"
                       "study.add_trial(optuna.trial.create_trial(params={'x': 0.5}, "
                       "distributions={'x': optuna.distributions.FloatDistribution(-1, 1)}, value=0.25))")
    seen = view(storage)
    assert seen == view(fresh)
    assert [(number, state) for number, state, *_ in seen] == [
        (0, TrialState.COMPLETE), (1, TrialState.COMPLETE), (2, TrialState.RUNNING), (3, TrialState.COMPLETE)]
    assert seen[2][4] == {"by": "other"}

    # the running trial changed there, then told: its new attr, then its end and value are seen
    other_process(url, "storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, 2), "
                       "'step', 1)")
    assert view(storage)[2][4] == {"by": "other", "step": 1}
    other_process(url, "study.tell(2, 0.5)")
    seen = view(storage)
    assert seen == view(fresh) and seen[2][1:3] == (TrialState.COMPLETE, [0.5])
    assert study.get_trials(states=(TrialState.RUNNING,)) == []
