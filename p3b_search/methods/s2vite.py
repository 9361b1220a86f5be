"""S²ViTE: structured sparse training, pruning and regrowing whole heads and MLP neurons.

The method (units, prune and grow scores, reference densities) is specified in
docs/methods.md, section 3.2; the schedule and death rate are SViTE's (:mod:`.svite`). What
this module decides beyond it:

* Units are switched off by the hard ``heads`` and ``hidden`` gates of
  :func:`~p3b_search.surgery.attach_gates`, so the final masks go straight to
  :func:`~p3b_search.surgery.shrink_model`.
* Each attention keeps ``round(head_density * H)`` heads and each MLP
  ``round(mlp_density * hidden)`` neurons (at least one) through every update (a swap drops
  and grows the same number, ``k = ceil(p_t * active)`` per layer). The density left unset is
  solved for ``prune_ratio``: ``mlp_density`` (with ``head_density`` as set, default
  ``1 - prune_ratio``), or ``head_density`` when only ``mlp_density`` is set.
* Initial units (no data at ``prepare``): the largest by weight L1 (``init="magnitude"``) or a
  seeded random draw as in the reference (``"random"``).
* A head's score sums over the image's tokens (or all its Swin windows) and the head's dims.
  A neuron's grow score is computed from the window's fc1 input, pre-activation and fc2
  output gradient, since the gate blocks the real ones.
* Statistics are collected only in windows that close an update (hooks armed from the
  window's first micro-batch; with gradient accumulation an update that falls inside a window
  waits for the next whole one), and averaged over ranks when ``torch.distributed`` is
  initialised.
* A switched-off unit keeps its weights (frozen: no gradient reaches them, only weight decay)
  and its optimizer state is cleared, so a regrown unit resumes from the weights its grow
  score was measured with. (Zeroing its fc1 row and fc2 column instead would leave it no
  gradient to ever come back.) Under Adam/AdamW a regrown unit counts its own steps
  (:class:`~p3b_search.methods.sparsity.FreshAdamSteps`).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from p3b_search.cost import model_cost
from p3b_search.distributed import average_across_ranks
from p3b_search.method_specs.s2vite import DENSITY_KNOB, S2VITE_SPEC, S2ViTEConfig
from p3b_search.methods.allocation import structured_allocation_rows, structured_metrics
from p3b_search.methods.base import PrunedModel, PruningMethod, register_method
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.sparsity import FreshAdamSteps, drop_and_grow, keep_largest, zero_optimizer_state
from p3b_search.methods.svite import PruneGrowClock
from p3b_search.methods.target import check_kept, solve_monotone
from p3b_search.methods.unit_weights import unit_weight_norms
from p3b_search.surgery import (
    BlockMasks,
    GateSet,
    ModelAdapter,
    SubBlock,
    attach_gates,
    canonical_masks,
    get_adapter,
    shrink_model,
)

#: the unit group S²ViTE prunes in each kind of sub-block
UNIT_GROUP = {"attn": "heads", "mlp": "hidden"}


def kept_units(size: int, density: float) -> int:
    """Units a group of ``size`` keeps at ``density``: ``round(density x size)``, at least one."""
    return max(1, round(density * size))


def count_masks(adapter: ModelAdapter, densities: dict[str, float]) -> BlockMasks:
    """Masks with the unit counts of ``densities`` (the first units kept): for costs only."""
    masks: BlockMasks = {}
    for sb in adapter.sub_blocks:
        size = sb.groups[UNIT_GROUP[sb.kind]]
        masks[sb.index] = {UNIT_GROUP[sb.kind]: torch.arange(size) < kept_units(size, densities[sb.kind])}
    return masks


def solve_densities(model: nn.Module, config: S2ViTEConfig) -> dict[str, float]:
    """Head (``attn``) and neuron (``mlp``) densities: as set, with the unset one solved so
    that the model keeps ``1 - prune_ratio`` of its parameters (:func:`~p3b_search.cost.model_cost`)."""
    given = config.given_densities()
    if None not in given.values():
        return dict(given)
    free = "mlp" if given["mlp"] is None else "attn"
    fixed = "attn" if free == "mlp" else "mlp"
    fixed_density = given[fixed] if given[fixed] is not None else 1.0 - config.prune_ratio
    adapter = get_adapter(model)
    dense = model_cost(model).params

    def densities(x: float) -> dict[str, float]:
        return {free: x, fixed: fixed_density}

    def kept(x: float) -> int:
        return model_cost(model, count_masks(adapter, densities(x))).params

    solved = solve_monotone(kept, config.kept_target(dense), 0.0, 1.0)
    hint = ("leave mlp_density unset to have it solved, or set head_density too" if free == "attn"
            else "pick another head_density or prune_ratio")
    check_kept("s2vite", kept(solved), dense, config.prune_ratio,
               fix=f"with {DENSITY_KNOB[fixed]}={fixed_density:g} no {DENSITY_KNOB[free]} reaches it: {hint}")
    return densities(solved)


def unit_parameters(adapter: ModelAdapter, sb: SubBlock,
                    units: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, bool positions) of everything the ``units`` (bool over heads or neurons) own."""
    first, second = adapter.linears(sb)
    if sb.kind == "attn":
        H, d = sb.num_heads, sb.head_dim
        rows = units.view(1, H, 1).expand(3, H, d).reshape(-1)
        owned = [(first.weight, rows[:, None].expand_as(first.weight)),
                 (second.weight, units.view(1, H, 1).expand(sb.dim, H, d).reshape(sb.dim, -1))]
    else:
        rows = units
        owned = [(first.weight, rows[:, None].expand_as(first.weight)),
                 (second.weight, units[None, :].expand_as(second.weight))]
    if first.bias is not None:
        owned.append((first.bias, rows))
    return owned


class GrowthStatistics:
    """Forward/backward hooks that, while ``armed``, sum S²ViTE's grow signals over a window.

    ``heads[j]``: ``||dL/dA_h||_1`` per head (gradient at the proj input, after the gate).
    ``head_taylor[j]``: per head, the sum over images of ``|sum A_h * dL/dA_h|`` (one image's
    tokens and the head's dims); ``images[j]``: the images it has seen.
    ``fc1[j]`` / ``fc2[j]``: the weight gradients of fc1 / fc2 as if every neuron were on.
    """

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.armed = False
        self.heads: dict[int, torch.Tensor] = {}
        self.head_taylor: dict[int, torch.Tensor] = {}
        self.images: dict[int, int] = {}
        self.fc1: dict[int, torch.Tensor] = {}
        self.fc2: dict[int, torch.Tensor] = {}
        self._fc1_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        for sb in adapter.sub_blocks:
            first, second = adapter.linears(sb)
            if sb.kind == "attn":
                self._handles.append(second.register_forward_pre_hook(partial(self._on_proj_input, sb)))
            else:
                self._handles.append(first.register_forward_hook(partial(self._on_fc1, sb)))
                self._handles.append(second.register_forward_hook(partial(self._on_fc2, sb), prepend=True))

    def reset(self) -> None:
        self.heads.clear()
        self.head_taylor.clear()
        self.images.clear()
        self.fc1.clear()
        self.fc2.clear()
        self._fc1_io.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    @staticmethod
    def _add(store: dict[int, torch.Tensor], index: int, value: torch.Tensor) -> None:
        store[index] = value if index not in store else store[index] + value

    # -- attention: head outputs and their gradient at the proj input, per head ----------------
    def _on_proj_input(self, sb: SubBlock, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if self.armed and x.requires_grad:
            x.register_hook(partial(self._on_head_grad, sb, x.detach()))

    def _on_head_grad(self, sb: SubBlock, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Rows of the proj input are ``sb.tokens`` per image, image after image (a Swin
        image's windows are consecutive), so ``(rows, C)`` regroups as (images, tokens, H, d)."""
        grad = grad.detach().float()
        per_image = grad.reshape(-1, sb.tokens, sb.num_heads, sb.head_dim)
        taylor = (x.float().reshape(per_image.shape) * per_image).sum((1, 3))  # (images, H)
        self._add(self.heads, sb.index, per_image.abs().sum((0, 1, 3)))
        self._add(self.head_taylor, sb.index, taylor.abs().sum(0))
        self.images[sb.index] = self.images.get(sb.index, 0) + per_image.shape[0]

    # -- MLP: weight gradients as if every neuron were on -----------------------------------------
    def _on_fc1(self, sb: SubBlock, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed and output.requires_grad:
            self._fc1_io[sb.index] = (args[0].detach(), output.detach())

    def _on_fc2(self, sb: SubBlock, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured = self._fc1_io.pop(sb.index, None)
        if captured is not None and output.requires_grad:
            output.register_hook(partial(self._on_fc2_grad, sb, *captured))

    def _on_fc2_grad(self, sb: SubBlock, x: torch.Tensor, z: torch.Tensor, grad: torch.Tensor) -> None:
        act = self.adapter.branch(sb).act
        fc2 = self.adapter.linears(sb)[1]
        g = grad.detach().float().flatten(0, -2)
        x, z = x.float().flatten(0, -2), z.float().flatten(0, -2)
        with torch.enable_grad():  # backward hooks run with grad mode off
            z = z.requires_grad_()
            h = act(z)
            (act_slope,) = torch.autograd.grad(h, z, torch.ones_like(h))
        h = h.detach()
        self._add(self.fc2, sb.index, g.T @ h)
        self._add(self.fc1, sb.index, ((g @ fc2.weight.detach().float()) * act_slope).T @ x)


@register_method
class S2ViTE(PruningMethod):
    """Structured prune-and-grow of heads and MLP neurons, ending in a smaller model."""

    spec = S2VITE_SPEC
    config: S2ViTEConfig

    def __init__(self, config: S2ViTEConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.clock = PruneGrowClock(config, method=self.spec.name, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.masks: BlockMasks = {}
        self.densities: dict[str, float] = {}
        self._gates: GateSet | None = None
        self._stats: GrowthStatistics | None = None
        self._fresh: FreshAdamSteps | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._window_start = 0
        self._window_armed = False

    # -- set-up -----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        generator = torch.Generator().manual_seed(self.config.seed)
        self.densities = solve_densities(model, self.config)
        for sb in adapter.sub_blocks:
            group = UNIT_GROUP[sb.kind]
            size = sb.groups[group]
            keep = kept_units(size, self.densities[sb.kind])
            if self.config.init == "magnitude":
                scores = unit_weight_norms(adapter, sb, "l1")[group].cpu()
            else:
                scores = torch.rand(size, generator=generator)
            self.masks[sb.index] = {group: keep_largest(scores, keep)}
        self._gates = attach_gates(model, adapter, requires_grad=False, on="activations")  # see GrowthStatistics
        self._gates.set_masks(self.masks)
        self._stats = GrowthStatistics(adapter)
        self._fresh = FreshAdamSteps(model)
        self._allocation_rows += structured_allocation_rows(model, adapter, self.masks, step=0, epoch=0)

    @property
    def adapter(self) -> ModelAdapter:
        return self._gates.adapter

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self._fresh.attach(optimizer)
        self._gates.to(next(model.parameters()).device)
        self._begin_window(self._window_start)

    # -- arming -----------------------------------------------------------------------------------
    def _begin_window(self, step: int) -> None:
        """Micro-batch ``step`` opens a new optimizer window."""
        self._window_start = step
        self._stats.reset()
        self._stats.armed = self._window_armed = self.clock.is_due(step)

    def after_backward(self, info: StepInfo) -> None:
        if not info.optimizer_step:
            self._stats.armed = self.clock.is_due(info.step + 1)

    def after_optimizer_step(self, info: StepInfo) -> None:
        if self.clock.is_due(info.step) and self._window_armed:
            self._update(info)
            self.clock.advance(info.step)
            self._allocation_rows += structured_allocation_rows(
                self.adapter.model, self.adapter, self.masks, step=info.step, epoch=info.epoch)
        self._begin_window(info.step + 1)

    # -- the update -------------------------------------------------------------------------------
    def _scores(self, sb: SubBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """(prune score, grow score) per unit of ``sb``, averaged over ranks."""
        if sb.kind == "attn":
            if sb.index not in self._stats.heads:
                return torch.zeros(sb.num_heads), torch.zeros(sb.num_heads)
            prune = self._stats.head_taylor[sb.index] / self._stats.images[sb.index]  # mean over images
            return average_across_ranks(prune), average_across_ranks(self._stats.heads[sb.index])
        prune = unit_weight_norms(self.adapter, sb, "l1")[UNIT_GROUP[sb.kind]]
        if sb.index not in self._stats.fc1:
            return prune, torch.zeros_like(prune)
        fc1, fc2 = (average_across_ranks(stats[sb.index]) for stats in (self._stats.fc1, self._stats.fc2))
        return prune, fc1.abs().sum(1) + fc2.abs().sum(0)

    def _update(self, info: StepInfo) -> None:
        rate = self.clock.death_rate(info.step)
        for sb in self.adapter.sub_blocks:
            group = UNIT_GROUP[sb.kind]
            mask = self.masks[sb.index][group]
            prune, grow = self._scores(sb)
            grown = drop_and_grow(mask, prune.cpu(), grow.cpu(), rate)
            self._gates.set(sb.index, group, mask.float())
            for param, positions in unit_parameters(self.adapter, sb, ~mask):
                zero_optimizer_state(self._optimizer, param, positions)
            for param, positions in unit_parameters(self.adapter, sb, grown):
                self._fresh.regrow(self._optimizer, param, positions)

    # -- results ----------------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return structured_metrics(self.adapter.model, self.masks)

    def finalize(self, model: nn.Module) -> PrunedModel:
        masks = canonical_masks(self.adapter, self.masks)
        self._stats.remove()
        self._gates.remove()
        self._fresh.detach()
        return PrunedModel(shrink_model(model, masks), structured=True)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {j: {g: m.clone() for g, m in groups.items()} for j, groups in self.masks.items()},
                "clock": self.clock.state_dict(), "window_start": self._window_start,
                "regrown_at": self._fresh.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {int(j): {g: m.bool().cpu() for g, m in groups.items()} for j, groups in state["masks"].items()}
        self._gates.set_masks(self.masks)
        self.clock.load_state_dict(state["clock"])
        self._window_start = int(state["window_start"])
        self._fresh.load_state_dict(state["regrown_at"])

