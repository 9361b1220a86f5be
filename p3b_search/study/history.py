"""The study's hypervolume against the compute it spent: how fast the search found its front.

Trials are taken in the order they ended (``end``, then ``number``); each ended trial adds the
epochs it trained (``epochs_done``, less ``epochs_shared`` when epochs came from a shared
prefix) to the study's **trial-epochs** (the compute, in units of one epoch of one trial), and a
COMPLETE trial that is not a ``dense`` reference may move the front. A PRUNED trial (stopped
early, e.g. at a rung of successive halving) spends epochs and never moves the front; a FAIL
spends its epochs too.

:class:`FrontHistory` keeps the front as trials end: a point enters when no front point
dominates it and pushes out the points it dominates, so an ended trial costs O(front size)
and the hypervolume is recomputed over the front only when the front changed. The driver
keeps one for the whole study (its trials table's ``pareto`` column, the Pareto summary and
the history all read it); :func:`hypervolume_history` replays a trials table through one.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from p3b_search.study.pareto import as_minimization, hypervolume, hypervolume_box, knee_index
from p3b_search.study.trials_table import (
    END,
    ENDED_STATES,
    EPOCHS_DONE,
    EPOCHS_SHARED,
    METHOD,
    NUMBER,
    STATE,
    may_be_on_front,
)

#: Columns of the history (its ``number``, ``state`` and ``end`` are the trials table's).
HISTORY_COLUMNS = (NUMBER, STATE, END, "epochs", "trial_epochs", "hypervolume", "hypervolume_normalized")


@dataclass(frozen=True)
class FrontChange:
    """Trial numbers that entered and left the front when one trial ended."""

    entered: frozenset[int] = frozenset()
    left: frozenset[int] = frozenset()


class FrontHistory:
    """The front of the COMPLETE, non-dense trials ended so far, and the history row of every
    ended trial, for objectives ``names`` with ``directions`` and the hypervolume bounded by
    ``reference`` (objective units).

    Feed ended trials with :meth:`end` in the order they ended. The front keeps every point no
    other point strictly dominates: identical points are all on it, as in
    :func:`~p3b_search.study.pareto.pareto_mask`; points with a NaN objective never are.
    """

    def __init__(self, names: Sequence[str], directions: Sequence[str], reference: Sequence[float]):
        self.names, self.directions, self.reference = list(names), list(directions), list(reference)
        self._front: dict[int, np.ndarray] = {}  # number -> objective values (minimization form)
        self._values: dict[int, np.ndarray] = {}  # number -> objective values (as given)
        self._order: list[tuple[tuple[float, ...], int]] = []  # (values as given, -number) of the front, ascending
        self._rows: list[tuple[Any, ...]] = []
        self._seen: set[int] = set()
        self.hypervolume = 0.0
        self.trial_epochs = 0
        #: ``(end, number)`` of the last ended trial fed (None before the first)
        self.last: tuple[Any, int] | None = None

    def __contains__(self, number: int) -> bool:
        """Whether trial ``number`` has been fed."""
        return number in self._seen

    @property
    def numbers(self) -> frozenset[int]:
        """Trial numbers on the front."""
        return frozenset(self._front)

    def end(self, number: int, state: str, end: Any, epochs: int, values: Sequence[float] | None,
            method: str) -> FrontChange:
        """Record that trial ``number`` of ``method`` ended in ``state`` at ``end`` after training
        ``epochs`` epochs; ``values``: its objectives (in the order of ``names``). It may be a
        point of the front when COMPLETE and not ``dense``
        (:func:`~p3b_search.study.trials_table.may_be_on_front`) with finite objectives. Returns
        how the front changed."""
        self._seen.add(number)
        self.last = (end, number)
        change = FrontChange()
        point = np.asarray(values if values is not None else [math.nan] * len(self.names), dtype=np.float64)
        if may_be_on_front(state, method) and np.isfinite(point).all():
            change = self._add(number, point)
        self.trial_epochs += int(epochs)
        self._rows.append((int(number), state, end, int(epochs), self.trial_epochs, self.hypervolume))
        return change

    def _add(self, number: int, point: np.ndarray) -> FrontChange:
        mine = as_minimization(point[None, :], self.directions)[0]
        if self._front:
            numbers = list(self._front)
            theirs = np.stack([self._front[n] for n in numbers])
            if ((theirs <= mine).all(axis=1) & (theirs < mine).any(axis=1)).any():
                return FrontChange()
            beaten = (mine <= theirs).all(axis=1) & (mine < theirs).any(axis=1)
            left = frozenset(n for n, out in zip(numbers, beaten) if out)
        else:
            left = frozenset()
        for gone in left:
            del self._front[gone], self._values[gone]
        if left:
            self._order = [entry for entry in self._order if -entry[1] not in left]
        bisect.insort(self._order, (tuple(point.tolist()), -number))
        self._front[number], self._values[number] = mine, point
        self.hypervolume = hypervolume(np.stack(list(self._values.values())), self.directions, self.reference)
        return FrontChange(frozenset({number}), left)

    def best(self, limit: int | None = None) -> list[int]:
        """Numbers of the front's trials by their objective values as given, highest first (the
        first objective, then the next; ties: the lower number first), at most ``limit``."""
        return [-negated for _, negated in self._order[::-1][:limit]]

    def front_values(self) -> tuple[list[int], np.ndarray]:
        """The front's trial numbers, ascending, and their objective values ``(k, objectives)``."""
        numbers = sorted(self._front)
        values = np.stack([self._values[n] for n in numbers]) if numbers else np.empty((0, len(self.names)))
        return numbers, values

    def knee(self) -> int | None:
        """Trial number of the knee (:func:`~p3b_search.study.pareto.knee_index` over the front,
        ties to the lowest number); None while the front is empty."""
        numbers, values = self.front_values()
        return numbers[knee_index(values, self.directions)] if numbers else None

    def history(self, ideal: Sequence[float] | None = None) -> pd.DataFrame:
        """One row per ended trial, in the order fed: ``number``, ``state``, ``end``, ``epochs``
        (trained by that trial), ``trial_epochs`` (cumulative), and the ``hypervolume`` (objective
        units) and ``hypervolume_normalized`` (by the box up to ``ideal``; NaN without it) of the
        front of the COMPLETE trials ended so far."""
        frame = pd.DataFrame(self._rows, columns=HISTORY_COLUMNS[:-1])
        box = hypervolume_box(self.reference, ideal) if ideal is not None else math.nan
        frame["hypervolume_normalized"] = frame["hypervolume"] / box if math.isfinite(box) and box > 0 else math.nan
        return frame


def trial_epochs_spent(trials: pd.DataFrame) -> pd.Series:
    """Epochs each trial trained itself: ``epochs_done`` less ``epochs_shared`` (when present)."""
    done = trials[EPOCHS_DONE].fillna(0) if EPOCHS_DONE in trials.columns else pd.Series(0, index=trials.index)
    shared = trials[EPOCHS_SHARED].fillna(0) if EPOCHS_SHARED in trials.columns else 0
    return (done - shared).clip(lower=0).astype("int64")


def ended_in_order(trials: pd.DataFrame) -> pd.DataFrame:
    """The ended trials (COMPLETE, PRUNED, FAIL) of a trials table, in the order they ended."""
    ended = trials[trials[STATE].isin(ENDED_STATES)]
    return ended.sort_values([END, NUMBER], kind="stable") if END in ended.columns else ended.sort_values(NUMBER)


def replay(trials: pd.DataFrame, names: Sequence[str], directions: Sequence[str],
           reference: Sequence[float]) -> FrontHistory:
    """A :class:`FrontHistory` fed every ended trial of ``trials`` (a trials table) in end order."""
    front = FrontHistory(names, directions, reference)
    if trials.empty or not {STATE, NUMBER} <= set(trials.columns):
        return front
    order = ended_in_order(trials)
    methods = order[METHOD].tolist() if METHOD in order.columns else [""] * len(order)
    values = order[list(names)].to_numpy(dtype=np.float64)
    ends = order[END].tolist() if END in order.columns else [None] * len(order)
    for i, (number, state, trained) in enumerate(zip(order[NUMBER].tolist(), order[STATE].tolist(),
                                                     trial_epochs_spent(order).tolist())):
        front.end(int(number), state, ends[i], trained, values[i], methods[i])
    return front


def hypervolume_history(trials: pd.DataFrame, names: Sequence[str], directions: Sequence[str],
                        reference: Sequence[float], ideal: Sequence[float] | None = None) -> pd.DataFrame:
    """:meth:`FrontHistory.history` of the trials table ``trials`` replayed in end order: one row
    per ended trial (see :class:`FrontHistory`)."""
    return replay(trials, names, directions, reference).history(ideal)
