"""Round a shrunk model's kept widths up to hardware-friendly multiples, exactly.

Matrix kernels run fastest on widths that are multiples of the vector length (8 or 16
floats); a pruned width of 397 pays for 400 and loses the tail's efficiency. ``round_widths``
keeps, in every partly pruned group (input and output channels, head dims, hidden units;
whole heads are never added), the smallest multiple of ``multiple`` at or above the kept count
(the dense size at most). The added units are pruned units of the dense model whose weights
are set to zero, so the rounded model computes the same logits (a zero hidden unit gives
GELU(0) = 0, a zero head dim adds nothing to q.k nor to v, a zero output channel adds 0 to the
residual) with slightly more MACs, which :func:`p3b_search.cost.model_cost` counts exactly.

A shared residual width is never rounded: its LayerNorms normalise over the kept channels, and
a zero channel more would change their mean and variance. Its head dims and hidden units are.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from p3b_search.surgery.adapters import ModelAdapter, SubBlock, get_adapter
from p3b_search.surgery.arch_spec import ArchSpec
from p3b_search.surgery.gates import RESIDUAL_GROUPS, BlockMasks, ResidualMasks, canonical_masks
from p3b_search.surgery.shrink import attention_indices, query_scale, shrink_model

ROUNDED_GROUPS = ("in", "out", "head_dim", "hidden")


def rounded_masks(masks: BlockMasks, multiple: int, rounded: tuple[str, ...] = ROUNDED_GROUPS) -> BlockMasks:
    """``masks`` with each partly kept group of ``rounded`` grown to a multiple of ``multiple``
    kept units (at most the group's size) by adding its lowest pruned indices."""
    if multiple < 1:
        raise ValueError(f"round_to must be >= 1 (got {multiple})")
    out: BlockMasks = {}
    for index, groups in masks.items():
        out[index] = {}
        for group, mask in groups.items():
            kept, size = int(mask.sum()), mask.numel()
            grown = mask.clone()
            if group in rounded and 0 < kept < size:
                missing = min(size, math.ceil(kept / multiple) * multiple) - kept
                grown[(~mask).nonzero().flatten()[:missing]] = True
            out[index][group] = grown
    return out


def _all(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


@torch.no_grad()
def _place_attention(dense_attn: nn.Module, shrunk_attn: nn.Module, sb: SubBlock, groups: dict[str, torch.Tensor]) -> None:
    heads, rows, cols = attention_indices(sb, groups, torch.device("cpu"))
    c_in, c_out = _all(groups["in"]), _all(groups["out"])
    q_rows = len(heads) * int(groups["head_dim"].sum())
    scale = torch.ones(len(rows))
    scale[:q_rows] = 1 / query_scale(sb, groups)  # undo shrink's query scaling
    qkv, proj = dense_attn.qkv, dense_attn.proj
    qkv.weight.zero_()
    qkv.weight[rows[:, None], c_in[None, :]] = shrunk_attn.qkv.weight.cpu() * scale[:, None]
    if qkv.bias is not None:
        qkv.bias.zero_()
        qkv.bias[rows] = shrunk_attn.qkv.bias.cpu() * scale
    proj.weight.zero_()
    proj.weight[c_out[:, None], cols[None, :]] = shrunk_attn.proj.weight.cpu()
    if proj.bias is not None:
        proj.bias.zero_()
        proj.bias[c_out] = shrunk_attn.proj.bias.cpu()
    table = getattr(dense_attn, "relative_position_bias_table", None)
    if table is not None:
        table[:, heads] = shrunk_attn.relative_position_bias_table.cpu()


@torch.no_grad()
def _place_mlp(dense_mlp: nn.Module, shrunk_mlp: nn.Module, groups: dict[str, torch.Tensor]) -> None:
    hidden, c_in, c_out = _all(groups["hidden"]), _all(groups["in"]), _all(groups["out"])
    fc1, fc2 = dense_mlp.fc1, dense_mlp.fc2
    fc1.weight.zero_()
    fc1.weight[hidden[:, None], c_in[None, :]] = shrunk_mlp.fc1.weight.cpu()
    if fc1.bias is not None:
        fc1.bias.zero_()
        fc1.bias[hidden] = shrunk_mlp.fc1.bias.cpu()
    fc2.weight.zero_()
    fc2.weight[c_out[:, None], hidden[None, :]] = shrunk_mlp.fc2.weight.cpu()
    if fc2.bias is not None:
        fc2.bias.zero_()
        fc2.bias[c_out] = shrunk_mlp.fc2.bias.cpu()


@torch.no_grad()
def _place_stream(dense: nn.Module, shrunk: nn.Module, adapter: ModelAdapter, residual: ResidualMasks) -> None:
    """Put ``shrunk``'s narrowed stream parameters (outside the sub-blocks, and the sub-blocks'
    norms) at their kept channels of ``dense`` (zeros elsewhere)."""
    widths, cuts = adapter.stream_widths(), adapter.outside_slices()
    kept = {stage: _all(mask) for stage, mask in residual.items()}
    shrunk_params = dict(shrunk.named_parameters())
    for name in dict.fromkeys(cut.name for cut in cuts):
        value = shrunk_params[name].detach().cpu()
        for cut in reversed([c for c in cuts if c.name == name]):  # undo the cuts in reverse order
            shape = list(value.shape)
            shape[cut.dim] = widths[cut.stage] * cut.repeats
            index = (torch.arange(cut.repeats)[:, None] * widths[cut.stage] + kept[cut.stage][None, :]).flatten()
            value = value.new_zeros(shape).index_copy_(cut.dim, index, value)
        dense.get_parameter(name).copy_(value)
    for sb in adapter.sub_blocks:
        norm_name = f"{sb.block_path}.{adapter.branch_attrs[sb.kind][0]}"
        for name, param in adapter.model.get_submodule(norm_name).named_parameters():
            narrow = shrunk_params.get(f"{norm_name}.{name}")
            if narrow is not None:  # None: the sub-block was skipped
                param.zero_()
                param[kept[sb.stage]] = narrow.detach().cpu()


@torch.no_grad()
def expand_to_dense(shrunk: nn.Module, spec: ArchSpec) -> nn.Module:
    """A dense timm model (CPU) holding ``shrunk``'s weights at their dense positions and zeros
    at every pruned unit; ``shrink_model`` of it with ``spec``'s masks gives ``shrunk`` back."""
    import timm

    dense = timm.create_model(spec.model_name, pretrained=False, **spec.model_kwargs).eval()
    adapter = get_adapter(dense)
    residual = spec.residual_masks(adapter)
    masks = canonical_masks(adapter, spec.masks(adapter), residual)
    own = {name: value for name, value in shrunk.state_dict().items()}
    for name, value in dense.state_dict().items():
        if name in own and own[name].shape == value.shape:
            value.copy_(own[name])
    if residual is not None:
        _place_stream(dense, shrunk, adapter, residual)
    shrunk_adapter = get_adapter(shrunk)
    for sb, shrunk_sb in zip(adapter.sub_blocks, shrunk_adapter.sub_blocks):
        groups = masks[sb.index]
        branch = shrunk_adapter.branch(shrunk_sb)
        if branch is None:  # skipped: shrink drops it again
            continue
        if sb.kind == "attn":
            _place_attention(adapter.branch(sb), branch, sb, groups)
        else:
            _place_mlp(adapter.branch(sb), branch, groups)
        _, _, ls_attr, _ = adapter.branch_attrs[sb.kind]
        dense_ls = getattr(adapter.block(sb), ls_attr, None)
        shrunk_ls = getattr(shrunk_adapter.block(shrunk_sb), ls_attr, None)
        if hasattr(dense_ls, "gamma") and hasattr(shrunk_ls, "gamma") and dense_ls.gamma.shape != shrunk_ls.gamma.shape:
            dense_ls.gamma.zero_()
            dense_ls.gamma[_all(groups["out"])] = shrunk_ls.gamma.cpu()
    return dense


def round_widths(shrunk: nn.Module, spec: ArchSpec, multiple: int) -> tuple[nn.Module, ArchSpec]:
    """``shrunk`` (described by ``spec``) with its kept widths rounded up to multiples of
    ``multiple`` by zero units (see the module docstring); returns the model (CPU, eval) and
    its :class:`ArchSpec` (``extra`` kept, plus ``round_to``)."""
    dense = expand_to_dense(shrunk, spec)
    adapter = get_adapter(dense)
    residual = spec.residual_masks(adapter)
    rounded = ROUNDED_GROUPS if residual is None else tuple(g for g in ROUNDED_GROUPS if g not in RESIDUAL_GROUPS)
    masks = rounded_masks(canonical_masks(adapter, spec.masks(adapter), residual), multiple, rounded)
    model = shrink_model(dense, masks, residual, inplace=True).eval()
    rounded = ArchSpec.from_model(model, spec.model_name, spec.model_kwargs, extra={**spec.extra, "round_to": multiple})
    return model, rounded
