"""The early-stopping rule of a multi-objective study: which trial another dominates at an epoch.

A trial's *standing* at one epoch of a stage is its top-1 and the costs it is compared on (the
fine-tune stage: the pruned model's MACs; the prune stage: the trial's budget and its kept
fraction at that epoch; see :mod:`p3b_search.search.early_stopping`). From the stage's
``grace_epochs``-th epoch on, a trial stops when another trial's standing at the same epoch of
the same stage is at least ``margin`` top-1 points higher at no larger cost. Every standing ever
recorded counts, a stopped trial's too.

The live stopper (Ray Tune) and the replay simulator of the tabular benchmark
(:mod:`p3b_search.search.replay`) both decide with :class:`DominationRule`.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Standing:
    """A trial at one epoch of a stage: its top-1 and the costs it is compared on (None: unknown)."""

    number: Any
    top1: float
    costs: tuple[float | None, ...]

    def dominates(self, other: "Standing", margin: float) -> bool:
        """At least ``margin`` points more accurate at no larger cost (unknown costs on either side are skipped)."""
        return self.top1 >= other.top1 + margin and all(
            mine <= theirs for mine, theirs in zip(self.costs, other.costs) if mine is not None and theirs is not None)


class DominationRule:
    """The standings recorded at each epoch of each stage, and the stop decision.

    ``grace_epochs``: epochs of each stage (0-based index within the stage) before a trial may be
    stopped; ``margin``: top-1 points by which the other trial must be better.
    """

    def __init__(self, grace_epochs: int, margin: float):
        self.grace_epochs = int(grace_epochs)
        self.margin = float(margin)
        self._peers: dict[tuple[str, int], dict[Hashable, Standing]] = {}

    def dominator(self, trial: Hashable, stage: str, index: int, standing: Standing) -> Standing | None:
        """Record ``trial``'s ``standing`` at epoch ``index`` of ``stage`` (replacing an earlier
        record there) and return the standing of another trial there that dominates it, the
        first recorded; None when the trial continues (always within the grace epochs)."""
        peers = self._peers.setdefault((stage, index), {})
        peers[trial] = standing
        if index < self.grace_epochs:
            return None
        return next((other for key, other in peers.items() if key != trial and other.dominates(standing, self.margin)),
                    None)
