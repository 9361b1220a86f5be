"""The study's Pareto front as a figure a person reads at a glance: static PNG and interactive
plotly HTML (MLflow artifacts and ``<study>/pareto/``).

What the two-objective figure shows (accuracy up, cost right):

* every finished trial; the front in red (or, when the method varies, a colour and marker
  per method, front points outlined in black) joined by its staircase;
* trials with identical objective values merged into one marker labelled ``×n``;
* the knee (gold star) and, with ``chosen``, the exported trial (blue ring);
* the dense model as a black diamond (``dense_reference``): its accuracy at its cost, or a
  dashed line at its cost when its accuracy is unknown. It is never a point of the front;
* counts (MACs, FLOPs, parameters) in K/M/G per image, every axis titled with its unit.

In the HTML, hovering a point shows its trials' objectives, parameters and MLflow run; a
click opens the run (the link each row carries in ``links``).
With three or more objectives the HTML is a scatter matrix and the PNG shows the first two.
Figures are built on ``matplotlib.figure.Figure`` (no pyplot state): safe in threads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from plotly import graph_objects as go

from p3b_search.study.dense import DenseReference
from p3b_search.study.trials_table import METHOD, NUMBER
from p3b_search.units import COUNTS, column_title, prefix_for, value_text

FRONT_RED, DOMINATED_GREY = "#d62728", "#9e9e9e"
_METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_MPL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")
_PLOTLY_MARKERS = ("circle", "square", "triangle-up", "diamond", "triangle-down", "cross", "x", "triangle-left")
#: Opens the clicked point's MLflow run (its ``customdata``) in a new tab.
CLICK_SCRIPT = ("var plot = document.getElementById('{plot_id}');"
                "plot.on('plotly_click', function (e) {"
                " var url = e.points[0].customdata; if (url) { window.open(url, '_blank'); } });")


def plot_axes(objectives: Mapping[str, str]) -> list[str]:
    """Objectives on (x, y): cost on x and accuracy on y for the usual (accuracy, cost) pair."""
    names = list(objectives)
    return [NUMBER, names[0]] if len(names) == 1 else [names[1], names[0]]


def axis_title(name: str, direction: str | None, prefix: str = "") -> str:
    """``MACs per image (M), lower is better``; ``trial`` for the trial-number axis."""
    if direction is None:
        return "trial" if name == NUMBER else column_title(name, prefix)
    return f"{column_title(name, prefix)}, {'higher' if direction == 'maximize' else 'lower'} is better"


def _scale(points: pd.DataFrame, name: str, dense: DenseReference | None) -> tuple[str, float]:
    """Prefix and divisor of a count column (over the trials and the dense value)."""
    if name not in COUNTS or name not in points.columns:
        return "", 1.0
    values = list(points[name].astype(float)) + ([dense.get(name)] if dense is not None else [])
    return prefix_for(values)


def merge_identical(points: pd.DataFrame, names: Sequence[str]) -> list[list[int]]:
    """Row positions of ``points`` grouped by identical values of ``names``, in first-seen order."""
    keys = [tuple(repr(float(v)) for v in row) for row in points[list(names)].to_numpy()]
    groups: dict[tuple, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def _varying_methods(points: pd.DataFrame) -> list[str]:
    """The methods of ``points`` when more than one occurs (else empty: colour by front)."""
    if METHOD not in points.columns:
        return []
    methods = sorted(points[METHOD].dropna().astype(str).unique())
    return methods if len(methods) > 1 else []


def _group_label(points: pd.DataFrame, group: list[int]) -> str:
    """``#3`` for one trial, ``#3, #5 (×2)`` or ``#3 … (×6)`` for merged ones."""
    if NUMBER not in points.columns:
        return f"×{len(group)}" if len(group) > 1 else ""
    numbers = [f"#{int(points[NUMBER].iloc[i])}" for i in group]
    if len(group) == 1:
        return numbers[0]
    shown = ", ".join(numbers) if len(group) <= 3 else f"{numbers[0]} …"
    return f"{shown} (×{len(group)})"


def _point_label(points: pd.DataFrame, group: list[int], front: bool) -> str:
    """Front points carry their trial numbers; a merged dominated point only its count."""
    if front:
        return _group_label(points, group)
    return f"×{len(group)}" if len(group) > 1 else ""


def _dense_text(dense: DenseReference, y: str) -> str:
    accuracy = dense.get(y)
    return f"dense {value_text(y, accuracy)}" if math.isfinite(accuracy) else "dense cost (accuracy unknown)"


# ----------------------------------------------------------------------------- plotly

def pareto_plotly(points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
                  knee: int | None, hover: Sequence[str], title: str, *, dense: DenseReference | None = None,
                  links: Sequence[str | None] | None = None) -> go.Figure:
    """Interactive front: ``points`` one row per finished trial (objective columns, ``number``,
    optionally ``method``); ``hover``: one HTML string per row; ``links``: per row the URL a
    click opens (its MLflow run), None for none."""
    hover = np.asarray(hover, dtype=object)
    links = list(links) if links is not None else [None] * len(points)
    fig = go.Figure()
    if len(objectives) >= 3:
        _splom(fig, points, objectives, on_front, hover, dense)
    else:
        _scatter_2d(fig, points, objectives, on_front, knee, hover, links, dense)
    fig.update_layout(title=title, template="plotly_white", hoverlabel=dict(align="left"),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def _splom(fig: go.Figure, points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
           hover: np.ndarray, dense: DenseReference | None) -> None:
    groups = [("dominated", ~on_front, dict(color=DOMINATED_GREY, size=8, opacity=0.7)),
              ("Pareto front", on_front, dict(color=FRONT_RED, size=11, line=dict(color="black", width=1)))]
    scales = {d: _scale(points, d, dense) for d in objectives}
    for label, rows, marker in groups:
        fig.add_trace(go.Splom(
            name=label, marker=marker, hovertext=hover[rows], hovertemplate="%{hovertext}<extra></extra>",
            dimensions=[dict(label=axis_title(d, objectives[d], scales[d][0]),
                             values=points.loc[rows, d] / scales[d][1]) for d in objectives],
            diagonal_visible=False,
        ))


def _scatter_2d(fig: go.Figure, points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
                knee: int | None, hover: np.ndarray, links: list[str | None], dense: DenseReference | None) -> None:
    x, y = plot_axes(objectives)
    (x_prefix, x_div), (y_prefix, y_div) = _scale(points, x, dense), _scale(points, y, dense)
    groups = merge_identical(points, list(objectives))
    methods = _varying_methods(points)
    offsets = _label_offsets([g[0] for g in groups if on_front[g[0]]], points[x].to_numpy(float),
                             points[y].to_numpy(float))

    def add(name: str, members: list[list[int]], marker: dict[str, Any]) -> None:
        heads = [g[0] for g in members]
        fig.add_trace(go.Scatter(
            x=points[x].iloc[heads] / x_div, y=points[y].iloc[heads] / y_div, name=name, marker=marker,
            mode="markers+text", text=[_point_label(points, g, bool(on_front[g[0]])) for g in members],
            textposition=["middle left" if offsets.get(i, (0, 0, "left"))[2] == "right" else "top right"
                          for i in heads], customdata=[links[i] for i in heads],
            hovertext=["<br>―――<br>".join(hover[g]) for g in members],
            hovertemplate="%{hovertext}<extra></extra>",
        ))

    if not methods:
        add("dominated", [g for g in groups if not on_front[g[0]]], dict(color=DOMINATED_GREY, size=8, opacity=0.7))
        add("Pareto front", [g for g in groups if on_front[g[0]]],
            dict(color=FRONT_RED, size=11, line=dict(color="black", width=1)))
    else:
        for i, method in enumerate(methods):
            own = [g for g in groups if str(points[METHOD].iloc[g[0]]) == method]
            style = dict(color=_METHOD_COLOURS[i % len(_METHOD_COLOURS)], symbol=_PLOTLY_MARKERS[i % len(_PLOTLY_MARKERS)])
            add(f"{method}: front", [g for g in own if on_front[g[0]]],
                dict(**style, size=12, line=dict(color="black", width=1.5)))
            add(f"{method}: dominated", [g for g in own if not on_front[g[0]]], dict(**style, size=8, opacity=0.5))
    front = points.loc[on_front].sort_values(x)
    if len(objectives) == 2 and len(front) > 1:
        fig.add_trace(go.Scatter(x=front[x] / x_div, y=front[y] / y_div, mode="lines", showlegend=False,
                                 hoverinfo="skip", line=dict(color=FRONT_RED, shape="hv", width=1)))
    if knee is not None:
        fig.add_trace(go.Scatter(
            x=[points[x].iloc[knee] / x_div], y=[points[y].iloc[knee] / y_div], mode="markers", name="knee",
            marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1)),
            hovertext=[hover[knee]], hovertemplate="%{hovertext}<extra></extra>", customdata=[links[knee]],
        ))
    if dense is not None and x in objectives and math.isfinite(dense.get(x)):
        _plotly_dense(fig, dense, x, y, x_div, y_div)
    fig.update_xaxes(title=axis_title(x, objectives.get(x), x_prefix), rangemode="tozero" if x in COUNTS else "normal")
    fig.update_yaxes(title=axis_title(y, objectives[y], y_prefix))


def _plotly_dense(fig: go.Figure, dense: DenseReference, x: str, y: str, x_div: float, y_div: float) -> None:
    text = f"{dense.describe()}<br>reference point, not a trial of the front"
    if math.isfinite(dense.get(y)):
        fig.add_trace(go.Scatter(
            x=[dense.get(x) / x_div], y=[dense.get(y) / y_div], mode="markers+text", name="dense model",
            text=[_dense_text(dense, y)], textposition="bottom left",
            marker=dict(symbol="diamond", size=14, color="black"), hovertext=[text],
            hovertemplate="%{hovertext}<extra></extra>"))
        fig.add_hline(y=dense.get(y) / y_div, line=dict(color="black", dash="dot", width=1))
    else:
        fig.add_vline(x=dense.get(x) / x_div, line=dict(color="black", dash="dash"),
                      annotation_text=_dense_text(dense, y), annotation_position="bottom left")


# ----------------------------------------------------------------------------- PNG

def pareto_png(points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
               knee: int | None, title: str, *, dense: DenseReference | None = None,
               chosen: int | None = None) -> Figure:
    """Static front plot (see the module docstring); ``chosen``: row of the exported trial."""
    x, y = plot_axes(objectives)
    (x_prefix, x_div), (y_prefix, y_div) = _scale(points, x, dense), _scale(points, y, dense)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    xs, ys = points[x].to_numpy(float) / x_div, points[y].to_numpy(float) / y_div
    methods = _varying_methods(points)
    groups = merge_identical(points, list(objectives))
    offsets = _label_offsets([g[0] for g in groups if on_front[g[0]]], xs, ys)
    for group in groups:
        i = group[0]
        front = bool(on_front[i])
        if methods:
            m = methods.index(str(points[METHOD].iloc[i]))
            colour, marker = _METHOD_COLOURS[m % len(_METHOD_COLOURS)], _MPL_MARKERS[m % len(_MPL_MARKERS)]
        else:
            colour, marker = (FRONT_RED if front else DOMINATED_GREY), "o"
        ax.scatter([xs[i]], [ys[i]], c=colour, marker=marker, s=55 if front else 28, alpha=1.0 if front else 0.55,
                   edgecolors="black" if front else "none", linewidths=0.7, zorder=3 if front else 2)
        label = _point_label(points, group, front)
        if label:
            dx, dy, align = offsets.get(i, (5, 4, "left"))
            if i == chosen:  # clear of the ring
                dx, dy = dx + (9 if align == "left" else -9), dy + 7
            ax.annotate(label, (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), ha=align, fontsize=7,
                        zorder=5)
    order = np.argsort(xs[on_front], kind="stable")
    if len(objectives) == 2 and on_front.sum() > 1:
        ax.step(xs[on_front][order], ys[on_front][order], where="post", c=FRONT_RED, lw=1, zorder=1)
    _legend_entries(ax, methods)
    if knee is not None:
        ax.scatter([xs[knee]], [ys[knee]], marker="*", s=260, c="gold", edgecolors="black", linewidths=0.8,
                   label="knee", zorder=4)
    if chosen is not None:
        ax.scatter([xs[chosen]], [ys[chosen]], marker="o", s=420, facecolors="none", edgecolors="#1f4eb4",
                   linewidths=2.2, label=_chosen_label(points, chosen), zorder=6)
    if dense is not None and x in objectives and math.isfinite(dense.get(x)):
        _png_dense(ax, dense, x, y, x_div, y_div)
    if x in COUNTS:
        ax.set_xlim(left=0)
        if dense is not None and dense.get(x) > 0:
            _fraction_axis(ax, dense.get(x) / x_div, x)
    ax.set_xlabel(axis_title(x, objectives.get(x), x_prefix))
    ax.set_ylabel(axis_title(y, objectives[y], y_prefix))
    ax.set_title(title if len(objectives) <= 2 else f"{title} (first two objectives)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def _fraction_axis(ax: Any, dense_x: float, name: str) -> None:
    """A top axis reading the cost as a fraction of the dense model's."""
    top = ax.secondary_xaxis("top", functions=(lambda v: v / dense_x, lambda f: f * dense_x))
    top.set_xlabel(f"fraction of the dense model's {'MACs' if name == 'macs' else name.upper() if name == 'flops' else name}",
                   fontsize=8)
    top.tick_params(labelsize=7)


def _label_offsets(rows: list[int], xs: np.ndarray, ys: np.ndarray) -> dict[int, tuple[int, int, str]]:
    """Label offsets (points) and alignment of the front's points: along the front, a point
    close to the previous one puts its label on the other (left) side, so neighbouring labels
    do not overlap."""
    offsets: dict[int, tuple[int, int, str]] = {}
    if not rows:
        return offsets
    span_x = float(np.ptp(xs)) or 1.0
    span_y = float(np.ptp(ys)) or 1.0
    previous, side = None, 0
    for i in sorted(rows, key=lambda r: (xs[r], ys[r])):
        close = previous is not None and (abs(xs[i] - xs[previous]) / span_x < 0.06
                                          and abs(ys[i] - ys[previous]) / span_y < 0.06)
        side = 1 - side if close else 0
        offsets[i] = (5, 4, "left") if side == 0 else (-7, -3, "right")
        previous = i
    return offsets


def _chosen_label(points: pd.DataFrame, chosen: int) -> str:
    return f"exported: trial {int(points[NUMBER].iloc[chosen])}" if NUMBER in points.columns else "exported"


def _legend_entries(ax: Any, methods: list[str]) -> None:
    """Legend handles for the point styles (drawn once, not per point)."""
    if methods:
        for m, method in enumerate(methods):
            ax.scatter([], [], c=_METHOD_COLOURS[m % len(_METHOD_COLOURS)], marker=_MPL_MARKERS[m % len(_MPL_MARKERS)],
                       s=40, label=method)
        ax.scatter([], [], c="white", edgecolors="black", s=40, label="Pareto front (black outline)")
        return
    ax.scatter([], [], c=DOMINATED_GREY, s=28, label="dominated")
    ax.scatter([], [], c=FRONT_RED, s=55, edgecolors="black", linewidths=0.7, label="Pareto front")


def _png_dense(ax: Any, dense: DenseReference, x: str, y: str, x_div: float, y_div: float) -> None:
    dx = dense.get(x) / x_div
    if math.isfinite(dense.get(y)):
        dy = dense.get(y) / y_div
        ax.scatter([dx], [dy], marker="D", s=70, c="black", label=f"dense model ({dense.source})", zorder=4)
        ax.annotate(_dense_text(dense, y), (dx, dy), textcoords="offset points", xytext=(-6, -12), ha="right",
                    fontsize=8)
        ax.axhline(dy, color="black", lw=0.6, ls=":", zorder=0)
    else:
        ax.axvline(dx, color="black", lw=1.0, ls="--", label="dense cost (accuracy unknown)")


# ----------------------------------------------------------------------------- files

def save_files(files: Mapping[str, Any], folder: str | Path, dpi: int = 110) -> list[Path]:
    """Write ``{file name: DataFrame | matplotlib Figure | plotly Figure}`` into ``folder``
    (Parquet, image, self-contained HTML with a click-to-open-run handler); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = folder / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(path, index=False)
        elif hasattr(content, "savefig"):
            content.savefig(path, dpi=dpi)
        else:  # plotly: plotly.js inlined, the MLflow UI's sandboxed iframe has no network
            content.write_html(path, include_plotlyjs=True, full_html=True, post_script=CLICK_SCRIPT)
        paths.append(path)
    return paths
