"""What a timm vision transformer's prunable parts are: its 2L sub-blocks and their unit groups.

A model with L transformer layers has 2L *sub-blocks*, ``j = 2l`` (attention of layer ``l``)
and ``j = 2l + 1`` (MLP of layer ``l``); Swin's layers are counted across stages. Each
sub-block has *unit groups* that a pruning method can gate and ``shrink`` can cut:

=========  ==========================================================  =========
kind       group: what a unit is                                       size
=========  ==========================================================  =========
attn       ``in``: input channel of ``qkv`` (after ``norm1``)           C
attn       ``head_dim``: one dim of every head's q, k and v            d
attn       ``heads``: a whole head (its q, k, v rows and proj columns) H
attn       ``out``: output channel of ``proj`` (into the residual)     C
mlp        ``in``: input channel of ``fc1`` (after ``norm2``)           C
mlp        ``hidden``: hidden unit (``fc1`` row, ``fc2`` column)       4C
mlp        ``out``: output channel of ``fc2`` (into the residual)      C
=========  ==========================================================  =========

Adapters are chosen by the model's class (:func:`get_adapter`); timm's code is never changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

from torch import nn

SubBlockKind = Literal["attn", "mlp"]
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("in", "head_dim", "heads", "out"),
    "mlp": ("in", "hidden", "out"),
}


@dataclass(frozen=True)
class BranchSizes:
    """Kept widths of one sub-block's branch (dense, masked or shrunk).

    attn: ``c_in`` -> qkv -> ``heads`` x ``head_dim`` -> proj -> ``c_out``;
    mlp: ``c_in`` -> fc1 -> ``hidden`` -> fc2 -> ``c_out``. ``skipped``: the branch is gone.
    """

    c_in: int
    c_out: int
    heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    skipped: bool = False

    def group_size(self, group: str) -> int:
        """Kept units in ``group`` (``in``, ``out``, ``heads``, ``head_dim``, ``hidden``)."""
        return {"in": self.c_in, "out": self.c_out, "heads": self.heads,
                "head_dim": self.head_dim, "hidden": self.hidden}[group]


@dataclass(frozen=True)
class SubBlock:
    """One attention or MLP sub-block of the *dense* architecture.

    ``tokens``: rows per image that the branch's linear layers process (Swin: after padding
    to whole windows); ``window``: tokens per attention group (ViT: all ``tokens``; Swin: the
    window area). ``block_path`` names the timm block module, e.g. ``blocks.3`` or
    ``layers.1.blocks.0``.
    """

    index: int
    layer: int
    kind: SubBlockKind
    block_path: str
    stage: int
    dim: int
    tokens: int
    window: int
    num_heads: int = 0
    head_dim: int = 0
    hidden: int = 0

    @property
    def name(self) -> str:
        """Short label, e.g. ``L03.attn``."""
        return f"L{self.layer:02d}.{self.kind}"

    @property
    def groups(self) -> dict[str, int]:
        """Dense size of each unit group."""
        sizes = self.dense_sizes()
        return {g: sizes.group_size(g) for g in GROUPS[self.kind]}

    def dense_sizes(self) -> BranchSizes:
        """The unpruned widths."""
        if self.kind == "attn":
            return BranchSizes(self.dim, self.dim, heads=self.num_heads, head_dim=self.head_dim)
        return BranchSizes(self.dim, self.dim, hidden=self.hidden)


class ModelAdapter:
    """Lists a model's sub-blocks and hands out their modules. Subclasses know one family."""

    #: attribute names of the attention / MLP branch's modules inside a timm block
    branch_attrs: dict[str, tuple[str, ...]] = {
        "attn": ("norm1", "attn", "ls1", "drop_path1"),
        "mlp": ("norm2", "mlp", "ls2", "drop_path2"),
    }

    def __init__(self, model: nn.Module):
        self.model = model
        self.sub_blocks: list[SubBlock] = list(self._list_sub_blocks())

    def _list_sub_blocks(self) -> Iterator[SubBlock]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.sub_blocks) // 2

    def block(self, sb: SubBlock) -> nn.Module:
        """The timm block module that holds ``sb``."""
        return self.model.get_submodule(sb.block_path)

    def branch(self, sb: SubBlock) -> nn.Module | None:
        """``block.attn`` or ``block.mlp`` (None when the sub-block was skipped by ``shrink``)."""
        return getattr(self.block(sb), sb.kind)

    def linears(self, sb: SubBlock) -> tuple[nn.Linear, nn.Linear]:
        """(qkv, proj) for attention, (fc1, fc2) for MLP."""
        branch = self.branch(sb)
        if sb.kind == "attn":
            return branch.qkv, branch.proj
        return branch.fc1, branch.fc2

    def branch_parameters(self, sb: SubBlock) -> Iterator[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of everything a sub-block owns: norm, branch, layer scale."""
        block = self.block(sb)
        for attr in self.branch_attrs[sb.kind]:
            module = getattr(block, attr, None)
            if module is None:
                continue
            for name, param in module.named_parameters():
                yield f"{sb.block_path}.{attr}.{name}", param

    def current_sizes(self, sb: SubBlock) -> BranchSizes:
        """Widths the branch's modules have now (dense, or physically shrunk)."""
        branch = self.branch(sb)
        if branch is None:
            return BranchSizes(0, 0, skipped=True)
        first, second = self.linears(sb)
        if sb.kind == "attn":
            heads = branch.num_heads
            return BranchSizes(first.in_features, second.out_features, heads=heads,
                               head_dim=first.out_features // (3 * heads))
        return BranchSizes(first.in_features, second.out_features, hidden=first.out_features)

    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input image."""
        pe = self.model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def patch_embed_macs(self) -> int:
        """MACs per image of the patch-embedding convolution."""
        pe = self.model.patch_embed
        conv = pe.proj
        return pe.grid_size[0] * pe.grid_size[1] * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size)

    def stem_and_head_macs(self) -> int:
        """MACs per image outside the sub-blocks (patch embedding, merging, classifier heads)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self.sub_blocks)} sub-blocks)"


def _check_supported_attention(attn: nn.Module, path: str) -> None:
    for attr in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, attr, nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{path}.attn.{attr}: qk-norm / scale-norm attention is not supported")
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"{path}.attn.gate: gated attention is not supported")


def _check_supported_mlp(mlp: nn.Module, path: str) -> None:
    if not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2"):
        raise NotImplementedError(f"{path}.mlp: only timm's Mlp (fc1 -> act -> fc2) is supported")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise NotImplementedError(f"{path}.mlp.norm: MLPs with a hidden norm are not supported")


def dense_geometry(block: nn.Module, dim: int, path: str) -> dict[str, int]:
    """Dense widths of a timm block: ``dim``, ``num_heads``, ``head_dim``, ``hidden``.

    A shrunk block remembers them in ``block.dense_geometry`` (set by ``shrink``)."""
    remembered = getattr(block, "dense_geometry", None)
    if remembered is not None:
        return dict(remembered)
    attn, mlp = block.attn, block.mlp
    _check_supported_attention(attn, path)
    _check_supported_mlp(mlp, path)
    return {"dim": dim, "num_heads": attn.num_heads,
            "head_dim": attn.qkv.out_features // (3 * attn.num_heads), "hidden": mlp.fc1.out_features}


class VisionTransformerAdapter(ModelAdapter):
    """timm ``VisionTransformer`` and subclasses (ViT, DeiT, DeiT-distilled)."""

    def _list_sub_blocks(self) -> Iterator[SubBlock]:
        model = self.model
        grid = model.patch_embed.grid_size
        tokens = grid[0] * grid[1] + model.num_prefix_tokens
        for layer, block in enumerate(model.blocks):
            path = f"blocks.{layer}"
            geo = dense_geometry(block, model.embed_dim, path)
            yield SubBlock(2 * layer, layer, "attn", path, 0, geo["dim"], tokens, tokens,
                           num_heads=geo["num_heads"], head_dim=geo["head_dim"])
            yield SubBlock(2 * layer + 1, layer, "mlp", path, 0, geo["dim"], tokens, tokens,
                           hidden=geo["hidden"])

    def stem_and_head_macs(self) -> int:
        model = self.model
        macs = self.patch_embed_macs()
        for head_name in ("head", "head_dist"):
            head = getattr(model, head_name, None)
            if isinstance(head, nn.Linear):
                macs += head.in_features * head.out_features
        return macs


class SwinTransformerAdapter(ModelAdapter):
    """timm ``SwinTransformer`` (window attention; patch merging and relative position bias are
    never pruned: they are the AUX module of DIMAP)."""

    def _list_sub_blocks(self) -> Iterator[SubBlock]:
        layer = 0
        for stage_idx, stage in enumerate(self.model.layers):
            for block_idx, block in enumerate(stage.blocks):
                path = f"layers.{stage_idx}.blocks.{block_idx}"
                geo = dense_geometry(block, block.dim, path)
                h, w = block.input_resolution
                wh, ww = block.window_size
                padded = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
                yield SubBlock(2 * layer, layer, "attn", path, stage_idx, geo["dim"], padded, wh * ww,
                               num_heads=geo["num_heads"], head_dim=geo["head_dim"])
                yield SubBlock(2 * layer + 1, layer, "mlp", path, stage_idx, geo["dim"], h * w, h * w,
                               hidden=geo["hidden"])
                layer += 1

    def stem_and_head_macs(self) -> int:
        model = self.model
        macs = self.patch_embed_macs()
        for stage in model.layers:
            reduction = getattr(stage.downsample, "reduction", None)
            if reduction is not None:
                h, w = stage.blocks[0].input_resolution
                macs += h * w * reduction.in_features * reduction.out_features
        fc = getattr(model.head, "fc", None)
        if isinstance(fc, nn.Linear):
            macs += fc.in_features * fc.out_features
        return macs


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class: a one-line error names the unsupported class."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return VisionTransformerAdapter(model)
    if isinstance(model, SwinTransformer):
        return SwinTransformerAdapter(model)
    raise TypeError(
        f"unsupported model class {type(model).__name__}: p3b-search prunes timm VisionTransformer "
        "(ViT, DeiT, DeiT-distilled) and SwinTransformer models"
    )
