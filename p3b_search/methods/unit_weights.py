"""Per-unit sums over the weights each structured unit of a sub-block owns.

Units: attention ``heads`` (H), ``head_dim`` (d, the same dim in every head), ``in`` and
``out`` channels (C); MLP ``hidden`` neurons, ``in`` and ``out`` channels. A unit owns the
weights that removing it removes: a head its 3d rows of qkv and its d columns of proj, a head
dim 3H rows of qkv and H columns of proj, an ``in`` channel a column of qkv/fc1, an ``out``
channel a row of proj/fc2, a hidden neuron a row of fc1 and a column of fc2. A shared
residual's channel owns every ``in`` and ``out`` channel of its stage's sub-blocks and, outside
them, its rows and columns of the patch embedding, patch merging and classifier heads
(:func:`residual_weight_norms`).
"""
from __future__ import annotations

from typing import Literal

import torch

from p3b_search.surgery import ModelAdapter, SubBlock


def unit_sums(sb: SubBlock, first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per unit of each group, the sum of per-weight values over the weights the unit owns.

    ``first``/``second``: one value per weight of the sub-block's first (qkv, fc1) and second
    (proj, fc2) linear layer, shaped like those weights. Returns group -> (units,) tensor.
    """
    if sb.kind == "attn":
        H, d, C = sb.num_heads, sb.head_dim, sb.dim
        qkv, proj = first.view(3, H, d, C), second.view(C, H, d)
        return {"heads": qkv.sum((0, 2, 3)) + proj.sum((0, 2)), "head_dim": qkv.sum((0, 1, 3)) + proj.sum((0, 1)),
                "in": qkv.sum((0, 1, 2)), "out": proj.sum((1, 2))}
    return {"hidden": first.sum(1) + second.sum(0), "in": first.sum(0), "out": second.sum(1)}


def _powered_sums(adapter: ModelAdapter, sb: SubBlock, power: int) -> dict[str, torch.Tensor]:
    """:func:`unit_sums` of ``|w| ** power`` over ``sb``'s linears."""
    first, second = (linear.weight.detach().float().abs().pow(power) for linear in adapter.linears(sb))
    return unit_sums(sb, first, second)


@torch.no_grad()
def unit_weight_norms(adapter: ModelAdapter, sb: SubBlock, norm: Literal["l1", "l2"]) -> dict[str, torch.Tensor]:
    """Per unit of each group of :func:`unit_sums`, the L1 or L2 norm of the weights it owns (float32)."""
    power = 1 if norm == "l1" else 2
    return {group: total.pow(1.0 / power) for group, total in _powered_sums(adapter, sb, power).items()}


@torch.no_grad()
def residual_weight_norms(adapter: ModelAdapter, norm: Literal["l1", "l2"]) -> dict[int, torch.Tensor]:
    """Per channel of each stage's shared residual, the L1 or L2 norm of the weights it owns:
    its input and output channels in every sub-block of the stage, and its slices of the
    matrix products outside the sub-blocks (patch embedding rows, patch merging rows and
    columns, head columns) (float32, stage -> (C_stage,))."""
    power = 1 if norm == "l1" else 2
    totals = {stage: torch.zeros(width, device=next(adapter.model.parameters()).device)
              for stage, width in adapter.stream_widths().items()}
    for sb in adapter.sub_blocks:
        sums = _powered_sums(adapter, sb, power)
        totals[sb.stage] += sums["in"] + sums["out"]
    weights = {name for name, _ in adapter.outside_matmuls()}
    for cut in adapter.outside_slices():
        if cut.name in weights:
            powered = adapter.model.get_parameter(cut.name).detach().float().abs().pow(power)
            per_index = powered.transpose(0, cut.dim).flatten(1).sum(1)
            totals[cut.stage] += per_index.view(cut.repeats, -1).sum(0)
    return {stage: total.pow(1.0 / power) for stage, total in totals.items()}
