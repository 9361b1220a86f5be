"""Rung ranking of multi-objective successive halving (MO-ASHA, Schmucker et al. 2021).

At a rung (an epoch every trial passes) the trials that reached it are ranked by non-dominated
sorting on the study's objectives, ties inside a front broken by crowding distance (NSGA-II's:
the points at the ends of a front and those far from their neighbours first); a trial continues
when it is in the top ``1 / eta`` of its rung. The live scheduler
(:mod:`p3b_search.search.successive_halving`) and the replay simulator of the tabular benchmark
use these functions, so both decide alike.

``values`` is an ``(n, m)`` array as in :mod:`p3b_search.study.pareto`; rows holding a NaN rank
after every finite row. A rung ranks on the objectives every epoch reports
(:func:`rung_objectives`), read from an epoch's metrics by :func:`epoch_values`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from p3b_search.study.pareto import as_minimization, pareto_mask
from p3b_search.units import FLOPS_PER_MAC

#: Objective -> (epoch metric, factor): how each objective is read from one epoch's metrics. Every
#: epoch of both stages reports ``top1``/``top5`` (%), ``macs`` (per image) and ``kept_params``
#: of the model the epoch's masks shrink to (fine-tune: the pruned model); ``latency_ms`` is
#: measured only when a trial ends.
EPOCH_METRICS: dict[str, tuple[str, float]] = {
    "top1": ("top1", 1.0), "top5": ("top5", 1.0), "macs": ("macs", 1.0),
    "flops": ("macs", FLOPS_PER_MAC), "params": ("kept_params", 1.0)}
#: The cost objectives a rung can rank on.
EPOCH_COSTS = ("macs", "flops", "params")


def rung_objectives(names: Sequence[str], directions: Sequence[str]) -> tuple[list[str], list[str]]:
    """The study's objectives that every epoch reports (all but ``latency_ms``) and their
    directions: what a rung ranks on."""
    kept = [(name, direction) for name, direction in zip(names, directions) if name in EPOCH_METRICS]
    return [name for name, _ in kept], [direction for _, direction in kept]


def epoch_values(metrics: Mapping[str, Any], names: Sequence[str]) -> tuple[float, ...]:
    """Objectives ``names`` (see :data:`EPOCH_METRICS`) at one epoch, from its metrics (a trial's
    result or a learning-curve row); NaN where the epoch did not report one."""
    values = []
    for name in names:
        key, factor = EPOCH_METRICS[name]
        value = metrics.get(key)
        finite = isinstance(value, (int, float, np.number)) and math.isfinite(value)
        values.append(float(value) * factor if finite else math.nan)
    return tuple(values)


def nondominated_ranks(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Int ``(n,)``: 0 for the rows on the Pareto front, 1 for the front of the rest, and so on;
    rows holding a NaN get one rank past the last finite front."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.full(len(values), -1, dtype=np.int64)
    finite = np.isfinite(values).all(axis=1) if values.size else np.zeros(len(values), dtype=bool)
    remaining = np.flatnonzero(finite)
    rank = 0
    while len(remaining):
        front = pareto_mask(values[remaining], directions)
        ranks[remaining[front]] = rank
        remaining = remaining[~front]
        rank += 1
    ranks[~finite] = rank
    return ranks


def crowding_distances(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Float ``(n,)``: NSGA-II's crowding distance of each row within ``values`` (one front).

    Per objective the rows are sorted; the two ends get infinity, the others the gap between
    their neighbours over the objective's range; the distances add over objectives. An
    objective with one value everywhere adds nothing.
    """
    points = as_minimization(values, directions)
    n = len(points)
    distance = np.zeros(n)
    if n <= 2:
        distance[:] = math.inf
        return distance
    for column in points.T:
        order = np.argsort(column, kind="stable")
        low, high = column[order[0]], column[order[-1]]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high > low:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / (high - low)
    return distance


def rung_order(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Row indices best first: by non-dominated rank, then by crowding distance within the rank
    (larger first), then by row index (earlier first)."""
    values = np.asarray(values, dtype=np.float64)
    ranks = nondominated_ranks(values, directions)
    crowding = np.zeros(len(values))
    finite = np.isfinite(values).all(axis=1) if values.size else np.zeros(len(values), dtype=bool)
    for rank in np.unique(ranks[finite]):
        members = np.flatnonzero((ranks == rank) & finite)
        crowding[members] = crowding_distances(values[members], directions)
    return np.lexsort((np.arange(len(values)), -crowding, ranks))


def promotion_quota(n: int, eta: int) -> int:
    """How many of ``n`` trials at a rung continue: the top ``n / eta``, at least one."""
    return max(1, n // eta)


def continues_at_rung(values: np.ndarray, directions: Sequence[str], row: int, eta: int) -> bool:
    """Whether row ``row`` of the trials recorded at a rung (itself included) is in the top
    ``1 / eta`` of :func:`rung_order` (asynchronous successive halving: the decision is taken
    when the trial reaches the rung, against the trials that reached it before)."""
    order = rung_order(values, directions)
    position = int(np.flatnonzero(order == row)[0])
    return position < promotion_quota(len(order), eta)


class SuccessiveHalvingRule:
    """Asynchronous multi-objective successive halving: the rungs' records and the decisions.

    ``rungs``: epoch counts (epochs trained over both stages, 1-based: ``4`` = after the fourth
    epoch) at which a trial is ranked against every trial that reached the rung before it;
    ``eta``: the top ``1 / eta`` continue. ``values`` are the trial's objectives at that epoch, in
    the order of ``directions``. A trial reported again at a rung (a retry, a resumed study)
    replaces its record; its decision is taken again against the others.
    """

    def __init__(self, rungs: Sequence[int], eta: int, directions: Sequence[str]):
        if eta < 2:
            raise ValueError(f"eta={eta}: successive halving needs eta >= 2")
        self.rungs = tuple(sorted(set(int(r) for r in rungs)))
        self.eta = int(eta)
        self.directions = tuple(directions)
        self.records: dict[int, dict[object, tuple[float, ...]]] = {rung: {} for rung in self.rungs}

    def record(self, trial: object, epochs_done: int, values: Sequence[float]) -> None:
        """Store ``trial``'s objectives at a rung (no decision: e.g. rebuilding the records)."""
        if epochs_done in self.records:
            self.records[epochs_done][trial] = tuple(float(v) for v in values)

    def record_curves(self, curves: pd.DataFrame, names: Sequence[str]) -> None:
        """Record every learning-curve row that lies on a rung, under its trial: ``curves`` as
        :func:`p3b_search.study.results.read_epochs` reads them (``trial``, ``epoch`` 0-based over
        both stages, the epoch's metrics), ``names`` the objectives of :func:`epoch_values`."""
        for row in curves.to_dict("records"):
            epochs_done = int(row["epoch"]) + 1
            if epochs_done in self.records:
                self.record(int(row["trial"]), epochs_done, epoch_values(row, names))

    def standing(self, trial: object, epochs_done: int) -> tuple[int, int]:
        """``(place, count)``: ``trial``'s 1-based place in :func:`rung_order` among the ``count``
        trials recorded at rung ``epochs_done``."""
        at_rung = self.records[epochs_done]
        trials = list(at_rung)
        order = rung_order(np.array([at_rung[t] for t in trials]), self.directions)
        return int(np.flatnonzero(order == trials.index(trial))[0]) + 1, len(trials)

    def decide(self, trial: object, epochs_done: int, values: Sequence[float]) -> bool:
        """Record ``trial`` at ``epochs_done`` and say whether it continues (always True off a rung)."""
        if epochs_done not in self.records:
            return True
        self.record(trial, epochs_done, values)
        at_rung = self.records[epochs_done]
        trials = list(at_rung)
        return continues_at_rung(np.array([at_rung[t] for t in trials]), self.directions, trials.index(trial),
                                 self.eta)
