"""Unstructured weight masks shared by DIMAP and SViTE.

* :func:`erk_densities`: Erdős–Rényi-kernel layer densities for a target overall density.
* :class:`MaskedWeights`: bool masks (True = kept) on named parameters of one model; keeps the
  pruned weights at exactly zero through optimizer steps by re-applying the masks *and*
  zeroing every per-weight optimizer state tensor (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's
  momentum) at pruned positions, so stale moments can never move a pruned weight again.
* :class:`FreshAdamSteps`: regrown weights (cleared optimizer state) step under Adam/AdamW
  with the bias correction of a fresh parameter, never faster.
* :class:`MaskKeeper`: the fine-tune stage's hooks for an unstructured model.
* :class:`NonzeroCounter`: dense and non-zero parameters and MACs. Non-zero MACs are what a
  sparse kernel *could* skip; the dense model still runs every MAC, so an unstructured result
  is never a speed-up by itself (``PrunedModel.structured`` is False for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from p3b_search.cost import model_cost, weight_uses_per_image
from p3b_search.method_specs import MethodConfig
from p3b_search.methods.base import PrunedModel, PruningMethod
from p3b_search.methods.hooks import StepInfo, TrainingHooks
from p3b_search.surgery import get_adapter


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Per-layer densities ``min(1, eps * sum(shape) / prod(shape))`` (Erdős–Rényi-kernel; for
    a linear layer ``eps (n_in + n_out) / (n_in n_out)``) with ``eps`` solved so that the
    parameter-weighted mean density is ``density``. Layers that would exceed 1 are kept dense
    and ``eps`` is solved again for the rest (this only raises ``eps``, so every layer marked
    dense stays dense)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density}: must be in (0, 1]")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            return dict.fromkeys(shapes, 1.0)
        eps = (budget - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in sparse)
        too_dense = {n for n in sparse if eps * raw[n] >= 1.0}
        if not too_dense:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense |= too_dense


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape keeping exactly the ``keep`` largest entries."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(min(keep, scores.numel())).indices] = True
    return mask.view_as(scores)


@torch.no_grad()
def drop_and_grow(mask: torch.Tensor, prune_score: torch.Tensor, grow_score: torch.Tensor,
                  death_rate: float) -> torch.Tensor:
    """One prune-and-grow swap on ``mask`` (bool, True = active; changed in place): drop the
    ``k = ceil(death_rate * active)`` active entries of lowest ``prune_score``, then activate
    the ``k`` inactive entries (just dropped ones included) of highest ``grow_score``.
    Returns the bool tensor of the grown entries; the active count is unchanged."""
    active = int(mask.sum())
    k = min(active, math.ceil(death_rate * active))
    grown = torch.zeros_like(mask)
    if k == 0:
        return grown
    flat_mask, flat_grown = mask.view(-1), grown.view(-1)
    dying = prune_score.detach().flatten().float().masked_fill(~flat_mask, float("inf"))
    flat_mask[dying.topk(k, largest=False).indices] = False
    growing = grow_score.detach().flatten().float().masked_fill(flat_mask, -float("inf"))
    flat_grown[growing.topk(k).indices] = True
    flat_mask |= flat_grown
    return grown


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, positions: torch.Tensor) -> None:
    """Zero ``param``'s per-element optimizer state (AdamW ``exp_avg``/``exp_avg_sq``, SGD
    momentum, ...) where ``positions`` (bool, broadcastable to ``param``) is True. Scalar state
    such as AdamW's ``step`` is left alone."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(positions.to(value.device), 0)


def _adam_update(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
                 group: Mapping[str, Any]) -> torch.Tensor:
    """Adam's update (weight decay aside, parameter units) from the moments after ``steps``
    steps (a tensor, per entry): ``lr m / (1 - beta1^steps) / (sqrt(v) / sqrt(1 - beta2^steps) + eps)``."""
    beta1, beta2 = (float(beta) for beta in group["betas"])
    steps = steps.double()  # bias corrections in double precision, as the optimizers compute them
    step_size = (float(group["lr"]) / (1.0 - beta1 ** steps)).to(exp_avg.dtype)
    correction2 = (1.0 - beta2 ** steps).sqrt().to(exp_avg.dtype)
    return step_size * exp_avg / (exp_avg_sq.sqrt() / correction2 + group["eps"])


class FreshAdamSteps:
    """Regrown weights step under Adam/AdamW as a fresh parameter would.

    Adam divides its moments by ``1 - beta^t``, ``t`` the parameter's step count. A weight
    regrown at step ``t0`` with cleared moments holds moments of ``k = t - t0`` steps but gets
    the correction of ``t``, so its first updates are several times ``lr`` (up to
    ``(1 - beta1) / sqrt(1 - beta2)``, 3.2x, for the default betas and a large ``t``).
    :meth:`regrow` clears the optimizer state of regrown entries and records ``t0`` per entry;
    after every step of the attached optimizer (a step post-hook, before any LR scheduler
    moves ``lr``) each regrown entry's update is swapped for a fresh parameter's after ``k``
    steps. The moments are the optimizer's own (cleared at ``t0``, they are exactly a fresh
    parameter's) and decoupled weight decay is the same for both, so the entry moves exactly
    as a fresh parameter does. Entries never regrown keep ``t0 = 0`` and are left alone, and
    so are parameters without a gradient in that step (the optimizer skipped them), ``maximize``
    groups and optimizers other than ``torch.optim.Adam``/``AdamW`` (SGD momentum has no bias
    correction; other Adam variants correct differently).
    """

    def __init__(self, model: nn.Module):
        self._names = {param: name for name, param in model.named_parameters()}
        self._params = {name: param for param, name in self._names.items()}
        self.births: dict[str, torch.Tensor] = {}  # t0 per entry (steps), 0: never regrown
        self._handle: RemovableHandle | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Correct the regrown entries after every step of ``optimizer`` (and no other)."""
        self.detach()
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def regrow(self, optimizer: torch.optim.Optimizer, param: torch.Tensor, positions: torch.Tensor) -> None:
        """Clear ``param``'s optimizer state where ``positions`` (bool, broadcastable) is True
        and count those entries' steps from now."""
        zero_optimizer_state(optimizer, param, positions)
        step = optimizer.state.get(param, {}).get("step")
        if step is None:  # never stepped: already fresh
            return
        name = self._names[param]
        birth = self.births.setdefault(name, torch.zeros(param.shape, dtype=torch.float32, device=param.device))
        birth.masked_fill_(positions.to(birth.device).expand_as(birth), float(step))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return  # other optimizers correct (or not) differently: left alone
        for group in optimizer.param_groups:
            if group.get("maximize"):
                continue
            for param in group["params"]:
                name = self._names.get(param)
                if name in self.births and param.grad is not None and param in optimizer.state:
                    self._refresh(param, optimizer.state[param], group, self.births[name])

    @staticmethod
    def _refresh(param: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any], birth: torch.Tensor) -> None:
        """Swap the update just applied to the regrown entries of ``param`` for a fresh parameter's
        (computed on those entries only)."""
        regrown = birth > 0
        if not regrown.any():
            return
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        born = birth[regrown]
        t = torch.as_tensor(state["step"], dtype=torch.float32).to(birth.device).expand_as(born)
        exp_avg, exp_avg_sq = state["exp_avg"][regrown], second[regrown]
        applied = _adam_update(exp_avg, exp_avg_sq, t, group)
        fresh = _adam_update(exp_avg, exp_avg_sq, t - born, group)
        param[regrown] += applied - fresh

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: birth.detach().cpu().clone() for name, birth in self.births.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.births = {name: birth.to(self._params[name].device) for name, birth in state.items()}


class MaskedWeights:
    """Unstructured masks bound to the parameters of ``model`` they name (True = kept)."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(f"weight mask {name!r} names no parameter of {type(model).__name__}")
            param = params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"weight mask {name!r}: shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
            self.params[name] = param
            self.masks[name] = mask.to(device=param.device, dtype=torch.bool)

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned weight to exactly zero (masks follow their parameters' device)."""
        for name, param in self.params.items():
            if self.masks[name].device != param.device:
                self.masks[name] = self.masks[name].to(param.device)
            param.masked_fill_(~self.masks[name], 0.0)

    def clear_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state at pruned positions."""
        for name, param in self.params.items():
            zero_optimizer_state(optimizer, param, ~self.masks[name])

    def enforce(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After an optimizer step: zero pruned weights and their optimizer state."""
        self.apply()
        if optimizer is not None:
            self.clear_optimizer_state(optimizer)

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def cpu_masks(self) -> dict[str, torch.Tensor]:
        """The masks as CPU bool tensors (for checkpoints and ``PrunedModel.weight_masks``)."""
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks (same names and shapes) and zero the newly pruned weights."""
        if set(masks) != set(self.masks):
            raise ValueError("saved weight masks name other parameters than this model's: "
                             "resume with the configuration that wrote them")
        for name, mask in masks.items():
            self.masks[name].copy_(mask.to(self.masks[name].device, torch.bool))
        self.apply()


class MaskKeeper(TrainingHooks):
    """Fine-tune hooks of an unstructured model: pruned weights stay exactly zero."""

    def __init__(self, weight_masks: Mapping[str, torch.Tensor]):
        self._masks = {name: mask.detach().cpu().bool() for name, mask in weight_masks.items()}
        self._bound: MaskedWeights | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bound = MaskedWeights(model, self._masks)
        self._optimizer = optimizer
        self._bound.enforce(optimizer)

    def after_optimizer_step(self, info: StepInfo) -> None:
        self._bound.enforce(self._optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"weight_masks": {name: mask.clone() for name, mask in self._masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._masks = {name: mask.bool() for name, mask in state["weight_masks"].items()}


@dataclass(frozen=True)
class UnstructuredCost:
    """Parameters and MACs per image of a dense-shaped model with zeroed weights.

    ``sub_blocks[j] = (kept_params, kept_macs)`` counts non-zeros of sub-block ``j``."""

    dense_params: int
    nonzero_params: int
    dense_macs: int
    nonzero_macs: int
    sub_blocks: dict[int, tuple[int, int]]

    def metrics(self) -> dict[str, float]:
        """Epoch metrics: ``kept_params`` (non-zero), ``keep_ratio``, ``macs`` (dense: what
        the model really runs), ``nonzero_macs``, ``structured`` = 0."""
        return {"kept_params": float(self.nonzero_params),
                "keep_ratio": self.nonzero_params / self.dense_params,
                "macs": float(self.dense_macs), "nonzero_macs": float(self.nonzero_macs),
                "structured": 0.0}


class NonzeroCounter:
    """Dense and non-zero parameter/MAC counts of one model under unstructured masks.

    Built once (one forward pass of one image to count how often each masked weight is used);
    then :meth:`__call__` is cheap. MACs are counted as in :mod:`p3b_search.cost`; a zeroed
    weight saves one MAC per use.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        names = list(names)
        adapter = get_adapter(model)
        self._dense = model_cost(model)
        self._uses = weight_uses_per_image(model, names)
        owner = {name: sb.index for sb in adapter.sub_blocks for name, _ in adapter.branch_parameters(sb)}
        self._sub_block = {name: owner.get(name) for name in names}

    def __call__(self, weights: MaskedWeights) -> UnstructuredCost:
        pruned_params = {c.index: 0 for c in self._dense.sub_blocks}
        pruned_macs = dict(pruned_params)
        other_params = other_macs = 0
        for name, mask in weights.masks.items():
            zeros = mask.numel() - int(mask.sum())
            j = self._sub_block[name]
            if j is None:
                other_params += zeros
                other_macs += zeros * self._uses[name]
            else:
                pruned_params[j] += zeros
                pruned_macs[j] += zeros * self._uses[name]
        sub_blocks = {c.index: (c.params - pruned_params[c.index], c.macs - pruned_macs[c.index])
                      for c in self._dense.sub_blocks}
        removed_params = sum(pruned_params.values()) + other_params
        removed_macs = sum(pruned_macs.values()) + other_macs
        return UnstructuredCost(self._dense.params, self._dense.params - removed_params,
                                self._dense.macs, self._dense.macs - removed_macs, sub_blocks)


class UnstructuredMethod(PruningMethod):
    """Base of methods whose result keeps dense shapes with zeroed weights (DIMAP, SViTE).

    Subclasses build their masks in ``prepare`` and call :meth:`_mask`; from then on the
    pruned weights stay zero after every optimizer step, in both stages."""

    def __init__(self, config: MethodConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self._weights: MaskedWeights | None = None
        self._counter: NonzeroCounter | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def _mask(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """Zero the pruned weights of ``model`` and start counting non-zeros."""
        self._weights = MaskedWeights(model, masks)
        self._weights.apply()
        self._counter = NonzeroCounter(model, self._weights.masks)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self._weights.enforce(optimizer)

    def after_optimizer_step(self, info: StepInfo) -> None:
        self._weights.enforce(self._optimizer)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {**self._counter(self._weights).metrics(), "density": self._weights.kept() / self._weights.total()}

    def finalize(self, model: nn.Module) -> PrunedModel:
        self._weights.apply()
        return PrunedModel(model, structured=False, weight_masks=self._weights.cpu_masks())

    def finetune_hooks(self, pruned: PrunedModel) -> TrainingHooks:
        return MaskKeeper(pruned.weight_masks)

    def state_dict(self) -> dict[str, Any]:
        return {"weight_masks": self._weights.cpu_masks()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._weights.load_masks(state["weight_masks"])
