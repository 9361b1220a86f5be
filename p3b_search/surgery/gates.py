"""Multiplicative gates on a timm model's unit groups (timm untouched).

A gate is a float vector ``m`` (one value per unit, 1 = fully on) that multiplies the unit's
activation. Methods set gates soft (any value) or hard (0/1) and read ``dL/dm`` after
backward: gates are leaf tensors that are *not* model parameters, so no optimizer trains
them (P3B's "gate learning rate 0"). Where each group's gate acts:

* attn ``in``: input of ``qkv`` (after ``norm1``); ``head_dim``: output of ``qkv`` viewed as
  (3, H, d), shared by q, k, v and all heads; ``heads``: input of ``proj`` viewed as (H, d);
  ``out``: output of ``proj``.
* mlp ``in``: input of ``fc1``; ``hidden``: input of ``fc2`` (after the activation);
  ``out``: output of ``fc2``.

A sub-block whose ``out`` gate is all zero contributes nothing: that is how a sub-block is
skipped in the masked model (``shrink`` then removes it from compute).

How they act (``on``): ``"weights"`` (default) folds every gate into the linear it touches
(rows of qkv/proj/fc2 and their biases, columns of qkv/proj/fc1/fc2), which computes the same
function and gate gradients at the cost of the weights rather than of the activations, the
cheaper one for every model here (tokens x width > out x in); ``"activations"`` multiplies the
activations in forward hooks, for methods whose own hooks must see gated activations and the
gradients there (S²ViTE's grow signal at the proj input).
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from p3b_search.surgery.adapters import GROUPS, BranchSizes, ModelAdapter, SubBlock

#: Where gates act: folded into the weights of the linears (cheaper), or on the activations
#: (for methods whose own hooks must see gated activations and their gradients).
GatesOn = Literal["weights", "activations"]
#: Hard masks of a model: ``masks[j][group]`` is a bool vector (True = kept) for sub-block ``j``.
BlockMasks = dict[int, dict[str, torch.Tensor]]


class GateSet:
    """The gates of every sub-block of one model, applied ``on`` the linears' weights (default)
    or on the activations (see the module docstring).

    ``values[j][group]`` is a float32 leaf tensor of shape (group size,) on the model's device.
    Use as a context manager or call :meth:`remove` to take the gates off again.
    """

    def __init__(self, adapter: ModelAdapter, requires_grad: bool = True, on: GatesOn = "weights"):
        if any(hasattr(adapter.block(sb), "dense_geometry") for sb in adapter.sub_blocks):
            raise ValueError("gates go on a dense model: this one was already shrunk")
        if on not in ("weights", "activations"):
            raise ValueError(f"gates on={on!r}: use 'weights' or 'activations'")
        self.adapter = adapter
        device = next(adapter.model.parameters()).device
        self.values: dict[int, dict[str, torch.Tensor]] = {
            sb.index: {
                group: torch.ones(size, device=device, requires_grad=requires_grad)
                for group, size in sb.groups.items()
            }
            for sb in adapter.sub_blocks
        }
        self._handles: list[RemovableHandle] = []
        self._gated_linears: list[nn.Linear] = []
        for sb in adapter.sub_blocks:
            if on == "weights":
                self._fold_into_weights(sb)
            else:
                self._hook_activations(sb)

    # -- where the gates act ----------------------------------------------------------------
    def _fold_into_weights(self, sb: SubBlock) -> None:
        """Each gate scales the rows (outputs) or columns (inputs) of the weight it touches."""
        gates = self.values[sb.index]
        first, second = self.adapter.linears(sb)
        if sb.kind == "attn":
            heads, head_dim = sb.num_heads, sb.head_dim
            # qkv's outputs are laid out (3, H, d) and proj's inputs (H, d)
            self._gate_linear(first, columns=lambda: gates["in"], rows=lambda: gates["head_dim"].repeat(3 * heads))
            self._gate_linear(second, columns=lambda: gates["heads"].repeat_interleave(head_dim),
                              rows=lambda: gates["out"])
        else:
            self._gate_linear(first, columns=lambda: gates["in"], rows=None)
            self._gate_linear(second, columns=lambda: gates["hidden"], rows=lambda: gates["out"])

    def _gate_linear(self, linear: nn.Linear, columns: Callable[[], torch.Tensor],
                     rows: Callable[[], torch.Tensor] | None) -> None:
        """Make ``linear`` compute ``((x * columns) W^T + b) * rows`` as ``x (W * rows[:, None] *
        columns)^T + b * rows``: the same function and gradients (to float rounding), at the
        cost of the weight (out x in) instead of the activations (tokens x width), with no
        module hooks. The instance's ``forward`` is replaced until :meth:`remove`."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = linear.weight, linear.bias
            scale = columns().to(weight.dtype)
            if rows is not None:
                row = rows().to(weight.dtype)
                scale = row[:, None] * scale
                bias = None if bias is None else bias * row
            return F.linear(x, weight * scale, bias)

        linear.forward = forward
        self._gated_linears.append(linear)

    def _hook_activations(self, sb: SubBlock) -> None:
        """Each gate multiplies the activation it names, in forward hooks that run before hooks
        registered later (which then observe gated activations and their gradients)."""
        gates = self.values[sb.index]
        first, second = self.adapter.linears(sb)

        def gate_input(group: str):
            def hook(module: nn.Module, args: tuple) -> tuple:
                return (_scale_last(args[0], gates[group]), *args[1:])
            return hook

        def gate_output(group: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                return _scale_last(output, gates[group])
            return hook

        self._handles.append(first.register_forward_pre_hook(gate_input("in")))
        self._handles.append(second.register_forward_hook(gate_output("out")))
        if sb.kind == "mlp":
            self._handles.append(second.register_forward_pre_hook(gate_input("hidden")))
            return
        heads, head_dim = sb.num_heads, sb.head_dim

        def gate_qkv(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            shaped = output.unflatten(-1, (3, heads, head_dim))
            return (shaped * gates["head_dim"].to(output.dtype)).flatten(-3)

        def gate_heads(module: nn.Module, args: tuple) -> tuple:
            x = args[0].unflatten(-1, (heads, head_dim))
            x = x * gates["heads"].to(x.dtype)[:, None]
            return (x.flatten(-2), *args[1:])

        self._handles.append(first.register_forward_hook(gate_qkv))
        self._handles.append(second.register_forward_pre_hook(gate_heads))

    def remove(self) -> None:
        """Take the gates off the model (they stop acting)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for linear in self._gated_linears:
            del linear.forward  # back to the class's forward
        self._gated_linears.clear()

    def __enter__(self) -> "GateSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- values -------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[SubBlock, str, torch.Tensor]]:
        """(sub-block, group, gate tensor) for every gate."""
        for sb in self.adapter.sub_blocks:
            for group, tensor in self.values[sb.index].items():
                yield sb, group, tensor

    @torch.no_grad()
    def set(self, index: int, group: str, value: torch.Tensor | float) -> None:
        """Overwrite gate ``group`` of sub-block ``index`` (soft values or 0/1)."""
        self.values[index][group].copy_(torch.as_tensor(value, dtype=torch.float32))

    @torch.no_grad()
    def set_masks(self, masks: BlockMasks) -> None:
        """Make every gate hard: 1 where ``masks`` keeps a unit, 0 elsewhere."""
        for index, groups in masks.items():
            for group, mask in groups.items():
                self.values[index][group].copy_(mask.to(torch.float32))

    def to(self, device: torch.device | str) -> "GateSet":
        """Move the gates to ``device`` (e.g. after the model moved there); the hooks follow."""
        for values in self.values.values():
            for group, tensor in values.items():
                if tensor.device != torch.device(device):
                    values[group] = tensor.detach().to(device).requires_grad_(tensor.requires_grad)
        return self

    def grads(self) -> Iterator[tuple[SubBlock, str, torch.Tensor | None]]:
        """(sub-block, group, ``dL/dm``) accumulated since the last :meth:`zero_grad`."""
        for sb, group, tensor in self.items():
            yield sb, group, tensor.grad

    def zero_grad(self) -> None:
        for _, _, tensor in self.items():
            tensor.grad = None

    def hard_masks(self, threshold: float = 0.5) -> BlockMasks:
        """Hard masks ``m >= threshold``, canonicalised (see :func:`canonical_masks`)."""
        masks = {
            index: {group: tensor.detach() >= threshold for group, tensor in groups.items()}
            for index, groups in self.values.items()
        }
        return canonical_masks(self.adapter, masks)


def _scale_last(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x * gate`` along the last (channel) dim, in ``x``'s dtype (gradients reach ``gate``)."""
    return x * gate.to(x.dtype)


def attach_gates(model: nn.Module, adapter: ModelAdapter | None = None, requires_grad: bool = True,
                 on: GatesOn = "weights") -> GateSet:
    """Install all-ones gates on every sub-block of ``model`` (a timm ViT/DeiT/Swin)."""
    from p3b_search.surgery.adapters import get_adapter

    return GateSet(adapter or get_adapter(model), requires_grad=requires_grad, on=on)


def full_masks(adapter: ModelAdapter) -> BlockMasks:
    """All-kept masks for every sub-block of ``adapter``'s model."""
    device = next(adapter.model.parameters()).device
    return {
        sb.index: {g: torch.ones(n, dtype=torch.bool, device=device) for g, n in sb.groups.items()}
        for sb in adapter.sub_blocks
    }


def random_masks(adapter: ModelAdapter, *, keep: float, seed: int, dead_prob: float = 0.0) -> BlockMasks:
    """Random hard masks (for tests and benchmarks): each unit kept with probability ``keep``;
    each group emptied entirely with probability ``dead_prob`` (its sub-block is then skipped)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for sb in adapter.sub_blocks:
        groups = {}
        for group, size in sb.groups.items():
            mask = torch.rand(size, generator=gen) < keep
            if torch.rand((), generator=gen) < dead_prob:
                mask[:] = False
            groups[group] = mask
        masks[sb.index] = groups
    return masks


def is_dead(sb: SubBlock, groups: dict[str, torch.Tensor]) -> bool:
    """True when the branch can only emit a constant: some group in its path has no unit left."""
    return any(not bool(groups[g].any()) for g in GROUPS[sb.kind] if g in groups)


def canonical_masks(adapter: ModelAdapter, masks: BlockMasks) -> BlockMasks:
    """Masks with every *dead* sub-block (a group emptied) switched off entirely.

    A branch whose input, heads, head dims or hidden units are all pruned emits only a
    constant (its biases); we zero its output too so the sub-block is skipped, as P3B does
    for kappa = 0. The masked model with these masks and its ``shrink`` give the same logits.
    Groups missing from ``masks`` count as fully kept.
    """
    out: BlockMasks = {}
    for sb in adapter.sub_blocks:
        given = masks.get(sb.index, {})
        groups = {g: given[g].bool() if g in given else torch.ones(n, dtype=torch.bool)
                  for g, n in sb.groups.items()}
        for group, mask in groups.items():
            if mask.shape != (sb.groups[group],):
                raise ValueError(f"mask {sb.name}.{group}: shape {tuple(mask.shape)}, expected ({sb.groups[group]},)")
        if is_dead(sb, groups):
            groups = {g: torch.zeros_like(m) for g, m in groups.items()}
        out[sb.index] = groups
    return out


def masked_sizes(sb: SubBlock, groups: dict[str, torch.Tensor]) -> BranchSizes:
    """Widths that ``shrink`` would keep for sub-block ``sb`` under hard masks ``groups``."""
    if is_dead(sb, groups):
        return BranchSizes(0, 0, skipped=True)

    def kept(group: str) -> int:
        return int(groups[group].sum()) if group in groups else sb.groups[group]

    if sb.kind == "attn":
        return BranchSizes(kept("in"), kept("out"), heads=kept("heads"), head_dim=kept("head_dim"))
    return BranchSizes(kept("in"), kept("out"), hidden=kept("hidden"))
