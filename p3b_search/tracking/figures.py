"""Tables and figures the MLflow runs carry: a trial's allocation table and keep-ratio heatmap,
and the study's Pareto front (interactive plotly HTML and a static PNG); and the method
comparison's keep ratio by depth (``search.py compare --out``).

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so they are safe
in worker threads and headless processes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from plotly import graph_objects as go

#: Allocation row fields in table order (see ``p3b_search.methods``); benefits and targets are
#: optional (baselines without block benefits leave them out).
ALLOCATION_COLUMNS = (
    "step", "epoch", "layer", "kind", "sub_block", "benefit_cls", "benefit_patch", "importance",
    "keep_ratio_target", "keep_ratio", "kept_params", "kept_macs",
)
REQUIRED_ALLOCATION_FIELDS = ("step", "layer", "kind", "keep_ratio")
_KIND_ORDER = {"attn": 0, "mlp": 1}


def sub_block_name(layer: int, kind: str) -> str:
    """Short label of a sub-block, e.g. ``L03.attn`` (as ``SubBlock.name``)."""
    return f"L{int(layer):02d}.{kind}"


def check_allocation_row(row: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` when ``row`` lacks a required field."""
    missing = [field for field in REQUIRED_ALLOCATION_FIELDS if row.get(field) is None]
    if missing:
        raise ValueError(
            f"allocation row lacks {', '.join(missing)}: every row needs {', '.join(REQUIRED_ALLOCATION_FIELDS)} "
            f"(got keys {sorted(row)})"
        )


def allocation_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Allocation rows as a table: a ``name`` column (``L03.attn``), then the known fields in
    :data:`ALLOCATION_COLUMNS` order (absent optional ones left out), then any extra fields."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return table
    table.insert(0, "name", [sub_block_name(layer, kind) for layer, kind in zip(table["layer"], table["kind"])])
    known = [c for c in ALLOCATION_COLUMNS if c in table.columns]
    extra = [c for c in table.columns if c not in known and c != "name"]
    return table[["name", *known, *extra]]


def _sub_block_order(table: pd.DataFrame) -> list[str]:
    """Sub-block names in network order (by ``sub_block`` index when present)."""
    keys = table.drop_duplicates("name").copy()
    if "sub_block" in keys.columns and keys["sub_block"].notna().all():
        keys = keys.sort_values("sub_block")
    else:
        keys = keys.assign(_kind=keys["kind"].map(_KIND_ORDER).fillna(2)).sort_values(["layer", "_kind"])
    return list(keys["name"])


def keep_ratio_heatmap(table: pd.DataFrame, title: str) -> Figure:
    """Keep ratio (colour, 0-1) per sub-block (rows, network order) per mask update (columns, by step)."""
    grid = table.pivot_table(index="name", columns="step", values="keep_ratio", aggfunc="last")
    grid = grid.reindex(_sub_block_order(table))
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(min(14.0, 3.0 + 0.25 * n_cols), 1.6 + 0.2 * n_rows), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                      interpolation="nearest")
    ax.set_yticks(range(n_rows), grid.index, fontsize=7)
    shown = np.unique(np.linspace(0, n_cols - 1, num=min(n_cols, 12)).round().astype(int))
    ax.set_xticks(shown, [str(grid.columns[i]) for i in shown], fontsize=7)
    ax.set_xlabel("mask update (training step)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="keep ratio")
    return fig


def _axis_label(name: str, direction: str) -> str:
    return f"{name} ({'higher' if direction == 'maximize' else 'lower'} is better)"


def _plot_axes(objectives: Mapping[str, str]) -> list[str]:
    """Objectives on (x, y): cost on x and accuracy on y for the usual (accuracy, cost) pair."""
    names = list(objectives)
    return ["number", names[0]] if len(names) == 1 else [names[1], names[0]]


def pareto_plotly(points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
                  knee: int | None, hover: Sequence[str], title: str) -> go.Figure:
    """All finished trials (grey), the front (red, joined for two objectives), the knee (star).

    ``points`` holds one row per trial with the objective columns (and ``number`` for a
    single objective); ``hover`` is one HTML string per row shown on mouse-over.
    """
    hover = np.asarray(hover, dtype=object)
    groups = [("dominated", ~on_front, dict(color="#9e9e9e", size=8, opacity=0.7)),
              ("Pareto front", on_front, dict(color="#d62728", size=11, line=dict(color="black", width=1)))]
    fig = go.Figure()
    if len(objectives) >= 3:
        dims = list(objectives)
        for label, rows, marker in groups:
            fig.add_trace(go.Splom(
                name=label, marker=marker, hovertext=hover[rows], hovertemplate="%{hovertext}<extra></extra>",
                dimensions=[dict(label=_axis_label(d, objectives[d]), values=points.loc[rows, d]) for d in dims],
                diagonal_visible=False,
            ))
    else:
        x, y = _plot_axes(objectives)
        for label, rows, marker in groups:
            fig.add_trace(go.Scatter(
                x=points.loc[rows, x], y=points.loc[rows, y], mode="markers", name=label, marker=marker,
                hovertext=hover[rows], hovertemplate="%{hovertext}<extra></extra>",
            ))
        front = points.loc[on_front].sort_values(x)
        if len(objectives) == 2 and len(front) > 1:
            fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", showlegend=False, hoverinfo="skip",
                                     line=dict(color="#d62728", shape="hv", width=1)))
        if knee is not None:
            fig.add_trace(go.Scatter(
                x=[points[x].iloc[knee]], y=[points[y].iloc[knee]], mode="markers", name="knee",
                marker=dict(symbol="star", size=18, color="gold", line=dict(color="black", width=1)),
                hovertext=[hover[knee]], hovertemplate="%{hovertext}<extra></extra>",
            ))
        fig.update_xaxes(title=_axis_label(x, objectives[x]) if x in objectives else "trial")
        fig.update_yaxes(title=_axis_label(y, objectives[y]))
    fig.update_layout(title=title, template="plotly_white", hoverlabel=dict(align="left"), legend=dict(
        orientation="h", y=-0.15))
    return fig


def pareto_png(points: pd.DataFrame, objectives: Mapping[str, str], on_front: np.ndarray,
               knee: int | None, title: str) -> Figure:
    """Static front plot; with three or more objectives it shows the first two (front in all)."""
    x, y = _plot_axes(objectives)
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(points.loc[~on_front, x], points.loc[~on_front, y], c="#9e9e9e", s=25, label="dominated")
    front = points.loc[on_front].sort_values(x)
    ax.scatter(front[x], front[y], c="#d62728", s=45, edgecolors="black", linewidths=0.6, label="Pareto front")
    if len(objectives) == 2 and len(front) > 1:
        ax.step(front[x], front[y], where="post", c="#d62728", lw=1)
    if "number" in front.columns:
        for _, row in front.iterrows():
            ax.annotate(f"#{int(row['number'])}", (row[x], row[y]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    if knee is not None:
        ax.scatter([points[x].iloc[knee]], [points[y].iloc[knee]], marker="*", s=260, c="gold",
                   edgecolors="black", linewidths=0.8, label="knee", zorder=3)
    ax.set_xlabel(_axis_label(x, objectives[x]) if x in objectives else "trial")
    ax.set_ylabel(_axis_label(y, objectives[y]))
    ax.set_title(title if len(objectives) <= 2 else f"{title} (first two objectives)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def keep_ratio_by_depth(allocations: pd.DataFrame, highlight: str) -> Figure:
    """Keep ratio per sub-block vs layer at the end of pruning, one panel per prune ratio.

    ``allocations``: the last mask update's rows of each trial, with ``method`` and
    ``prune_ratio``; one line per method and sub-block kind (a colour per method, dashed
    squares for attention, solid circles for MLP), mean ± std over the trials (seeds). Lines
    of method ``highlight`` are drawn opaque and thicker, the others faded; the legend sits
    beside the panels."""
    from matplotlib import colormaps

    ratios = sorted(allocations["prune_ratio"].unique())
    methods = sorted(allocations["method"].unique(), key=lambda m: (m != highlight, m))
    colours = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    fig = Figure(figsize=(5.5 * len(ratios) + 2.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(ratios), sharey=True, squeeze=False)[0]
    for ax, ratio in zip(axes, ratios):
        rows = allocations[allocations["prune_ratio"] == ratio]
        for method in methods:
            for kind in ("attn", "mlp"):
                group = rows[(rows["method"] == method) & (rows["kind"] == kind)]
                if group.empty:
                    continue
                stats = group.groupby("layer")["keep_ratio"].agg(["mean", "std"]).reset_index()
                ax.errorbar(stats["layer"] + (0.08 if kind == "mlp" else -0.08), stats["mean"],
                            yerr=stats["std"].fillna(0), fmt="-o" if kind == "mlp" else "--s", capsize=2,
                            color=colours[method], label=f"{method} {kind}", markersize=4,
                            lw=2.2 if method == highlight else 1.0, alpha=1.0 if method == highlight else 0.55)
        ax.set_title(f"prune ratio {ratio:g}")
        ax.set_xlabel("layer (depth)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("keep ratio at the end of pruning")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig


def _depth_colours(layers: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    top = max(max(layers), 1)
    return {layer: colormaps["viridis"](layer / top) for layer in layers}


def benefit_over_training(allocations: pd.DataFrame, title: str) -> Figure:
    """P3B's block performance over training: ΔΨ_cls and ΔΨ_patch of each sub-block at every mask
    update (the mean over its window), and its keep ratio, vs the prune-stage step (columns);
    attention and MLP sub-blocks in rows; one line per layer, coloured by depth.

    ``allocations``: every mask update's rows of one or more trials (seeds) with
    ``benefit_cls`` and ``benefit_patch``; each line is the mean over the trials."""
    rows = allocations.dropna(subset=["benefit_cls", "benefit_patch"])
    layers = sorted(int(layer) for layer in rows["layer"].unique())
    colours = _depth_colours(layers)
    panels = (("benefit_cls", "ΔΨ cls (block benefit)"), ("benefit_patch", "ΔΨ patch (block benefit)"),
              ("keep_ratio", "keep ratio"))
    fig = Figure(figsize=(14, 6.5), layout="constrained")
    axes = fig.subplots(2, len(panels), sharex=True, squeeze=False)
    for r, kind in enumerate(("attn", "mlp")):
        for c, (column, label) in enumerate(panels):
            ax = axes[r][c]
            for layer in layers:
                series = rows[(rows["kind"] == kind) & (rows["layer"] == layer)].groupby("step")[column].mean()
                ax.plot(series.index, series.to_numpy(), color=colours[layer], label=f"layer {layer}", lw=1.5)
            ax.set_title(f"{kind}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("prune-stage step (micro-batch) of the mask update")
    axes[0][-1].legend(fontsize=7, loc="best", title="depth")
    fig.suptitle(title, fontsize=11)
    return fig


def write_comparison_figures(allocations: pd.DataFrame, benefits: pd.DataFrame, core_method: str,
                             prefix: Path) -> list[Path]:
    """The method comparison's figures (``search.py compare --out PREFIX``): ``PREFIX_depth.png``,
    keep ratio per layer at each trial's last mask update, and ``PREFIX_benefit_p<ratio>.png``,
    ``core_method``'s block benefit and keep ratio over the prune stage, per prune ratio.
    ``allocations``: every allocation row with ``trial``, ``method`` and ``prune_ratio``;
    ``benefits``: the core method's rows that carry block benefits (may be empty). Returns the
    paths written."""
    if allocations.empty:
        return []
    final = allocations[allocations["step"] == allocations.groupby("trial")["step"].transform("max")]
    paths = [prefix.with_name(f"{prefix.name}_depth.png")]
    keep_ratio_by_depth(final, core_method).savefig(paths[0], dpi=130)
    for ratio, rows in benefits.groupby("prune_ratio") if not benefits.empty else ():
        paths.append(prefix.with_name(f"{prefix.name}_benefit_p{ratio:g}.png"))
        title = (f"{core_method} at prune ratio {ratio:g}: block benefit and keep ratio over the prune stage "
                 f"(mean of {rows['trial'].nunique()} trials)")
        benefit_over_training(rows, title).savefig(paths[-1], dpi=110)
    return paths
