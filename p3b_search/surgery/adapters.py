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

**Residual streams.** The channels the sub-blocks read and write form one residual stream per
*stage* (ViT: one stage; Swin: one per stage, patch merging maps one into the next). A
*shared* residual (see :mod:`p3b_search.surgery.gates`) narrows a stage's stream everywhere at
once: the adapter names every LayerNorm that normalises over a stream's channels
(:meth:`ModelAdapter.stream_norms`) and every parameter outside the sub-blocks that the
stream's width cuts (:meth:`ModelAdapter.outside_slices`: patch embedding, class and position
tokens, patch merging, final norm, classifier heads).
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
    #: width of the branch's LayerNorm when a shared residual narrows it (counted on the dense
    #: model's norm); None: the norm as the module is (full width in per-block mode)
    norm: int | None = None

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


@dataclass(frozen=True)
class StreamNorm:
    """A LayerNorm (``path`` in the model) whose statistics run over residual stream ``stage``'s
    channels, ``repeats`` copies side by side (Swin's patch merging norms 2x2 tokens' channels)."""

    path: str
    stage: int
    repeats: int = 1


@dataclass(frozen=True)
class StreamSlice:
    """Parameter ``name`` (outside the sub-blocks) is cut along ``dim`` to stream ``stage``'s
    kept channels, ``repeats`` copies side by side (channel ``k * C + c`` for copy ``k``)."""

    name: str
    dim: int
    stage: int
    repeats: int = 1


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

    # -- residual streams ---------------------------------------------------------------------
    def stream_widths(self) -> dict[int, int]:
        """Dense width C of each stage's residual stream, by stage."""
        return {sb.stage: sb.dim for sb in self.sub_blocks}

    def stream_norms(self) -> list[StreamNorm]:
        """Every LayerNorm that normalises over a residual stream's channels (present modules only)."""
        norms = self._outside_norms()
        for sb in self.sub_blocks:
            attr = self.branch_attrs[sb.kind][0]
            if isinstance(getattr(self.block(sb), attr, None), nn.LayerNorm):
                norms.append(StreamNorm(f"{sb.block_path}.{attr}", sb.stage))
        return norms

    def _outside_norms(self) -> list[StreamNorm]:
        """The stream norms outside the sub-blocks."""
        raise NotImplementedError

    def outside_slices(self) -> list[StreamSlice]:
        """How each parameter outside the sub-blocks that a stream's width cuts is cut."""
        slices = []
        for norm in self._outside_norms():
            for name, param in self.model.get_submodule(norm.path).named_parameters():
                slices.append(StreamSlice(f"{norm.path}.{name}", param.ndim - 1, norm.stage, norm.repeats))
        return slices + self._outside_weight_slices()

    def _outside_weight_slices(self) -> list[StreamSlice]:
        """:meth:`outside_slices` of the embeddings, merging layers and heads (norms aside)."""
        raise NotImplementedError

    def outside_matmuls(self) -> list[tuple[str, int]]:
        """(weight name, uses per image) of the matrix products outside the sub-blocks: each
        weight is multiplied ``uses`` times per image (output positions or rows)."""
        raise NotImplementedError

    def check_shared_residual(self) -> None:
        """Raise ``NotImplementedError`` (one line, naming the model's part) when a shared
        residual cannot narrow this model exactly: every reader of a stream must be a LayerNorm."""
        raise NotImplementedError

    def numel_at(self, name: str, widths: dict[int, int] | None = None) -> int:
        """Elements of parameter ``name`` when the streams have ``widths`` (by stage; None: as it is)."""
        shape = list(self.model.get_parameter(name).shape)
        if widths is not None:
            for cut in self.outside_slices():
                if cut.name == name:
                    shape[cut.dim] = widths[cut.stage] * cut.repeats
        return math.prod(shape)

    def outside_params(self, widths: dict[int, int] | None = None) -> int:
        """Parameters outside the sub-blocks that the streams' widths cut, at ``widths`` (by
        stage; None: as the model is)."""
        return sum(self.numel_at(name, widths) for name in dict.fromkeys(c.name for c in self.outside_slices()))

    def stem_and_head_macs(self, widths: dict[int, int] | None = None) -> int:
        """MACs per image outside the sub-blocks (patch embedding, merging, classifier heads),
        with the streams at ``widths`` (by stage; None: as the model is)."""
        return sum(uses * self.numel_at(name, widths) for name, uses in self.outside_matmuls())

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

    def _heads(self) -> list[str]:
        return [name for name in ("head", "head_dist") if isinstance(getattr(self.model, name, None), nn.Linear)]

    def _outside_norms(self) -> list[StreamNorm]:
        return [StreamNorm(name, 0) for name in ("norm_pre", "norm", "fc_norm")
                if isinstance(getattr(self.model, name, None), nn.LayerNorm)]

    def _outside_weight_slices(self) -> list[StreamSlice]:
        model = self.model
        slices = [StreamSlice(f"patch_embed.proj.{name}", 0, 0) for name, _ in model.patch_embed.proj.named_parameters()]
        slices += [StreamSlice(name, 2, 0) for name in ("cls_token", "reg_token", "dist_token", "pos_embed")
                   if isinstance(getattr(model, name, None), nn.Parameter)]
        return slices + [StreamSlice(f"{head}.weight", 1, 0) for head in self._heads()]

    def outside_matmuls(self) -> list[tuple[str, int]]:
        grid = self.model.patch_embed.grid_size
        return [("patch_embed.proj.weight", grid[0] * grid[1])] + [(f"{head}.weight", 1) for head in self._heads()]

    def check_shared_residual(self) -> None:
        model, name = self.model, type(self.model).__name__
        if not isinstance(model.patch_embed.norm, nn.Identity):
            raise NotImplementedError(f"{name}: a shared residual cannot narrow patch_embed.norm (only models "
                                      "without a patch-embedding norm, e.g. ViT and DeiT, are supported)")
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError(f"{name}: a shared residual cannot narrow the attention-pooling head "
                                      "(global_pool='map'): use global_pool 'token' or 'avg'")
        final = [n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)]
        if not final:
            raise NotImplementedError(f"{name}: a shared residual needs a final LayerNorm (norm or fc_norm) "
                                      "before the head")
        if not isinstance(model.norm_pre, (nn.Identity, nn.LayerNorm)):
            raise NotImplementedError(f"{name}: a shared residual cannot narrow norm_pre "
                                      f"({type(model.norm_pre).__name__}): only LayerNorm is supported")
        _check_block_norms(self, name)


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

    def _merging_stages(self) -> list[int]:
        """Stages that start with a patch merging (it maps stage s - 1's stream into stage s's)."""
        return [s for s, stage in enumerate(self.model.layers) if hasattr(stage.downsample, "reduction")]

    def _last_stage(self) -> int:
        return len(self.model.layers) - 1

    def _outside_norms(self) -> list[StreamNorm]:
        model = self.model
        norms = [StreamNorm("patch_embed.norm", 0)] if isinstance(model.patch_embed.norm, nn.LayerNorm) else []
        norms += [StreamNorm(f"layers.{s}.downsample.norm", s - 1, repeats=4) for s in self._merging_stages()
                  if isinstance(model.layers[s].downsample.norm, nn.LayerNorm)]
        if isinstance(model.norm, nn.LayerNorm):
            norms.append(StreamNorm("norm", self._last_stage()))
        return norms

    def _outside_weight_slices(self) -> list[StreamSlice]:
        model = self.model
        slices = [StreamSlice(f"patch_embed.proj.{name}", 0, 0) for name, _ in model.patch_embed.proj.named_parameters()]
        for s in self._merging_stages():
            reduction = f"layers.{s}.downsample.reduction"
            slices += [StreamSlice(f"{reduction}.weight", 0, s), StreamSlice(f"{reduction}.weight", 1, s - 1, repeats=4)]
            if model.layers[s].downsample.reduction.bias is not None:
                slices.append(StreamSlice(f"{reduction}.bias", 0, s))
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            slices.append(StreamSlice("head.fc.weight", 1, self._last_stage()))
        return slices

    def outside_matmuls(self) -> list[tuple[str, int]]:
        grid = self.model.patch_embed.grid_size
        matmuls = [("patch_embed.proj.weight", grid[0] * grid[1])]
        for s in self._merging_stages():
            h, w = self.model.layers[s].blocks[0].input_resolution
            matmuls.append((f"layers.{s}.downsample.reduction.weight", h * w))
        if isinstance(getattr(self.model.head, "fc", None), nn.Linear):
            matmuls.append(("head.fc.weight", 1))
        return matmuls

    def check_shared_residual(self) -> None:
        model, name = self.model, type(self.model).__name__
        for s in self._merging_stages():
            merging = model.layers[s].downsample
            if not isinstance(merging.norm, nn.LayerNorm):
                raise NotImplementedError(f"{name}: a shared residual cannot narrow layers.{s}.downsample "
                                          "(only timm's PatchMerging with a LayerNorm is supported)")
        if not isinstance(model.norm, nn.LayerNorm):
            raise NotImplementedError(f"{name}: a shared residual needs a final LayerNorm before the head")
        if not isinstance(model.patch_embed.norm, (nn.Identity, nn.LayerNorm)):
            raise NotImplementedError(f"{name}: a shared residual cannot narrow patch_embed.norm "
                                      f"({type(model.patch_embed.norm).__name__}): only LayerNorm is supported")
        _check_block_norms(self, name)


def _check_block_norms(adapter: ModelAdapter, model_name: str) -> None:
    for sb in adapter.sub_blocks:
        attr = adapter.branch_attrs[sb.kind][0]
        norm = getattr(adapter.block(sb), attr)
        if norm is not None and not isinstance(norm, nn.LayerNorm):
            raise NotImplementedError(f"{model_name}: a shared residual cannot narrow {sb.block_path}.{attr} "
                                      f"({type(norm).__name__}): only LayerNorm is supported")


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
