"""The trials table's names: its columns, the states of its rows, and which rows count as what.

Every module that writes or reads ``trials.parquet`` (and its update parts, see
:mod:`p3b_search.study.results`) takes the column names, the state names and the filters from
here, so a row means the same to the driver, ``search.py status``, the front files, the MLflow
tags and export:

* :func:`row_state`: the state of an Optuna trial's row (None: no row);
* :func:`ended_count` / :func:`study_done`: the trials that ran and ended, and whether a study
  has its ``n_trials`` of them (the runner, ``study_summary`` and ``study_finished`` all ask this);
* :func:`finished_rows`: the rows that may be points of the front (the front, its knee and
  export's knee are taken over these only).

States: ``COMPLETE`` (finished, objectives recorded), ``PRUNED`` (stopped early), ``FAIL`` (it ran
and failed), ``RUNNING``, and ``NEVER_RAN``: a sample told FAIL before Ray ever ran it (an
invalid configuration, a lost trial whose parameters no longer fit the space, one asked by a
driver that stopped); it spent no compute, is no failure and does not count towards ``n_trials``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- columns
NUMBER = "number"  # Optuna trial number
STATE = "state"  # one of STATES
METHOD = "method"  # the trial's pruning method
PARAM_PREFIX = "param."  # every sampled parameter: param.<dotted path>
TOP1, TOP5, MACS, FLOPS, PARAMS, LATENCY_MS, KEPT_FRACTION = (
    "top1", "top5", "macs", "flops", "params", "latency_ms", "kept_fraction")
#: Final metrics (NaN unless the trial finished): top-1/top-5 in %, MACs and FLOPs per image,
#: parameters of the final model, latency in ms, kept fraction of the dense model's parameters.
FINAL_METRICS = (TOP1, TOP5, MACS, FLOPS, PARAMS, LATENCY_MS, KEPT_FRACTION)
START, END, DURATION_S = "start", "end", "duration_s"  # Optuna's timestamps, seconds between
EPOCHS_DONE, EPOCHS_SAVED, EPOCHS_SHARED, RETRIES = "epochs_done", "epochs_saved", "epochs_shared", "retries"
FAIL_REASON = "fail_reason"
MLFLOW_RUN_ID, RAY_TRIAL_ID, RAY_NODE_ID = "mlflow_run_id", "ray_trial_id", "ray_node_id"
#: The driver's notes on a trial (by trial number), stored as columns.
ANNOTATIONS = (EPOCHS_DONE, EPOCHS_SAVED, EPOCHS_SHARED, RETRIES, FAIL_REASON, MLFLOW_RUN_ID, RAY_TRIAL_ID,
               RAY_NODE_ID)
#: Annotations that are counts (integers, 0 when not noted).
COUNT_COLUMNS = (EPOCHS_DONE, EPOCHS_SAVED, EPOCHS_SHARED, RETRIES)
PARETO = "pareto"  # True on the current front
#: Columns every trials table has (what a reader of the table may rely on).
REQUIRED_COLUMNS = (NUMBER, STATE, TOP1)

# ----------------------------------------------------------------------------- states
COMPLETE, PRUNED, FAIL, RUNNING, NEVER_RAN = "COMPLETE", "PRUNED", "FAIL", "RUNNING", "NEVER_RAN"
STATES = (COMPLETE, PRUNED, FAIL, RUNNING, NEVER_RAN)
#: Trials that ran and ended: what ``n_trials`` counts, and what the hypervolume history holds.
ENDED_STATES = (COMPLETE, PRUNED, FAIL)
#: States whose row no longer changes (until the driver notes something new on the trial).
FINAL_STATES = (*ENDED_STATES, NEVER_RAN)
#: How each state reads in a sentence (``search.py status``, the progress line).
STATE_WORDS = {COMPLETE: "complete", RUNNING: "running", PRUNED: "pruned", FAIL: "failed", NEVER_RAN: "never ran"}

#: The method whose trials measure the dense reference (never points of the front).
DENSE_METHOD = "dense"

# ----------------------------------------------------------------------------- Optuna's records
FINAL_ATTR = "final_"  # user-attr prefix of a trial's final metrics
DUPLICATE_ATTR = "duplicate_of"  # user attr of a skipped grid point: the trial it repeats
FAIL_REASON_ATTR = FAIL_REASON  # user attr of why a trial failed or never ran
#: User attr set when a trial is handed to Ray (its Ray trial id): a trial without it never ran.
RAY_TRIAL_ATTR = RAY_TRIAL_ID
_OPTUNA_ROW_STATES = (COMPLETE, PRUNED, FAIL, RUNNING)


def row_state(trial: Any) -> str | None:
    """The trials-table state of an Optuna trial (``optuna.trial.FrozenTrial``): Optuna's state
    name, except :data:`NEVER_RAN` for a trial told FAIL without ever being handed to Ray; None
    for a trial that is no row (WAITING: enqueued, not started; a skipped grid point)."""
    if DUPLICATE_ATTR in trial.user_attrs:
        return None
    state = trial.state.name
    if state == FAIL and RAY_TRIAL_ATTR not in trial.user_attrs:
        return NEVER_RAN
    return state if state in _OPTUNA_ROW_STATES else None


def ended_count(states: Iterable[str]) -> int:
    """How many of ``states`` (a table's ``state`` column, or :func:`row_state` of Optuna's
    trials) are trials that ran and ended."""
    return sum(1 for state in states if state in ENDED_STATES)


def study_done(states: Iterable[str], n_trials: int) -> bool:
    """Whether a study whose rows have ``states`` has run its ``n_trials`` trials to their end."""
    return ended_count(states) >= n_trials


def is_dense(frame: pd.DataFrame) -> pd.Series:
    """True for the rows of ``dense`` trials (the reference point of the front)."""
    if METHOD not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame[METHOD].astype(str) == DENSE_METHOD


def may_be_on_front(state: str, method: Any) -> bool:
    """Whether a row in ``state`` of ``method`` may be a point of the front (COMPLETE, not dense);
    it is one when its objectives are finite too (see :func:`finished_rows`)."""
    return state == COMPLETE and str(method) != DENSE_METHOD


def complete_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE rows of a trials table."""
    return trials[trials[STATE] == COMPLETE]


def finished_rows(trials: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """The rows that may be points of the front: COMPLETE, not dense, every objective of
    ``names`` finite (index 0..n-1, in the table's order)."""
    rows = complete_rows(trials)
    rows = rows[~is_dense(rows)]
    values = rows[list(names)].to_numpy(dtype=float).reshape(len(rows), len(names))
    return rows[np.isfinite(values).all(axis=1)].reset_index(drop=True)
