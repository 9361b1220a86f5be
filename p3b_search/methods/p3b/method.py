"""P3B, Pruning by Block Benefit (also published as Depth Aware Pruning): the method as a
set of training hooks.

During the prune stage, on the dense model:

* every forward pass trains per-sub-block auxiliary heads on the detached residual stream and
  measures each sub-block's benefit Delta Psi (:mod:`.benefit`), summed from the prune start;
* every optimizer step adds squared Taylor scores of the gates to the window (:mod:`.selection`);
* every N micro-batches from the start epoch on, the window's mean benefit becomes keep ratios
  kappa_j (:func:`~.budget.allocate_budget`, ramped from dense to the target by the sparse
  epoch) and, inside each sub-block, soft masks at the cost-aware threshold of the
  rank-normalised Taylor scores. Masks are rebuilt from scratch each time, so units come back
  when a block's budget grows;
* at the finalize epoch the last two windows are combined, the masks made hard and frozen.

With ``residual: shared`` the residual width is fixed first at each update (one walk over all
units, :meth:`~p3b_search.methods.gated.GatedPruning._block_budget`) and the block-benefit
budget distributes what it leaves over the sub-blocks' inner units (head dims, hidden units);
the auxiliary heads then read the stream as the model does, pruned channels zeroed.

``finalize`` removes gates and heads and returns the physically shrunk model. The auxiliary
heads live on the model as ``model.p3b_aux_heads`` during the prune stage (so they move with
it, are saved in its checkpoints and sit in their own optimizer group, lr ``aux_head_lr``
unscaled) and are gone after ``finalize``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from p3b_search.method_specs.p3b import P3B_SPEC, P3BConfig
from p3b_search.methods.base import register_method
from p3b_search.methods.gated import TaylorGatedPruning, per_gate_ranks
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.p3b.benefit import BlockBenefit
from p3b_search.methods.p3b.budget import BudgetAllocation, allocate_budget
from p3b_search.methods.ramp import ramp_keep_ratios
from p3b_search.methods.window import WindowedSum

AUX_HEADS_ATTR = "p3b_aux_heads"
#: devices with torch's fused AdamW kernel for float32 parameters (torch >= 2.4)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


@register_method
class P3B(TaylorGatedPruning):
    """Pruning by Block Benefit (see module docstring)."""

    spec = P3B_SPEC
    config: P3BConfig

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        num_sub_blocks = len(self.adapter.sub_blocks)
        self.allocation: BudgetAllocation | None = None
        self.benefit: BlockBenefit | None = None
        if self.config.keep_ratios is not None:
            if len(self.config.keep_ratios) != num_sub_blocks:
                raise ValueError(
                    f"keep_ratios has {len(self.config.keep_ratios)} values but the model has {num_sub_blocks} "
                    "sub-blocks (attention and MLP of each layer): give one per sub-block"
                )
            return
        device = next(model.parameters()).device
        stream_gate = (lambda stage: self.gates.residual[stage].detach()) if self.shared else None
        self.benefit = BlockBenefit(self.adapter, self.num_classes, stream_gate).to(device)
        model.add_module(AUX_HEADS_ATTR, self.benefit)
        self.benefit.attach(model)
        self.benefit_window = WindowedSum((2, num_sub_blocks), device)

    def windows(self) -> list[WindowedSum]:
        return super().windows() + ([self.benefit_window] if self.benefit is not None else [])

    def prefix_knobs(self) -> dict[str, Any]:
        """The auxiliary heads train from the first micro-batch on (every ``aux_every``-th,
        counted from the start step): their learning rate, batch share, period and phase shape
        the epochs before the start; without heads (hand-set ``keep_ratios``) nothing does."""
        if self.config.keep_ratios is not None:
            return {"auxiliary_heads": False}
        period = self.config.aux_period
        return {"auxiliary_heads": True, "aux_head_lr": self.config.aux_head_lr,
                "aux_batch_fraction": self.config.aux_batch_fraction, "aux_every": period,
                "aux_phase": self.schedule.start_step % period}

    def param_groups(self) -> list[dict[str, Any]]:
        """The auxiliary heads at ``aux_head_lr`` (no weight decay on norms and biases).

        The heads are ~10 small tensors per sub-block, so their groups ask for the fused AdamW
        kernel (one call per group instead of a Python loop over tensors; the same update up to
        float rounding) where torch has it for the heads' device, else for the multi-tensor one."""
        if self.benefit is None:
            return []
        decay = [p for p in self.benefit.parameters() if p.ndim > 1]
        no_decay = [p for p in self.benefit.parameters() if p.ndim <= 1]
        fused = decay[0].device.type in FUSED_ADAMW_DEVICES
        kernel = {"fused": True} if fused else {"foreach": True}
        return [{"params": decay, "lr": self.config.aux_head_lr, **kernel},
                {"params": no_decay, "lr": self.config.aux_head_lr, "weight_decay": 0.0, **kernel}]

    def extra_loss(self, info: StepInfo, inputs: torch.Tensor, targets: torch.Tensor, outputs: Any) -> torch.Tensor | None:
        """The heads' losses (before finalize) on the micro-batches they run on (every
        ``aux_every``-th, on ``aux_batch_fraction`` of it); Delta Psi is summed from the prune start on."""
        if self.benefit is None or self.finalized:
            return None
        if (info.step - self.schedule.start_step) % self.config.aux_period:
            self.benefit.release()
            return None
        step = self.benefit.step(targets, math.ceil(self.config.aux_batch_fraction * len(targets)))
        if self.schedule.collecting(info.step):
            self.benefit_window.add(torch.stack([step.delta_cls, step.delta_patch]))
        return step.loss

    def decide(self, info: StepInfo, scores: torch.Tensor, *, tau: float, progress: float, final: bool) -> None:
        """(Shared: the residual width,) budget (block benefit, or the hand-set ratios), ramp,
        then per-sub-block selection."""
        benefit = importance = None
        ranks = per_gate_ranks(self.layout, scores, self.unit_scales)
        budget = self._block_budget(ranks, progress, tau)
        if self.benefit is None:
            keep_ratios = torch.tensor(self.config.keep_ratios, dtype=torch.float64)
        else:
            benefit = self.benefit_window.mean(with_previous=final).cpu()
            self.allocation = allocate_budget(
                benefit[0], benefit[1], self.kept_params(), budget.dense, budget.target,
                alpha=self.config.alpha, gamma=self.config.gamma,
                scale=self.config.block_importance_scale, previous=self.allocation,
            )
            keep_ratios, importance = self.allocation.keep_ratios, self.allocation.importance
        target = ramp_keep_ratios(keep_ratios, budget.progress)
        self._set_gate_values(self._select_per_block(ranks, target, budget, tau))
        self._record(info, keep_ratio_target=self._dense_relative(target, budget), importance=importance,
                     benefit=benefit)
        if final and self.benefit is not None:
            self.benefit.capturing = False

    def _remove_auxiliary(self, model: nn.Module) -> None:
        if self.benefit is not None:
            self.benefit.remove_hooks()
            if hasattr(model, AUX_HEADS_ATTR):
                delattr(model, AUX_HEADS_ATTR)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.benefit is not None:
            state["benefit"] = self.benefit_window.state_dict()
            state["allocation"] = None if self.allocation is None else {
                "keep_ratios": self.allocation.keep_ratios.clone(), "importance": self.allocation.importance.clone(),
                "importance_cls": self.allocation.importance_cls.clone(),
                "importance_patch": self.allocation.importance_patch.clone(),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.benefit is not None:
            self.benefit_window.load_state_dict(state["benefit"])
            saved = state["allocation"]
            self.allocation = None if saved is None else BudgetAllocation(**saved)
            self.benefit.capturing = not self.finalized
