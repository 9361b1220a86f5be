"""The study's results as Parquet tables, readable with pandas/pyarrow while the study runs.

``trials.parquet`` (the one reader is :func:`read_trials`; one row per trial that started; written by the driver only; a grid point
skipped as a repeat of an earlier trial's configuration is no row)::

    number        Optuna trial number (int)
    state         COMPLETE | PRUNED (stopped early) | FAIL | RUNNING
    method        the trial's pruning method
    param.<path>  every sampled parameter, e.g. ``param.method_config.prune_ratio``
    top1, top5, macs, flops, params, latency_ms, kept_fraction   final metrics (top-1/top-5
                  in %, MACs per image, FLOPs per image = 2 x MACs, parameters of the final
                  model (non-zeros when unstructured), latency in ms, kept_fraction = params /
                  the dense model's); NaN unless the trial finished (and its objective
                  reported the metric)
    pareto        True for COMPLETE trials on the current front of the study's objectives;
                  ``dense`` trials are the reference point, never on the front
    start, end, duration_s   Optuna's timestamps (the driver's local time) and seconds
    epochs_done   epochs reported so far; epochs_saved: epochs covered by the trial's latest
                  checkpoint that Ray has registered (where a resume or a retry continues from);
                  retries: restarts from a checkpoint after a failure; epochs_shared: prune-stage
                  epochs restored from a prefix another trial trained (``shared_prefixes``), not trained
    fail_reason   one line for FAIL (PRUNED: why it was stopped)
    mlflow_run_id, ray_trial_id
    ray_node_id   the Ray node the trial's latest attempt ran on

``allocations.parquet``: one row per sub-block per mask update, the method's allocation rows
plus ``trial``; trials write their own parts under ``allocations/<number>/`` and
:func:`merge_allocations` joins them. Both tables are replaced atomically (write a new file,
then rename), so a reader never sees a half-written file.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from p3b_search.errors import first_line
from p3b_search.files import atomic_write
from p3b_search.study.layout import StudyLayout
from p3b_search.study.messages import StudyError
from p3b_search.study.pareto import pareto_mask
from p3b_search.units import FLOPS_PER_MAC

PARAM_PREFIX = "param."
FINAL_METRICS = ("top1", "top5", "macs", "flops", "params", "latency_ms", "kept_fraction")
#: The method whose trials measure the dense reference (never points of the front).
DENSE_METHOD = "dense"
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
ANNOTATIONS = ("epochs_done", "epochs_saved", "epochs_shared", "retries", "fail_reason", "mlflow_run_id",
               "ray_trial_id", "ray_node_id")
FINAL_ATTR = "final_"  # Optuna user-attr prefix of a trial's final metrics
DUPLICATE_ATTR = "duplicate_of"  # Optuna user attr of a skipped grid point: the trial it repeats
#: Columns every trials table has (what a reader of the table may rely on).
REQUIRED_COLUMNS = ("number", "state", "top1")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so readers see the old file or the new one, never a partial one."""
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def _uniform(values: list[Any]) -> bool:
    """Whether Arrow can store ``values`` as one column type (else: store them as text)."""
    try:
        pa.array(values)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


# ----------------------------------------------------------------------------- trials

def trials_frame(
    trials: Iterable[Any],
    metric_names: Sequence[str],
    directions: Sequence[str],
    annotations: dict[int, dict[str, Any]] | None = None,
    default_method: str = "",
) -> pd.DataFrame:
    """One row per started Optuna trial (``optuna.trial.FrozenTrial``), with the driver's
    ``annotations`` (by trial number: epoch counts, retries, fail_reason, run ids) merged in."""
    annotations = annotations or {}
    rows = []
    for trial in trials:
        state = trial.state.name
        if state not in STATES or DUPLICATE_ATTR in trial.user_attrs:
            continue  # WAITING: enqueued, not started yet; a skipped grid point: never started
        row: dict[str, Any] = {"number": trial.number, "state": state,
                               "method": trial.params.get("method", default_method)}
        row.update({f"{PARAM_PREFIX}{k}": v for k, v in trial.params.items()})
        final = {k.removeprefix(FINAL_ATTR): v for k, v in trial.user_attrs.items() if k.startswith(FINAL_ATTR)}
        if trial.values is not None:
            final.update(zip(metric_names, trial.values))
        if final.get("flops") is None and final.get("macs") is not None:
            final["flops"] = FLOPS_PER_MAC * float(final["macs"])
        row.update({m: float(final[m]) if final.get(m) is not None else math.nan for m in FINAL_METRICS})
        row["start"] = trial.datetime_start
        row["end"] = trial.datetime_complete
        notes = annotations.get(trial.number, {})
        row.update({k: notes.get(k) for k in ANNOTATIONS})
        if row["fail_reason"] is None:
            row["fail_reason"] = trial.user_attrs.get("fail_reason")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=_trial_columns(rows))
    frame["start"] = pd.to_datetime(frame["start"])
    frame["end"] = pd.to_datetime(frame["end"])
    frame["duration_s"] = (frame["end"] - frame["start"]).dt.total_seconds()
    for count in ("epochs_done", "epochs_saved", "epochs_shared", "retries"):
        frame[count] = frame[count].fillna(0).astype("int64")
    frame["pareto"] = front_mask(frame, metric_names, directions)
    return frame.sort_values("number", ignore_index=True)


def _trial_columns(rows: list[dict[str, Any]]) -> list[str]:
    params = sorted({k for row in rows for k in row if k.startswith(PARAM_PREFIX)})
    return ["number", "state", "method", *params, *FINAL_METRICS, "start", "end", *ANNOTATIONS]


def front_mask(frame: pd.DataFrame, metric_names: Sequence[str], directions: Sequence[str]) -> np.ndarray:
    """True for COMPLETE rows of ``frame`` on the Pareto front of ``metric_names`` (rows of
    ``dense`` trials excluded: they are the reference point)."""
    mask = np.zeros(len(frame), dtype=bool)
    complete = ((frame["state"] == "COMPLETE") & ~is_dense(frame)).to_numpy()
    if complete.any():
        values = frame.loc[complete, list(metric_names)].to_numpy(dtype=np.float64)
        mask[np.flatnonzero(complete)] = pareto_mask(values, directions)
    return mask


def is_dense(frame: pd.DataFrame) -> pd.Series:
    """True for the rows of ``dense`` trials (the reference point of the front)."""
    if "method" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["method"].astype(str) == DENSE_METHOD


def front(frame: pd.DataFrame, metric_names: Sequence[str]) -> pd.DataFrame:
    """The front's rows, best first objective first."""
    rows = frame[frame["pareto"]]
    return rows.sort_values(list(metric_names), ascending=False, ignore_index=True)


def write_trials(frame: pd.DataFrame, layout: StudyLayout) -> None:
    """Replace ``trials.parquet`` with ``frame`` (atomically)."""
    frame = frame.copy()
    for name in frame.columns:
        if frame[name].dtype == object and not _uniform(frame[name].tolist()):
            frame[name] = [None if v is None else str(v) for v in frame[name]]
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), layout.trials_table)


def read_trials(layout: StudyLayout, must_exist: bool = False) -> pd.DataFrame:
    """``trials.parquet``: an empty frame when no trial has started yet, or with ``must_exist``
    a one-line :class:`StudyError` when the table is missing, unreadable or lacks the
    ``number``, ``state`` or ``top1`` column."""
    path = layout.trials_table
    if not path.is_file():
        if must_exist:
            raise StudyError(f"{path}: no trials table: is {layout.root} a study folder (runs/<study name>)?")
        return pd.DataFrame(columns=["number", "state", *FINAL_METRICS, "pareto"])
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as error:  # noqa: BLE001  (pyarrow raises several types for corrupt files)
        raise StudyError(f"{path}: cannot read the trials table ({first_line(error)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise StudyError(f"{path}: lacks column(s) {missing} (has {list(frame.columns)})")
    return frame


def annotations_of(frame: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """The driver's annotations stored in a trials table (to carry them over a resume)."""
    present = [c for c in ANNOTATIONS if c in frame.columns]
    return {int(row["number"]): {c: (None if _missing(row[c]) else row[c]) for c in present}
            for _, row in frame.iterrows()}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------- per-trial parts

class TrialPartWriter:
    """Writes one trial's rows of a per-trial table as parts ``<parts>/<number>/part-<index>.parquet``.

    ``index`` is the epoch the rows belong to. A trial restarted from a checkpoint redoes the
    epochs after it: :meth:`clear_from` drops their old parts first, and :meth:`write` replaces
    a part, so a retried trial never duplicates rows. Used for ``allocations/`` (the method's
    allocation rows) and ``epochs/`` (one row of metrics per epoch: the learning curve).
    """

    def __init__(self, parts: Path, number: int):
        self.folder = parts / f"{number:05d}"
        self.number = number

    def write(self, rows: list[dict[str, Any]], index: int) -> None:
        if rows:
            table = pa.Table.from_pylist([{"trial": self.number, **row} for row in rows])
            write_parquet_atomic(table, self.folder / f"part-{index:05d}.parquet")

    def clear_from(self, index: int) -> None:
        """Delete the parts of epochs ``index`` and later."""
        for path in self.folder.glob("part-*.parquet"):
            if int(path.stem.removeprefix("part-")) >= index:
                path.unlink(missing_ok=True)


def read_parts(parts: Path) -> pd.DataFrame:
    """Every row written so far under ``parts`` (one folder per trial), in trial and part order."""
    tables = []
    for path in sorted(parts.glob("*/part-*.parquet")):
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowInvalid):
            continue  # replaced between glob and read
    if not tables:
        return pd.DataFrame(columns=["trial"])
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def read_allocations(layout: StudyLayout) -> pd.DataFrame:
    """Every allocation row written so far, read from the per-trial parts (always current)."""
    return read_parts(layout.allocation_parts)


def read_epochs(layout: StudyLayout) -> pd.DataFrame:
    """The learning curves: one row per trial per epoch reported so far (both stages), with
    ``trial``, ``epoch`` (0-based over both stages), ``stage`` (0 prune, 1 fine-tune) and the
    epoch's metrics (``top1`` in %, ``epoch_seconds``, and the cost: ``macs`` per image,
    ``kept_params`` and ``keep_ratio`` of the model the epoch's masks would shrink to, in the
    fine-tune stage of the pruned model)."""
    return read_parts(layout.epoch_parts)


def merge_allocations(layout: StudyLayout) -> int:
    """Replace ``allocations.parquet`` with all parts joined; returns the number of rows."""
    frame = read_allocations(layout)
    if frame.empty:
        return 0
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), layout.allocations_table)
    return len(frame)
