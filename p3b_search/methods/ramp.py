"""The ramp of every gated method's keep ratios from dense to their target (P3B's step 7,
docs/methods.md): the mask tightens gradually between the prune start and the sparse step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeepRatioRamp:
    """Step 7: ``kappa(t) = 1 - (1 - kappa) * min(1, (t + 1 - t_start) / (t_sparse - t_start))``
    at micro-batch ``t`` (before ``t_start`` the model stays dense; ``t_sparse == t_start``
    jumps to the target at once)."""

    start_step: int
    sparse_step: int

    def progress(self, step: int) -> float:
        """Fraction of the way from dense (0) to the target keep ratios (1)."""
        span = self.sparse_step - self.start_step
        if span <= 0:
            return 1.0 if step + 1 >= self.start_step else 0.0
        return min(1.0, max(0.0, (step + 1 - self.start_step) / span))

    def __call__(self, keep_ratios: torch.Tensor, step: int) -> torch.Tensor:
        return ramp_keep_ratios(keep_ratios, self.progress(step))


def ramp_keep_ratios(keep_ratios: torch.Tensor, progress: float) -> torch.Tensor:
    """``1 - (1 - kappa) * progress``: dense at progress 0, the target ``kappa`` at 1."""
    return 1.0 - (1.0 - keep_ratios) * progress
