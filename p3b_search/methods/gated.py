"""What the gated methods (P3B and its baselines) share: gates on the P3B unit groups, the
schedule, cost accounting, allocation rows, state, and the finalize step that shrinks the model.

Their knobs and schedule are in :mod:`p3b_search.method_specs.gated`. A gated method keeps
the model dense during the prune stage and expresses pruning as gate values (soft or 0/1) on
the units of :data:`~p3b_search.methods.selection.P3B_GROUPS`. At the finalize step the gates
are made hard; :meth:`GatedPruning.finalize` removes the gates and returns ``shrink_model`` of
the hard masks (sub-blocks with nothing left are skipped).

Allocation rows (one per sub-block per mask update) have every key of
:data:`~p3b_search.method_specs.allocation.ALLOCATION_KEYS` (benefits, importance and the target
keep ratio NaN when not used), the kept sizes being those of the hard masks.

``residual: shared`` (docs/methods.md, section 1.6) gives the model one residual gate per
stage instead of each sub-block's input and output gates. Its channels are ranked like any
gate's units; at every decision one cost-aware walk over *all* units (the residual's channels,
each paying every parameter it holds across the model, and the sub-blocks' inner units) to
the model's current target fixes the residual width (:meth:`GatedPruning._block_budget`);
what that width leaves of the target is the sub-blocks' budget, which each method spends as
it does per block (P3B by block benefit, uniform-magnitude evenly, global Taylor in that
same walk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from p3b_search.cost import SubBlockCost, dense_sub_block_params, model_cost, sub_block_cost
from p3b_search.method_specs.gated import RESIDUAL, GatedPruningConfig, IterativePruningConfig
from p3b_search.methods.allocation import allocation_row
from p3b_search.methods.base import PrunedModel, PruningMethod, SharedPrefix
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.ramp import KeepRatioRamp
from p3b_search.methods.selection import (
    TauSchedule,
    UnitLayout,
    normalised_ranks,
    soft_mask,
    taylor_terms,
    walk_threshold,
)
from p3b_search.methods.target import block_params_target
from p3b_search.methods.window import WindowedSum
from p3b_search.surgery import BlockMasks, GateSet, ModelAdapter, attach_gates, get_adapter, shrink_model
from p3b_search.surgery.gates import ResidualMasks, masked_sizes

NAN = float("nan")


@dataclass(frozen=True)
class BlockBudget:
    """What the sub-blocks share at one decision: ``dense`` W_j (2L,) float64, each sub-block's
    parameters with its units kept (at the shared residual's ``widths``), the parameters
    ``target`` they keep together at the end of the ramp and ``progress`` in [0, 1] along it.
    ``values`` (N,): gate values of every unit of the method's layout, the shared residual's
    set by the walk that fixed its ``widths`` (per block: ``widths`` None, values to be set)."""

    dense: torch.Tensor
    target: float
    progress: float
    widths: dict[int, int] | None
    values: torch.Tensor


class GatedPruning(PruningMethod):
    """Base of the gated structured methods (not registered itself)."""

    config: GatedPruningConfig
    #: whether gate gradients are needed (Taylor scores)
    gate_gradients: ClassVar[bool] = True

    def __init__(self, config: GatedPruningConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.schedule = config.prune_schedule(epochs, steps_per_epoch)
        self.adapter: ModelAdapter | None = None
        self.gates: GateSet | None = None
        self.finalized = False
        self._last_info: StepInfo | None = None

    # -- setup ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Measure the dense model (W_j, W_nb; shared: also what the residual width holds outside
        the sub-blocks), check the target is reachable, attach gates."""
        adapter = get_adapter(model)
        self.adapter = adapter
        self.shared = self.config.residual == "shared"
        self.dense_params = torch.tensor(
            [float(w) for w in dense_sub_block_params(adapter).values()], dtype=torch.float64)
        dense = model_cost(model)
        self.other_params, self.other_macs = dense.other_params, dense.other_macs
        self.dense_total_params = dense.params
        #: parameters outside the sub-blocks that a shared residual's width cuts (0 per block)
        self.dense_outside = float(adapter.outside_params()) if self.shared else 0.0
        never_pruned = dense.other_params - self.dense_outside
        self.counted_other_params = 0 if self.config.block_params_only else never_pruned
        prunable = torch.cat([self.dense_params, torch.tensor([self.dense_outside], dtype=torch.float64)])
        #: D and T: the parameters the method can prune (sub-blocks; shared: and outside them), dense and kept
        self.prunable_params = float(prunable.sum())
        self.prunable_target = block_params_target(prunable, self.counted_other_params, self.config.prune_ratio)
        if self.prunable_target < 0:
            total = self.prunable_params + self.counted_other_params
            raise ValueError(
                f"prune_ratio={self.config.prune_ratio:g} asks to remove more than the sub-blocks hold "
                f"(at most {self.prunable_params / total:.3f} with the never-pruned parameters counted): "
                "lower prune_ratio or set block_params_only=true"
            )
        self.gates = attach_gates(model, adapter, requires_grad=self.gate_gradients, residual=self.config.residual)
        self.layout = UnitLayout(adapter, adapter.sub_blocks, residual=self.config.residual)
        self.block_layouts = [UnitLayout(adapter, [sb], residual=self.config.residual, residual_units=False)
                              for sb in adapter.sub_blocks]
        self.block_spans = [self.layout.block_span(sb.index) for sb in adapter.sub_blocks]
        self.unit_scales = self.layout.per_unit(self.config.gate_scales())

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Move the gates (not model tensors) to where the model now lives."""
        self.gates.to(next(model.parameters()).device)

    # -- what trials share ------------------------------------------------------------------
    def prefix_knobs(self) -> dict[str, Any]:
        """What the training before the config's
        :meth:`~p3b_search.method_specs.gated.GatedPruningConfig.first_acting_step` depends on
        besides the method's name (gated methods: nothing; P3B's auxiliary heads add theirs)."""
        return {}

    def shared_prefix(self) -> SharedPrefix:
        """The whole epochs before the config's first acting step
        (:meth:`~p3b_search.method_specs.gated.GatedPruningConfig.shared_epochs`), keyed by
        :meth:`prefix_knobs`."""
        return SharedPrefix(super().shared_prefix().epochs, self.prefix_knobs())

    # -- masks and costs -----------------------------------------------------------------
    def hard_masks(self) -> BlockMasks:
        """The current gates thresholded at 0.5 (canonical: emptied sub-blocks fully off; shared:
        every live sub-block's ``in``/``out`` are the residual's)."""
        return self.gates.hard_masks()

    def hard_residual(self) -> ResidualMasks | None:
        """The shared residual's gates thresholded at 0.5, by stage (None per block)."""
        return self.gates.hard_residual()

    def kept_params(self, masks: BlockMasks | None = None) -> torch.Tensor:
        """Parameters each sub-block keeps under ``masks`` (default: the current hard masks) (2L,)."""
        masks = self.hard_masks() if masks is None else masks
        return torch.tensor([float(c.params) for c in self._kept_costs(masks)], dtype=torch.float64)

    def _kept_costs(self, masks: BlockMasks) -> list[SubBlockCost]:
        return [sub_block_cost(self.adapter, sb, masked_sizes(sb, masks[sb.index], shared=self.shared))
                for sb in self.adapter.sub_blocks]

    def _outside_costs(self, residual: ResidualMasks | None) -> tuple[float, float]:
        """(parameters, MACs per image) outside the sub-blocks of the model that a shared
        ``residual`` (hard masks; None per block) shrinks to."""
        if residual is None:
            return float(self.other_params), float(self.other_macs)
        widths = {stage: int(mask.sum()) for stage, mask in residual.items()}
        return (self.other_params - self.dense_outside + self.adapter.outside_params(widths),
                float(self.adapter.stem_and_head_macs(widths)))

    def _set_gate_values(self, values: torch.Tensor) -> None:
        for s in self.layout:
            if s.sub_block is None:
                self.gates.set_residual(s.stage, values[s.span])
            else:
                self.gates.set(s.sub_block.index, s.group, values[s.span])

    def _block_budget(self, ranks: torch.Tensor, progress: float, tau: float) -> BlockBudget:
        """The sub-blocks' budget at ``progress`` along the ramp (docs/methods.md, section 1.6).

        Per block: W_j, the final target T and ``progress`` as given. Shared: one cost-aware
        walk over every unit (``ranks``) to the current target ``T(t) = D - progress (D - T)``
        fixes the residual's widths c and gate values (soft with ``tau``); the sub-blocks then
        hold W_j(c) and keep ``T - R(c)`` at the end (R: the parameters outside them at widths
        c), and are as far along their ramp as makes the whole model meet ``T(t)`` now."""
        if not self.shared:
            return BlockBudget(self.dense_params, self.prunable_target, progress, None,
                               torch.ones(self.layout.size, dtype=torch.float32))
        now = self.prunable_params - progress * (self.prunable_params - self.prunable_target)
        selection = walk_threshold(self.layout, ranks, now)
        widths = self.layout.kept_widths(selection.kept)
        dense, outside = self.layout.block_params(widths), self.layout.outside_params(widths)
        full = float(dense.sum()) + outside
        along = 1.0 if full <= self.prunable_target else min(1.0, max(0.0, (full - now) / (full - self.prunable_target)))
        return BlockBudget(dense, self.prunable_target - outside, along, widths, soft_mask(selection, tau))

    def _select_per_block(self, ranks: torch.Tensor, keep_ratios: torch.Tensor, budget: BlockBudget, tau: float,
                          carry: bool = False) -> torch.Tensor:
        """Per sub-block threshold walk to ``keep_ratios[j] * budget.dense[j]`` (at the shared
        residual's widths); returns all gate values (N,): ``budget.values`` with each sub-block's
        units set. ``carry``: each walk also takes up the parameters the walks before it kept too
        few (or, negative, too many), so the whole model meets the summed target despite unit rounding."""
        values = budget.values.clone()
        missed = 0.0
        for j, (layout, span) in enumerate(zip(self.block_layouts, self.block_spans)):
            if budget.widths is not None:
                layout.fix_widths(budget.widths)
            target = float(keep_ratios[j]) * float(budget.dense[j]) + missed
            selection = walk_threshold(layout, ranks[span], target)
            if carry:
                missed = target - float(selection.kept_params.sum())
            values[span] = soft_mask(selection, tau)
        return values

    def _dense_relative(self, keep_ratios: torch.Tensor, budget: BlockBudget) -> torch.Tensor:
        """Keep ratios of ``budget.dense`` as fractions of the dense W_j (the allocation rows' unit)."""
        return keep_ratios * budget.dense / self.dense_params

    def _record(self, info: StepInfo, *, keep_ratio_target: torch.Tensor | None = None,
                importance: torch.Tensor | None = None, benefit: torch.Tensor | None = None) -> None:
        """Append one allocation row per sub-block for the update after ``info``'s step."""
        costs = self._kept_costs(self.hard_masks())

        def value(t: torch.Tensor | None, j: int) -> float:
            return NAN if t is None else float(t[j])

        for sb, cost in zip(self.adapter.sub_blocks, costs):
            j = sb.index
            self._allocation_rows.append(allocation_row(
                sb, float(self.dense_params[j]), cost.params, cost.macs, step=info.step, epoch=info.epoch,
                benefit_cls=value(None if benefit is None else benefit[0], j),
                benefit_patch=value(None if benefit is None else benefit[1], j),
                importance=value(importance, j), keep_ratio_target=value(keep_ratio_target, j)))

    def _freeze(self) -> None:
        """Masks are final: stop gate gradients."""
        self.finalized = True
        self.gates.zero_grad()
        for tensor in self.gates.tensors():
            tensor.requires_grad_(False)

    def _final_info(self) -> StepInfo:
        step = self.schedule.final_step - 1
        return self._last_info or StepInfo(step, step // self.steps_per_epoch, self.steps_per_epoch, True)

    # -- the hooks -------------------------------------------------------------------------
    def update_masks(self, info: StepInfo, final: bool = False) -> None:
        """Decide new gate values after ``info``'s backward (``final``: hard, then frozen)."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """``kept_params``, ``macs`` (per image) and ``keep_ratio`` of the model the current hard
        masks would shrink to; shared: ``residual_keep``, its kept fraction of the residual channels."""
        costs = self._kept_costs(self.hard_masks())
        residual = self.hard_residual()
        other_params, other_macs = self._outside_costs(residual)
        kept = sum(c.params for c in costs) + other_params
        metrics = {"kept_params": float(kept), "macs": float(sum(c.macs for c in costs) + other_macs),
                   "keep_ratio": kept / self.dense_total_params}
        if residual is not None:
            metrics["residual_keep"] = (sum(int(m.sum()) for m in residual.values())
                                        / sum(m.numel() for m in residual.values()))
        return metrics

    def finalize(self, model: nn.Module) -> PrunedModel:
        """Hard masks (made now if the finalize step was not reached), gates and auxiliary
        modules removed, then ``shrink_model`` (a copy; ``model`` is left dense and clean)."""
        if not self.finalized:
            self.update_masks(self._final_info(), final=True)
        masks, residual = self.hard_masks(), self.hard_residual()
        self.gates.remove()
        self._remove_auxiliary(model)
        return PrunedModel(shrink_model(model, masks, residual), structured=True)

    def _remove_auxiliary(self, model: nn.Module) -> None:
        """Take off anything besides the gates that the method put on ``model``."""

    def _named_gates(self) -> dict[str, tuple[str, torch.Tensor]]:
        """Checkpoint key -> (what to call it in an error, gate tensor), the shared residual's too."""
        gates = {f"{sb.index}/{group}": (f"{sb.name}.{group}", tensor) for sb, group, tensor in self.gates.items()}
        gates.update({f"{RESIDUAL}/{stage}": (f"{RESIDUAL} of stage {stage}", tensor)
                      for stage, tensor in self.gates.residual.items()})
        return gates

    def state_dict(self) -> dict[str, Any]:
        gates = {key: tensor.detach().cpu().clone() for key, (_, tensor) in self._named_gates().items()}
        return {"gates": gates, "finalized": self.finalized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gates = self._named_gates()
        if set(state["gates"]) != set(gates):
            raise ValueError(f"method state: its gates are not this method's (residual={self.config.residual}): "
                             "resume with the configuration the checkpoint was written with")
        for key, (name, tensor) in gates.items():
            saved = state["gates"][key]
            if saved.shape != tensor.shape:
                raise ValueError(f"method state: gate {name} has shape {tuple(saved.shape)}, "
                                 f"this model's has {tuple(tensor.shape)}: resume with the same model")
            with torch.no_grad():
                tensor.copy_(saved)
        if state["finalized"] and not self.finalized:
            self._freeze()


class TaylorGatedPruning(GatedPruning):
    """Gated methods scored by squared Taylor terms and updated every N micro-batches
    (P3B and global Taylor): the windowed scores, tau schedule, ramp and update timing."""

    config: IterativePruningConfig

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        device = next(model.parameters()).device
        self.taylor = WindowedSum(self.layout.size, device)
        self.tau = TauSchedule(self.schedule.sparse_step, self.schedule.final_step,
                               self.config.tau_max, self.config.tau_min)
        self.ramp = KeepRatioRamp(self.schedule.start_step, self.schedule.sparse_step)

    def windows(self) -> list[WindowedSum]:
        """Every windowed statistic (reduced across ranks and rolled at each update)."""
        return [self.taylor]

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_start(model, optimizer)
        device = next(model.parameters()).device
        for window in self.windows():
            window.to(device)

    def after_backward(self, info: StepInfo) -> None:
        """At optimizer steps inside the prune window: add ``(m dL/dm)^2`` to the window and
        clear the gate gradients; then a scheduled (or the final) mask update.

        The gate gradients of an accumulation window are complete after the backward of its
        last micro-batch, so they are read here rather than in ``after_optimizer_step`` (gates
        are no optimizer parameters): an update scheduled on that micro-batch sees its scores."""
        self._last_info = info
        if self.finalized:
            return
        if info.optimizer_step:
            if self.schedule.collecting(info.step):
                self.taylor.add(taylor_terms(self.gates, self.layout))
            self.gates.zero_grad()
        if self.schedule.is_final(info.step):
            self.update_masks(info, final=True)
        elif self.schedule.is_update(info.step):
            self.update_masks(info)

    def update_masks(self, info: StepInfo, final: bool = False) -> None:
        """All-reduce the window, decide (combining the last two windows when ``final``),
        set the gates (soft with the current tau, or hard), record rows, start a new window."""
        for window in self.windows():
            window.reduce_across_ranks()
        scores = self.taylor.mean(with_previous=final)
        tau = 0.0 if final else self.tau(info.step)
        progress = 1.0 if final else self.ramp.progress(info.step)
        self.decide(info, scores, tau=tau, progress=progress, final=final)
        for window in self.windows():
            window.roll()
        if final:
            self._freeze()

    def decide(self, info: StepInfo, scores: torch.Tensor, *, tau: float, progress: float, final: bool) -> None:
        """Set new gate values from window-mean Taylor ``scores`` (N,) and record rows."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "taylor": self.taylor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.taylor.load_state_dict(state["taylor"])


def per_gate_ranks(layout: UnitLayout, scores: torch.Tensor, unit_scales: torch.Tensor,
                   by_gate_type: bool = False) -> torch.Tensor:
    """Normalised ranks within each gate (or each gate type across sub-blocks), times s_g; the
    best channel of each shared residual stream ranks ``inf``, which no walk removes (a stream
    keeps a channel)."""
    ranks = normalised_ranks(scores, layout.segment_ids(by_gate_type=by_gate_type), unit_scales)
    for s in layout.residual_segments:
        ranks[s.start + int(torch.argmax(ranks[s.span]))] = math.inf
    return ranks
