"""The exported-latency table (``benchmarks/export_latency.py``): the shared residual row matches
the per-block row's MACs and is what torch counts, the spread and the paired-ratio interval give
the known answers on hand-made latencies, and the goals read them right."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from benchmarks.export_latency import (
    DENSE,
    MATCH_TOLERANCE,
    PER_BLOCK,
    SHARED,
    TORCH_PRUNING,
    Case,
    case_rows,
    make_case,
    matched_shared,
    paired_ratio,
    spread,
)
from benchmarks.shrink_latency import masks_for_prune_ratio, uniform_masks, uniform_residual
from p3b_search.cost import model_cost, torch_macs
from p3b_search.surgery import ArchSpec, get_adapter, shrink_model

NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 10}


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, **KWARGS).eval()


@pytest.mark.parametrize("prune_ratio", [0.5, 0.75])
def test_shared_row_matches_the_per_block_macs_and_torch_counts_them(dense, prune_ratio):
    per_block = shrink_model(dense, masks_for_prune_ratio(dense, prune_ratio))
    target = model_cost(per_block).macs
    shared, label = matched_shared(dense, target)
    macs = model_cost(shared).macs
    assert abs(macs / target - 1) < MATCH_TOLERANCE
    assert torch_macs(shared) == macs
    kept = len(shared.kept_residual[0])
    assert 0 < kept < KWARGS["embed_dim"] and label.startswith(f"shared (C {kept}/64")
    assert ArchSpec.from_model(shared, NAME, KWARGS).residual_mode == "shared"


def test_a_shared_export_is_its_own_shared_row(dense):
    pytest.importorskip("torch_pruning")  # the [bench] extra
    adapter = get_adapter(dense)
    cut = shrink_model(dense, uniform_masks(adapter, 0.6, shared=True), uniform_residual(adapter, 0.6)).eval()
    case = make_case("knee", dense, cut, ArchSpec.from_model(cut, NAME, KWARGS), round_to=[], export=True)
    assert list(case.models) == [DENSE, SHARED, TORCH_PRUNING]
    assert case.models[SHARED] == ("shared (as cut)", cut)


def test_spread_is_the_median_and_quartiles():
    s = spread([9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    assert (s.median, s.p25, s.p75) == (5.0, 3.0, 7.0)


def test_paired_ratio_interval_is_the_order_statistics_of_the_median():
    rng = np.random.default_rng(0)
    dense = rng.uniform(10.0, 20.0, 30)  # drift hits both models of a repeat alike
    ratios = rng.permutation(0.50 + 0.01 * np.arange(30))  # 0.50 ... 0.79
    ratio = paired_ratio(dense * ratios, dense)
    # 30 repeats: the 95 % interval of the median runs from the 10th to the 21st smallest ratio
    assert ratio.median == pytest.approx(0.645) and ratio.low == pytest.approx(0.59) and ratio.high == pytest.approx(0.70)
    few = paired_ratio([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert few.median == 1.0 and math.isnan(few.low) and few.text() == "1.000 [n/a]"


def test_goals_read_the_paired_ratios():
    """Shared at 0.6 of dense's time for 0.5 of its MACs (1.2x), Torch-Pruning 5 % faster than shared in
    every repeat but one; the export (as cut) at 0.9 of dense with every repeat below 1."""
    repeats = 30
    dense = np.linspace(10.0, 13.0, repeats)
    shared = 0.6 * dense
    tp = shared / 1.05
    tp[0] = shared[0] * 1.1
    runs = {DENSE: list(dense), PER_BLOCK: list(0.9 * dense), SHARED: list(shared), TORCH_PRUNING: list(tp)}
    case = Case("knee", {DENSE: (DENSE, None), PER_BLOCK: ("per-block (as cut)", None), SHARED: ("shared", None),
                         TORCH_PRUNING: ("Torch-Pruning", None)}, export=True)
    costs = {DENSE: (1e9, 1000), PER_BLOCK: (5e8, 500), SHARED: (5e8, 400), TORCH_PRUNING: (5e8, 450)}

    rows, goals = case_rows(case, runs, costs, batch=64)
    assert rows[2] == ("| knee | shared | 0.500 | 0.400 | 64 | 6.90 | 6.45-7.35 | 0.600 [0.600, 0.600] | **1.20** |")
    assert goals == ["| knee | 64 | shared / Torch-Pruning <= 1.0 | 1.050 [1.050, 1.050] | not met |",
                     "| knee | 64 | shared latency / MACs <= 1.2 | 1.200 [1.200, 1.200] | **met** |"]
    _, goals = case_rows(case, runs, costs, batch=1)
    assert goals[-1] == "| knee | 1 | per-block (as cut) / dense < 1 | 0.900 [0.900, 0.900] | **met** |"
