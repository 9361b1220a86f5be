"""The study's results as Parquet tables, readable with pandas/pyarrow while the study runs.

``trials.parquet`` (the one reader is :func:`read_trials`; one row per trial that started; written by the driver only; a grid point
skipped as a repeat of an earlier trial's configuration is no row)::

    number        Optuna trial number (int)
    state         COMPLETE | PRUNED (stopped early) | FAIL | RUNNING | NEVER_RAN (a sample told FAIL
                  before Ray ran it: an invalid configuration, a lost trial that no longer fits)
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
                  checkpoint the driver accepted (where a resume or a retry continues from; known
                  to the driver with the trial's next report);
                  retries: restarts from a checkpoint after a failure; epochs_shared: prune-stage
                  epochs restored from a prefix another trial trained (``shared_prefixes``), not trained
    fail_reason   one line for FAIL and NEVER_RAN (PRUNED: why it was stopped)
    mlflow_run_id, ray_trial_id
    ray_node_id   the Ray node the trial's latest attempt ran on

The driver writes the rows that changed (a trial started, reported, ended, or entered or left
the front) as numbered parts ``trial_updates/part-<seq>.parquet`` as it goes, and rewrites
``trials.parquet`` whole only now and then (:func:`write_trials`, which records in the file the
last part it holds and deletes the parts up to it). :func:`read_trials` reads the file and the
parts written after it, so it sees every update; ``trials.parquet`` alone may lag behind by the
driver's cadence (``TABLES_REFRESH_S`` in :mod:`p3b_search.search.progress`). The column and
state names, and which rows count as ended or finished, are :mod:`p3b_search.study.trials_table`'s.

``allocations.parquet``: one row per sub-block per mask update, the method's allocation rows
plus ``trial``; trials write their own parts under ``allocations/<number>/`` and
:func:`merge_allocations` joins them. Both tables are replaced atomically (write a new file,
then rename), so a reader never sees a half-written file.
"""
from __future__ import annotations

import math
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from p3b_search.errors import first_line
from p3b_search.files import atomic_write
from p3b_search.study.history import replay
from p3b_search.study.layout import StudyLayout
from p3b_search.study.messages import StudyError
from p3b_search.study.trials_table import (
    ANNOTATIONS,
    COUNT_COLUMNS,
    DURATION_S,
    END,
    FAIL_REASON,
    FAIL_REASON_ATTR,
    FINAL_ATTR,
    FINAL_METRICS,
    FLOPS,
    MACS,
    METHOD,
    NUMBER,
    PARAM_PREFIX,
    PARETO,
    REQUIRED_COLUMNS,
    START,
    STATE,
    row_state,
)
from p3b_search.units import FLOPS_PER_MAC

#: Key of ``trials.parquet``'s schema metadata: the last update part the file holds.
UPDATES_KEY = b"p3b.trial_updates"
#: Reads of the trials table tried again when the driver rewrote it mid-read (each retry follows a
#: rewrite, which the driver does at most every few seconds; a loaded machine can stretch a read
#: across several).
READ_ATTEMPTS = 20


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so readers see the old file or the new one, never a partial one."""
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_once(path: Path) -> pa.Table:
    """The Parquet file at ``path``, read through one open file: a writer that replaces it
    meanwhile (:func:`write_parquet_atomic`) cannot mix its footer with another version's pages,
    as ``pq.read_table(path)``, which opens the path more than once, can."""
    with open(path, "rb") as file:
        return pq.read_table(file)


def _uniform(values: list[Any]) -> bool:
    """Whether Arrow can store ``values`` as one column type (else: store them as text)."""
    try:
        pa.array(values)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


# ----------------------------------------------------------------------------- trials

def trial_row(trial: Any, metric_names: Sequence[str], notes: dict[str, Any] | None = None,
              default_method: str = "") -> dict[str, Any] | None:
    """The trials-table row of one Optuna trial (``optuna.trial.FrozenTrial``) with the driver's
    ``notes`` on it (epoch counts, retries, fail_reason, run ids), without ``pareto`` and
    ``duration_s``; None for a trial that is no row (see
    :func:`~p3b_search.study.trials_table.row_state`)."""
    state = row_state(trial)
    if state is None:
        return None
    row: dict[str, Any] = {NUMBER: trial.number, STATE: state, METHOD: trial.params.get(METHOD, default_method)}
    row.update({f"{PARAM_PREFIX}{k}": v for k, v in trial.params.items()})
    final = {k.removeprefix(FINAL_ATTR): v for k, v in trial.user_attrs.items() if k.startswith(FINAL_ATTR)}
    if trial.values is not None:
        final.update(zip(metric_names, trial.values))
    if final.get(FLOPS) is None and final.get(MACS) is not None:
        final[FLOPS] = FLOPS_PER_MAC * float(final[MACS])
    row.update({m: float(final[m]) if final.get(m) is not None else math.nan for m in FINAL_METRICS})
    row[START] = trial.datetime_start
    row[END] = trial.datetime_complete
    notes = notes or {}
    row.update({k: notes.get(k) for k in ANNOTATIONS})
    if row[FAIL_REASON] is None:
        row[FAIL_REASON] = trial.user_attrs.get(FAIL_REASON_ATTR)
    return row


def rows_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`trial_row` (with or without ``pareto``) as a trials table, in the order
    given: the columns in their order, timestamps, ``duration_s``, counts as integers."""
    frame = pd.DataFrame(list(rows), columns=_trial_columns(rows))
    frame[START] = pd.to_datetime(frame[START])
    frame[END] = pd.to_datetime(frame[END])
    frame[DURATION_S] = (frame[END] - frame[START]).dt.total_seconds()
    for count in COUNT_COLUMNS:
        frame[count] = frame[count].fillna(0).astype("int64")
    if PARETO in frame.columns:
        frame[PARETO] = frame[PARETO].fillna(False).astype(bool)
    return _in_table_order(frame)


def trials_frame(
    trials: Iterable[Any],
    metric_names: Sequence[str],
    directions: Sequence[str],
    reference: Sequence[float],
    annotations: dict[int, dict[str, Any]] | None = None,
    default_method: str = "",
) -> pd.DataFrame:
    """The trials table of Optuna's trials (``optuna.trial.FrozenTrial``) built at once, as the
    driver's :class:`~p3b_search.study.live_table.LiveTrialsTable` builds it trial by trial:
    one row per started trial, with the driver's ``annotations`` (by trial number: epoch
    counts, retries, fail_reason, run ids) merged in, and ``pareto`` from the front of its
    ended trials (:func:`~p3b_search.study.history.replay`; ``reference``: the hypervolume's)."""
    annotations = annotations or {}
    rows = [row for trial in trials
            if (row := trial_row(trial, metric_names, annotations.get(trial.number), default_method)) is not None]
    frame = rows_frame(rows)
    front = replay(frame, metric_names, directions, reference).numbers
    frame[PARETO] = frame[NUMBER].isin(list(front)).astype(bool)
    return frame.sort_values(NUMBER, ignore_index=True)


def _trial_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    params = sorted({k for row in rows for k in row if k.startswith(PARAM_PREFIX)})
    extra = [PARETO] if any(PARETO in row for row in rows) else []
    return [NUMBER, STATE, METHOD, *params, *FINAL_METRICS, START, END, *ANNOTATIONS, *extra]


def _in_table_order(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s columns in the trials table's order (parameters sorted, ``duration_s`` after
    the annotations, ``pareto`` last)."""
    params = sorted(c for c in frame.columns if c.startswith(PARAM_PREFIX))
    order = [NUMBER, STATE, METHOD, *params, *FINAL_METRICS, START, END, *ANNOTATIONS, DURATION_S, PARETO]
    return frame[[c for c in order if c in frame.columns] + [c for c in frame.columns if c not in order]]


def front(frame: pd.DataFrame, metric_names: Sequence[str]) -> pd.DataFrame:
    """The front's rows (the ``pareto`` column the driver wrote), best first objective first."""
    rows = frame[frame[PARETO]]
    return rows.sort_values(list(metric_names), ascending=False, ignore_index=True)


def _arrow_table(frame: pd.DataFrame) -> pa.Table:
    """``frame`` for Parquet: object columns Arrow cannot store as one type become text."""
    frame = frame.copy()
    for name in frame.columns:
        if frame[name].dtype == object and not _uniform(frame[name].tolist()):
            frame[name] = [None if v is None else str(v) for v in frame[name]]
    return pa.Table.from_pandas(frame, preserve_index=False)


def update_parts(layout: StudyLayout) -> list[tuple[int, Path]]:
    """``(seq, path)`` of every part under ``trial_updates/``, in the order written."""
    parts = []
    for path in layout.trial_updates.glob("part-*.parquet"):
        try:
            parts.append((int(path.stem.removeprefix("part-")), path))
        except ValueError:
            continue  # not one of ours
    return sorted(parts)


def table_seq(layout: StudyLayout) -> int:
    """The last update part that ``trials.parquet`` holds (0: none, or no table)."""
    try:
        metadata = pq.read_schema(layout.trials_table).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return 0
    return int(metadata.get(UPDATES_KEY, b"0"))


def write_trial_updates(rows: pd.DataFrame, layout: StudyLayout, seq: int) -> None:
    """Write ``rows`` (whole rows of the trials whose row changed, see :func:`rows_frame`) as
    update part ``seq`` (atomically; ``seq`` greater than every earlier part's)."""
    write_parquet_atomic(_arrow_table(rows), layout.trial_updates / f"part-{seq:09d}.parquet")


def write_trials(frame: pd.DataFrame, layout: StudyLayout, seq: int | None = None) -> None:
    """Replace ``trials.parquet`` with ``frame``, the whole table (atomically), as holding every
    update part up to ``seq`` (default: the last one written), and delete those parts."""
    parts = update_parts(layout)
    seq = seq if seq is not None else max([0, *(s for s, _ in parts)])
    table = _arrow_table(frame)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), UPDATES_KEY: str(seq).encode()})
    write_parquet_atomic(table, layout.trials_table)
    for part_seq, path in parts:
        if part_seq <= seq:
            path.unlink(missing_ok=True)


def read_trials(layout: StudyLayout, must_exist: bool = False) -> pd.DataFrame:
    """The trials table: ``trials.parquet`` with the update parts written after it (one row per
    trial, the latest), sorted by ``number``. An empty frame when no trial has started yet, or
    with ``must_exist`` a one-line :class:`StudyError` when the table is missing, unreadable or
    lacks the ``number``, ``state`` or ``top1`` column."""
    path = layout.trials_table
    for _ in range(READ_ATTEMPTS):
        parts = update_parts(layout)  # before the table: a rewrite in between deletes only parts it holds
        if not path.is_file() and not parts:
            if must_exist:
                raise StudyError(f"{path}: no trials table: is {layout.root} a study folder (runs/<study name>)?")
            return pd.DataFrame(columns=[NUMBER, STATE, *FINAL_METRICS, PARETO])
        try:
            frame, seq = _read_table(path)
            updates = [read_parquet_once(part).to_pandas() for part_seq, part in parts if part_seq > seq]
        except FileNotFoundError:
            continue  # the driver rewrote the table and deleted parts while we read: read again
        except Exception as error:  # noqa: BLE001  (pyarrow raises several types for corrupt files)
            raise StudyError(f"{path}: cannot read the trials table ({first_line(error)})") from None
        if updates:
            frame = pd.concat([f for f in [frame, *updates] if len(f)] or [frame], ignore_index=True)
            frame = frame.drop_duplicates(NUMBER, keep="last").sort_values(NUMBER, ignore_index=True)
            frame = _in_table_order(frame)
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise StudyError(f"{path}: lacks column(s) {missing} (has {list(frame.columns)})")
        return frame
    raise StudyError(f"{path}: the trials table kept changing while it was read: try again")


def _read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """``trials.parquet`` and the last update part it holds (an empty table when missing)."""
    if not path.is_file():
        return pd.DataFrame(columns=[NUMBER]), 0
    table = read_parquet_once(path)
    return table.to_pandas(), int((table.schema.metadata or {}).get(UPDATES_KEY, b"0"))


def annotations_of(frame: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """The driver's annotations stored in a trials table (to carry them over a resume)."""
    present = [c for c in ANNOTATIONS if c in frame.columns]
    return {int(row[NUMBER]): {c: (None if _missing(row[c]) else row[c]) for c in present}
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
            tables.append(read_parquet_once(path))
        except FileNotFoundError:
            continue  # deleted between glob and read (its trial restarted from an earlier epoch)
    if not tables:
        return pd.DataFrame(columns=["trial"])
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def read_allocations(layout: StudyLayout) -> pd.DataFrame:
    """Every allocation row written so far, read from the per-trial parts (always current); a
    study folder kept without its parts (e.g. its tables committed as raw data) reads its merged
    ``allocations.parquet``."""
    if not layout.allocation_parts.is_dir() and layout.allocations_table.exists():
        return read_parquet_once(layout.allocations_table).to_pandas()
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
    return PartsMerger(layout.allocation_parts, layout.allocations_table).merge()


class PartsMerger:
    """Joins the per-trial parts under ``parts`` (``<number>/part-<index>.parquet``, see
    :class:`TrialPartWriter`) into the one Parquet file ``table``, again and again as trials
    write theirs, at a cost that hardly grows with the ended trials: the parts of a trial named
    final (it ended) are read once, and the rows of the trials below the first one that may
    still change (the settled trials) are kept joined as one table, so a merge reads only the
    parts of trials that may still change and writes one contiguous table."""

    def __init__(self, parts: Path, table: Path):
        self.parts, self.table = parts, table
        self._final: dict[int, pa.Table | None] = {}  # trial number -> its rows (None: it wrote none)
        self._settled = 0  # trials 0 .. _settled - 1 are final, their rows joined in _joined
        self._joined: pa.Table | None = None

    def _trial(self, folder: Path) -> pa.Table | None:
        tables = []
        for path in sorted(folder.glob("part-*.parquet")):
            try:
                tables.append(read_parquet_once(path))
            except FileNotFoundError:
                continue  # deleted between glob and read (its trial restarted from an earlier epoch)
        return _joined(tables)

    def _settle(self, folders: dict[int, Path], final_trials: Container[int]) -> None:
        """Join the rows of the final trials that follow the settled ones without a gap."""
        settling = [self._joined]
        while self._settled in final_trials:
            number = self._settled
            folder = folders.get(number)
            settling.append(self._final.pop(number) if number in self._final
                            else self._trial(folder) if folder is not None else None)
            self._settled += 1
        if len(settling) > 1:
            self._joined = _joined(settling)

    def merge(self, final_trials: Container[int] = ()) -> int:
        """Replace ``table`` with every part joined, in trial and part order (nothing written
        while there are none); ``final_trials``: numbers of trials whose parts no longer
        change. Returns the number of rows."""
        found = self.parts.iterdir() if self.parts.is_dir() else ()
        folders = {int(folder.name): folder for folder in found if folder.name.isdigit()}
        self._settle(folders, final_trials)
        tables = [self._joined]
        for number in sorted(n for n in folders if n >= self._settled):
            table = self._final[number] if number in self._final else self._trial(folders[number])
            if number in final_trials:
                self._final[number] = table
            tables.append(table)
        merged = _joined(tables)
        if merged is None:
            return 0
        write_parquet_atomic(merged, self.table)
        return merged.num_rows


def _joined(tables: Sequence[pa.Table | None]) -> pa.Table | None:
    """``tables`` (None: no rows) concatenated into one table of contiguous columns (a Parquet
    write of many small chunks costs far more than joining them first); None when all are None."""
    present = [table for table in tables if table is not None]
    if not present:
        return None
    return pa.concat_tables(present, promote_options="permissive").combine_chunks()

