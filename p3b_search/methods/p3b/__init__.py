"""P3B, Pruning by Block Benefit: the block benefit (``benefit``), the global budget from it
(``budget``) and the method (``method``). The machinery P3B shares with the other gated
methods (within-block selection, schedule, windows, the keep-ratio ramp, the gated base) lives
one level up in :mod:`p3b_search.methods`.

Importing this package registers the ``p3b`` method (see :func:`p3b_search.methods.get_method`);
its knobs, ``P3BConfig``, are in :mod:`p3b_search.method_specs.p3b`.
"""
from p3b_search.methods.p3b.benefit import BenefitStep, BlockBenefit, PatchHead, TokenLayout
from p3b_search.methods.p3b.budget import BudgetAllocation, allocate_budget, block_importance, solve_keep_ratios
from p3b_search.methods.p3b.method import P3B

__all__ = [
    "BenefitStep", "BlockBenefit", "BudgetAllocation", "P3B", "PatchHead", "TokenLayout",
    "allocate_budget", "block_importance", "solve_keep_ratios",
]
