"""From block benefit to a global parameter budget: keep ratios per sub-block (P3B, step 2).

The steps (scale, soft clamp, importance per kept parameter, EMA, combination, the solve for
kappa) are specified in docs/methods.md, section 1.2; :func:`allocate_budget` runs them on the
cls and patch benefits (shape (2L,) each). What this module decides beyond it:

* Silent sources (``max(D) <= 0``): dividing by ``max(|D|)`` keeps the blocks' order (all
  ``u <= 0``); ``u = 0`` when every ``D`` is exactly 0. The first window has no ``I_prev`` and
  is used as is.
* The sub-blocks' target is :func:`p3b_search.methods.target.block_params_target` per block
  (with a shared residual: what its width leaves, :class:`p3b_search.methods.gated.BlockBudget`);
  kappa is clamped to [0, 1] by fixing saturated sub-blocks and solving again
  (:func:`solve_keep_ratios`). The ramp from dense to the target is
  :class:`p3b_search.methods.ramp.KeepRatioRamp`, shared by every gated method.
* Everything here is float64 and works on any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOFT_CLAMP_SLOPE = 1.4
KEPT_PARAMS_EPS = 1e-6
#: The reference fails after 20 re-solve rounds; each round fixes at least one more sub-block,
#: so we allow max(20, number of sub-blocks) rounds, which always converges.
MIN_SOLVE_ROUNDS = 20


def block_importance(benefit: torch.Tensor, kept_params: torch.Tensor, scale: float) -> torch.Tensor:
    """Steps 1-3: window-mean benefit ``D`` and kept parameters ``R`` (both (2L,)) -> importance
    per kept parameter, normalised to mean 1."""
    benefit = benefit.to(torch.float64)
    top = benefit.max()
    if top <= 0:
        top = benefit.abs().max()
    u = scale * benefit / top if top > 0 else torch.zeros_like(benefit)
    soft = F.softplus(SOFT_CLAMP_SLOPE * u) - F.softplus(SOFT_CLAMP_SLOPE * u - scale)
    importance = soft / (kept_params.to(torch.float64) + KEPT_PARAMS_EPS)
    return importance / importance.mean()


def solve_keep_ratios(importance: torch.Tensor, dense_params: torch.Tensor, target_params: float) -> torch.Tensor:
    """Step 6: ``kappa = clamp(s * importance, 0, 1)`` with ``sum(kappa * W) = target_params``.

    ``importance`` (2L,) >= 0, ``dense_params`` W (2L,). Sub-blocks whose ``s * I`` reaches 1
    are fixed dense (0: fixed off) and ``s`` is re-solved for the rest until none crosses.
    """
    importance = importance.to(torch.float64)
    weights = dense_params.to(torch.float64)
    if target_params >= float(weights.sum()):
        return torch.ones_like(importance)
    if target_params <= 0:
        return torch.zeros_like(importance)
    dense = torch.zeros_like(importance, dtype=torch.bool)
    off = importance <= 0
    kappa = torch.where(off, 0.0, 1.0).to(importance)
    for _ in range(max(MIN_SOLVE_ROUNDS, importance.numel())):
        free = ~(dense | off)
        if not bool(free.any()):
            break
        remaining = target_params - float(weights[dense].sum())
        s = remaining / float((importance[free] * weights[free]).sum())
        kappa = torch.where(dense, 1.0, torch.where(off, 0.0, s * importance))
        crossing = free & ((kappa >= 1.0) | (kappa <= 0.0))
        if not bool(crossing.any()):
            break
        dense |= free & (kappa >= 1.0)
        off |= free & (kappa <= 0.0)
    return kappa.clamp(0.0, 1.0)


@dataclass(frozen=True)
class BudgetAllocation:
    """One budget decision: ``keep_ratios`` kappa (2L,) and the importances it came from
    (``importance_cls``/``importance_patch`` after the EMA, ``importance`` their alpha-mix)."""

    keep_ratios: torch.Tensor
    importance: torch.Tensor
    importance_cls: torch.Tensor
    importance_patch: torch.Tensor


def allocate_budget(
    benefit_cls: torch.Tensor,
    benefit_patch: torch.Tensor,
    kept_params: torch.Tensor,
    dense_params: torch.Tensor,
    target_params: float,
    *,
    alpha: float = 0.5,
    gamma: float = 0.2,
    scale: float = 10.0,
    previous: BudgetAllocation | None = None,
) -> BudgetAllocation:
    """The six numbered steps of the budget solve (this module's docstring) for one mask update.

    ``benefit_*``: window-mean Delta-Psi per sub-block (2L,); ``kept_params`` R (2L,);
    ``dense_params`` W (2L,); ``target_params``: what the sub-blocks keep together
    (:func:`~p3b_search.methods.target.block_params_target` per block);
    ``previous``: the allocation of the previous update (its EMA'd importances), or None.
    """
    cls_now = block_importance(benefit_cls, kept_params, scale)
    patch_now = block_importance(benefit_patch, kept_params, scale)
    if previous is not None:
        cls_now = gamma * cls_now + (1 - gamma) * previous.importance_cls.to(cls_now)
        patch_now = gamma * patch_now + (1 - gamma) * previous.importance_patch.to(patch_now)
    importance = alpha * cls_now + (1 - alpha) * patch_now
    return BudgetAllocation(solve_keep_ratios(importance, dense_params, target_params), importance, cls_now, patch_now)
