"""Knobs of ``svite`` and of the prune-and-grow schedule it shares with ``s2vite`` (the methods:
:mod:`p3b_search.methods.svite`, :mod:`p3b_search.methods.s2vite`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from p3b_search.method_specs.base import MethodConfig, MethodSpec, register_spec


class PruneGrowConfig(MethodConfig):
    """The prune-and-grow schedule shared by SViTE and S²ViTE (times in micro-batches)."""

    update_interval: int = Field(100, ge=1, description="ΔT: micro-batches between prune-and-grow updates.")
    end_fraction: float = Field(0.8, gt=0.0, le=1.0, description="Updates stop at t_end = end_fraction x T.")
    death_rate: float = Field(0.5, gt=0.0, le=1.0,
                              description="p_0: fraction of active weights/units dropped at t = 0.")
    final_death_rate: float = Field(0.005, ge=0.0, le=1.0, description="p_t at t = T (cosine decay).")
    init: Literal["magnitude", "random"] = Field("magnitude", description="How the initial masks are drawn.")
    seed: int = Field(0, description="Seed of init='random'.")

    @model_validator(mode="after")
    def _decaying(self) -> "PruneGrowConfig":
        if self.final_death_rate > self.death_rate:
            raise ValueError(f"final_death_rate={self.final_death_rate} exceeds death_rate={self.death_rate}: "
                             "the death rate decays, lower final_death_rate")
        return self


class SViTEConfig(PruneGrowConfig):
    density: float | None = Field(None, gt=0.0, le=1.0, description="Kept fraction of the masked weights; "
                                  "None: the one that keeps 1 - prune_ratio of all the model's parameters.")
    scope: Literal["all", "blocks"] = Field(
        "all", description="all: every Linear/Conv2d weight; blocks: qkv/proj/fc1/fc2.")

    def masked_density(self, masked: int, total: int) -> float:
        """Kept fraction of the ``masked`` weights (a count) of a model of ``total`` parameters:
        ``density`` if set, else the one that keeps ``1 - prune_ratio`` of ``total`` with every
        unmasked parameter kept."""
        if self.density is not None:
            return self.density
        density = (self.kept_target(total) - (total - masked)) / masked
        if density <= 0.0:
            raise ValueError(
                f"svite: prune_ratio={self.prune_ratio:g} asks to keep {1.0 - self.prune_ratio:.3f} of the parameters, "
                f"but scope={self.scope!r} never masks {(total - masked) / total:.3f} of them: "
                "lower prune_ratio or set scope='all'"
            )
        return density


SVITE_SPEC = register_spec(MethodSpec("svite", SViTEConfig, structured=False))
