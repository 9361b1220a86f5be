"""Exact parameter and MAC accounting for dense, masked and shrunk timm ViT/DeiT/Swin models.

MACs are multiply-accumulates per image of matrix products (linear layers, attention's
``q @ k^T`` and ``attn @ v``, the patch-embedding convolution), as in timm/DeiT tables:
norms, softmax, biases, GELU and the Swin position bias are not counted. This is what
:func:`torch_macs` counts with ``torch.utils.flop_counter`` (FLOPs / 2), which the tests
check against. A sub-block's parameters are its norm, branch (qkv + proj, or fc1 + fc2,
plus Swin's relative position table) and layer scale; everything else is *never pruned*, except
with a shared residual, whose width also cuts the embeddings, merging layers, final norm and
heads (:meth:`~p3b_search.surgery.adapters.ModelAdapter.outside_params`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from p3b_search.surgery.adapters import BranchSizes, ModelAdapter, SubBlock, get_adapter
from p3b_search.surgery.gates import BlockMasks, ResidualMasks, canonical_masks, masked_sizes


@dataclass(frozen=True)
class SubBlockCost:
    """Parameters and MACs per image of one sub-block, with the widths they come from."""

    index: int
    layer: int
    kind: str
    params: int
    macs: int
    sizes: BranchSizes


@dataclass(frozen=True)
class CostReport:
    """Per-sub-block costs plus the never-pruned rest (stem, position embedding, heads)."""

    sub_blocks: list[SubBlockCost]
    other_params: int
    other_macs: int

    @property
    def block_params(self) -> int:
        return sum(c.params for c in self.sub_blocks)

    @property
    def params(self) -> int:
        return self.block_params + self.other_params

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.sub_blocks) + self.other_macs

    def rows(self) -> list[dict]:
        """One plain dict per sub-block (for tables), sizes flattened."""
        return [{"index": c.index, "layer": c.layer, "kind": c.kind, "params": c.params,
                 "macs": c.macs, **asdict(c.sizes)} for c in self.sub_blocks]


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _has_bias(linear: nn.Linear) -> int:
    return int(linear.bias is not None)


def sub_block_cost(adapter: ModelAdapter, sb: SubBlock, sizes: BranchSizes) -> SubBlockCost:
    """Analytic cost of ``sb`` at widths ``sizes``; biases, norm and layer-scale layout are
    read from the model's (dense or shrunk) modules (``sizes.norm``: the dense norm narrowed)."""
    if sizes.skipped:
        return SubBlockCost(sb.index, sb.layer, sb.kind, 0, 0, sizes)
    block = adapter.block(sb)
    norm_attr, _, ls_attr, _ = adapter.branch_attrs[sb.kind]
    first, second = adapter.linears(sb)
    c_in, c_out, T = sizes.c_in, sizes.c_out, sb.tokens
    layer_scale = c_out if hasattr(getattr(block, ls_attr, None), "gamma") else 0  # sliced by shrink
    norm = _numel(getattr(block, norm_attr))
    params = (norm if sizes.norm is None else norm // sb.dim * sizes.norm) + layer_scale
    if sb.kind == "attn":
        width = sizes.heads * sizes.head_dim
        table = getattr(adapter.branch(sb), "relative_position_bias_table", None)
        params += (c_in * 3 * width + 3 * width * _has_bias(first)
                   + width * c_out + c_out * _has_bias(second)
                   + (table.shape[0] * sizes.heads if table is not None else 0))
        attention = (T // sb.window) * 2 * sizes.heads * sb.window ** 2 * sizes.head_dim
        macs = T * c_in * 3 * width + attention + T * width * c_out
    else:
        h = sizes.hidden
        params += c_in * h + h * _has_bias(first) + h * c_out + c_out * _has_bias(second)
        macs = T * c_in * h + T * h * c_out
    return SubBlockCost(sb.index, sb.layer, sb.kind, params, macs, sizes)


def model_cost(model: nn.Module, masks: BlockMasks | None = None, residual: ResidualMasks | None = None) -> CostReport:
    """Costs of ``model`` as it is (dense or shrunk) or, with ``masks`` (and a shared
    ``residual``), of the model that ``shrink_model(model, masks, residual)`` would produce."""
    adapter = get_adapter(model)
    if residual is not None and masks is None:
        masks = {}
    if masks is not None:
        masks = canonical_masks(adapter, masks, residual)
    costs, actual_block_params = [], 0
    for sb in adapter.sub_blocks:
        if masks is not None:
            sizes = masked_sizes(sb, masks[sb.index], shared=residual is not None)
        else:
            sizes = adapter.current_sizes(sb)
        costs.append(sub_block_cost(adapter, sb, sizes))
        actual_block_params += sum(p.numel() for _, p in adapter.branch_parameters(sb))
    other = sum(p.numel() for p in model.parameters()) - actual_block_params
    if residual is None:
        return CostReport(costs, other, adapter.stem_and_head_macs())
    widths = {stage: int(mask.sum()) for stage, mask in residual.items()}
    other -= adapter.outside_params() - adapter.outside_params(widths)
    return CostReport(costs, other, adapter.stem_and_head_macs(widths))


def dense_sub_block_params(adapter: ModelAdapter) -> dict[int, int]:
    """W_j: parameters of each sub-block of the dense model (P3B's budget units)."""
    return {sb.index: sub_block_cost(adapter, sb, sb.dense_sizes()).params for sb in adapter.sub_blocks}


@torch.no_grad()
def torch_macs(model: nn.Module, batch_size: int = 1) -> float:
    """MACs per image counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on a
    random input, with timm's fused attention switched off so attention matmuls are seen."""
    from torch.utils.flop_counter import FlopCounterMode

    adapter = get_adapter(model)
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *adapter.input_size(), device=device)
    try:
        for m in fused:
            m.fused_attn = False
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, value in fused.items():
            m.fused_attn = value
        model.train(was_training)
    return counter.get_total_flops() / 2 / batch_size


@torch.no_grad()
def weight_uses_per_image(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """How many times per image each weight of the ``nn.Linear``/``nn.Conv2d`` layers owning
    the parameters ``names`` (``<module>.weight``) is multiplied: the layer's output rows
    (linear) or output positions (convolution), counted on one image."""
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    handles = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{name!r} is not the weight of a Linear or Conv2d layer: only those can be masked")
        uses[name] = 0

        def count(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            uses[name] += output.numel() // channels

        handles.append(module.register_forward_hook(count))
    if not handles:
        return uses
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *get_adapter(model).input_size(), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return uses


def nonzero_macs(model: nn.Module, weight_masks: dict[str, torch.Tensor]) -> int:
    """MACs per image that remain when the zeros of ``weight_masks`` (parameter name -> bool,
    True = kept, weights of ``nn.Linear``/``nn.Conv2d`` layers anywhere in the model) are
    skipped: what unstructured sparsity could save with sparse kernels. Each zeroed weight
    saves one MAC per use (:func:`weight_uses_per_image`). Without masks this is
    :func:`model_cost`'s MACs."""
    uses = weight_uses_per_image(model, weight_masks)
    return model_cost(model).macs - sum(uses[name] * int((~mask).sum()) for name, mask in weight_masks.items())


def masked_params(model: nn.Module, weight_masks: dict[str, torch.Tensor]) -> int:
    """Parameters of ``model`` less the zeros that ``weight_masks`` (name -> bool, True = kept) pin."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(int((~mask).sum()) for mask in weight_masks.values())


@dataclass(frozen=True)
class KeptCost:
    """What a shrunk or masked model really keeps: ``params`` (non-zero parameters), ``macs`` per
    image of its shapes (dense shapes for unstructured results: no speed-up without sparse
    kernels) and ``nonzero_macs`` per image (what sparse kernels could reach)."""

    params: int
    macs: int
    nonzero_macs: int


def kept_cost(model: nn.Module, weight_masks: dict[str, torch.Tensor]) -> KeptCost:
    """:class:`KeptCost` of ``model`` with the unstructured zeros of ``weight_masks`` (empty for structured results)."""
    return KeptCost(params=masked_params(model, weight_masks), macs=model_cost(model).macs,
                    nonzero_macs=nonzero_macs(model, weight_masks))
