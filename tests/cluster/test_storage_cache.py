"""The storage of a study on PostgreSQL (``open_storage``: retrying, behind the trial cache) reads
a finished trial from the database once: later reads of the study cost the database a few
statements and no rows of finished trials, however many there are; what another process
writes is still seen."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from p3b_search.search.optuna_storage import open_storage

pytestmark = pytest.mark.cluster

TRIALS = 20


@dataclass
class Traffic:
    statements: int = 0
    rows: int = 0  # rows the SELECTs returned


@contextmanager
def traffic() -> Iterator[Traffic]:
    """Statements every SQLAlchemy engine of this process sends while the block runs."""
    counted = Traffic()

    def count(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        counted.statements += 1
        if statement.lstrip().upper().startswith("SELECT"):
            counted.rows += max(cursor.rowcount, 0)

    event.listen(Engine, "after_cursor_execute", count)
    try:
        yield counted
    finally:
        event.remove(Engine, "after_cursor_execute", count)


def test_finished_trials_are_read_from_postgres_once(postgres):
    url = postgres.create_database("cache")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=TRIALS)
    study_id = storage.get_study_id_from_name("s")
    first = study.get_trials()

    with traffic() as read:
        again = study.get_trials()
    assert again == first and len(again) == TRIALS
    # the unfinished trials (none), the study's row and one look for a trial after the last one
    assert read.rows <= 2, read
    with traffic() as lookups:
        assert storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, 3)) == first[3]
        assert storage.get_study_directions(study_id) == study.directions
    assert lookups.statements == 0

    other = optuna.load_study(study_name="s", storage=url)  # Optuna's own storage, as another process
    running = other.ask()
    running.set_user_attr("by", "other")
    other.tell(other.ask(), 0.5)
    seen = study.get_trials()
    assert [(t.number, t.state, t.user_attrs) for t in seen[TRIALS:]] == [
        (TRIALS, TrialState.RUNNING, {"by": "other"}), (TRIALS + 1, TrialState.COMPLETE, {})]
    other.tell(running, 0.25)
    assert study.get_trials()[TRIALS].values == [0.25]
