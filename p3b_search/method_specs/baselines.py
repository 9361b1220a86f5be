"""Knobs of the baselines ``uniform-magnitude`` and ``global-taylor`` (the methods:
:mod:`p3b_search.methods.baselines`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from p3b_search.method_specs.base import MethodSpec, register_spec
from p3b_search.method_specs.gated import GatedPruningConfig, IterativePruningConfig
from p3b_search.method_specs.schedule import PruneSchedule


class UniformMagnitudeConfig(GatedPruningConfig):
    """``uniform-magnitude`` knobs; the schedule fields are P3B's (sparse/update fields unused)."""

    prune_at: Literal["start", "finalize"] = Field(
        "start", description="When the one-shot pruning happens: at prune_start_epoch, or at the finalize epoch.")
    norm: Literal["l1", "l2"] = Field("l2", description="Weight norm that ranks units within a gate.")

    def first_acting_step(self, schedule: PruneSchedule) -> int:
        """The micro-batch after whose backward the one-shot pruning happens (before its
        optimizer step): the one before the start step, or the finalize step's last one; 0 when
        it prunes before training."""
        if self.prune_at == "start":
            return max(0, schedule.start_step - 1)
        return schedule.final_step - 1


class GlobalTaylorConfig(IterativePruningConfig):
    """``global-taylor`` knobs: P3B's schedule, tau and gate scales, no block-benefit knobs."""


UNIFORM_MAGNITUDE_SPEC = register_spec(MethodSpec("uniform-magnitude", UniformMagnitudeConfig, structured=True))
GLOBAL_TAYLOR_SPEC = register_spec(MethodSpec("global-taylor", GlobalTaylorConfig, structured=True))
