"""When a gated pruning method acts: prune start, mask updates, sparse and finalize points.

Epochs may be fractional (as the reference's ``--prune-*-epoch`` flags); they become
micro-batch steps as ``int(epoch * steps_per_epoch)``, counted from the start of the prune
stage. Left unset, the three epochs take the proportions of the reference README run
(start 10, sparse 25, finalize 50 of 50 prune epochs):

* ``finalize_epoch`` = the prune stage's last epoch boundary (``epochs``);
* ``start_epoch`` = 0.2 x ``finalize_epoch``;
* ``sparse_epoch`` = ``start_epoch`` + 0.375 x (``finalize_epoch`` - ``start_epoch``).
"""
from __future__ import annotations

from dataclasses import dataclass

#: Reference README run: start 10, sparse 25, finalize 50 (of 50 epochs).
DEFAULT_START_FRACTION = 10 / 50
DEFAULT_SPARSE_FRACTION = (25 - 10) / (50 - 10)


@dataclass(frozen=True)
class PruneSchedule:
    """Micro-batch steps (0-based, counted over the prune stage) at which pruning acts.

    ``start_step``: first step whose forward/backward counts toward a window;
    ``sparse_step``: the keep-ratio ramp is complete and tau starts to fall;
    ``final_step``: masks are made hard after the backward of step ``final_step - 1``;
    ``update_every``: N, a mask update after the backward of every step with
    ``(step - start_step) % N == N - 1`` before ``final_step - 1`` (None: no periodic updates).
    """

    start_step: int
    sparse_step: int
    final_step: int
    update_every: int | None
    steps_per_epoch: int

    @classmethod
    def from_epochs(
        cls,
        *,
        start_epoch: float | None,
        sparse_epoch: float | None,
        finalize_epoch: float | None,
        epochs: int,
        steps_per_epoch: int,
        update_every: int | None,
    ) -> "PruneSchedule":
        """Resolve unset epochs (see module docstring) and check them against the prune stage's
        ``epochs``; a bad combination raises a one-line ``ValueError`` naming the field."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}: the prune stage needs at least one step per epoch")
        final = float(epochs) if finalize_epoch is None else float(finalize_epoch)
        if final > epochs:
            raise ValueError(
                f"prune_finalize_epoch={final:g} is beyond the prune stage's {epochs} epochs: "
                f"lower it to at most {epochs} or train the prune stage longer"
            )
        start = DEFAULT_START_FRACTION * final if start_epoch is None else float(start_epoch)
        if start >= final:
            raise ValueError(
                f"prune_start_epoch={start:g} is not before prune_finalize_epoch={final:g}: "
                "start pruning earlier or finalize later"
            )
        sparse = start + DEFAULT_SPARSE_FRACTION * (final - start) if sparse_epoch is None else float(sparse_epoch)
        if not start <= sparse <= final:
            raise ValueError(
                f"prune_sparse_epoch={sparse:g} must lie between prune_start_epoch={start:g} and "
                f"prune_finalize_epoch={final:g}"
            )
        start_step, sparse_step, final_step = (int(e * steps_per_epoch) for e in (start, sparse, final))
        if final_step <= start_step:
            raise ValueError(
                f"prune_start_epoch={start:g} and prune_finalize_epoch={final:g} fall on the same step "
                f"({steps_per_epoch} steps per epoch): move them further apart"
            )
        return cls(start_step, sparse_step, final_step, update_every, steps_per_epoch)

    def collecting(self, step: int) -> bool:
        """Whether ``step`` belongs to a scoring window (prune start <= step < finalize)."""
        return self.start_step <= step < self.final_step

    def is_final(self, step: int) -> bool:
        """Whether the masks are made hard after the backward of ``step``."""
        return step == self.final_step - 1

    def is_update(self, step: int) -> bool:
        """Whether a (soft) mask update follows the backward of ``step`` (never when
        ``update_every`` is None: one-shot methods)."""
        return (
            self.update_every is not None
            and self.start_step <= step < self.final_step - 1
            and (step - self.start_step) % self.update_every == self.update_every - 1
        )
