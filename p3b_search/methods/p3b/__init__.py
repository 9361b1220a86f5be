"""P3B, Pruning by Block Benefit: block benefit, global budget, within-block selection, schedule.

Importing this package registers the ``p3b`` method (see :func:`p3b_search.methods.get_method`).
"""
from p3b_search.methods.p3b.benefit import BenefitStep, BlockBenefit, PatchHead, TokenLayout
from p3b_search.methods.p3b.budget import (
    BudgetAllocation,
    KeepRatioRamp,
    allocate_budget,
    block_importance,
    block_params_target,
    ramp_keep_ratios,
    solve_keep_ratios,
)
from p3b_search.methods.p3b.method import P3B, P3BConfig
from p3b_search.methods.p3b.schedule import PruneSchedule
from p3b_search.methods.p3b.selection import (
    P3B_GROUPS,
    Selection,
    TauSchedule,
    UnitLayout,
    normalised_ranks,
    soft_mask,
    taylor_terms,
    walk_threshold,
)
from p3b_search.methods.p3b.window import WindowedSum

__all__ = [
    "BenefitStep", "BlockBenefit", "BudgetAllocation", "KeepRatioRamp", "P3B", "P3BConfig", "P3B_GROUPS",
    "PatchHead", "PruneSchedule", "Selection", "TauSchedule", "TokenLayout", "UnitLayout", "WindowedSum",
    "allocate_budget", "block_importance", "block_params_target", "normalised_ranks", "ramp_keep_ratios",
    "soft_mask", "solve_keep_ratios", "taylor_terms", "walk_threshold",
]
