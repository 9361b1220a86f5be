"""Knobs of ``p3b``, Pruning by Block Benefit (the method: :mod:`p3b_search.methods.p3b`)."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from p3b_search.method_specs.base import MethodSpec, register_spec
from p3b_search.method_specs.gated import IterativePruningConfig

#: The heads on half of every 2nd micro-batch (a quarter of their cost): on the glyphs benchmark
#: (benchmarks/benefit_fidelity.py, 5 seeds) the same decisions as every image of every batch
#: (Spearman 0.90 of the window benefit, keep ratios within 0.023, top-1 -0.02 [-0.20, +0.17]);
#: a quarter of every 4th batch was measurably worse (0.55, top-1 -0.95 [-1.56, -0.35]).
DEFAULT_AUX_BATCH_FRACTION = 0.5
DEFAULT_AUX_EVERY = 2


class P3BConfig(IterativePruningConfig):
    """P3B's knobs, reference defaults (flag names of the reference code in brackets).

    Inherited: ``prune_ratio`` [--prune-ratio], ``prune_start_epoch``, ``prune_sparse_epoch``,
    ``prune_finalize_epoch``, ``prune_steps_update_mask``, ``block_params_only``, the six
    ``gate_scale_*`` [--prune-scale-gate-imp] and ``tau_max``/``tau_min``.
    """

    alpha: float = Field(0.5, ge=0, le=1, description="[--pr-alpha] Mix of cls (alpha) and patch (1-alpha) importance.")
    gamma: float = Field(0.2, gt=0, le=1, description="[--pr-gamma] EMA weight of the newest window's importance.")
    block_importance_scale: float = Field(
        10.0, gt=0, description="[--pr-block-imp-scale] S: benefits are scaled to max S and soft-clamped into (0, S).")
    aux_head_lr: float = Field(
        5e-4, gt=0, description="Learning rate of the auxiliary cls/patch heads (not scaled by the batch).")
    aux_batch_fraction: float = Field(
        DEFAULT_AUX_BATCH_FRACTION, gt=0, le=1, description="Share of each micro-batch the auxiliary heads see "
        "(the first ceil(fraction x B) images of the shuffled batch); 1: all of it, as the reference code.")
    aux_every: int | None = Field(
        None, ge=1, description="The auxiliary heads run (are trained and measure the benefit) on every k-th "
        "micro-batch, counted from the prune start; 1: every micro-batch, as the reference code. At most "
        f"prune_steps_update_mask, so that every window measures the benefit; None: {DEFAULT_AUX_EVERY}, or "
        "prune_steps_update_mask when that is smaller.")
    keep_ratios: tuple[float, ...] | None = Field(
        None, description="[--prune-kr-handcraft] Hand-set kappa per sub-block (2L values, attention of layer 0 "
        "first); replaces the block-benefit budget (no auxiliary heads are trained).")

    @field_validator("keep_ratios")
    @classmethod
    def _ratios_in_unit_interval(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None:
            bad = [r for r in value if not 0.0 <= r <= 1.0]
            if bad or not value:
                raise ValueError(f"keep_ratios must be non-empty values in [0, 1], got {bad or list(value)}")
        return value

    @property
    def aux_period(self) -> int:
        """k: the auxiliary heads run on every k-th micro-batch (``aux_every`` resolved)."""
        return min(DEFAULT_AUX_EVERY, self.prune_steps_update_mask) if self.aux_every is None else self.aux_every

    @model_validator(mode="after")
    def _every_window_measures(self) -> "P3BConfig":
        if self.aux_every is not None and self.aux_every > self.prune_steps_update_mask:
            raise ValueError(
                f"aux_every={self.aux_every} exceeds prune_steps_update_mask={self.prune_steps_update_mask}: "
                "a window would measure no benefit; lower aux_every or update the masks less often"
            )
        return self


P3B_SPEC = register_spec(MethodSpec("p3b", P3BConfig, structured=True))
