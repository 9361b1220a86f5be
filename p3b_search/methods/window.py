"""Sums of per-unit (or per-sub-block) statistics over a mask-update window, and the window before.

P3B averages block benefits over the forward passes of a window and Taylor scores over its
optimizer steps; at finalize it combines the last two windows. Under ``torch.distributed``
the current window is all-reduced (sum) before it is used, so every rank decides alike.
"""
from __future__ import annotations

from typing import Any

import torch

from p3b_search.distributed import sum_across_ranks


class WindowedSum:
    """A running sum of fixed-shape tensors and how many were added, for the current window
    and the previous one. ``sum``/``previous_sum`` have shape ``shape`` (float64)."""

    def __init__(self, shape: tuple[int, ...] | int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.previous_sum = torch.zeros_like(self.sum)
        self.previous_count = torch.zeros_like(self.count)

    def to(self, device: torch.device | str) -> "WindowedSum":
        for name in ("sum", "count", "previous_sum", "previous_count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def add(self, values: torch.Tensor, count: int = 1) -> None:
        """Add one observation (or ``count`` already summed ones)."""
        self.sum += values.detach().to(self.sum.dtype)
        self.count += count

    def reduce_across_ranks(self) -> None:
        """All-reduce (sum) the current window over the ranks of an initialised process group."""
        sum_across_ranks(self.sum)
        sum_across_ranks(self.count)

    def mean(self, with_previous: bool = False) -> torch.Tensor:
        """Average over the current window (and the previous one); zeros when nothing was added."""
        total = self.sum + self.previous_sum if with_previous else self.sum
        count = self.count + self.previous_count if with_previous else self.count
        return total / count.clamp(min=1.0)

    def roll(self) -> None:
        """Close the current window: it becomes the previous one, and a new one starts empty."""
        self.previous_sum, self.previous_count = self.sum, self.count
        self.sum, self.count = torch.zeros_like(self.previous_sum), torch.zeros_like(self.previous_count)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.sum.cpu().clone(), "count": self.count.cpu().clone(),
                "previous_sum": self.previous_sum.cpu().clone(), "previous_count": self.previous_count.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("sum", "count", "previous_sum", "previous_count"):
            target = getattr(self, name)
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(f"window state {name}: shape {tuple(state[name].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[name])
