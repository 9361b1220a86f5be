"""Which trial to export: a rule over the study's trials table (``trials.parquet``).

Rules (``--pick``):

* ``max-accuracy``: the highest top-1 (ties: fewer MACs, then the lower trial number).
* ``knee``: the knee of the Pareto front over the study's objectives, as defined by
  :func:`p3b_search.study.pareto.knee_index`: each objective is scaled to [0, 1] over the front
  (0 = the front's best value, 1 = its worst), and the knee is the front trial closest in
  Euclidean distance to the ideal point (0, ..., 0): the most balanced trade-off. The front is
  the one the driver wrote in the table's ``pareto`` column (the front of the study's files,
  MLflow tags and knee); under limits, the front of the finished trials within them. ``dense``
  trials are the front's reference point, never its knee (as in the front figure).
* ``trial N``: Optuna trial number ``N``.

Limits (``--max-macs``, ``--max-params``, ``--max-latency``) keep only the trials within them
before ``max-accuracy`` or ``knee`` choose. Only COMPLETE trials are candidates; the chosen
trial must still have its fine-tuned model (see :func:`check_exportable`): a pick whose model is
gone is an error naming the trial, never a silent switch to another trial.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from p3b_search.errors import first_line
from p3b_search.export.load import ExportError
from p3b_search.study.layout import StudyLayout
from p3b_search.study.pareto import knee_index
from p3b_search.study.trials_table import (
    LATENCY_MS,
    MACS,
    NUMBER,
    PARAMS,
    PARETO,
    PRUNED,
    STATE,
    TOP1,
    complete_rows,
    finished_rows,
    is_dense,
)
from p3b_search.trial_folder import FINISHED

RULES = ("max-accuracy", "knee", "trial")
_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_amount(text: str | float, option: str) -> float:
    """``"350M"`` -> 3.5e8: a plain number or one with a K/M/G/T suffix (x1e3/1e6/1e9/1e12)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)\s*", text)
        try:
            value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0) if match else float("nan")
        except ValueError:
            value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ExportError(f"{option}: must be a positive number such as 1.2e9 or 350M (got {text!r})")
    return value


@dataclass(frozen=True)
class Pick:
    """A rule (``max-accuracy``, ``knee`` or ``trial``), its trial number, and optional limits
    (MACs per image, parameter count, latency in ms)."""

    rule: str
    trial: int | None = None
    max_macs: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None

    @classmethod
    def parse(cls, text: str, *, max_macs: float | None = None, max_params: float | None = None,
              max_latency_ms: float | None = None) -> "Pick":
        """``"max-accuracy"``, ``"knee"`` or ``"trial N"`` (also ``trial:N``, ``trial=N``)."""
        words = text.strip().lower()
        match = re.fullmatch(r"trial\s*[:= ]?\s*(\d+)", words)
        if match:
            rule, trial = "trial", int(match.group(1))
        elif words in ("max-accuracy", "knee"):
            rule, trial = words, None
        else:
            raise ExportError(f"--pick {text!r}: use max-accuracy, knee or 'trial N' (N: an Optuna trial number)")
        pick = cls(rule, trial, max_macs, max_params, max_latency_ms)
        if rule == "trial" and pick.limits:
            raise ExportError("--max-macs/--max-params/--max-latency apply to max-accuracy and knee, "
                              "not to --pick trial N: remove them or pick by rule")
        return pick

    @property
    def limits(self) -> dict[str, float]:
        """Column -> largest allowed value, for the limits that are set."""
        limits = {MACS: self.max_macs, PARAMS: self.max_params, LATENCY_MS: self.max_latency_ms}
        return {column: value for column, value in limits.items() if value is not None}

    def describe(self) -> str:
        text = f"trial {self.trial}" if self.rule == "trial" else self.rule
        return text + "".join(f", {column} <= {_fmt(value)}" for column, value in self.limits.items())


_OPTIONS = {MACS: "--max-macs", PARAMS: "--max-params", LATENCY_MS: "--max-latency"}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _within_limits(candidates: pd.DataFrame, pick: Pick) -> pd.DataFrame:
    for column, limit in pick.limits.items():
        if column not in candidates.columns or candidates[column].isna().all():
            raise ExportError(f"{_OPTIONS[column]}: no COMPLETE trial recorded {column}")
        inside = candidates[candidates[column] <= limit]
        if inside.empty:
            best = candidates.loc[candidates[column].idxmin()]
            raise ExportError(f"{_OPTIONS[column]} {_fmt(limit)}: no COMPLETE trial qualifies; the smallest "
                              f"{column} available is {_fmt(best[column])} (trial {int(best[NUMBER])}, "
                              f"top-1 {best[TOP1]:.2f} %)")
        candidates = inside
    return candidates


def select_trial(trials: pd.DataFrame, pick: Pick, objectives: Sequence[tuple[str, str]]) -> pd.Series:
    """The row of ``trials`` chosen by ``pick``.

    ``objectives``: the study's (column, "maximize" | "minimize") pairs, used by ``knee``.
    """
    if pick.rule == "trial":
        rows = trials[trials[NUMBER] == pick.trial]
        if rows.empty:
            numbers = sorted(int(n) for n in trials[NUMBER])
            raise ExportError(f"--pick trial {pick.trial}: the study has no such trial (trials: "
                              f"{_number_ranges(numbers)})")
        return rows.iloc[0]
    candidates = complete_rows(trials).dropna(subset=[TOP1])
    if candidates.empty:
        states = trials[STATE].astype(str).value_counts().to_dict()
        raise ExportError(f"--pick {pick.rule}: the study has no COMPLETE trial yet (states: {states}): "
                          "wait for a trial to finish")
    candidates = _within_limits(candidates, pick)
    if pick.rule == "max-accuracy":
        order = [TOP1, *([MACS] if MACS in candidates.columns else []), NUMBER]
        ascending = [False, *([True] if MACS in candidates.columns else []), True]
        return candidates.sort_values(order, ascending=ascending, kind="stable").iloc[0]
    return _knee(candidates, pick, objectives)


def _knee(candidates: pd.DataFrame, pick: Pick, objectives: Sequence[tuple[str, str]]) -> pd.Series:
    """The knee of the front: without limits the front the driver wrote (the table's ``pareto``
    rows), with limits the front of the finished ``candidates`` within them."""
    columns = [column for column, _ in objectives]
    if is_dense(candidates).all():
        raise ExportError("--pick knee: the study has only dense trials (the reference point): "
                          "use --pick max-accuracy or 'trial N'")
    missing = [c for c in columns if c not in candidates.columns]
    if missing:
        raise ExportError(f"--pick knee: the trials table lacks objective column(s) {missing}")
    finished = finished_rows(candidates, columns)
    if finished.empty:
        raise ExportError(f"--pick knee: no COMPLETE trial has all objectives {columns} recorded")
    if not pick.limits:
        finished = finished[finished[PARETO].astype(bool)] if PARETO in finished.columns else finished.iloc[:0]
        if finished.empty:
            raise ExportError(f"--pick knee: the trials table marks no trial on the front (its {PARETO!r} column): "
                              "use --pick max-accuracy or 'trial N'")
    values = finished[columns].to_numpy(dtype=np.float64)
    return finished.iloc[knee_index(values, [d for _, d in objectives])]


def _number_ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    return f"{numbers[0]}..{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else str(numbers)


def trial_state(layout: StudyLayout, number: int) -> str | None:
    """The ``state`` in the trial's ``result.json`` (``"finished"`` once fine-tuned), None without one."""
    path = layout.trial_folder(number).result
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text()).get("state"))
    except (ValueError, AttributeError) as error:
        raise ExportError(f"{path}: corrupt result file ({first_line(error)})") from None


def is_exportable(layout: StudyLayout, number: int) -> bool:
    """True when trial ``number`` finished fine-tuning and its model folder is complete."""
    model = layout.trial_folder(number).model
    return trial_state(layout, number) == FINISHED and model.arch.is_file() and model.weights.is_file()


def check_exportable(layout: StudyLayout, row: pd.Series, trials: pd.DataFrame, resume_command: str) -> Path:
    """The model folder of the chosen trial; :class:`ExportError` when its weights are not
    fine-tuned or are gone, saying what finishes it and which trials are exportable instead."""
    number = int(row[NUMBER])
    folder = layout.trial_folder(number).model.root
    if is_exportable(layout, number):
        return folder
    state, table_state = trial_state(layout, number), str(row[STATE])
    if state == FINISHED:
        why = (f"its model folder {folder} is gone or incomplete: copy trials/{folder.parent.name} back from "
               "where the study ran (a finished trial is not run again by resume)")
    elif table_state == PRUNED:
        why = "it was stopped early (PRUNED) and never fine-tuned: pick another trial"
    else:
        why = (f"its weights are not fine-tuned yet (state {table_state}, result.json state {state!r}): "
               f"finish it with `{resume_command}`")
    ready = [int(n) for n in complete_rows(trials)[NUMBER] if int(n) != number and is_exportable(layout, int(n))]
    other = f"; exportable trials: {_number_ranges(sorted(ready))}" if ready else ""
    raise ExportError(f"trial {number}: {why}{other}; nothing was exported")
