"""The files that describe the study's front: ``front.png``, ``front.html`` (hover: a trial's
objectives, parameters and MLflow run), ``front.parquet`` (the front's rows, ``knee`` flag),
``summary.parquet`` (one row: trials finished, front size, hypervolume in objective units and
normalised, the reference point and the dense reference) and the hypervolume history
(``history.png``, ``history.parquet``: after each ended trial, against trial-epochs), all drawn from one
:class:`~p3b_search.study.front.ParetoSummary`. The driver writes them to ``<study>/pareto/``
and the tracker logs the same files to the parent run's ``pareto/``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from p3b_search.study.front import ParetoSummary
from p3b_search.study.front_figures import pareto_plotly, pareto_png, save_files
from p3b_search.study.history_figure import history_png
from p3b_search.study.trials_table import (
    FLOPS,
    KEPT_FRACTION,
    LATENCY_MS,
    MACS,
    METHOD,
    MLFLOW_RUN_ID,
    NUMBER,
    PARAM_PREFIX,
    PARAMS,
    PRUNED,
    STATE,
    TOP1,
    TOP5,
)
from p3b_search.units import value_text

#: Table columns shown on hover besides the objectives and ``param.*`` (with their units).
_HOVER_EXTRA = (KEPT_FRACTION, PARAMS, TOP1, TOP5, MACS, FLOPS, LATENCY_MS)
FRONT_FILES = ("front.parquet", "front.html", "front.png", "summary.parquet", "history.parquet", "history.png")


def _shown(value: Any) -> bool:
    return not (pd.api.types.is_scalar(value) and pd.isna(value))


def hover_text(row: pd.Series, names: Sequence[str], link: str | None) -> str:
    """HTML hover of one trial: number and method, objectives and costs with units, sampled
    parameters (``param.*``), then its MLflow run and the link a click opens."""
    lines = []
    if NUMBER in row.index and _shown(row[NUMBER]):
        method = f" ({row[METHOD]})" if METHOD in row.index and _shown(row[METHOD]) else ""
        lines.append(f"<b>trial {int(row[NUMBER])}</b>{method}")
    seen = set()
    for name in [*names, *_HOVER_EXTRA]:
        if name in row.index and name not in seen and _shown(row[name]):
            seen.add(name)
            lines.append(f"{name}: {value_text(name, float(row[name]))}")
    lines += [f"{key}: {_plain(value)}" for key, value in row.items()
              if str(key).startswith(PARAM_PREFIX) and _shown(value)]
    run_id = row.get(MLFLOW_RUN_ID)
    if isinstance(run_id, str) and run_id:
        lines.append(f"MLflow run {run_id}")
        if link:
            lines.append(f"click to open: {link}")
    return "<br>".join(lines)


def _plain(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def summary_table(state: ParetoSummary) -> pd.DataFrame:
    """One row: ``trials_finished``, ``front_size``, ``hypervolume`` (objective units, e.g.
    % x MACs per image), ``hypervolume_normalized`` (1.0 = dense accuracy at zero cost),
    ``knee_trial``, ``trial_epochs_shared`` (trial-epochs restored from shared prefixes, not
    trained), ``reference.<objective>``, ``dense.<objective>`` and ``dense_source``."""
    knee = state.finished[NUMBER].iloc[state.knee] if (
        state.knee is not None and NUMBER in state.finished.columns) else math.nan
    row: dict[str, Any] = {"trials_finished": len(state.finished), "front_size": int(state.on_front.sum()),
                           "hypervolume": state.hypervolume, "hypervolume_normalized": state.hypervolume_normalized,
                           "knee_trial": float(knee), "trial_epochs_shared": state.trial_epochs_shared}
    row.update({f"reference.{name}": float(value) for name, value in zip(state.directions, state.reference)})
    dense = state.dense
    if dense is not None:
        row.update({f"dense.{name}": dense.get(name) for name in (TOP1, TOP5, MACS, FLOPS, PARAMS)})
        row["dense_source"] = dense.source
    return pd.DataFrame([row])


def front_title(study_name: str, state: ParetoSummary) -> str:
    """``quickstart: Pareto front of 8 finished trials (3 on the front), HV 0.71 of dense``."""
    title = (f"{study_name}: Pareto front of {len(state.finished)} finished trials "
             f"({int(state.on_front.sum())} on the front)")
    if math.isfinite(state.hypervolume_normalized):
        title += f"; normalised hypervolume {state.hypervolume_normalized:.3f}"
    return title


def front_files(state: ParetoSummary, study_name: str, link: Callable[[str], str] | None = None) -> dict[str, Any]:
    """``{file name: table or figure}`` of :data:`FRONT_FILES`; ``link``: run id -> URL of the run."""
    directions, dense = dict(state.directions), state.dense
    names = list(directions)
    finished = state.finished
    run_ids = finished[MLFLOW_RUN_ID] if MLFLOW_RUN_ID in finished.columns else pd.Series([None] * len(finished))
    links = [link(r) if link is not None and isinstance(r, str) and r else None for r in run_ids]
    hover = [hover_text(row, names, url) for (_, row), url in zip(finished.iterrows(), links)]
    title = front_title(study_name, state)
    return {
        "front.parquet": state.front,
        "front.html": pareto_plotly(finished, directions, state.on_front, state.knee, hover, title, dense=dense,
                                    links=links),
        "front.png": pareto_png(finished, directions, state.on_front, state.knee, title, dense=dense),
        "summary.parquet": summary_table(state),
        "history.parquet": state.history,
        "history.png": history_png(state.history, f"{study_name}: hypervolume against compute"),
    }


def history_line(history: pd.DataFrame, points: int = 4) -> str:
    """``hypervolume history (normalised): 0.412 after 24 trial-epochs, ..., 0.615 after 96``: the
    history at ``points`` evenly spaced moments (by trial-epochs) up to now; '' when empty."""
    if history.empty:
        return ""
    normalized = bool(history["hypervolume_normalized"].notna().all())
    column = "hypervolume_normalized" if normalized else "hypervolume"
    spent = history["trial_epochs"].to_numpy()
    marks = sorted({int(spent[-1] * (k + 1) / points) for k in range(points)})
    shown = []
    for mark in marks:
        row = history[history["trial_epochs"] <= mark].tail(1)
        if len(row):
            shown.append(f"{row[column].iloc[0]:.4g} after {int(row['trial_epochs'].iloc[0])}")
    stopped = int((history[STATE] == PRUNED).sum())
    return (f"hypervolume history{' (normalised)' if normalized else ''}: " + ", ".join(shown)
            + f" trial-epochs ({len(history)} trials ended, {stopped} stopped early)")


def write_front(folder: str | Path, state: ParetoSummary, study_name: str,
                link: Callable[[str], str] | None = None) -> list[Path]:
    """Write :func:`front_files` into ``folder`` (the study's ``pareto/``); returns the paths."""
    return save_files(front_files(state, study_name, link), folder)
