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

**Residual** (``residual``): ``"per-block"`` (default) gives every sub-block its own ``in``
and ``out`` gates, as above. ``"shared"`` replaces them with one gate ``r`` per residual stream
(per stage; ViT has one), which serves the patch embedding's output, every sub-block's input
and output, the final norm and the head: the sub-blocks keep only their inner gates
(``head_dim``, ``heads``, ``hidden``). ``r`` acts where the stream is *read*: every LayerNorm
over the stream (:meth:`~p3b_search.surgery.adapters.ModelAdapter.stream_norms`) becomes
:func:`masked_layer_norm`, whose mean and variance are weighted by ``r`` and whose output is
multiplied by ``r``. With 0/1 gates a pruned channel is then invisible to every reader (its
statistics weight and its output are 0) and the statistics are those over the kept channels
only, so the model computes exactly what the physically narrower model computes (embedding
width = kept channels, ``LayerNorm(kept)``); writes into pruned channels need no gate, as
nothing reads them. Soft gates include a channel partly: in the statistics with weight
``r_c``, in the output scaled by ``r_c``; ``dL/dr`` sums the effect of a channel on every
reader, i.e. on the whole model.

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
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from p3b_search.surgery.adapters import GROUPS, BranchSizes, ModelAdapter, SubBlock

#: Where gates act: folded into the weights of the linears (cheaper), or on the activations
#: (for methods whose own hooks must see gated activations and their gradients).
GatesOn = Literal["weights", "activations"]
#: Whether each sub-block gates its own residual input and output channels, or one gate per
#: residual stream serves them all (see the module docstring).
ResidualMode = Literal["per-block", "shared"]
RESIDUAL_MODES: tuple[str, ...] = ("per-block", "shared")
#: The per-block groups that a shared residual replaces.
RESIDUAL_GROUPS = ("in", "out")
#: Hard masks of a model: ``masks[j][group]`` is a bool vector (True = kept) for sub-block ``j``.
BlockMasks = dict[int, dict[str, torch.Tensor]]
#: Hard masks of shared residual streams: ``residual[stage]`` is a bool vector (C_stage,).
ResidualMasks = dict[int, torch.Tensor]


def inner_groups(sb: SubBlock) -> dict[str, int]:
    """The groups of ``sb`` that a shared residual leaves to the sub-block, with their sizes."""
    return {g: n for g, n in sb.groups.items() if g not in RESIDUAL_GROUPS}


def masked_layer_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` (..., C) over the channels weighted by ``gate`` (C,): mean and variance
    are ``gate``-weighted averages, the affine output is multiplied by ``gate``. With a 0/1 gate
    this is ``LayerNorm(kept)`` on the kept channels and 0 on the others. Computed in float32
    with autocast off (as ``F.layer_norm`` is under autocast), returned in ``x``'s dtype."""
    with torch.autocast(x.device.type, enabled=False):  # sums, not matmuls: no TF32 on the statistics
        xf, g = x.float(), gate.float()
        total = g.sum()
        mean = (xf * g).sum(-1, keepdim=True) / total
        centred = xf - mean
        var = (centred.square() * g).sum(-1, keepdim=True) / total
        y = centred * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return (y * g).to(x.dtype)


class GateSet:
    """The gates of every sub-block of one model, applied ``on`` the linears' weights (default)
    or on the activations, with per-block or ``shared`` residual gates (see the module docstring).

    ``values[j][group]`` is a float32 leaf tensor of shape (group size,) on the model's device
    (with a shared residual: the inner groups only); ``residual[stage]`` the shared residual
    gate of each stage (C_stage,) (empty per block). Use as a context manager or call
    :meth:`remove` to take the gates off again.
    """

    def __init__(self, adapter: ModelAdapter, requires_grad: bool = True, on: GatesOn = "weights",
                 residual: ResidualMode = "per-block"):
        if any(hasattr(adapter.block(sb), "dense_geometry") for sb in adapter.sub_blocks):
            raise ValueError("gates go on a dense model: this one was already shrunk")
        if on not in ("weights", "activations"):
            raise ValueError(f"gates on={on!r}: use 'weights' or 'activations'")
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"gates residual={residual!r}: use 'per-block' or 'shared'")
        if residual == "shared":
            adapter.check_shared_residual()
        self.adapter = adapter
        self.shared = residual == "shared"
        device = next(adapter.model.parameters()).device

        def ones(size: int) -> torch.Tensor:
            return torch.ones(size, device=device, requires_grad=requires_grad)

        self.values: dict[int, dict[str, torch.Tensor]] = {
            sb.index: {group: ones(size) for group, size in (inner_groups(sb) if self.shared else sb.groups).items()}
            for sb in adapter.sub_blocks
        }
        self.residual: dict[int, torch.Tensor] = (
            {stage: ones(width) for stage, width in adapter.stream_widths().items()} if self.shared else {})
        self._handles: list[RemovableHandle] = []
        self._patched: list[nn.Module] = []
        for sb in adapter.sub_blocks:
            if on == "weights":
                self._fold_into_weights(sb)
            else:
                self._hook_activations(sb)
        if self.shared:
            for norm in adapter.stream_norms():
                self._mask_norm(adapter.model.get_submodule(norm.path), norm.stage, norm.repeats)

    # -- where the gates act ----------------------------------------------------------------
    def _gate(self, sb: SubBlock, group: str, repeat: int = 1, interleave: int = 1) -> Callable[[], torch.Tensor] | None:
        """The gate ``group`` of ``sb`` as a callable (read at each forward), ``repeat``-ed whole
        or ``interleave``-d per element; None when ``sb`` has no such gate (shared residual)."""
        gates = self.values[sb.index]
        if group not in gates:
            return None

        def value() -> torch.Tensor:
            gate = gates[group]
            if repeat > 1:
                gate = gate.repeat(repeat)
            return gate.repeat_interleave(interleave) if interleave > 1 else gate

        return value

    def _fold_into_weights(self, sb: SubBlock) -> None:
        """Each gate scales the rows (outputs) or columns (inputs) of the weight it touches."""
        first, second = self.adapter.linears(sb)
        if sb.kind == "attn":
            heads, head_dim = sb.num_heads, sb.head_dim
            # qkv's outputs are laid out (3, H, d) and proj's inputs (H, d)
            self._gate_linear(first, columns=self._gate(sb, "in"), rows=self._gate(sb, "head_dim", repeat=3 * heads))
            self._gate_linear(second, columns=self._gate(sb, "heads", interleave=head_dim), rows=self._gate(sb, "out"))
        else:
            self._gate_linear(first, columns=self._gate(sb, "in"), rows=None)
            self._gate_linear(second, columns=self._gate(sb, "hidden"), rows=self._gate(sb, "out"))

    def _gate_linear(self, linear: nn.Linear, columns: Callable[[], torch.Tensor] | None,
                     rows: Callable[[], torch.Tensor] | None) -> None:
        """Make ``linear`` compute ``((x * columns) W^T + b) * rows`` as ``x (W * rows[:, None] *
        columns)^T + b * rows``: the same function and gradients (to float rounding), at the
        cost of the weight (out x in) instead of the activations (tokens x width), with no
        module hooks. The instance's ``forward`` is replaced until :meth:`remove`; a linear
        without gates is left alone."""
        if columns is None and rows is None:
            return

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = linear.weight, linear.bias
            scale = None if columns is None else columns().to(weight.dtype)
            if rows is not None:
                row = rows().to(weight.dtype)[:, None]
                scale = row if scale is None else row * scale
                bias = None if bias is None else bias * row[:, 0]
            return F.linear(x, weight * scale, bias)

        linear.forward = forward
        self._patched.append(linear)

    def _mask_norm(self, norm: nn.LayerNorm, stage: int, repeats: int) -> None:
        """Make ``norm`` a :func:`masked_layer_norm` under the shared residual gate of ``stage``
        (``repeats`` copies side by side) until :meth:`remove`."""
        gates = self.residual

        def forward(x: torch.Tensor) -> torch.Tensor:
            return masked_layer_norm(x, gates[stage].repeat(repeats), norm.weight, norm.bias, norm.eps)

        norm.forward = forward
        self._patched.append(norm)

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

        if "in" in gates:
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
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._patched.clear()

    def __enter__(self) -> "GateSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- values -------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[SubBlock, str, torch.Tensor]]:
        """(sub-block, group, gate tensor) for every sub-block gate (the residual's aside)."""
        for sb in self.adapter.sub_blocks:
            for group, tensor in self.values[sb.index].items():
                yield sb, group, tensor

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every gate tensor: the sub-blocks' gates, then the shared residual's."""
        yield from (tensor for _, _, tensor in self.items())
        yield from self.residual.values()

    @torch.no_grad()
    def set(self, index: int, group: str, value: torch.Tensor | float) -> None:
        """Overwrite gate ``group`` of sub-block ``index`` (soft values or 0/1)."""
        self.values[index][group].copy_(torch.as_tensor(value, dtype=torch.float32))

    @torch.no_grad()
    def set_residual(self, stage: int, value: torch.Tensor | float) -> None:
        """Overwrite the shared residual gate of ``stage`` (soft values or 0/1)."""
        self.residual[stage].copy_(torch.as_tensor(value, dtype=torch.float32))

    @torch.no_grad()
    def set_masks(self, masks: BlockMasks, residual: ResidualMasks | None = None) -> None:
        """Make every gate hard: 1 where ``masks`` (and, shared, ``residual``) keep a unit, 0
        elsewhere. With a shared residual, ``masks`` may hold the ``in``/``out`` groups that
        :func:`canonical_masks` fills in; they have no gates and are skipped."""
        for index, groups in masks.items():
            for group, mask in groups.items():
                if not (self.shared and group in RESIDUAL_GROUPS):
                    self.values[index][group].copy_(mask.to(torch.float32))
        for stage, mask in (residual or {}).items():
            self.residual[stage].copy_(mask.to(torch.float32))

    def to(self, device: torch.device | str) -> "GateSet":
        """Move the gates to ``device`` (e.g. after the model moved there); the hooks follow."""
        for values in (*self.values.values(), self.residual):
            for key, tensor in values.items():
                if tensor.device != torch.device(device):
                    values[key] = tensor.detach().to(device).requires_grad_(tensor.requires_grad)
        return self

    def grads(self) -> Iterator[tuple[SubBlock, str, torch.Tensor | None]]:
        """(sub-block, group, ``dL/dm``) accumulated since the last :meth:`zero_grad`."""
        for sb, group, tensor in self.items():
            yield sb, group, tensor.grad

    def zero_grad(self) -> None:
        for tensor in self.tensors():
            tensor.grad = None

    def hard_residual(self, threshold: float = 0.5) -> ResidualMasks | None:
        """The shared residual's hard masks ``r >= threshold`` by stage; None per block."""
        if not self.shared:
            return None
        return {stage: tensor.detach() >= threshold for stage, tensor in self.residual.items()}

    def hard_masks(self, threshold: float = 0.5) -> BlockMasks:
        """Hard masks ``m >= threshold``, canonicalised (see :func:`canonical_masks`; with a
        shared residual its masks fill every live sub-block's ``in`` and ``out``)."""
        masks = {
            index: {group: tensor.detach() >= threshold for group, tensor in groups.items()}
            for index, groups in self.values.items()
        }
        return canonical_masks(self.adapter, masks, self.hard_residual(threshold))


def _scale_last(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x * gate`` along the last (channel) dim, in ``x``'s dtype (gradients reach ``gate``)."""
    return x * gate.to(x.dtype)


def attach_gates(model: nn.Module, adapter: ModelAdapter | None = None, requires_grad: bool = True,
                 on: GatesOn = "weights", residual: ResidualMode = "per-block") -> GateSet:
    """Install all-ones gates on every sub-block of ``model`` (a timm ViT/DeiT/Swin), per block
    or with a ``shared`` residual."""
    from p3b_search.surgery.adapters import get_adapter

    return GateSet(adapter or get_adapter(model), requires_grad=requires_grad, on=on, residual=residual)


def full_masks(adapter: ModelAdapter) -> BlockMasks:
    """All-kept masks for every sub-block of ``adapter``'s model."""
    device = next(adapter.model.parameters()).device
    return {
        sb.index: {g: torch.ones(n, dtype=torch.bool, device=device) for g, n in sb.groups.items()}
        for sb in adapter.sub_blocks
    }


def random_masks(adapter: ModelAdapter, *, keep: float, seed: int, dead_prob: float = 0.0,
                 shared: bool = False) -> BlockMasks:
    """Random hard masks (for tests and benchmarks): each unit kept with probability ``keep``;
    each group emptied entirely with probability ``dead_prob`` (its sub-block is then skipped).
    ``shared``: only the inner groups (a shared residual sets ``in``/``out``, see
    :func:`random_residual`)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for sb in adapter.sub_blocks:
        groups = {}
        for group, size in (inner_groups(sb) if shared else sb.groups).items():
            mask = torch.rand(size, generator=gen) < keep
            if torch.rand((), generator=gen) < dead_prob:
                mask[:] = False
            groups[group] = mask
        masks[sb.index] = groups
    return masks


def random_residual(adapter: ModelAdapter, *, keep: float, seed: int) -> ResidualMasks:
    """Random shared residual masks (for tests and benchmarks): each channel kept with
    probability ``keep``, at least one per stage."""
    gen = torch.Generator().manual_seed(seed)
    residual = {}
    for stage, width in adapter.stream_widths().items():
        mask = torch.rand(width, generator=gen) < keep
        mask[torch.randint(width, (), generator=gen)] = True
        residual[stage] = mask
    return residual


def is_dead(sb: SubBlock, groups: dict[str, torch.Tensor]) -> bool:
    """True when the branch can only emit a constant: some group in its path has no unit left."""
    return any(not bool(groups[g].any()) for g in GROUPS[sb.kind] if g in groups)


def check_residual(adapter: ModelAdapter, residual: ResidualMasks) -> ResidualMasks:
    """``residual`` as bool masks, after checking it has one mask per stage of the right size,
    each keeping a channel (``ValueError`` naming the stage otherwise)."""
    widths = adapter.stream_widths()
    if set(residual) != set(widths):
        raise ValueError(f"residual masks for stages {sorted(residual)}: the model's streams are stages {sorted(widths)}")
    out = {}
    for stage, width in widths.items():
        mask = residual[stage].bool()
        if mask.shape != (width,):
            raise ValueError(f"residual mask of stage {stage}: shape {tuple(mask.shape)}, expected ({width},)")
        if not bool(mask.any()):
            raise ValueError(f"residual mask of stage {stage} keeps no channel: keep at least one")
        out[stage] = mask
    return out


def canonical_masks(adapter: ModelAdapter, masks: BlockMasks, residual: ResidualMasks | None = None) -> BlockMasks:
    """Masks with every *dead* sub-block (a group emptied) switched off entirely.

    A branch whose input, heads, head dims or hidden units are all pruned emits only a
    constant (its biases); we zero its output too so the sub-block is skipped, as P3B does
    for kappa = 0. The masked model with these masks and its ``shrink`` give the same logits.
    Groups missing from ``masks`` count as fully kept. With a shared ``residual`` (masks by
    stage), every sub-block's ``in`` and ``out`` are its stage's residual mask: ``masks`` leave
    them out, give them so, or give one all False to skip the sub-block.
    """
    if residual is not None:
        residual = check_residual(adapter, residual)
    out: BlockMasks = {}
    for sb in adapter.sub_blocks:
        given = dict(masks.get(sb.index, {}))
        skipped = False
        if residual is not None:
            stream = residual[sb.stage]
            for group in RESIDUAL_GROUPS:
                mask = given.get(group)
                if mask is not None and bool(mask.any()) and not torch.equal(mask.bool().cpu(), stream.cpu()):
                    raise ValueError(f"mask {sb.name}.{group}: a shared residual sets every sub-block's input and "
                                     f"output channels: leave {group} out of the masks (or all False to skip it)")
                skipped |= mask is not None and not bool(mask.any())
                given[group] = stream
        groups = {g: given[g].bool() if g in given else torch.ones(n, dtype=torch.bool)
                  for g, n in sb.groups.items()}
        for group, mask in groups.items():
            if mask.shape != (sb.groups[group],):
                raise ValueError(f"mask {sb.name}.{group}: shape {tuple(mask.shape)}, expected ({sb.groups[group]},)")
        if skipped or is_dead(sb, groups):
            groups = {g: torch.zeros_like(m) for g, m in groups.items()}
        out[sb.index] = groups
    return out


def masked_sizes(sb: SubBlock, groups: dict[str, torch.Tensor], shared: bool = False) -> BranchSizes:
    """Widths that ``shrink`` would keep for sub-block ``sb`` under hard masks ``groups``
    (canonical; ``shared``: a shared residual, which narrows the norm to the kept input too)."""
    if is_dead(sb, groups):
        return BranchSizes(0, 0, skipped=True)

    def kept(group: str) -> int:
        return int(groups[group].sum()) if group in groups else sb.groups[group]

    norm = kept("in") if shared else None
    if sb.kind == "attn":
        return BranchSizes(kept("in"), kept("out"), heads=kept("heads"), head_dim=kept("head_dim"), norm=norm)
    return BranchSizes(kept("in"), kept("out"), hidden=kept("hidden"), norm=norm)
