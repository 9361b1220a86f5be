"""The study's Pareto summary at one moment, computed once and handed to every reader.

:class:`ParetoSummary` holds which finished trials are on the front, the knee, the
hypervolume (raw, in objective units, and normalised by the box up to the dense reference's
ideal point) and the dense reference itself. The driver computes it once per refresh
(:func:`study_pareto`); the study folder's ``pareto/`` files, the MLflow parent run, the console
and ``search.py status`` all show that one object, so they always agree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from p3b_search.study.dense import DenseReference, dense_cost, dense_reference
from p3b_search.study.history import FrontHistory, replay
from p3b_search.study.pareto import hypervolume_box
from p3b_search.study.sections import MAXIMIZED, StudyConfig
from p3b_search.study.trials_table import EPOCHS_SHARED, NUMBER, finished_rows


@dataclass(frozen=True)
class ParetoSummary:
    """The front of a trials table.

    ``directions``: objective name -> maximize/minimize, in the study's order; ``reference``:
    the hypervolume's bound per objective; ``finished``: the finished trials with finite
    objectives, dense trials left out (index 0..n-1); ``on_front``: bool per row; ``knee``:
    row index of the knee (None without rows); ``hypervolume`` in objective units (e.g.
    % x MACs); ``hypervolume_normalized``: divided by the box from the reference point to the
    dense reference's ideal point (NaN when that is unknown); ``dense``: that reference;
    ``history``: the hypervolume after each ended trial against the trial-epochs spent
    (:func:`~p3b_search.study.history.hypervolume_history`); ``trial_epochs_shared``: trial-epochs
    restored from shared prefixes instead of trained, over every trial of the table (its
    ``epochs_shared`` summed)."""

    directions: Mapping[str, str]
    reference: Sequence[float]
    finished: pd.DataFrame
    on_front: np.ndarray
    knee: int | None
    hypervolume: float
    hypervolume_normalized: float
    dense: DenseReference | None = None
    history: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    trial_epochs_shared: int = 0

    @property
    def front(self) -> pd.DataFrame:
        """The front's rows with a ``knee`` flag."""
        return self.finished[self.on_front].assign(knee=np.flatnonzero(self.on_front) == self.knee)

    @property
    def trials_finished(self) -> int:
        """How many finished trials the front was taken over."""
        return len(self.finished)

    def with_columns(self, **columns: Sequence) -> "ParetoSummary":
        """The same summary with columns added to ``finished`` (e.g. each row's MLflow run id)."""
        return dataclasses.replace(self, finished=self.finished.assign(**columns))


def pareto_summary(trials: pd.DataFrame, directions: Mapping[str, str] | Sequence[tuple[str, str]],
                   reference: Sequence[float], dense: DenseReference | None = None,
                   front: FrontHistory | None = None) -> ParetoSummary:
    """The :class:`ParetoSummary` of ``trials`` (one row per trial, a column per objective of
    ``directions``) for the objectives ``directions`` (name -> maximize/minimize), the
    hypervolume bounded by ``reference``; ``dense`` gives the ideal point of the normalised
    hypervolume (the dense accuracy at zero cost; None: not normalised).

    The front is a :class:`~p3b_search.study.history.FrontHistory` fed every ended trial of
    ``trials`` in end order: the driver's own (``front``, the one its trials table's ``pareto``
    column, the front files and the MLflow tags are taken from), or, from a reader of the
    table, one replayed from the table (:func:`~p3b_search.study.history.replay`, the same
    front). Its rows are :func:`~p3b_search.study.trials_table.finished_rows`."""
    directions = dict(directions)
    missing = [name for name in directions if name not in trials.columns]
    if missing:
        raise ValueError(f"trials table lacks objective column(s) {missing}; it has {list(trials.columns)}")
    names, dirs = list(directions), list(directions.values())
    finished = finished_rows(trials, names)
    if front is None:
        front = replay(trials, names, dirs, reference)
    ideal = dense.ideal(names) if dense is not None else None
    box = hypervolume_box(reference, ideal) if ideal is not None else math.nan
    numbers = finished[NUMBER].to_numpy()
    on_front = np.isin(numbers, list(front.numbers))
    knee_number = front.knee()
    knee = int(np.flatnonzero(numbers == knee_number)[0]) if knee_number is not None else None
    normalized = front.hypervolume / box if math.isfinite(box) and box > 0 else math.nan
    shared = int(trials[EPOCHS_SHARED].fillna(0).sum()) if EPOCHS_SHARED in trials.columns else 0
    return ParetoSummary(directions, list(reference), finished, on_front, knee, front.hypervolume, normalized, dense,
                         front.history(ideal), shared)


def reference_point(study: StudyConfig, cost: Mapping[str, float] | None = None) -> list[float]:
    """The hypervolume reference per objective: the stated ``reference``, else 0 % for
    accuracies and the dense model's value for ``macs``/``flops``/``params`` (``cost``: the
    :func:`~p3b_search.study.dense.dense_cost`, counted here when not given)."""
    point = []
    for objective in study.objectives:
        if objective.reference is not None:
            point.append(objective.reference)
        elif objective.name in MAXIMIZED:
            point.append(0.0)
        else:
            cost = cost or dense_cost(study)
            point.append(cost[objective.name])
    return point


def study_pareto(study: StudyConfig, trials: pd.DataFrame, cost: Mapping[str, float] | None = None,
                 front: FrontHistory | None = None) -> ParetoSummary:
    """The study's current :class:`ParetoSummary` (dense trials left out, the dense reference
    from the study file or its dense trials); ``cost``: the dense model's, counted when not
    given; ``front``: see :func:`pareto_summary`."""
    cost = cost or dense_cost(study)
    dense = dense_reference(study, trials, cost)
    return pareto_summary(trials, dict(zip(study.metric_names, study.directions)), reference_point(study, cost), dense,
                          front)
