"""Allocation rows per sub-block (in the schema of :mod:`p3b_search.method_specs.allocation`)
and epoch metrics of a model, from what a mask decision left.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from p3b_search.cost import dense_sub_block_params, model_cost
from p3b_search.method_specs.allocation import ALLOCATION_KEYS, OPTIONAL_ALLOCATION_KEYS
from p3b_search.surgery import BlockMasks, ModelAdapter, SubBlock


def allocation_row(sb: SubBlock, dense_params: float, kept_params: int, kept_macs: int, *, step: int,
                   epoch: int, **optional: float) -> dict[str, Any]:
    """One row of sub-block ``sb`` (``dense_params``: W_j), its fields in :data:`ALLOCATION_KEYS`
    order; ``optional``: values of :data:`OPTIONAL_ALLOCATION_KEYS` (absent ones are left out)."""
    unknown = set(optional) - set(OPTIONAL_ALLOCATION_KEYS)
    if unknown:
        raise ValueError(f"allocation row fields {sorted(unknown)} are not in ALLOCATION_KEYS: add them there")
    values = {"step": int(step), "epoch": int(epoch), "layer": sb.layer, "kind": sb.kind, "sub_block": sb.index,
              **optional, "keep_ratio": kept_params / dense_params if dense_params else 0.0,
              "kept_params": int(kept_params), "kept_macs": int(kept_macs)}
    return {key: values[key] for key in ALLOCATION_KEYS if key in values}


def allocation_rows(
    adapter: ModelAdapter,
    kept: Mapping[int, tuple[int, int]],
    *,
    step: int,
    epoch: int,
) -> list[dict[str, Any]]:
    """Rows for every sub-block from ``kept[j] = (kept_params, kept_macs)``."""
    dense = dense_sub_block_params(adapter)
    return [allocation_row(sb, dense[sb.index], *kept[sb.index], step=step, epoch=epoch) for sb in adapter.sub_blocks]


def structured_allocation_rows(model: nn.Module, adapter: ModelAdapter, masks: BlockMasks, *,
                               step: int, epoch: int) -> list[dict[str, Any]]:
    """Rows for hard unit masks: the sizes ``shrink_model(model, masks)`` would have."""
    report = model_cost(model, masks)
    kept = {c.index: (c.params, c.macs) for c in report.sub_blocks}
    return allocation_rows(adapter, kept, step=step, epoch=epoch)


def structured_metrics(model: nn.Module, masks: BlockMasks) -> dict[str, float]:
    """Epoch metrics of a hard-unit-masked model, as ``shrink_model(model, masks)`` will be:
    ``kept_params``, ``keep_ratio`` (of the dense model's parameters), ``macs``, ``structured`` = 1."""
    kept, dense = model_cost(model, masks), model_cost(model)
    return {"kept_params": float(kept.params), "keep_ratio": kept.params / dense.params,
            "macs": float(kept.macs), "structured": 1.0}
