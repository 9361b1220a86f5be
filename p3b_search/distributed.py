"""Data parallelism over ``torch.distributed`` ranks, without wrapping the model.

A ``workers_per_trial > 1`` trial runs the same objective in every rank of a process group
(gloo on CPU, NCCL on GPU; Ray Train sets it up). What keeps the ranks one model:

* :func:`broadcast_state`: every rank starts a stage from rank 0's parameters and buffers;
* :func:`average_gradients`: before each optimizer step the gradients are averaged over the
  ranks (in flat buckets), so every rank takes the same step, as ``DistributedDataParallel``
  does — but after the methods' ``after_backward`` hooks, which keep reading their own
  rank's gradients, and with the model's modules, hooks and ``state_dict`` keys untouched;
* :func:`average_across_ranks` / :func:`sum_across_ranks`: the methods' statistics (benefit
  sums, Taylor scores, SViTE gradients), so every rank takes the same mask decision;
* :func:`broadcast_object`: rank 0's decisions that are no tensors (which shared prefix to
  start from).

Without an initialised process group (or with one rank) every function is a no-op, so the
single-process path pays nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20  # as DistributedDataParallel's default bucket_cap_mb


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _parallel() -> bool:
    return rank_and_world()[1] > 1


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks, in place; returns ``tensor``."""
    if _parallel():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks (a new tensor; the input is left as is), or ``tensor``
    itself with one rank. Every rank then decides on the same numbers."""
    if not _parallel():
        return tensor
    return sum_across_ranks(tensor.detach().clone()).div_(rank_and_world()[1])


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself with one rank."""
    if not _parallel():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """``tensors`` in consecutive groups of one dtype and device, each at most ``BUCKET_BYTES``
    (a larger tensor is a group of its own)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def _in_flat_buckets(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run ``collective`` (in place on a flat 1-D tensor) on ``tensors`` bucket by bucket, one
    call per bucket instead of one per tensor, and copy the results back into ``tensors``."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        collective(flat)
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(part.view_as(tensor))


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace the ``.grad`` of each parameter by its mean over the ranks.

    A parameter without a gradient on this rank counts as a zero gradient (every rank must hold
    the same parameters, in the same order); it then gets one, as ``DistributedDataParallel``
    would with ``find_unused_parameters``.
    """
    if not _parallel():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = rank_and_world()[1]
    _in_flat_buckets([p.grad for p in params], lambda flat: sum_across_ranks(flat).div_(world))


def broadcast_state(modules: Iterable[nn.Module], params: Iterable[torch.Tensor] = ()) -> None:
    """Copy rank 0's parameters and buffers of ``modules`` (and the extra tensors ``params``,
    e.g. a method's own trainable tensors) to every rank, in place."""
    if not _parallel():
        return
    seen: set[int] = set()
    tensors = []
    for tensor in [t for m in modules for t in (*m.parameters(), *m.buffers())] + list(params):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    with torch.no_grad():
        _in_flat_buckets(tensors, lambda flat: dist.broadcast(flat, src=0))
