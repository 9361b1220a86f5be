"""Knobs of the gated methods (P3B and its baselines) and when they act (:mod:`.schedule`);
the methods themselves are in :mod:`p3b_search.methods.gated`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from p3b_search.method_specs.base import MethodConfig
from p3b_search.method_specs.schedule import PruneSchedule

#: Group (and gate type) name of a shared residual's channels: the key of its gate scale.
RESIDUAL = "residual"


class GatedPruningConfig(MethodConfig):
    """Knobs shared by P3B and its baselines (reference flag names in brackets)."""

    prune_start_epoch: float | None = Field(
        None, ge=0, description="[--prune-start-epoch] Epoch (may be fractional) at which pruning starts; "
        "None: 0.2 x the finalize epoch (the README run's 10 of 50).")
    prune_finalize_epoch: float | None = Field(
        None, gt=0, description="[--prune-finalize-epoch] Epoch at which masks become hard; "
        "None: the end of the prune stage. Must not exceed the prune stage's epochs.")
    block_params_only: bool = Field(
        False, description="[--prune-rate-by-block-param-only] prune_ratio counts only sub-block parameters "
        "(and, with a shared residual, those its width cuts outside them); False: the never-pruned ones (stem, "
        "position embedding, head) count too.")
    residual: Literal["per-block", "shared"] = Field(
        "per-block", description="per-block: every sub-block chooses its own residual input and output channels "
        "(the export gathers and index_adds them); shared: one residual width per stage for the patch embedding, "
        "every sub-block's input and output, the final norm and the head (the export is a plain narrower "
        "model). docs/methods.md, section 1.6.")
    gate_scale_attn_in: float = Field(1.0, gt=0, description="Rank scale s_g of attention input channels.")
    gate_scale_attn_head_dim: float = Field(1.0, gt=0, description="Rank scale s_g of the qkv head dims.")
    gate_scale_attn_out: float = Field(1.5, gt=0, description="Rank scale s_g of attention output channels.")
    gate_scale_mlp_in: float = Field(1.0, gt=0, description="Rank scale s_g of MLP input channels.")
    gate_scale_mlp_hidden: float = Field(0.75, gt=0, description="Rank scale s_g of MLP hidden units.")
    gate_scale_mlp_out: float = Field(1.5, gt=0, description="Rank scale s_g of MLP output channels.")
    gate_scale_residual: float = Field(
        1.5, gt=0, description="Rank scale s_g of the shared residual's channels (residual: shared).")

    @model_validator(mode="after")
    def _start_before_finalize(self) -> "GatedPruningConfig":
        start, final = self.prune_start_epoch, self.prune_finalize_epoch
        if start is not None and final is not None and start >= final:
            raise ValueError(
                f"prune_start_epoch={start:g} is not before prune_finalize_epoch={final:g}: "
                "start pruning earlier or finalize later"
            )
        return self

    def gate_scales(self) -> dict[str, float]:
        """``{"attn.in": s, ..., "mlp.out": s, "residual": s}`` (the keys of ``Segment.gate_type``)."""
        return {**{f"{kind}.{group}": getattr(self, f"gate_scale_{kind}_{group}")
                   for kind, groups in (("attn", ("in", "head_dim", "out")), ("mlp", ("in", "hidden", "out")))
                   for group in groups}, RESIDUAL: self.gate_scale_residual}

    def prune_schedule(self, epochs: int, steps_per_epoch: int) -> PruneSchedule:
        """When the method acts in a prune stage of ``epochs`` x ``steps_per_epoch`` micro-batches
        (one-shot configs have no sparse epoch or update period); a one-line ``ValueError`` when
        the epochs do not fit that stage."""
        return PruneSchedule.from_epochs(
            start_epoch=self.prune_start_epoch,
            sparse_epoch=getattr(self, "prune_sparse_epoch", None),
            finalize_epoch=self.prune_finalize_epoch,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            update_every=getattr(self, "prune_steps_update_mask", None),
        )

    def first_acting_step(self, schedule: PruneSchedule) -> int:
        """The first micro-batch of ``schedule`` whose hooks depend on the method's knobs (outside
        its prefix knobs): from its ``after_backward`` on the Taylor methods score and update the
        gates. Before it the gates are all ones, the windows empty, no row recorded."""
        return schedule.start_step

    def shared_epochs(self, epochs: int, steps_per_epoch: int) -> int:
        """The whole epochs before :meth:`first_acting_step` (``floor(start)`` for a start epoch
        that falls on a step boundary)."""
        return self.first_acting_step(self.prune_schedule(epochs, steps_per_epoch)) // steps_per_epoch


class IterativePruningConfig(GatedPruningConfig):
    """Knobs of methods that update soft masks during training (P3B, global Taylor)."""

    prune_steps_update_mask: int = Field(
        100, ge=1, description="[--prune-steps-update-mask] N: a mask update every N micro-batches from the "
        "start epoch on (README run: 100, about 3 per epoch there).")
    prune_sparse_epoch: float | None = Field(
        None, ge=0, description="[--prune-sparse-epoch] Epoch at which the keep-ratio ramp reaches the target "
        "and tau starts falling; None: start + 0.375 x (finalize - start) (the README run's 25 of 10..50).")
    tau_max: float = Field(0.1, gt=0, description="[--pr-tau-max] Soft-mask width tau until the sparse epoch.")
    tau_min: float = Field(0.0, ge=0, description="[--pr-tau-min] tau reached at the finalize epoch (0: hard).")

    @model_validator(mode="after")
    def _ordered(self) -> "IterativePruningConfig":
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min:g} exceeds tau_max={self.tau_max:g}: tau only falls over time")
        sparse = self.prune_sparse_epoch
        if sparse is not None:
            if self.prune_start_epoch is not None and sparse < self.prune_start_epoch:
                raise ValueError(f"prune_sparse_epoch={sparse:g} is before prune_start_epoch={self.prune_start_epoch:g}")
            if self.prune_finalize_epoch is not None and sparse > self.prune_finalize_epoch:
                raise ValueError(
                    f"prune_sparse_epoch={sparse:g} is after prune_finalize_epoch={self.prune_finalize_epoch:g}")
        return self
