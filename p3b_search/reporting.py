"""How a trial tells the world what it did, without knowing who listens.

The objective (``objectives/``) calls a :class:`TrialReporter`; the Ray Tune runner, the
MLflow tracker, the Parquet writer and the tests each provide one. Running by hand, the base
class (which keeps everything in memory) is enough.

Per-epoch ``metrics`` keys (floats): ``epoch`` (0-based, counted over both stages),
``stage`` (0 = prune, 1 = fine-tune), ``loss``, ``top1``, ``top5`` (percent), ``lr``,
``kept_params``, ``macs`` (per image), ``keep_ratio`` (kept / dense parameters); with shared
prefixes also ``prefix_shared`` (1: the epoch was restored from a prefix another trial trained).
Allocation rows: one per sub-block per mask update (see ``p3b_search.methods``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class TrialReporter:
    """Collects a trial's reports in memory; subclasses forward them somewhere."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.allocations: list[dict[str, Any]] = []
        self.final: dict[str, float] = {}

    def report_epoch(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        """End of an epoch; ``checkpoint_dir`` holds a full-state checkpoint to resume from."""
        self.epochs.append(dict(metrics))

    def report_allocations(self, rows: list[dict[str, Any]]) -> None:
        """Per-sub-block allocation rows of the mask updates since the last call."""
        self.allocations.extend(rows)

    def report_final(self, metrics: dict[str, float]) -> None:
        """The trial's objectives (``top1``, ``macs``, ``params``, optionally ``latency_ms``)."""
        self.final = dict(metrics)
