"""Block benefit: how much each sub-block makes the residual stream more discriminative (P3B, step 1).

The auxiliary heads and Delta Psi are specified in docs/methods.md, section 1.1. What this
module decides beyond it:

* Both sides of a head go through it as one stacked batch, with BatchNorm statistics kept per
  side: exactly what two separate calls compute, in fewer, larger convolution calls.
* Features come from forward hooks on the timm blocks (timm untouched): ``x_{2l}`` is the input
  of block ``l``, ``x_{2l+1}`` the input of its ``norm2`` (the residual after
  ``x + attn(...)``), ``x_{2l+2}`` the block's output; captured only while the block trains.
* Token layouts. ViT/DeiT: prefix tokens (class, distillation, register) are left out of the
  patch grid; the cls head reads the class token, or the mean patch token when the model has
  none. Swin: features are ``(B, H, W, C)`` maps (``(B, H*W, C)`` at the MLP input) and the cls
  head reads the average-pooled token, the vector Swin's own classifier pools.
* With a shared residual (``stream_gate``) the heads read the stream as the model's norms do,
  multiplied by its stage's residual gate, so pruned channels are zero.
* Cross-entropy against the loop's targets: class indices (no label smoothing), or soft
  targets as given (mixup/cutmix already smooth them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from p3b_search.surgery import ModelAdapter


class PatchHead(nn.Module):
    """``(B, C, h, w)`` patch grid -> ``(B, K)`` logits: 2 x [Conv3x3 + BN + ReLU], GAP, Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(*(
            layer
            for _ in range(2)
            for layer in (nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        ))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, grid: torch.Tensor, sides: int = 1) -> torch.Tensor:
        """``grid``: ``sides`` equal batches stacked along dim 0, ``(sides * B, C, h, w)`` ->
        ``(sides * B, K)`` logits, exactly as ``sides`` separate calls (one per batch, in order).

        Convolutions, ReLU, pooling and the Linear act per sample, so they run on the whole
        stack (one convolution call instead of ``sides``); each BatchNorm normalises every
        side with that side's own batch statistics and updates its running statistics once
        per side, in order."""
        for layer in self.convs:
            if isinstance(layer, nn.BatchNorm2d) and sides > 1:
                grid = torch.cat([layer(side) for side in grid.chunk(sides)])
            else:
                grid = layer(grid)
        # global average pool as sum / count: the same values as ``mean``, but its gradient is a
        # broadcast view that keeps the activations' memory format in the backward pass (``mean``'s
        # materialises a contiguous gradient, and a channels-last ReLU backward against it is ~10x slower)
        return self.fc(grid.sum(dim=(2, 3)) / (grid.shape[2] * grid.shape[3]))


@dataclass(frozen=True)
class TokenLayout:
    """How a model's residual stream holds its tokens.

    ``prefix``: tokens before the patch grid; ``class_token``: whether token 0 is a class
    token; ``grid``: (h, w) of the patch grid, or None when the features are already maps
    (Swin, ``(B, H, W, C)``)."""

    prefix: int
    class_token: bool
    grid: tuple[int, int] | None

    @classmethod
    def of(cls, adapter: ModelAdapter) -> "TokenLayout":
        model = adapter.model
        if hasattr(model, "num_prefix_tokens"):  # VisionTransformer family
            if getattr(model, "dynamic_img_size", False):
                raise ValueError("P3B's patch heads need a fixed patch grid: build the model with dynamic_img_size=False")
            return cls(model.num_prefix_tokens, bool(model.has_class_token), tuple(model.patch_embed.grid_size))
        return cls(0, False, None)

    def split(self, x: torch.Tensor, map_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (cls vector (B, C), patch grid (B, C, h, w)).

        ``x``: ``(B, N, C)`` tokens or ``(B, H, W, C)`` maps; ``map_hw``: (H, W) of a Swin
        block's maps, to lay out its flattened ``(B, H*W, C)`` MLP input."""
        if x.dim() == 4:
            grid = x.permute(0, 3, 1, 2)
        else:
            patches = x[:, self.prefix:]
            h, w = self.grid if self.grid is not None else map_hw
            if patches.shape[1] != h * w:
                raise ValueError(f"residual stream has {patches.shape[1]} patch tokens, expected a {h}x{w} grid")
            grid = patches.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
        cls_vector = x[:, 0] if self.class_token else grid.mean(dim=(2, 3))
        return cls_vector, grid


class _BlockTap:
    """Detached residual-stream features around one timm block: input, MLP input, output."""

    def __init__(self, block: nn.Module, enabled: "BlockBenefit"):
        self.features: dict[str, torch.Tensor] = {}
        self.map_hw: tuple[int, int] | None = None

        def on_input(module: nn.Module, args: tuple) -> None:
            if module.training and enabled.capturing:
                x = args[0]
                self.map_hw = tuple(x.shape[1:3]) if x.dim() == 4 else None
                self.features["input"] = x.detach()

        def on_middle(module: nn.Module, args: tuple) -> None:
            if module.training and enabled.capturing:
                self.features["middle"] = args[0].detach()

        def on_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training and enabled.capturing:
                self.features["output"] = output.detach()

        self.handles: list[RemovableHandle] = [
            block.register_forward_pre_hook(on_input),
            block.norm2.register_forward_pre_hook(on_middle),
            block.register_forward_hook(on_output),
        ]

    def take(self, name: str) -> torch.Tensor:
        try:
            return self.features[name]
        except KeyError:
            raise RuntimeError("block benefit: no features were captured; run a training-mode forward first") from None


@dataclass(frozen=True)
class BenefitStep:
    """One forward pass: ``loss`` (sum of the four auxiliary cross-entropies of every
    sub-block, to train the heads) and ``delta_cls``/``delta_patch`` Delta Psi (2L,)."""

    loss: torch.Tensor
    delta_cls: torch.Tensor
    delta_patch: torch.Tensor


class BlockBenefit(nn.Module):
    """The auxiliary heads of every sub-block of ``adapter``'s model and the hooks that feed them.

    ``cls_heads[j]``/``patch_heads[j]`` serve sub-block ``j`` (width ``C_j``, K classes).
    Call :meth:`attach` to start capturing features and :meth:`step` after each training
    forward; :meth:`remove_hooks` takes the hooks off again. ``stream_gate(stage)``: the shared
    residual gate (C_stage,) the features are multiplied by (None: read as they are).
    """

    def __init__(self, adapter: ModelAdapter, num_classes: int,
                 stream_gate: Callable[[int], torch.Tensor] | None = None):
        super().__init__()
        self._stream_gate = stream_gate
        self._stages = [sb.stage for sb in adapter.sub_blocks]
        self.layout = TokenLayout.of(adapter)
        self.cls_heads = nn.ModuleList(nn.Linear(sb.dim, num_classes) for sb in adapter.sub_blocks)
        self.patch_heads = nn.ModuleList(PatchHead(sb.dim, num_classes) for sb in adapter.sub_blocks)
        self.capturing = True
        self._taps: list[_BlockTap] = []
        self._num_layers = adapter.num_layers
        self._block_paths = [sb.block_path for sb in adapter.sub_blocks[0::2]]

    def attach(self, model: nn.Module) -> None:
        """Install the feature hooks on ``model``'s blocks (idempotent)."""
        self.remove_hooks()
        self._taps = [_BlockTap(model.get_submodule(path), self) for path in self._block_paths]

    def remove_hooks(self) -> None:
        for tap in self._taps:
            for handle in tap.handles:
                handle.remove()
        self._taps = []

    def release(self) -> None:
        """Drop the captured features (a step that does not measure the benefit)."""
        for tap in self._taps:
            tap.features.clear()

    def _stream(self, j: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int] | None]:
        """(x_j, x_{j+1}) of sub-block ``j`` and the block's map size (Swin)."""
        if not self._taps:
            raise RuntimeError("block benefit: the feature hooks are not attached; call attach(model) first")
        tap = self._taps[j // 2]
        names = ("input", "middle") if j % 2 == 0 else ("middle", "output")
        return (tap.take(names[0]), tap.take(names[1])), tap.map_hw

    def step(self, targets: torch.Tensor, images: int | None = None) -> BenefitStep:
        """Auxiliary losses and Delta Psi of the last captured forward pass, against
        ``targets`` (class indices (B,) or soft targets (B, K)); the features are released.

        ``images``: the heads see only the first ``images`` samples of the batch (all when
        None); the loaders shuffle, so these are a random subset of the batch."""
        targets = targets[:images]
        losses = []
        deltas_cls, deltas_patch = [], []
        for j, (cls_head, patch_head) in enumerate(zip(self.cls_heads, self.patch_heads)):
            (x_in, x_out), map_hw = self._stream(j)
            x_in, x_out = x_in[:images], x_out[:images]
            if self._stream_gate is not None:
                gate = self._stream_gate(self._stages[j])
                x_in, x_out = x_in * gate.to(x_in.dtype), x_out * gate.to(x_out.dtype)
            dtype = cls_head.weight.dtype
            # both sides as one batch [x_j; x_{j+1}] (each head is called once; see PatchHead.forward)
            (cls_in, grid_in), (cls_out, grid_out) = (self.layout.split(x.to(dtype), map_hw) for x in (x_in, x_out))
            cls_ce = _side_cross_entropies(cls_head(torch.cat([cls_in, cls_out])), targets)
            # channels-last is the grid's natural layout (tokens hold channels last) and the faster one for the convs
            grids = torch.cat([grid_in, grid_out]).contiguous(memory_format=torch.channels_last)
            patch_ce = _side_cross_entropies(patch_head(grids, sides=2), targets)
            losses.append(cls_ce[0] + patch_ce[0] + cls_ce[1] + patch_ce[1])
            deltas_cls.append((cls_ce[0] - cls_ce[1]).detach())
            deltas_patch.append((patch_ce[0] - patch_ce[1]).detach())
        self.release()
        return BenefitStep(torch.stack(losses).sum(), torch.stack(deltas_cls), torch.stack(deltas_patch))


def _side_cross_entropies(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of each half of ``logits`` (2B, K) (input side, output side) vs ``targets``."""
    first, second = logits.chunk(2)
    return _cross_entropy(first, targets), _cross_entropy(second, targets)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32; ``targets`` class indices or probabilities (B, K)."""
    logits = logits.float()
    if targets.is_floating_point():
        return F.cross_entropy(logits, targets.float())
    return F.cross_entropy(logits, targets)
