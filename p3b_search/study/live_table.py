"""The trials table as the driver keeps it while a study runs, at a cost that does not grow with
the number of trials.

An ended trial's row is final once built (until the driver notes something new on it), so an
update rebuilds only the rows of trials still running, new trials and the trials noted since
the last update, and writes just the rows that changed as an update part of
``trials.parquet`` (see :mod:`p3b_search.study.results`). The front is kept by a
:class:`~p3b_search.study.history.FrontHistory` fed each trial as it ends, so the ``pareto``
column changes only on the rows that enter or leave the front. The whole table is built and
written only by :meth:`LiveTrialsTable.rewrite`, which the driver calls at its cadence.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from p3b_search.study.history import FrontHistory, replay
from p3b_search.study.layout import StudyLayout
from p3b_search.study.results import (
    rows_frame,
    table_seq,
    trial_row,
    update_parts,
    write_trial_updates,
    write_trials,
)
from p3b_search.study.trials_table import (
    END,
    ENDED_STATES,
    EPOCHS_DONE,
    EPOCHS_SHARED,
    FINAL_STATES,
    METHOD,
    NUMBER,
    PARETO,
    STATE,
)


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two rows hold the same values (NaN equal to NaN)."""
    if old.keys() != new.keys():
        return False
    for key, value in new.items():
        other = old[key]
        if not (other is value or other == value or (_is_nan(other) and _is_nan(value))):
            return False
    return True


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class LiveTrialsTable:
    """The study's trials table kept current by :meth:`update` from Optuna's trials and the
    driver's notes, with its front (``front``) and the count of rows per ``state``
    (``counts``). ``names``, ``directions``, ``reference``: the objectives and the hypervolume's
    reference point; ``default_method``: the method of trials that do not sample one."""

    def __init__(self, layout: StudyLayout, names: Sequence[str], directions: Sequence[str],
                 reference: Sequence[float], default_method: str = ""):
        self.layout = layout
        self.names, self.directions, self.reference = list(names), list(directions), list(reference)
        self.default_method = default_method
        self.front = FrontHistory(names, directions, reference)
        self.counts: Counter[str] = Counter()
        #: increases whenever a row changes
        self.version = 0
        #: rows written so far (update parts and rewrites): what the table's upkeep costs
        self.rows_written = 0
        self._rows: dict[int, dict[str, Any]] = {}
        self._final: set[int] = set()  # ended trials whose row is built
        self._seq = max([table_seq(layout), *(seq for seq, _ in update_parts(layout))])
        self._frame: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def ended(self) -> frozenset[int]:
        """Numbers of the trials whose row is final (they ended, or never ran)."""
        return frozenset(self._final)

    def update(self, trials: Iterable[Any], notes: dict[int, dict[str, Any]], noted: set[int]) -> set[int]:
        """Bring the rows up to date with ``trials`` (Optuna's, ``FrozenTrial``) and the driver's
        ``notes`` (by trial number), rebuilding ended trials' rows only when their number is in
        ``noted``; write the rows that changed as one update part. Returns their numbers."""
        changed: set[int] = set()
        ended = []
        for trial in trials:
            number = trial.number
            if number in self._final and number not in noted:
                continue
            row = trial_row(trial, self.names, notes.get(number), self.default_method)
            if row is None:
                continue
            row[PARETO] = number in self.front.numbers
            if self._set(number, row):
                changed.add(number)
            if row[STATE] in FINAL_STATES and number not in self._final:
                self._final.add(number)
                if row[STATE] in ENDED_STATES:  # a sample that never ran spent nothing: no history row
                    ended.append(row)
        for number in self._feed(ended):
            changed.add(number)
            self._set(number, {**self._rows[number], PARETO: number in self.front.numbers})
        if changed:
            self._seq += 1
            write_trial_updates(rows_frame([self._rows[n] for n in sorted(changed)]), self.layout, self._seq)
            self.rows_written += len(changed)
        return changed

    def _set(self, number: int, row: dict[str, Any]) -> bool:
        """Store ``row`` as trial ``number``'s; returns whether it changed."""
        old = self._rows.get(number)
        if old is not None and _same(old, row):
            return False
        if old is not None:
            self.counts[old[STATE]] -= 1
        self.counts[row[STATE]] += 1
        self._rows[number] = row
        self._frame = None
        self.version += 1
        return True

    def _feed(self, ended: list[dict[str, Any]]) -> set[int]:
        """Feed newly ended rows to the front in the order they ended; returns the numbers that
        entered or left it. A trial that ended before one already fed (a clock step, a trial
        recorded late) makes the front be replayed from every ended row."""
        key = lambda row: (row[END], row[NUMBER])  # noqa: E731
        ended.sort(key=key)
        if ended and self.front.last is not None and key(ended[0]) < self.front.last:
            before = self.front.numbers
            final = rows_frame([self._rows[n] for n in sorted(self._final)])
            self.front = replay(final, self.names, self.directions, self.reference)
            return set(before ^ self.front.numbers)
        moved: set[int] = set()
        for row in ended:
            epochs = max(0, int(row[EPOCHS_DONE] or 0) - int(row[EPOCHS_SHARED] or 0))
            change = self.front.end(row[NUMBER], row[STATE], row[END], epochs, [row[name] for name in self.names],
                                    str(row[METHOD]))
            moved |= change.entered | change.left
        return moved

    def frame(self) -> pd.DataFrame:
        """The whole table (built once per change, sorted by ``number``)."""
        if self._frame is None:
            self._frame = rows_frame([self._rows[n] for n in sorted(self._rows)])
        return self._frame

    def front_rows(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The rows on the front, best first objective first (ties: the next objectives, then the
        lower number), at most ``limit``."""
        return [self._rows[n] for n in self.front.best(limit)]

    def rewrite(self) -> None:
        """Write the whole table as ``trials.parquet`` (holding every update part so far)."""
        write_trials(self.frame(), self.layout, self._seq)
        self.rows_written += len(self._rows)
