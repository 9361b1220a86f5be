"""Block benefit -> global budget (docs/methods.md, section 1.2): importance, EMA, alpha mix, solver, ramp."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p3b_search.methods.p3b.budget import BudgetAllocation, allocate_budget, block_importance, solve_keep_ratios
from p3b_search.methods.ramp import KeepRatioRamp
from p3b_search.methods.target import block_params_target


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_importance_follows_steps_one_to_three():
    benefit = torch.tensor([1.0, 0.5, -1.0])
    kept = torch.tensor([100.0, 50.0, 100.0])
    soft = [softplus(1.4 * u) - softplus(1.4 * u - 10) for u in (10.0, 5.0, -10.0)]
    per_param = torch.tensor([soft[0] / (100 + 1e-6), soft[1] / (50 + 1e-6), soft[2] / (100 + 1e-6)],
                             dtype=torch.float64)
    torch.testing.assert_close(block_importance(benefit, kept, scale=10.0), per_param / per_param.mean())


def test_importance_keeps_the_order_when_no_block_helps_and_is_uniform_when_all_are_zero():
    kept = torch.ones(3)
    hurting = block_importance(torch.tensor([-0.1, -2.0, -0.5]), kept, scale=10.0)
    assert hurting[0] > hurting[2] > hurting[1] > 0
    torch.testing.assert_close(block_importance(torch.zeros(3), kept, 10.0), torch.ones(3, dtype=torch.float64))


def test_squeezed_blocks_get_more_importance_per_kept_parameter():
    imp = block_importance(torch.tensor([1.0, 1.0]), torch.tensor([100.0, 25.0]), scale=10.0)
    torch.testing.assert_close(imp[1] / imp[0], torch.tensor(4.0, dtype=torch.float64))


def test_solver_fixes_saturating_blocks_dense_and_re_solves():
    kappa = solve_keep_ratios(torch.tensor([1.0, 1.0, 4.0]), torch.tensor([100.0, 100.0, 100.0]), 200.0)
    torch.testing.assert_close(kappa, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))


def test_solver_edges_dense_and_empty_targets():
    w = torch.tensor([10.0, 20.0])
    assert solve_keep_ratios(torch.ones(2), w, 30.0).tolist() == [1.0, 1.0]
    assert solve_keep_ratios(torch.ones(2), w, 0.0).tolist() == [0.0, 0.0]


def test_target_counts_never_pruned_parameters_unless_block_params_only():
    w = torch.tensor([300.0, 500.0])
    assert block_params_target(w, 200.0, 0.5) == pytest.approx(0.5 * 1000 - 200)
    assert block_params_target(w, 0.0, 0.5) == pytest.approx(400.0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 24),
    seed=st.integers(0, 10_000),
    prune_ratio=st.floats(0.05, 0.9),
    saturating=st.integers(0, 4),
    block_params_only=st.booleans(),
)
def test_allocation_meets_the_parameter_target(n, seed, prune_ratio, saturating, block_params_only):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randint(1_000, 100_000, (n,), generator=gen).double()
    kept = dense * torch.rand(n, generator=gen, dtype=torch.float64).clamp(min=0.05)
    benefit_cls = torch.randn(n, generator=gen, dtype=torch.float64)
    benefit_patch = torch.randn(n, generator=gen, dtype=torch.float64)
    benefit_cls[:saturating] = 50.0  # dominant blocks: they saturate at kappa = 1
    kept[:saturating] = 10.0
    never_pruned = 0.0 if block_params_only else float(dense.sum()) * 0.1
    assume(block_params_target(dense, never_pruned, prune_ratio) > 0)
    alloc = allocate_budget(benefit_cls, benefit_patch, kept, dense,
                            block_params_target(dense, never_pruned, prune_ratio))
    kappa = alloc.keep_ratios
    assert bool(((kappa >= 0) & (kappa <= 1)).all())
    total = float((kappa * dense).sum()) + never_pruned
    target = (1 - prune_ratio) * (float(dense.sum()) + never_pruned)
    assert total == pytest.approx(target, rel=5e-3)


def test_ema_runs_separately_for_cls_and_patch_and_alpha_mixes_them():
    dense = torch.full((3,), 1000.0, dtype=torch.float64)
    kept = dense.clone()
    first = allocate_budget(torch.tensor([1.0, 0.2, 0.1]), torch.tensor([0.1, 0.2, 1.0]), kept, dense, 500.0 * 3,
                            alpha=0.25, gamma=0.2)
    assert isinstance(first, BudgetAllocation)
    torch.testing.assert_close(first.importance, 0.25 * first.importance_cls + 0.75 * first.importance_patch)
    new_cls = block_importance(torch.tensor([0.1, 1.0, 0.1]), kept, 10.0)
    new_patch = block_importance(torch.tensor([1.0, 0.1, 0.1]), kept, 10.0)
    second = allocate_budget(torch.tensor([0.1, 1.0, 0.1]), torch.tensor([1.0, 0.1, 0.1]), kept, dense, 500.0 * 3,
                             alpha=0.25, gamma=0.2, previous=first)
    torch.testing.assert_close(second.importance_cls, 0.2 * new_cls + 0.8 * first.importance_cls)
    torch.testing.assert_close(second.importance_patch, 0.2 * new_patch + 0.8 * first.importance_patch)


def test_more_beneficial_blocks_keep_more():
    dense = torch.full((4,), 1000.0, dtype=torch.float64)
    alloc = allocate_budget(torch.tensor([0.1, 0.4, 0.8, 1.0]), torch.tensor([0.1, 0.4, 0.8, 1.0]),
                            dense, dense, 0.5 * 4000.0)
    assert alloc.keep_ratios.tolist() == sorted(alloc.keep_ratios.tolist())


def test_ramp_values_at_chosen_steps():
    ramp = KeepRatioRamp(start_step=10, sparse_step=20)
    kappa = torch.tensor([0.2, 1.0, 0.0], dtype=torch.float64)
    assert ramp.progress(5) == 0.0 and ramp.progress(9) == 0.0
    assert ramp.progress(10) == pytest.approx(0.1)
    assert ramp.progress(14) == pytest.approx(0.5)
    assert ramp.progress(19) == 1.0 and ramp.progress(100) == 1.0
    torch.testing.assert_close(ramp(kappa, 14), torch.tensor([0.6, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(ramp(kappa, 9), torch.ones(3, dtype=torch.float64))
    assert KeepRatioRamp(start_step=10, sparse_step=10).progress(9) == 1.0
