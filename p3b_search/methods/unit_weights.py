"""Per-unit sums over the weights each structured unit of a sub-block owns.

Units: attention ``heads`` (H), ``head_dim`` (d, the same dim in every head), ``in`` and
``out`` channels (C); MLP ``hidden`` neurons, ``in`` and ``out`` channels. A unit owns the
weights that removing it removes: a head its 3d rows of qkv and its d columns of proj, a head
dim 3H rows of qkv and H columns of proj, an ``in`` channel a column of qkv/fc1, an ``out``
channel a row of proj/fc2, a hidden neuron a row of fc1 and a column of fc2.
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


@torch.no_grad()
def unit_weight_norms(adapter: ModelAdapter, sb: SubBlock, norm: Literal["l1", "l2"]) -> dict[str, torch.Tensor]:
    """Per unit of each group of :func:`unit_sums`, the L1 or L2 norm of the weights it owns (float32)."""
    power = 1 if norm == "l1" else 2
    first, second = (linear.weight.detach().float().abs().pow(power) for linear in adapter.linears(sb))
    return {group: total.pow(1.0 / power) for group, total in unit_sums(sb, first, second).items()}
