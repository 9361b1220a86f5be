"""The front of a trials table at one moment: which finished trials are on it, the knee, and
the hypervolume, raw (objective units) and normalised by the dense reference's box.

Both the driver (study folder, console) and the MLflow tracker read the front from here, so
they always agree.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from p3b_search.search.pareto import hypervolume, knee_index, normalized_hypervolume, pareto_mask
from p3b_search.search.results import is_dense

#: Values of ``state`` that count as a finished point (Optuna's name and the tracker's).
FINISHED_STATES = {"finished", "complete"}
STATE_COLUMN = "state"


@dataclass(frozen=True)
class FrontState:
    """``finished``: the finished trials with finite objectives, dense trials left out (index
    0..n-1); ``on_front``: bool per row; ``knee``: row index of the knee (None without rows);
    ``hypervolume`` in objective units (e.g. % x MACs); ``hypervolume_normalized``: divided
    by the box from the reference point to the ideal point (NaN when that is unknown)."""

    finished: pd.DataFrame
    on_front: np.ndarray
    knee: int | None
    hypervolume: float
    hypervolume_normalized: float

    @property
    def front(self) -> pd.DataFrame:
        """The front's rows with a ``knee`` flag."""
        return self.finished[self.on_front].assign(knee=np.flatnonzero(self.on_front) == self.knee)


def finished_rows(trials: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Rows of finished (``state`` COMPLETE/finished, when the column exists), non-dense trials
    whose objectives ``names`` are all finite."""
    rows = trials
    if STATE_COLUMN in rows.columns:
        rows = rows[rows[STATE_COLUMN].astype(str).str.lower().isin(FINISHED_STATES)]
    rows = rows[~is_dense(rows)]
    values = rows[list(names)].to_numpy(dtype=float)
    return rows[np.isfinite(values).all(axis=1)].reset_index(drop=True)


def front_state(trials: pd.DataFrame, directions: Mapping[str, str], reference: Sequence[float],
                ideal: Sequence[float] | None = None) -> FrontState:
    """The :class:`FrontState` of ``trials`` for the objectives ``directions`` (name ->
    maximize/minimize), hypervolume bounded by ``reference``; ``ideal``: per objective, the
    far corner of the normalising box (the dense accuracy, zero cost), None: not normalised."""
    names, dirs = list(directions), list(directions.values())
    finished = finished_rows(trials, names)
    values = finished[names].to_numpy(dtype=float).reshape(len(finished), len(names))
    normalized = normalized_hypervolume(values, dirs, reference, ideal) if ideal is not None else math.nan
    return FrontState(finished, pareto_mask(values, dirs), knee_index(values, dirs) if len(values) else None,
                      hypervolume(values, dirs, reference), normalized)
