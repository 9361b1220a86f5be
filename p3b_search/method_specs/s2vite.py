"""Knobs of ``s2vite`` (the method: :mod:`p3b_search.methods.s2vite`)."""
from __future__ import annotations

from pydantic import Field

from p3b_search.method_specs.base import MethodSpec, register_spec
from p3b_search.method_specs.svite import PruneGrowConfig

#: the density knob of each kind of sub-block
DENSITY_KNOB = {"attn": "head_density", "mlp": "mlp_density"}


class S2ViTEConfig(PruneGrowConfig):
    head_density: float | None = Field(
        None, gt=0.0, le=1.0, description="Kept fraction of heads per attention; None: 1 - prune_ratio, "
        "or solved for prune_ratio when mlp_density is set.")
    mlp_density: float | None = Field(
        None, gt=0.0, le=1.0, description="Kept fraction of neurons per MLP; None: solved so that the model "
        "keeps 1 - prune_ratio of all its parameters.")

    def given_densities(self) -> dict[str, float | None]:
        """The density of each kind of sub-block as set (``None``: unset)."""
        return {kind: getattr(self, knob) for kind, knob in DENSITY_KNOB.items()}


S2VITE_SPEC = register_spec(MethodSpec("s2vite", S2ViTEConfig, structured=True))
