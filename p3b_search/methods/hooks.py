"""The points where a pruning method plugs into the training loop.

The loop (``p3b_search.training.loop``) calls these in this order for every micro-batch::

    outputs = model(inputs)
    loss = criterion(outputs, targets) + hooks.extra_loss(step, inputs, targets, outputs)
    loss.backward()
    hooks.after_backward(step)
    if step closes an accumulation window:
        optimizer.step(); hooks.after_optimizer_step(step)
    ...
    hooks.on_epoch_end(epoch)

``step`` counts micro-batches from the start of the stage (0-based), ``epoch`` is 0-based.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: micro-batch ``step`` (0-based, counted over the stage), ``epoch``
    (0-based), ``steps_per_epoch`` micro-batches per epoch, and whether this micro-batch
    closes a gradient-accumulation window (an optimizer step follows)."""

    step: int
    epoch: int
    steps_per_epoch: int
    optimizer_step: bool

    @property
    def epoch_progress(self) -> float:
        """Fractional epoch: ``epoch + batch_in_epoch / steps_per_epoch``."""
        return self.epoch + (self.step % self.steps_per_epoch) / self.steps_per_epoch


class TrainingHooks:
    """No-op base: a method overrides what it needs. Methods never see Optuna, Ray or MLflow."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once the model and optimizer exist (also after a resume)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (e.g. P3B's auxiliary heads with their own LR)."""
        return []

    def extra_loss(
        self, info: StepInfo, inputs: torch.Tensor, targets: torch.Tensor, outputs: Any
    ) -> torch.Tensor | None:
        """Loss added to the task loss for this micro-batch (``targets`` may be soft)."""
        return None

    def after_backward(self, info: StepInfo) -> None:
        """Gradients of this micro-batch are in ``.grad`` (accumulated within a window)."""

    def after_optimizer_step(self, info: StepInfo) -> None:
        """The optimizer has just stepped (re-apply masks here)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """End of ``epoch``; returns extra per-epoch metrics to report (e.g. kept params)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the method exactly (tensors and plain Python only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
