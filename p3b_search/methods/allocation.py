"""What a mask decision left: allocation rows per sub-block and epoch metrics of a model.

One row per sub-block per mask decision, with keys ``step`` (micro-batch of the decision),
``epoch``, ``layer``, ``kind``, ``sub_block``, ``keep_ratio`` (kept / dense parameters of the
sub-block, in [0, 1]), ``kept_params`` and ``kept_macs`` (per image). Methods without block
benefits (DIMAP, SViTE, S²ViTE) leave ``benefit_*`` and ``importance`` out.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from p3b_search.cost import dense_sub_block_params, model_cost
from p3b_search.surgery import BlockMasks, ModelAdapter


def allocation_rows(
    adapter: ModelAdapter,
    kept: Mapping[int, tuple[int, int]],
    *,
    step: int,
    epoch: int,
) -> list[dict[str, Any]]:
    """Rows for every sub-block from ``kept[j] = (kept_params, kept_macs)``."""
    dense = dense_sub_block_params(adapter)
    rows = []
    for sb in adapter.sub_blocks:
        params, macs = kept[sb.index]
        rows.append({
            "step": int(step), "epoch": int(epoch), "layer": sb.layer, "kind": sb.kind,
            "sub_block": sb.index, "keep_ratio": params / dense[sb.index] if dense[sb.index] else 0.0,
            "kept_params": int(params), "kept_macs": int(macs),
        })
    return rows


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
