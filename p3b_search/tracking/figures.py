"""Tables and figures the MLflow runs carry: a trial's allocation table and keep-ratio heatmap,
and the method comparison's keep ratio by depth (``search.py compare --out``). The study's
Pareto front figures live in :mod:`p3b_search.study.front_figures`.

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

from p3b_search.method_specs.allocation import ALLOCATION_KEYS, REQUIRED_ALLOCATION_KEYS

_KIND_ORDER = {"attn": 0, "mlp": 1}


def sub_block_name(layer: int, kind: str) -> str:
    """Short label of a sub-block, e.g. ``L03.attn`` (as ``SubBlock.name``)."""
    return f"L{int(layer):02d}.{kind}"


def check_allocation_row(row: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` when ``row`` lacks a required field."""
    missing = [field for field in REQUIRED_ALLOCATION_KEYS if row.get(field) is None]
    if missing:
        raise ValueError(
            f"allocation row lacks {', '.join(missing)}: every row needs {', '.join(REQUIRED_ALLOCATION_KEYS)} "
            f"(got keys {sorted(row)})"
        )


def allocation_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Allocation rows as a table: a ``name`` column (``L03.attn``), then the known fields in
    :data:`ALLOCATION_KEYS` order (absent optional ones left out), then any extra fields."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return table
    table.insert(0, "name", [sub_block_name(layer, kind) for layer, kind in zip(table["layer"], table["kind"])])
    known = [c for c in ALLOCATION_KEYS if c in table.columns]
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
