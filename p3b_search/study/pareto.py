"""Pareto front, hypervolume and knee point of a set of trials' objective values.

``values`` is an ``(n, m)`` float array: one row per trial, one column per objective;
``directions`` names each column ``"maximize"`` or ``"minimize"``. Rows holding a NaN are
never on the front, never dominate another row and add no hypervolume (an unfinished trial).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_DIRECTIONS = ("maximize", "minimize")


def as_minimization(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """``values`` as float64 ``(n, m)`` with maximized columns negated (smaller is better)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-d array (trials x objectives), got shape {values.shape}")
    if len(directions) != values.shape[1]:
        raise ValueError(f"{len(directions)} directions given for {values.shape[1]} objective columns")
    for direction in directions:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return values * signs


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean ``(n,)``: True where no other row dominates the row.

    Row ``a`` dominates row ``b`` when ``a`` is at least as good in every objective and strictly
    better in one. Identical rows do not dominate each other, so duplicates of a front point are
    all on the front. Cost O(n^2 m) in blocks of rows, fine for thousands of trials.
    """
    points = as_minimization(values, directions)
    n = len(points)
    finite = np.isfinite(points).all(axis=1)
    mask = finite.copy()
    candidates = points[finite]
    block = max(1, 2_000_000 // max(1, len(candidates) * points.shape[1]))
    for start in range(0, n, block):
        rows = points[start : start + block]
        no_worse = (candidates[None, :, :] <= rows[:, None, :]).all(axis=2)
        better = (candidates[None, :, :] < rows[:, None, :]).any(axis=2)
        mask[start : start + block] &= ~(no_worse & better).any(axis=1)
    return mask


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by the rows, bounded by ``reference`` (objective units).

    ``reference`` is a point every useful trial beats (e.g. top-1 = 0 %, MACs = dense MACs).
    Rows not strictly better than ``reference`` in every objective add nothing. Two objectives:
    a sort-and-sweep, O(n log n); more: slicing along the last objective down to the
    two-objective sweep, O(n^(m-1) log n), exact.
    """
    points = as_minimization(values, directions)
    ref = as_minimization(np.asarray(reference, dtype=np.float64)[None, :], directions)[0]
    if not np.isfinite(ref).all():
        raise ValueError(f"hypervolume reference point must be finite, got {list(reference)}")
    points = points[np.isfinite(points).all(axis=1)]
    points = points[(points < ref).all(axis=1)]
    if len(points) == 0:
        return 0.0
    return float(_hypervolume_min(points, ref))


def _hypervolume_min(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of minimization ``points`` (all strictly below ``ref``) up to ``ref``."""
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    if points.shape[1] == 2:
        order = np.lexsort((points[:, 1], points[:, 0]))
        volume, best_y = 0.0, ref[1]
        for x, y in points[order]:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = y
        return volume
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        upper = points[i + 1, -1] if i + 1 < len(points) else ref[-1]
        thickness = upper - points[i, -1]
        if thickness > 0:
            volume += thickness * _hypervolume_min(points[: i + 1, :-1], ref[:-1])
    return volume


def knee_index(values: np.ndarray, directions: Sequence[str]) -> int:
    """Row index of the front's knee: the best trade-off between the objectives.

    Definition: scale each objective to [0, 1] over the front (0 = the front's best value,
    1 = its worst; a constant objective scales to 0), then take the front row closest in
    Euclidean distance to the ideal point (0, ..., 0). Ties go to the lowest row index.
    """
    points = as_minimization(values, directions)
    front = np.flatnonzero(pareto_mask(values, directions))
    if len(front) == 0:
        raise ValueError("knee_index needs at least one row with finite objective values")
    front_points = points[front]
    low, high = front_points.min(axis=0), front_points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((front_points - low) / span, axis=1)
    return int(front[int(np.argmin(distance))])


def hypervolume_box(reference: Sequence[float], ideal: Sequence[float]) -> float:
    """Volume of the box between ``reference`` and ``ideal`` (objective units; NaN when an
    ``ideal`` value is unknown)."""
    spans = np.abs(np.asarray(ideal, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    return float(np.prod(spans)) if np.isfinite(spans).all() else math.nan


def normalized_hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float],
                           ideal: Sequence[float]) -> float:
    """:func:`hypervolume` divided by :func:`hypervolume_box` of ``reference`` and ``ideal``.

    With ``ideal`` = (dense top-1, zero MACs) 1.0 means "the dense model's accuracy for free";
    a trial better than ``ideal`` in some objective (more accurate than dense) can take it above
    1. NaN when an ideal value is unknown or the box is empty.
    """
    box = hypervolume_box(reference, ideal)
    if not math.isfinite(box) or box <= 0:
        return math.nan
    return hypervolume(values, directions, reference) / box
