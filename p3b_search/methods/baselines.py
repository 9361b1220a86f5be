"""Cheap baselines that isolate what P3B adds, in P3B's framework: the
same gates and unit groups, the same cost-aware threshold walk, ``shrink_model`` and cost
accounting, the same schedule fields.

* ``uniform-magnitude``: every sub-block keeps the same fraction kappa of its parameters,
  solved for the global target ``(1-p)(sum W + W_nb) - W_nb``; inside a sub-block units are
  ranked by the norm of the weights they own (``norm``: L1 or L2), rank-normalised per gate
  with P3B's gate scales. With a shared residual its channels are ranked by the norm of every
  weight they own across the model, the walk over all units fixes its width, and kappa is the
  same fraction of each sub-block's W_j at that width. Each sub-block's walk rounds to whole units; sub-blocks of the same
  shape round alike, so each aims at ``kappa W_j`` plus what the sub-blocks before it missed,
  and the roundings do not add up over the model. One-shot and hard: at the prune start (``prune_at="start"``, after
  the backward of the micro-batch before it, or before training when it is step 0; the rest
  of the prune stage then trains the pruned model) or at the finalize epoch
  (``prune_at="finalize"``, on the weights the dense fine-tuning reached).
* ``global-taylor``: P3B's schedule, windows, squared Taylor scores, soft masks and ramp, but
  no block benefit and no per-block budget: the rank-normalised scores of each gate *type*
  (e.g. every MLP hidden unit of the model) are ranked together, scaled by the gate scales,
  and one global cost-aware threshold walk keeps ``target(t)`` parameters over all sub-blocks,
  with ``target(t)`` ramped from dense to the global target like P3B's keep ratios. With a
  shared residual its channels are one more gate type in that same walk.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from p3b_search.method_specs.baselines import (
    GLOBAL_TAYLOR_SPEC,
    UNIFORM_MAGNITUDE_SPEC,
    GlobalTaylorConfig,
    UniformMagnitudeConfig,
)
from p3b_search.methods.base import register_method
from p3b_search.methods.gated import GatedPruning, TaylorGatedPruning, per_gate_ranks
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.ramp import ramp_keep_ratios
from p3b_search.methods.selection import soft_mask, walk_threshold
from p3b_search.methods.unit_weights import residual_weight_norms, unit_weight_norms


@register_method
class UniformMagnitude(GatedPruning):
    """Same keep fraction in every sub-block, units ranked by weight norm, one-shot."""

    spec = UNIFORM_MAGNITUDE_SPEC
    config: UniformMagnitudeConfig
    gate_gradients: ClassVar[bool] = False

    def __init__(self, config: UniformMagnitudeConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.pruned = False
        #: kappa shared by every sub-block: the blocks' target over their W_j (None until it prunes)
        self.keep_ratio: float | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_start(model, optimizer)
        if self.config.prune_at == "start" and self.schedule.start_step == 0 and not self.pruned:
            self._prune(StepInfo(0, 0, self.steps_per_epoch, False))

    def after_backward(self, info: StepInfo) -> None:
        self._last_info = info
        if self.finalized:
            return
        if self.config.prune_at == "start" and not self.pruned and info.step == self.schedule.start_step - 1:
            self._prune(info)
        if self.schedule.is_final(info.step):
            self.update_masks(info, final=True)

    def _prune(self, info: StepInfo) -> None:
        norms = {sb.index: unit_weight_norms(self.adapter, sb, self.config.norm) for sb in self.adapter.sub_blocks}
        residual = residual_weight_norms(self.adapter, self.config.norm) if self.shared else None
        ranks = per_gate_ranks(self.layout, self.layout.gather(norms, residual), self.unit_scales)
        budget = self._block_budget(ranks, progress=1.0, tau=0.0)
        self.keep_ratio = min(1.0, max(0.0, budget.target / float(budget.dense.sum())))
        keep = torch.full((len(self.adapter.sub_blocks),), self.keep_ratio, dtype=torch.float64)
        self._set_gate_values(self._select_per_block(ranks, keep, budget, tau=0.0, carry=True))
        self.pruned = True
        self._record(info, keep_ratio_target=self._dense_relative(keep, budget))

    def update_masks(self, info: StepInfo, final: bool = False) -> None:
        """The one-shot pruning if it has not happened yet; at ``final`` the masks are frozen."""
        if not self.pruned:
            self._prune(info)
        if final:
            self._freeze()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned = bool(state["pruned"])


@register_method
class GlobalTaylor(TaylorGatedPruning):
    """P3B's gates and Taylor scores with one global ranking (no block benefit)."""

    spec = GLOBAL_TAYLOR_SPEC
    config: GlobalTaylorConfig

    def decide(self, info: StepInfo, scores: torch.Tensor, *, tau: float, progress: float, final: bool) -> None:
        """One walk over every unit (the shared residual's channels too) to the ramped target."""
        ranks = per_gate_ranks(self.layout, scores, self.unit_scales, by_gate_type=True)
        dense = self.prunable_params
        keep = ramp_keep_ratios(torch.tensor(self.prunable_target / dense, dtype=torch.float64), progress)
        selection = walk_threshold(self.layout, ranks, float(keep) * dense)
        self._set_gate_values(soft_mask(selection, tau))
        self._record(info)
