"""Agreement across data-parallel ranks: every rank must take the same mask decision."""
from __future__ import annotations

import torch
import torch.distributed as dist


def average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks when ``torch.distributed`` is initialised (a new tensor;
    the input is left as is), else ``tensor`` itself. Values that DDP already synchronised may
    be averaged again: what matters is that every rank decides on the same numbers."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.div_(dist.get_world_size())
