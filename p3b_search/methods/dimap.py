"""DIMAP: data-independent module-aware pruning (one-shot, on the pretrained weights).

The method (metric, modules, one threshold per module, the structured variant) is specified
in docs/methods.md, section 2. What this module decides beyond it:

* Ties in the metric share the denominator that includes all of them.
* Module ratios count the module's weight matrices (biases excluded); ``prune_ratio`` counts
  *all* the model's parameters (see :mod:`p3b_search.methods.target`), and the module ratios
  left unset share one ratio solved for it; with all three set, ``prune_ratio`` is not used.
* ``dimap`` keeps its masks at zero through both training stages
  (:class:`~p3b_search.methods.sparsity.MaskedWeights`); parameters are reported as
  non-zeros, MACs both dense and non-zero.
* ``dimap-structured`` scores a unit (``unit_groups``) by the *mean* score of the weights it
  removes (importance per freed parameter) and removes units cheapest first, each costing the
  weights it still removes given the units already gone, until its module's weight target is
  met (QKV and PRJ together are the attention module, target ``r_qkv P_qkv + r_prj P_prj``).
  The last unit of a group is never removed, so no sub-block disappears. Units take their
  biases (and Swin position-bias columns) with them, so the shared ratio is solved on the
  masked model's parameter count. The hard masks act through gates while training and
  :func:`~p3b_search.surgery.shrink_model` makes the model physically smaller at the end.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from p3b_search.cost import model_cost
from p3b_search.method_specs.dimap import (
    DIMAP_SPEC,
    DIMAP_STRUCTURED_SPEC,
    MODULES,
    DIMAPConfig,
    DIMAPStructuredConfig,
)
from p3b_search.methods.allocation import (
    allocation_rows,
    structured_allocation_rows,
    structured_metrics,
)
from p3b_search.methods.base import PrunedModel, PruningMethod, register_method
from p3b_search.methods.sparsity import UnstructuredMethod
from p3b_search.methods.target import check_kept, solve_monotone
from p3b_search.methods.unit_weights import unit_sums
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

#: the DIMAP modules whose weights each kind of sub-block holds
KIND_MODULES = {"attn": ("qkv", "prj"), "mlp": ("mlp",)}


@torch.no_grad()
def dimap_scores(weight: torch.Tensor) -> torch.Tensor:
    """DIMAP importance of every element of one layer's ``weight`` (same shape, float64):
    ``w_j^2`` over the sum of squares of all weights of the layer at least as large."""
    magnitudes, order = weight.detach().flatten().abs().sort(descending=True)
    squares = magnitudes.to(torch.float64).square()
    cumulative = squares.cumsum(0)
    _, tie_counts = torch.unique_consecutive(magnitudes, return_counts=True)
    denominator = cumulative[tie_counts.cumsum(0) - 1].repeat_interleave(tie_counts, output_size=squares.numel())
    ranked = torch.where(denominator > 0, squares / denominator, 0.0)
    return torch.empty_like(ranked).scatter_(0, order, ranked).view_as(weight)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries of the 1-D ``scores`` (ties at the threshold
    go by position), found by selection rather than a full sort."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return chosen
    threshold = scores.kthvalue(count).values
    chosen = scores < threshold
    tied = (scores == threshold).nonzero().flatten()
    chosen[tied[: count - int(chosen.sum())]] = True
    return chosen


def module_layers(model: nn.Module, adapter: ModelAdapter) -> dict[str, dict[str, nn.Parameter]]:
    """Weight matrices of each DIMAP module by parameter name: ``{"qkv": {...}, "prj": ..., "mlp": ...}``."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers: dict[str, dict[str, nn.Parameter]] = {m: {} for m in MODULES}
    for sb in adapter.sub_blocks:
        first, second = adapter.linears(sb)
        targets = ("qkv", "prj") if sb.kind == "attn" else ("mlp", "mlp")
        for module, linear in zip(targets, (first, second)):
            layers[module][names[id(linear.weight)]] = linear.weight
    return layers


def dimap_weight_masks(layers: dict[str, dict[str, nn.Parameter]], ratios: dict[str, float]) -> dict[str, torch.Tensor]:
    """Unstructured masks (True = kept): in each module the ``round(ratio * weights)`` lowest
    scores are removed (one global threshold per module, ties broken by layer order)."""
    masks: dict[str, torch.Tensor] = {}
    for module, weights in layers.items():
        scores = [dimap_scores(w).flatten() for w in weights.values()]
        flat = torch.cat(scores)
        keep = ~lowest(flat, round(ratios[module] * flat.numel()))
        for (name, weight), part in zip(weights.items(), keep.split([s.numel() for s in scores])):
            masks[name] = part.view_as(weight)
    return masks


def _module_sizes(layers: dict[str, dict[str, nn.Parameter]]) -> dict[str, int]:
    return {m: sum(w.numel() for w in ws.values()) for m, ws in layers.items()}


@register_method
class DIMAP(UnstructuredMethod):
    """One-shot unstructured DIMAP; the prune stage and the fine-tune stage both train with
    the pruned weights held at zero."""

    spec = DIMAP_SPEC
    config: DIMAPConfig

    def __init__(self, config: DIMAPConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self.ratios: dict[str, float] = {}

    def prepare(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        layers = module_layers(model, adapter)
        self.ratios = self.config.module_ratios(_module_sizes(layers), sum(p.numel() for p in model.parameters()))
        self._mask(model, dimap_weight_masks(layers, self.ratios))
        self._allocation_rows += allocation_rows(adapter, self._counter(self._weights).sub_blocks, step=0, epoch=0)


# -- structured --------------------------------------------------------------------------------

def unit_scores(adapter: ModelAdapter, sb: SubBlock) -> dict[str, torch.Tensor]:
    """Mean DIMAP score of the weights each unit of ``sb`` removes, per unit group."""
    sums = unit_sums(sb, *(dimap_scores(linear.weight) for linear in adapter.linears(sb)))
    C = sb.dim
    if sb.kind == "attn":
        H, d = sb.num_heads, sb.head_dim
        owned = {"heads": 3 * d * C + C * d, "head_dim": 3 * H * C + C * H, "in": 3 * H * d, "out": H * d}
    else:
        owned = {"hidden": 2 * C, "in": sb.hidden, "out": sb.hidden}
    return {group: sums[group] / owned[group] for group in owned}


def _weights_removed_by_one(kind: str, group: str, kept: dict[str, int]) -> int:
    """Weight-matrix entries that removing one more unit of ``group`` removes, given ``kept``."""
    if kind == "attn":
        width = kept["heads"] * kept["head_dim"]
        return {
            "heads": kept["head_dim"] * (3 * kept["in"] + kept["out"]),
            "head_dim": kept["heads"] * (3 * kept["in"] + kept["out"]),
            "in": 3 * width,
            "out": width,
        }[group]
    return {"hidden": kept["in"] + kept["out"], "in": kept["hidden"], "out": kept["hidden"]}[group]


@dataclass(frozen=True)
class RemovalOrder:
    """The order in which DIMAP removes the units of one kind of sub-block (``attn`` or
    ``mlp``), cheapest first, each unit costing the weights it still removes given the units
    already gone; the last unit of a group is never removed.

    ``unit_groups``: the groups walked; ``position[j][group][u]``: place of unit ``u`` in
    the order (``len`` of the order when it is never removed); ``removed_weights[n]``:
    weight-matrix entries the first ``n`` units remove, ``n = 0 .. len``."""

    kind: str
    unit_groups: tuple[str, ...]
    position: dict[int, dict[str, torch.Tensor]]
    removed_weights: list[int]

    def count(self, target: float) -> int:
        """Units removed for a target of ``target`` weights: up to the first unit that
        reaches it (every unit of the order if none does)."""
        return min(bisect_left(self.removed_weights, target), len(self.removed_weights) - 1)

    def masks(self, count: int) -> BlockMasks:
        """Hard masks of this kind's sub-blocks with the first ``count`` units removed."""
        return {j: {g: place >= count for g, place in groups.items()} for j, groups in self.position.items()}


def removal_order(adapter: ModelAdapter, kind: str, unit_groups: tuple[str, ...]) -> RemovalOrder:
    """The DIMAP removal order of the ``unit_groups`` of every ``kind`` sub-block."""
    blocks = [sb for sb in adapter.sub_blocks if sb.kind == kind]
    kept = {sb.index: dict(sb.groups) for sb in blocks}
    candidates: list[tuple[float, int, str, int]] = []
    for sb in blocks:
        for group, scores in unit_scores(adapter, sb).items():
            if group in unit_groups:
                candidates += [(s, sb.index, group, u) for u, s in enumerate(scores.tolist())]
    candidates.sort(key=lambda c: c[0])
    removed, places = [0], []
    for _, j, group, unit in candidates:
        if kept[j][group] <= 1:
            continue
        removed.append(removed[-1] + _weights_removed_by_one(kind, group, kept[j]))
        kept[j][group] -= 1
        places.append((j, group, unit))
    position = {sb.index: {g: torch.full((n,), len(places)) for g, n in sb.groups.items()} for sb in blocks}
    for place, (j, group, unit) in enumerate(places):
        position[j][group][unit] = place
    return RemovalOrder(kind, unit_groups, position, removed)


def removal_orders(adapter: ModelAdapter, unit_groups: tuple[str, ...]) -> list[RemovalOrder]:
    """The removal orders of the attention and the MLP sub-blocks."""
    return [removal_order(adapter, kind, unit_groups) for kind in KIND_MODULES]


def _weight_target(order: RemovalOrder, ratios: dict[str, float], sizes: dict[str, int]) -> float:
    """Weights ``ratios`` remove from the modules of ``order``'s kind."""
    return sum(ratios[m] * sizes[m] for m in KIND_MODULES[order.kind])


def _unit_masks(adapter: ModelAdapter, orders: list[RemovalOrder], ratios: dict[str, float],
                sizes: dict[str, int]) -> BlockMasks:
    """Hard unit masks for ``ratios`` of the module weights ``sizes``, every order walked
    at most to its end."""
    masks: BlockMasks = {}
    for order in orders:
        masks.update(order.masks(order.count(_weight_target(order, ratios, sizes))))
    return canonical_masks(adapter, masks)


def dimap_unit_masks(adapter: ModelAdapter, ratios: dict[str, float], orders: list[RemovalOrder]) -> BlockMasks:
    """Hard unit masks removing ``ratios`` of each module's weights, cheapest units first
    (``orders``: :func:`removal_orders`)."""
    sizes = _module_sizes(module_layers(adapter.model, adapter))
    for order in orders:
        target = _weight_target(order, ratios, sizes)
        if target > order.removed_weights[-1]:
            raise ValueError(
                f"dimap-structured: unit_groups={list(order.unit_groups)} can remove only "
                f"{order.removed_weights[-1]} of the {round(target)} {order.kind} weights the prune ratios ask for: "
                "add unit groups or lower the ratios"
            )
    return _unit_masks(adapter, orders, ratios, sizes)


def solve_unit_ratios(model: nn.Module, config: DIMAPStructuredConfig,
                      orders: list[RemovalOrder]) -> dict[str, float]:
    """Module ratios of ``config`` with the unset ones sharing the ratio whose unit masks keep
    ``1 - prune_ratio`` of the model's parameters (counted by :func:`~p3b_search.cost.model_cost`)."""
    given = config.given_ratios()
    if None not in given.values():
        return dict(given)
    adapter = get_adapter(model)
    sizes = _module_sizes(module_layers(model, adapter))
    dense = model_cost(model).params

    def kept(share: float) -> int:
        return model_cost(model, _unit_masks(adapter, orders, config.with_share(share), sizes)).params

    def within_walks(share: float) -> bool:
        ratios = config.with_share(share)
        return all(_weight_target(order, ratios, sizes) <= order.removed_weights[-1] for order in orders)

    highest = 1.0
    if not within_walks(highest):  # the largest share that every removal order can still walk to
        low, high = 0.0, 1.0
        for _ in range(40):
            low, high = ((low + high) / 2, high) if within_walks((low + high) / 2) else (low, (low + high) / 2)
        highest = low
    share = solve_monotone(kept, config.kept_target(dense), 0.0, highest)
    check_kept("dimap-structured", kept(share), dense, config.prune_ratio,
               fix=f"add unit groups to unit_groups={list(config.unit_groups)} or lower prune_ratio")
    return config.with_share(share)


@register_method
class DIMAPStructured(PruningMethod):
    """DIMAP aggregated per unit: hard unit masks (gates) while training, a physically
    smaller model at the end."""

    spec = DIMAP_STRUCTURED_SPEC
    config: DIMAPStructuredConfig

    def __init__(self, config: DIMAPStructuredConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        super().__init__(config, num_classes=num_classes, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self._gates: GateSet | None = None
        self.masks: BlockMasks = {}
        self.ratios: dict[str, float] = {}

    def prepare(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        orders = removal_orders(adapter, self.config.unit_groups)
        self.ratios = solve_unit_ratios(model, self.config, orders)
        self.masks = dimap_unit_masks(adapter, self.ratios, orders)
        self._gates = attach_gates(model, adapter, requires_grad=False)
        self._gates.set_masks(self.masks)
        self._allocation_rows += structured_allocation_rows(model, adapter, self.masks, step=0, epoch=0)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._gates.to(next(model.parameters()).device)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return structured_metrics(self._gates.adapter.model, self.masks)

    def finalize(self, model: nn.Module) -> PrunedModel:
        self._gates.remove()
        return PrunedModel(shrink_model(model, self.masks), structured=True)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {j: {g: m.clone() for g, m in groups.items()} for j, groups in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = canonical_masks(self._gates.adapter, state["masks"])
        self._gates.set_masks(self.masks)

