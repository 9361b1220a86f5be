"""Knobs of ``dense``, fine-tuning without pruning (the method: :mod:`p3b_search.methods.dense`)."""
from __future__ import annotations

from pydantic import Field

from p3b_search.method_specs.base import MethodConfig, MethodSpec, register_spec


class DenseConfig(MethodConfig):
    """No knobs: ``prune_ratio`` stays 0 (a searched prune ratio does not apply to dense)."""

    fixed_knobs = frozenset({"prune_ratio"})
    prune_ratio: float = Field(0.0, ge=0.0, le=0.0, description="dense prunes nothing.")


#: structured: the full model is its own (unchanged) result
DENSE_SPEC = register_spec(MethodSpec("dense", DenseConfig, structured=True))
