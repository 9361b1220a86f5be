"""What a mask decision left: allocation rows per sub-block and epoch metrics of a model.

The allocation-row schema, the one definition every table and figure reads: one row per
sub-block per mask decision, with the fields of :data:`ALLOCATION_KEYS` in that order:
``step`` (micro-batch of the decision), ``epoch``, ``layer``, ``kind``, ``sub_block`` (j),
``benefit_cls``/``benefit_patch`` (window-mean block benefit, NaN when not measured),
``importance`` (combined I_j, NaN when not used), ``keep_ratio_target`` (the keep ratio the
decision aimed at, NaN for a global ranking), ``keep_ratio`` (kept / dense parameters of the
sub-block, in [0, 1]), ``kept_params`` and ``kept_macs`` (per image). The fields of
:data:`OPTIONAL_ALLOCATION_KEYS` are left out by methods without block benefits (DIMAP,
SViTE, S²ViTE).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from p3b_search.cost import dense_sub_block_params, model_cost
from p3b_search.surgery import BlockMasks, ModelAdapter, SubBlock

ALLOCATION_KEYS: tuple[str, ...] = (
    "step", "epoch", "layer", "kind", "sub_block", "benefit_cls", "benefit_patch", "importance",
    "keep_ratio_target", "keep_ratio", "kept_params", "kept_macs",
)
OPTIONAL_ALLOCATION_KEYS: tuple[str, ...] = ("benefit_cls", "benefit_patch", "importance", "keep_ratio_target")
#: Fields every row must carry (for the tables and the keep-ratio heatmap).
REQUIRED_ALLOCATION_KEYS: tuple[str, ...] = ("step", "layer", "kind", "keep_ratio")


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
