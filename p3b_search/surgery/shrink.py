"""``shrink_model``: turn a hard-masked timm model into a physically smaller one.

The shrunk model computes exactly what the masked model computes (same logits up to fp32
rounding), with fewer parameters and MACs:

* ``qkv``/``fc1`` keep only the input channels, heads, head dims and hidden units that
  survive; ``proj``/``fc2`` keep the surviving output channels, which go back into the
  full-width residual stream (C itself never shrinks): ViT blocks add them in place with one
  ``index_add``; Swin's linears scatter them (its window attention reshapes full-width maps).
  Both become :class:`SlicedLinear`, a ``nn.Linear`` with optional gather/scatter indices.
* ``num_heads`` and the per-head dim shrink uniformly. The attention keeps the dense scale
  ``d**-0.5``: timm's kernels use ``d'**-0.5`` for the new dim ``d'``, so the query rows are
  multiplied by ``sqrt(d'/d)`` once, here. (This works for timm's fused and unfused paths.)
* Norms stay full-width with statistics over all C channels, exactly as in the masked model
  that was trained; only a skipped sub-block loses its norm.
* With a *shared residual* (``residual``: one mask per stage's stream) the stream itself is
  narrow: the patch embedding, class/position tokens, every norm (``LayerNorm(kept)``), every
  sub-block's input and output, patch merging, the final norm and the heads keep only the kept
  channels, so branches read and write the stream directly: no gather, no scatter, no
  ``index_add`` (plain ``nn.Linear`` everywhere). The masked model it matches normalises over
  the kept channels (:func:`~p3b_search.surgery.gates.masked_layer_norm`).
* A sub-block whose output is gone (or that can only emit a constant, see
  :func:`~p3b_search.surgery.gates.canonical_masks`) is removed from compute: its block's
  class becomes a subclass of timm's whose ``forward`` skips the missing branch.

The kept indices are remembered on each block (``block.kept_units``) and, with a shared
residual, on the model (``model.kept_residual``: stage -> kept indices, None = all) so that
:class:`~p3b_search.surgery.arch_spec.ArchSpec` can describe the result as plain JSON.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from p3b_search.surgery.adapters import ModelAdapter, SubBlock, get_adapter
from p3b_search.surgery.gates import BlockMasks, ResidualMasks, canonical_masks, check_residual


class SlicedLinear(nn.Linear):
    """``nn.Linear`` over a subset of the input's channels, scattered into a wider output.

    ``in_index`` (kept input channels, or None for all) is gathered from the last dim of the
    input; the result, of width ``out_features``, is written at ``out_index`` of a zero
    tensor of width ``full_out`` (or returned as is when ``out_index`` is None).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 in_index: torch.Tensor | None = None, out_index: torch.Tensor | None = None,
                 full_out: int | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("in_index", in_index, persistent=False)
        self.register_buffer("out_index", out_index, persistent=False)
        self.full_out = full_out if out_index is not None else weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gather/scatter_add with a broadcast index: on CPU they run 4-13x faster than
        # index_select/index_copy over the last dim (benchmarks/RESULTS.md, section 3)
        if self.in_index is not None:
            x = torch.gather(x, -1, self.in_index.expand(*x.shape[:-1], -1))
        y = F.linear(x, self.weight, self.bias)
        if self.out_index is None:
            return y
        rows = y.shape[:-1]
        return y.new_zeros(*rows, self.full_out).scatter_add(-1, self.out_index.expand(*rows, -1), y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_out={self.full_out}"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, in_index: torch.Tensor | None = None,
            out_index: torch.Tensor | None = None, full_out: int | None = None) -> nn.Linear:
    """A :class:`SlicedLinear` when it must gather or scatter, else a plain ``nn.Linear``."""
    if in_index is not None or out_index is not None:
        return SlicedLinear(weight, bias, in_index=in_index, out_index=out_index, full_out=full_out)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class ShrunkViTBlock(Block):
    """timm ViT ``Block`` whose attention or MLP branch may be gone (``None``).

    Branches emit only their kept output channels; they are added into the residual at
    ``attn_out_index`` / ``mlp_out_index`` (buffers, None = all channels) with one
    ``index_add``, which costs what the dense residual add costs."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if self.attn is not None:
            y = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            x = _add_at(x, self.attn_out_index, y)
        if self.mlp is not None:
            x = _add_at(x, self.mlp_out_index, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))
        return x


def _add_at(x: torch.Tensor, index: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` where ``y`` holds only the channels ``index`` of ``x`` (all when None)."""
    return x + y if index is None else x.index_add(-1, index, y)


class ShrunkSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` whose attention or MLP branch may be gone (``None``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.attn is not None:
            x = x + self.drop_path1(self._attn(self.norm1(x)))
        if self.mlp is not None:
            x = x.reshape(B, -1, C)
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            x = x.reshape(B, H, W, C)
        return x


_SHRUNK_CLASS: dict[type, type] = {Block: ShrunkViTBlock, SwinTransformerBlock: ShrunkSwinBlock}


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten().to(torch.long)


def _subset(mask: torch.Tensor) -> torch.Tensor | None:
    """Kept indices, or None when every unit is kept (no gather/scatter needed)."""
    return None if bool(mask.all()) else _indices(mask)


def _on(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.device)


def attention_indices(sb: SubBlock, groups: dict[str, torch.Tensor],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept heads, ``qkv`` rows, ``proj`` columns) of the dense attention that ``groups`` keep;
    the first ``len(heads) * kept head dims`` rows are the queries."""
    H, d = sb.num_heads, sb.head_dim
    heads = _indices(groups["heads"]).to(device)
    dims = _indices(groups["head_dim"]).to(device)
    rows = (torch.arange(3, device=device)[:, None, None] * H * d
            + heads[None, :, None] * d + dims[None, None, :]).flatten()
    cols = (heads[:, None] * d + dims[None, :]).flatten()
    return heads, rows, cols


def query_scale(sb: SubBlock, groups: dict[str, torch.Tensor]) -> float:
    """Factor on the kept query rows: timm scales by d'^-0.5 for the kept head dim d', the
    model was trained with the dense d^-0.5."""
    return math.sqrt(int(groups["head_dim"].sum()) / sb.head_dim)


def _shrink_attention(attn: nn.Module, sb: SubBlock, groups: dict[str, torch.Tensor], *, gather: bool,
                      scatter: bool) -> None:
    """Cut ``attn`` to ``groups``; ``gather``: qkv picks its kept inputs from the full-width stream
    (else the stream is already the kept channels), ``scatter``: proj writes full width."""
    qkv, proj = attn.qkv, attn.proj
    device = qkv.weight.device
    heads, rows, cols = attention_indices(sb, groups, device)
    dims = _indices(groups["head_dim"])
    c_in, c_out = _subset(groups["in"]), _subset(groups["out"])
    with torch.no_grad():
        weight = qkv.weight[rows]
        if c_in is not None:
            weight = weight[:, c_in.to(device)]
        bias = qkv.bias[rows].clone() if qkv.bias is not None else None
        q_rows = len(heads) * len(dims)
        keep_scale = query_scale(sb, groups)
        weight[:q_rows] *= keep_scale
        if bias is not None:
            bias[:q_rows] *= keep_scale
        attn.qkv = _linear(weight, bias, in_index=_on(c_in, weight) if gather else None)
        proj_weight = proj.weight[:, cols]
        proj_bias = proj.bias
        if c_out is not None:
            proj_weight, proj_bias = proj_weight[c_out.to(device)], (
                proj_bias[c_out.to(device)] if proj_bias is not None else None)
        attn.proj = _linear(proj_weight, proj_bias, out_index=_on(c_out, proj_weight) if scatter else None,
                            full_out=proj.out_features)
        table = getattr(attn, "relative_position_bias_table", None)
        if table is not None:
            attn.relative_position_bias_table = nn.Parameter(table[:, heads].clone())
    attn.num_heads = len(heads)
    attn.head_dim = len(dims)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = len(heads) * len(dims)
    attn.scale = len(dims) ** -0.5


def _shrink_mlp(mlp: nn.Module, groups: dict[str, torch.Tensor], *, gather: bool, scatter: bool) -> None:
    """Cut ``mlp`` to ``groups`` (``gather``/``scatter`` as in :func:`_shrink_attention`)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    device = fc1.weight.device
    hidden = _indices(groups["hidden"]).to(device)
    c_in, c_out = _subset(groups["in"]), _subset(groups["out"])
    with torch.no_grad():
        weight = fc1.weight[hidden]
        if c_in is not None:
            weight = weight[:, c_in.to(device)]
        mlp.fc1 = _linear(weight, fc1.bias[hidden] if fc1.bias is not None else None,
                          in_index=_on(c_in, weight) if gather else None)
        weight2, bias2 = fc2.weight[:, hidden], fc2.bias
        if c_out is not None:
            weight2 = weight2[c_out.to(device)]
            bias2 = bias2[c_out.to(device)] if bias2 is not None else None
        mlp.fc2 = _linear(weight2, bias2, out_index=_on(c_out, weight2) if scatter else None,
                          full_out=fc2.out_features)


def _compact_residual(block: nn.Module, adapter: ModelAdapter, kind: str, out_mask: torch.Tensor,
                      add_at: bool) -> None:
    """Slice the layer scale to the kept output channels; a ViT block registers ``{kind}_out_index``
    for the ``index_add`` into the full-width stream when ``add_at`` (else None: the stream is
    the kept channels)."""
    _, _, ls_attr, _ = adapter.branch_attrs[kind]
    out = _subset(out_mask)
    ls = getattr(block, ls_attr, None)
    device = next(block.parameters()).device
    if isinstance(block, ShrunkViTBlock):
        index = out.to(device) if out is not None and add_at else None
        block.register_buffer(f"{kind}_out_index", index, persistent=False)
    if out is not None and hasattr(ls, "gamma"):
        with torch.no_grad():
            ls.gamma = nn.Parameter(ls.gamma[out.to(device)].clone())


def _stream_index(kept: torch.Tensor, width: int, repeats: int) -> torch.Tensor:
    """Indices of ``kept`` channels in each of ``repeats`` side-by-side copies of a ``width`` stream."""
    return (torch.arange(repeats, device=kept.device)[:, None] * width + kept[None, :]).flatten()


@torch.no_grad()
def _cut_parameter(model: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``model`` by its entries ``index`` along ``dim``."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    param = getattr(module, attr)
    setattr(module, attr, nn.Parameter(param.index_select(dim, index.to(param.device)).clone(),
                                       requires_grad=param.requires_grad))


def _refresh_shape(module: nn.Module) -> None:
    """Make a cut module's size attributes agree with its weight."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels = weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)


def _narrow_outside(model: nn.Module, adapter: ModelAdapter, kept: dict[int, torch.Tensor]) -> None:
    """Cut every parameter outside the sub-blocks that the streams' widths cut, and the size
    attributes that describe them, to the kept channels ``kept[stage]``."""
    widths, cuts = adapter.stream_widths(), adapter.outside_slices()
    for cut in cuts:
        _cut_parameter(model, cut.name, cut.dim, _stream_index(kept[cut.stage], widths[cut.stage], cut.repeats))
    for module in {cut.name.rpartition(".")[0] for cut in cuts}:
        if module:
            _refresh_shape(model.get_submodule(module))
    last = len(kept[max(kept)])
    for attr in ("num_features", "head_hidden_size"):
        if isinstance(getattr(model, attr, None), int):
            setattr(model, attr, last)
    if isinstance(getattr(model, "embed_dim", None), int) and len(kept) == 1:
        model.embed_dim = last


@torch.no_grad()
def _narrow_norm(norm: nn.Module, kept: torch.Tensor) -> None:
    """Cut a sub-block's LayerNorm to the kept channels of its stream."""
    for name, param in list(norm.named_parameters()):
        setattr(norm, name, nn.Parameter(param[kept.to(param.device)].clone(), requires_grad=param.requires_grad))
    _refresh_shape(norm)


def _shrunk_block_class(block: nn.Module) -> type:
    for timm_class, shrunk_class in _SHRUNK_CLASS.items():
        if type(block) in (timm_class, shrunk_class):
            return shrunk_class
    raise NotImplementedError(f"cannot shrink block class {type(block).__name__}")


def _skip_branch(block: nn.Module, adapter: ModelAdapter, kind: str) -> None:
    for attr in adapter.branch_attrs[kind]:
        if attr.startswith("drop_path"):
            continue
        setattr(block, attr, None)


def shrink_model(model: nn.Module, masks: BlockMasks, residual: ResidualMasks | None = None,
                 inplace: bool = False) -> nn.Module:
    """A physically smaller copy of ``model`` (a dense timm ViT/DeiT/Swin, no gates attached)
    keeping the units where ``masks[j][group]`` is True; missing groups are kept whole.
    ``residual`` (stage -> bool mask): a shared residual, whose kept channels every stream
    keeps (the sub-blocks' ``in``/``out`` masks are then the residual's).

    The result's logits equal those of ``model`` with hard gates set to ``masks`` (and
    ``residual``) (after :func:`~p3b_search.surgery.gates.canonical_masks`).
    """
    adapter = get_adapter(model)
    if any(hasattr(adapter.block(sb), "dense_geometry") for sb in adapter.sub_blocks):
        raise ValueError("shrink_model expects a dense model: this one was already shrunk")
    shared = residual is not None
    if shared:
        adapter.check_shared_residual()
        residual = check_residual(adapter, residual)
    masks = canonical_masks(adapter, masks, residual)
    target = model if inplace else copy.deepcopy(model)
    adapter = get_adapter(target)
    for attn_sb, mlp_sb in zip(adapter.sub_blocks[0::2], adapter.sub_blocks[1::2]):
        block = adapter.block(attn_sb)
        block.__class__ = _shrunk_block_class(block)
        block.dense_geometry = {"dim": attn_sb.dim, "num_heads": attn_sb.num_heads,
                                "head_dim": attn_sb.head_dim, "hidden": mlp_sb.hidden}
        block.kept_units = {}
        vit = isinstance(block, ShrunkViTBlock)
        for sb in (attn_sb, mlp_sb):
            groups = masks[sb.index]
            if not bool(groups["out"].any()):
                _skip_branch(block, adapter, sb.kind)
                block.kept_units[sb.kind] = None
                if vit:
                    block.register_buffer(f"{sb.kind}_out_index", None, persistent=False)
                continue
            # per block, ViT blocks add compact branch outputs into the full-width residual;
            # Swin's window attention needs full-width outputs, so its linears scatter them.
            # A shared residual is narrow itself: branches read and write it as it is.
            scatter = not (vit or shared)
            if sb.kind == "attn":
                _shrink_attention(block.attn, sb, groups, gather=not shared, scatter=scatter)
            else:
                _shrink_mlp(block.mlp, groups, gather=not shared, scatter=scatter)
            if not scatter:
                _compact_residual(block, adapter, sb.kind, groups["out"], add_at=not shared)
            if shared:
                _narrow_norm(getattr(block, adapter.branch_attrs[sb.kind][0]), _indices(residual[sb.stage]))
            block.kept_units[sb.kind] = {g: None if bool(m.all()) else _indices(m).tolist()
                                         for g, m in groups.items() if not (shared and g in ("in", "out"))}
    if shared:
        _narrow_outside(target, adapter, {stage: _indices(mask) for stage, mask in residual.items()})
        target.kept_residual = {stage: None if bool(mask.all()) else _indices(mask).tolist()
                                for stage, mask in residual.items()}
    return target
