"""Learning-rate scaling and schedules, stepped once per optimizer update (not per epoch).

Update ``u`` (0-based, counted over the stage) uses ``base_lr * lr_multiplier(u, ...)``:
linear warm-up ``(u + 1) / warmup_updates`` for ``u < warmup_updates``, then ``1`` (constant)
or a cosine from ``1`` down to ``min_ratio`` reached at the last update (cosine).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from p3b_search.config import StageConfig, TrainingConfig
from p3b_search.distributed import rank_and_world

REFERENCE_BATCH = 512


def scaled_lr(lr: float, training: TrainingConfig) -> float:
    """``lr`` given for a batch of 512, scaled linearly to the effective batch: batch (per rank) x
    accumulation x data-parallel ranks, as DeiT scales it."""
    return lr * training.batch_size * training.grad_accum * rank_and_world()[1] / REFERENCE_BATCH


def lr_multiplier(update: int, *, total_updates: int, warmup_updates: int, schedule: str, min_ratio: float) -> float:
    """Factor on the base LR for optimizer update ``update`` (see module docstring)."""
    if update < warmup_updates:
        return (update + 1) / warmup_updates
    if schedule == "constant":
        return 1.0
    decay_updates = max(1, total_updates - warmup_updates - 1)
    progress = min(1.0, (update - warmup_updates) / decay_updates)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, updates_per_epoch: int) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group's own base LR;
    call ``scheduler.step()`` after each ``optimizer.step()``."""
    if stage.min_lr > stage.lr:
        raise ValueError(f"stage min_lr={stage.min_lr} exceeds lr={stage.lr}: lower min_lr")
    multiplier = partial(
        lr_multiplier,
        total_updates=stage.epochs * updates_per_epoch,
        warmup_updates=round(stage.warmup_epochs * updates_per_epoch),
        schedule=stage.schedule,
        min_ratio=stage.min_lr / stage.lr,
    )
    return LambdaLR(optimizer, multiplier)
