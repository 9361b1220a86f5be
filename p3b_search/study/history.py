"""The study's hypervolume against the compute it spent: how fast the search found its front.

Trials are taken in the order they ended (``end``); each ended trial adds the epochs it trained
(``epochs_done``, less ``epochs_shared`` when epochs came from a shared prefix) to the study's
**trial-epochs** (the compute, in units of one epoch of one trial), and a COMPLETE trial that is
not a ``dense`` reference may move the front. A PRUNED trial (stopped early, e.g. at a rung of
successive halving) spends epochs and never moves the front; a FAIL spends its epochs too.

The front is kept incrementally (a point enters only when nothing on the front dominates it), so
the whole history costs O(trials x front size), not a hypervolume over all trials per step.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from p3b_search.study.pareto import as_minimization, hypervolume, hypervolume_box, pareto_mask
from p3b_search.study.results import is_dense

#: States of an ended trial (RUNNING trials are not in the history yet).
ENDED_STATES = ("COMPLETE", "PRUNED", "FAIL")
HISTORY_COLUMNS = ("number", "state", "end", "epochs", "trial_epochs", "hypervolume", "hypervolume_normalized")


def trial_epochs_spent(trials: pd.DataFrame) -> pd.Series:
    """Epochs each trial trained itself: ``epochs_done`` less ``epochs_shared`` (when present)."""
    done = trials["epochs_done"].fillna(0) if "epochs_done" in trials.columns else pd.Series(0, index=trials.index)
    shared = trials["epochs_shared"].fillna(0) if "epochs_shared" in trials.columns else 0
    return (done - shared).clip(lower=0).astype("int64")


def hypervolume_history(trials: pd.DataFrame, names: Sequence[str], directions: Sequence[str],
                        reference: Sequence[float], ideal: Sequence[float] | None = None) -> pd.DataFrame:
    """One row per ended trial, in the order they ended: ``number``, ``state``, ``end``,
    ``epochs`` (trained by that trial), ``trial_epochs`` (cumulative), and the ``hypervolume``
    (objective units, against ``reference``) and ``hypervolume_normalized`` (by the box up to
    ``ideal``; NaN without it) of the front of the COMPLETE trials ended so far."""
    if trials.empty or not {"state", "number"} <= set(trials.columns):
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    ended = trials[trials["state"].isin(ENDED_STATES)]
    order = ended.sort_values(["end", "number"], kind="stable") if "end" in ended.columns else ended.sort_values("number")
    epochs = trial_epochs_spent(order)
    box = hypervolume_box(reference, ideal) if ideal is not None else math.nan
    counts = (~is_dense(order) & (order["state"] == "COMPLETE")).tolist()
    values = order[list(names)].to_numpy(dtype=np.float64)
    ends = order["end"].tolist() if "end" in order.columns else [None] * len(order)
    front = np.empty((0, len(names)))
    volume, spent, rows = 0.0, 0, []
    for i, (number, state, trained) in enumerate(zip(order["number"].tolist(), order["state"].tolist(),
                                                     epochs.tolist())):
        point = values[i]
        if counts[i] and np.isfinite(point).all() and not _dominated(point, front, directions):
            front = np.vstack([front, point])
            front = front[pareto_mask(front, directions)]
            volume = hypervolume(front, directions, reference)
        spent += int(trained)
        rows.append((int(number), state, ends[i], int(trained), spent, volume,
                     volume / box if math.isfinite(box) and box > 0 else math.nan))
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _dominated(point: np.ndarray, front: np.ndarray, directions: Sequence[str]) -> bool:
    """Whether some row of ``front`` is at least as good as ``point`` in every objective."""
    if not len(front):
        return False
    mine = as_minimization(point[None, :], directions)[0]
    theirs = as_minimization(front, directions)
    return bool((theirs <= mine).all(axis=1).any())
