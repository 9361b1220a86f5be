"""p3b_search.tracking.figures (allocation tables, keep-ratio heatmaps) and the Pareto plots of
p3b_search.study.front_figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from p3b_search.study.compare import core_benefits
from p3b_search.study.front_figures import pareto_plotly, pareto_png
from p3b_search.tracking.figures import (
    allocation_table,
    benefit_over_training,
    check_allocation_row,
    keep_ratio_by_depth,
    keep_ratio_heatmap,
    write_comparison_figures,
)


def test_allocation_table_orders_columns_and_heatmap_rows_follow_the_network():
    rows = [dict(step=s, layer=layer, kind=k, keep_ratio=1.0 - 0.1 * s * layer, extra_note="x")
            for s in (0, 5) for layer in (1, 0) for k in ("mlp", "attn")]  # no sub_block, no benefits
    table = allocation_table(rows)
    assert list(table.columns) == ["name", "step", "layer", "kind", "keep_ratio", "extra_note"]
    fig = keep_ratio_heatmap(table, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L00.attn", "L00.mlp", "L01.attn", "L01.mlp"]
    grid = ax.images[0].get_array()
    assert grid.shape == (4, 2) and grid[2, 1] == pytest.approx(0.5) and grid[0, 1] == pytest.approx(1.0)


def test_keep_ratio_by_depth_has_a_panel_per_ratio_and_a_line_per_method_and_kind():
    rows = pd.DataFrame([dict(method=m, prune_ratio=r, trial=seed, layer=layer, kind=k, keep_ratio=1 - r)
                         for m in ("p3b", "uniform-magnitude") for r in (0.5, 0.75) for seed in (0, 1)
                         for layer in range(3) for k in ("attn", "mlp")])
    fig = keep_ratio_by_depth(rows, "p3b")
    assert [ax.get_title() for ax in fig.axes] == ["prune ratio 0.5", "prune ratio 0.75"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]  # beside the panels, highlighted method first
    assert labels == ["p3b attn", "p3b mlp", "uniform-magnitude attn", "uniform-magnitude mlp"]


def benefit_rows(trials: int = 2, updates: int = 9, layers: int = 3, patch_slope: float = 0.0) -> pd.DataFrame:
    """P3B-like rows: layer l's cls benefit grows by l per update, its patch benefit by
    ``patch_slope * l`` per update."""
    return pd.DataFrame([dict(trial=t, step=10 * (u + 1), epoch=u // 3, layer=layer, kind=k, keep_ratio=0.5,
                              benefit_cls=0.1 + layer * u, benefit_patch=0.2 + t + patch_slope * layer * u)
                         for t in range(trials) for u in range(updates) for layer in range(layers)
                         for k in ("attn", "mlp")])


def test_benefit_over_training_draws_a_line_per_layer_in_six_panels():
    fig = benefit_over_training(benefit_rows(), "t")
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "attn: ΔΨ cls (block benefit)"
    assert [len(ax.get_lines()) for ax in fig.axes] == [3] * 6
    assert list(fig.axes[0].get_lines()[2].get_ydata()) == pytest.approx([0.1 + 2 * u for u in range(9)])
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == pytest.approx([0.7] * 9)  # patch: mean of trials


def test_comparison_figures_are_written_per_prune_ratio(tmp_path):
    rows = pd.concat([benefit_rows().assign(method="p3b", prune_ratio=r) for r in (0.5, 0.75)]
                     + [benefit_rows().assign(method="uniform-magnitude", prune_ratio=0.5, benefit_cls=None)])
    paths = write_comparison_figures(rows, core_benefits(rows), "p3b", tmp_path / "cmp")
    assert [p.name for p in paths] == ["cmp_depth.png", "cmp_benefit_p0.5.png", "cmp_benefit_p0.75.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert write_comparison_figures(pd.DataFrame(), pd.DataFrame(), "p3b", tmp_path / "none") == []


def test_allocation_row_without_keep_ratio_is_rejected():
    with pytest.raises(ValueError, match="lacks step, keep_ratio"):
        check_allocation_row({"layer": 0, "kind": "mlp"})


@pytest.mark.parametrize("objectives", [
    {"top1": "maximize"},
    {"top1": "maximize", "macs": "minimize"},
    {"top1": "maximize", "macs": "minimize", "latency_ms": "minimize"},
])
def test_pareto_figures_for_one_two_and_three_objectives(objectives):
    points = pd.DataFrame({"number": [0, 1, 2], "top1": [70.0, 80.0, 60.0], "macs": [1.0, 2.0, 3.0],
                           "latency_ms": [1.0, 3.0, 2.0]})
    on_front = np.array([True, True, False])
    hover = [f"trial {n}" for n in points["number"]]
    fig = pareto_plotly(points, objectives, on_front, 1, hover, "front")
    kinds = {trace.type for trace in fig.data}
    assert kinds == ({"splom"} if len(objectives) >= 3 else {"scatter"})
    front_trace = next(trace for trace in fig.data if trace.name == "Pareto front")
    assert list(front_trace.hovertext) == ["trial 0", "trial 1"]
    png = pareto_png(points, objectives, on_front, 1, "front")
    assert png.axes[0].get_ylabel().startswith("top1")
