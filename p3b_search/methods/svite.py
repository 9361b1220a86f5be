"""SViTE: unstructured sparse training by prune-and-grow (Chen et al., NeurIPS'21).

The method (ERK densities, the drop-and-grow update, the death rate) is specified in
docs/methods.md, section 3.1. What this module decides beyond it:

* Masked: the weight of every ``nn.Linear`` and ``nn.Conv2d`` (``scope="all"``: patch
  embedding, qkv/proj/fc1/fc2, Swin patch merging, classifier heads) or only the sub-blocks'
  qkv/proj/fc1/fc2 (``scope="blocks"``).
* Target density over the masked weights: ``density`` if set, else the one that keeps
  ``1 - prune_ratio`` of *all* the model's parameters (the unmasked ones count as kept, see
  :mod:`p3b_search.methods.target`).
* An update happens every ``update_interval`` micro-batches while ``t < end_fraction * T``
  (T: the prune stage's micro-batches), at the optimizer step that closes the window; the
  dropped weights may be regrown at once. Layers that ERK keeps dense are left alone.
* Grown weights start at 0 with cleared optimizer state and, under Adam/AdamW, their own step
  count (:class:`~p3b_search.methods.sparsity.FreshAdamSteps`); after every optimizer step the
  masks are re-applied (:class:`~p3b_search.methods.sparsity.MaskedWeights`).
* With ``torch.distributed`` initialised, gradients are averaged over ranks before growth.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from p3b_search.distributed import average_across_ranks
from p3b_search.method_specs.svite import SVITE_SPEC, PruneGrowConfig, SViTEConfig
from p3b_search.methods.allocation import allocation_rows
from p3b_search.methods.base import PrunedModel, register_method
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.sparsity import (
    FreshAdamSteps,
    UnstructuredMethod,
    drop_and_grow,
    erk_densities,
    keep_largest,
)
from p3b_search.surgery import ModelAdapter, get_adapter


def cosine_death_rate(t: int, total: int, initial: float, final: float) -> float:
    """``p_t = final + (initial - final)(1 + cos(pi t / total)) / 2``."""
    return final + (initial - final) * (1.0 + math.cos(math.pi * t / total)) / 2.0


class PruneGrowClock:
    """When prune-and-grow updates fire and at which death rate.

    ``step`` counts micro-batches over the prune stage (``StepInfo.step``); an update is due
    once ``step + 1`` reaches the next multiple of ``update_interval`` and fires at the
    optimizer step closing that micro-batch's window, while ``step < t_end``.
    """

    def __init__(self, config: PruneGrowConfig, *, method: str, epochs: int, steps_per_epoch: int):
        self.config = config
        self.total = epochs * steps_per_epoch
        self.end = math.floor(config.end_fraction * self.total)
        if config.update_interval > self.end:
            raise ValueError(
                f"{method}.update_interval={config.update_interval} micro-batches leaves no prune-and-grow update "
                f"before t_end={self.end} (end_fraction x {self.total} prune-stage micro-batches): lower "
                "update_interval or train the prune stage longer"
            )
        self.next_update = config.update_interval

    def is_due(self, step: int) -> bool:
        """An update is due at (or before) micro-batch ``step``."""
        return step + 1 >= self.next_update and step < self.end

    def death_rate(self, step: int) -> float:
        return cosine_death_rate(step, self.total, self.config.death_rate, self.config.final_death_rate)

    def advance(self, step: int) -> None:
        """The update for micro-batch ``step`` fired: schedule the next one."""
        interval = self.config.update_interval
        self.next_update = ((step + 1) // interval + 1) * interval

    def state_dict(self) -> dict[str, Any]:
        return {"next_update": self.next_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_update = int(state["next_update"])


def masked_weights(model: nn.Module, scope: str) -> dict[str, nn.Parameter]:
    """The weights SViTE masks (see the module docstring), by parameter name."""
    if scope == "blocks":
        adapter = get_adapter(model)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(linear.weight)]: linear.weight
                for sb in adapter.sub_blocks for linear in adapter.linears(sb)}
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


def initial_masks(weights: dict[str, nn.Parameter], density: float, init: str, seed: int) -> dict[str, torch.Tensor]:
    """ERK densities for ``density``; per layer the largest weights (``magnitude``) or a
    seeded uniform draw (``random``) of ``round(density_l * numel)`` positions."""
    densities = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, density)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, weight in weights.items():
        keep = round(densities[name] * weight.numel())
        scores = weight.detach().abs() if init == "magnitude" else torch.rand(weight.shape, generator=generator)
        masks[name] = keep_largest(scores, keep).to(weight.device)
    return masks


def prune_and_grow(weight: nn.Parameter, mask: torch.Tensor, grad: torch.Tensor, death_rate: float) -> torch.Tensor:
    """One SViTE update of one layer (``mask`` and ``weight`` changed in place): magnitude
    death, gradient growth, grown weights set to zero. Returns the grown positions."""
    grown = drop_and_grow(mask, weight.detach().abs(), grad.abs(), death_rate)
    with torch.no_grad():
        weight.masked_fill_(grown, 0.0)
    return grown


@register_method
class SViTE(UnstructuredMethod):
    """Unstructured prune-and-grow sparse training; the result keeps dense shapes."""

    spec = SVITE_SPEC
    config: SViTEConfig

    def __init__(self, config: SViTEConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.clock = PruneGrowClock(config, method=self.spec.name, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self._adapter: ModelAdapter | None = None
        self._evolving: list[str] = []
        self._fresh: FreshAdamSteps | None = None

    def prepare(self, model: nn.Module) -> None:
        self._adapter = get_adapter(model)
        weights = masked_weights(model, self.config.scope)
        density = self.config.masked_density(sum(w.numel() for w in weights.values()),
                                             sum(p.numel() for p in model.parameters()))
        masks = initial_masks(weights, density, self.config.init, self.config.seed)
        self._mask(model, masks)
        self._evolving = [name for name, mask in masks.items() if not bool(mask.all())]
        self._fresh = FreshAdamSteps(model)
        self._record(step=0, epoch=0)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_train_start(model, optimizer)
        self._fresh.attach(optimizer)

    def _record(self, step: int, epoch: int) -> None:
        kept = self._counter(self._weights).sub_blocks
        self._allocation_rows += allocation_rows(self._adapter, kept, step=step, epoch=epoch)

    def after_optimizer_step(self, info: StepInfo) -> None:
        super().after_optimizer_step(info)
        if not self.clock.is_due(info.step):
            return
        rate = self.clock.death_rate(info.step)
        grown = {}
        for name in self._evolving:
            param = self._weights.params[name]
            if param.grad is None:
                continue
            grown[name] = prune_and_grow(param, self._weights.masks[name], average_across_ranks(param.grad), rate)
        self._weights.apply()
        self._weights.clear_optimizer_state(self._optimizer)
        for name, positions in grown.items():
            self._fresh.regrow(self._optimizer, self._weights.params[name], positions)
        self.clock.advance(info.step)
        self._record(step=info.step, epoch=info.epoch)

    def finalize(self, model: nn.Module) -> PrunedModel:
        self._fresh.detach()
        return super().finalize(model)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clock": self.clock.state_dict(), "regrown_at": self._fresh.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.clock.load_state_dict(state["clock"])
        self._fresh.load_state_dict(state["regrown_at"])
