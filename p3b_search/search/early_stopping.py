"""Early stopping of hopeless trials, safe for a multi-objective front.

A trial is *hopeless* when, at the same fine-tune epoch, another trial was clearly better in
accuracy at no more MACs: some trial reached top-1 at least ``margin`` points higher with MACs
no larger (both measured on the pruned model, after the prune stage). Single-metric schedulers
(ASHA, HyperBand) cannot express this, and stopping by accuracy alone would kill the cheap
trials that the front needs.

A stopped trial's last result carries ``trial_finished = False``, so the searcher records it as
PRUNED (:class:`~p3b_search.search.searcher.FrontSafeOptunaSearch`), never as a point.
"""
from __future__ import annotations

import math
from typing import Any

from ray.tune.stopper import Stopper

from p3b_search.search.schema import EarlyStopping
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER

FINETUNE_STAGE = 1.0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class DominatedTrialStopper(Stopper):
    """Stops a trial dominated by ``margin`` top-1 points at the same fine-tune epoch.

    ``reasons`` maps the Ray trial id of each stopped trial to a one-line explanation.
    """

    def __init__(self, config: EarlyStopping):
        self.config = config
        self.reasons: dict[str, str] = {}
        self._first_finetune_epoch: dict[str, int] = {}
        self._last_macs: dict[str, float] = {}
        self._by_epoch: dict[int, dict[str, tuple[Any, float, float]]] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not self.config.enabled or result.get(FINISHED):
            return False
        if _finite(result.get("macs")):
            self._last_macs[trial_id] = float(result["macs"])
        if result.get("stage") != FINETUNE_STAGE:
            return False
        # fine-tune epochs may not report MACs: the pruned model's are the prune stage's last
        top1, macs, epoch = result.get("top1"), self._last_macs.get(trial_id), result.get("epoch")
        if not all(_finite(v) for v in (top1, macs, epoch)):
            return False
        index = int(epoch) - self._first_finetune_epoch.setdefault(trial_id, int(epoch))
        number = (result.get("config") or {}).get(TRIAL_NUMBER, trial_id)
        peers = self._by_epoch.setdefault(index, {})
        peers[trial_id] = (number, float(top1), float(macs))
        if index < self.config.grace_epochs:
            return False
        for other_id, (other, other_top1, other_macs) in peers.items():
            if other_id != trial_id and other_top1 >= top1 + self.config.margin and other_macs <= macs:
                self.reasons[trial_id] = (
                    f"stopped at fine-tune epoch {index}: trial {other} had top-1 {other_top1:.2f}% "
                    f"with {other_macs:.4g} MACs there (this trial: {top1:.2f}%, {macs:.4g} MACs)"
                )
                return True
        return False

    def stop_all(self) -> bool:
        return False
