"""Wall-clock timing of forward passes: what the objective's ``latency_ms`` and ``bench`` measure.

Times are in milliseconds (medians, or every repeat), under ``torch.inference_mode``, with the device
synchronised around each pass (CUDA runs asynchronously).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

#: A model or any callable ``x -> output`` (e.g. a compiled model or an ONNX Runtime session).
Forward = Callable[[torch.Tensor], Any]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_ms(model: Forward, x: torch.Tensor) -> float:
    """Wall time (ms) of one forward pass of ``x`` through ``model``."""
    _synchronize(x.device)
    start = time.perf_counter()
    model(x)
    _synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def time_runs(models: dict[str, Forward], x: torch.Tensor, warmup: int = 3, repeats: int = 10) -> dict[str, list[float]]:
    """Ms of each of ``repeats`` forward passes of ``x`` through each model after ``warmup`` untimed
    passes, timed round-robin (each repeat runs every model once, the first model rotating from
    repeat to repeat, so drift on a shared machine hits all alike, and the i-th times of two
    models pair naturally)."""
    for _ in range(warmup):
        for model in models.values():
            model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(repeats):
        first = repeat % len(names)
        for name in names[first:] + names[:first]:  # each model leads in turn: no position bias
            times[name].append(forward_ms(models[name], x))
    return times


def time_models(models: dict[str, Forward], x: torch.Tensor, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median ms of one forward pass of ``x`` through each model, timed round-robin (:func:`time_runs`)."""
    return {name: statistics.median(values) for name, values in time_runs(models, x, warmup, repeats).items()}
