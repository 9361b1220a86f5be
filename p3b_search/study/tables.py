"""The trials and the front as text tables (``search.py status``, ``pareto``, the end of a run).

One ``method`` column (a searched method is not repeated as a parameter), the sampled
parameters by their short names, then the objectives and costs with their units in the
column titles: top-1 in %, MACs/FLOPs per image and parameters in M or G (one prefix per
column), the kept fraction of the dense model's parameters. The dense reference point is the
first row (``dense``), never a trial of the front.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from p3b_search.study.dense import DenseReference
from p3b_search.study.trials_table import (
    DURATION_S,
    EPOCHS_DONE,
    EPOCHS_SHARED,
    FAIL_REASON,
    KEPT_FRACTION,
    MACS,
    METHOD,
    NUMBER,
    PARAM_PREFIX,
    PARAMS,
    STATE,
    TOP1,
    TOP5,
)
from p3b_search.units import COUNTS, column_title, prefix_for

KNOB_PREFIX = "method_config."
#: Cost columns always shown (after the objectives), when the table has them.
COST_COLUMNS = (MACS, PARAMS, KEPT_FRACTION)
TRAILING = (EPOCHS_DONE, EPOCHS_SHARED, DURATION_S, FAIL_REASON)
DENSE_LABEL = "dense"


def _short_names(params: Sequence[str]) -> dict[str, str]:
    """``param.method_config.prune_ratio`` -> ``prune_ratio`` unless two would collide (then
    only ``param.`` goes)."""
    bare = {p: p.removeprefix(PARAM_PREFIX) for p in params}
    short = {p: name.removeprefix(KNOB_PREFIX) for p, name in bare.items()}
    clash = len(set(short.values())) < len(short) or any(s in (METHOD, NUMBER, STATE) for s in short.values())
    return bare if clash else short


def _value_columns(frame: pd.DataFrame, metric_names: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys([*metric_names, *COST_COLUMNS]))
    return [n for n in names if n in frame.columns]


def _decimals(values: pd.Series, scale: float) -> int:
    """Decimals that give the column's largest value four significant digits."""
    top = float(values.abs().max()) / scale if values.notna().any() else 0.0
    return max(0, 3 - int(math.floor(math.log10(top)))) if top > 0 else 0


def _format(name: str, value: float, scale: float, decimals: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if name in COUNTS:
        return f"{value / scale:.{decimals}f}"
    if name == KEPT_FRACTION:
        return f"{value:.3f}"
    if name in (TOP1, TOP5):
        return f"{value:.2f}"
    return f"{value:.4g}"


def display_table(frame: pd.DataFrame, metric_names: Sequence[str], dense: DenseReference | None = None) -> pd.DataFrame:
    """The printable table of ``frame`` (trials or front rows) with the dense row on top."""
    params = [c for c in frame.columns if c.startswith(PARAM_PREFIX) and c != f"{PARAM_PREFIX}{METHOD}"]
    values = _value_columns(frame, metric_names)
    rows = frame.copy()
    if dense is not None:
        reference = {NUMBER: DENSE_LABEL, STATE: "reference", METHOD: DENSE_LABEL,
                     **{n: dense.get(n) for n in values}, KEPT_FRACTION: 1.0}
        rows = pd.concat([pd.DataFrame([reference]), rows.astype({NUMBER: object})], ignore_index=True)
    out = pd.DataFrame(index=rows.index)
    for column in (NUMBER, STATE, METHOD):
        if column in rows.columns:
            out[column] = rows[column].astype(object).where(rows[column].notna(), "")
    for column, short in _short_names(params).items():
        out[short] = [_plain(v) for v in rows[column]]
    for name in values:
        prefix, scale = prefix_for(rows[name].astype(float)) if name in COUNTS else ("", 1.0)
        title = "kept fraction" if name == KEPT_FRACTION else column_title(name, prefix)
        decimals = _decimals(rows[name].astype(float), scale)
        out[title] = [_format(name, v, scale, decimals) for v in rows[name].astype(float)]
    for column in TRAILING:
        if column in rows.columns and _worth_showing(rows[column], column):
            out["duration (s)" if column == DURATION_S else column] = [_plain(v) for v in rows[column]]
    return out


def _worth_showing(values: pd.Series, column: str) -> bool:
    """Whether a trailing column says something: a value in some row (a non-empty
    ``fail_reason``; a trial that restored epochs from a shared prefix)."""
    if column == FAIL_REASON:
        return bool(values.fillna("").astype(bool).any())
    if column == EPOCHS_SHARED:
        return bool(values.fillna(0).astype(bool).any())
    return bool(values.notna().any())


def _plain(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_text(frame: pd.DataFrame, metric_names: Sequence[str], dense: DenseReference | None = None) -> str:
    """:func:`display_table` as aligned text (``(no trials yet)`` when ``frame`` is empty)."""
    if frame.empty:
        return "(no trials yet)"
    with pd.option_context("display.max_colwidth", 60, "display.width", 250):
        return display_table(frame, metric_names, dense).to_string(index=False)
