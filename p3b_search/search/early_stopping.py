"""Early stopping of hopeless trials, safe for a multi-objective front.

A trial is *hopeless* when, at the same epoch of the same stage, another trial was clearly
better in accuracy at no higher cost: some trial reached top-1 at least ``margin`` points higher
with a cost no larger. The cost compared depends on the stage:

* fine-tune stage: the pruned model's MACs (measured after the prune stage);
* prune stage: the trial's parameter budget (kept fraction ``1 - prune_ratio``, known from its
  configuration before it trains) and, where both trials report it, the kept fraction of the
  epoch (``keep_ratio``), so that a trial that has not started pruning (still dense, still
  accurate) cannot stop one that has. Stopping here saves the expensive part of a trial.

Single-metric schedulers (ASHA, HyperBand) cannot express this, and stopping by accuracy alone
would kill the cheap trials that the front needs.

A stopped trial's last result carries ``trial_finished = False``, so the searcher records it as
PRUNED (:class:`~p3b_search.search.searcher.FrontSafeOptunaSearch`), never as a point. The
decision itself is :class:`~p3b_search.study.stopping.DominationRule`'s (shared with the replay
simulator of the tabular benchmark).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ray.tune.stopper import Stopper

from p3b_search.search.session import LiveStudy
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER
from p3b_search.study.sections import EarlyStopping, StudyConfig
from p3b_search.study.stopping import DominationRule, Standing
from p3b_search.study.trials import trial_budget

STAGES = {0.0: "prune", 1.0: "finetune"}
STAGE_WORDS = {"prune": "prune-stage", "finetune": "fine-tune"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class StudyBudget:
    """``budget_of`` of a study's stopper: a trial's budget (kept fraction) from its sampled
    parameters, by :func:`~p3b_search.study.trials.trial_budget`. Ray pickles the stopper, so
    the study is held as a :class:`~p3b_search.search.session.LiveStudy`."""

    def __init__(self, study: StudyConfig):
        self.study = LiveStudy(study)

    def __call__(self, params: dict[str, Any]) -> float:
        return trial_budget(self.study.config, params)


class DominatedTrialStopper(Stopper):
    """Stops a trial dominated by ``margin`` top-1 points at the same epoch of a stage in
    ``config.stages``. ``budget_of`` maps a trial's Ray config (its sampled parameters) to its
    budget (kept fraction); without it the prune stage compares the epoch's kept fraction only.

    ``reasons`` maps the Ray trial id of each stopped trial to a one-line explanation.
    """

    def __init__(self, config: EarlyStopping, budget_of: Callable[[dict[str, Any]], float] | None = None):
        self.config = config
        self.budget_of = budget_of
        self.reasons: dict[str, str] = {}
        self._first_epoch: dict[tuple[str, str], int] = {}
        self._last_macs: dict[str, float] = {}
        self._budgets: dict[str, float | None] = {}
        self._rule = DominationRule(config.grace_epochs, config.margin)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not self.config.enabled or result.get(FINISHED):
            return False
        if _finite(result.get("macs")):
            self._last_macs[trial_id] = float(result["macs"])
        stage = STAGES.get(result.get("stage"))
        top1, epoch = result.get("top1"), result.get("epoch")
        if stage not in self.config.stages or not (_finite(top1) and _finite(epoch)):
            return False
        costs = self._costs(trial_id, stage, result)
        if costs is None:
            return False
        index = int(epoch) - self._first_epoch.setdefault((trial_id, stage), int(epoch))
        config = result.get("config") or {}
        standing = Standing(config.get(TRIAL_NUMBER, trial_id), float(top1), costs)
        other = self._rule.dominator(trial_id, stage, index, standing)
        if other is None:
            return False
        self.reasons[trial_id] = (
            f"stopped at {STAGE_WORDS[stage]} epoch {index}: trial {other.number} had top-1 {other.top1:.2f}% "
            f"with {_describe(stage, other.costs)} there (this trial: {standing.top1:.2f}%, "
            f"{_describe(stage, standing.costs)})"
        )
        return True

    def _costs(self, trial_id: str, stage: str, result: dict[str, Any]) -> tuple[float | None, ...] | None:
        """Fine-tune: (MACs,); prune: (budget, kept fraction now). None when nothing is known."""
        if stage == "finetune":  # fine-tune epochs may not report MACs: the pruned model's are the prune stage's last
            macs = self._last_macs.get(trial_id)
            return None if macs is None else (macs,)
        if trial_id not in self._budgets:
            params = {k: v for k, v in (result.get("config") or {}).items() if k != TRIAL_NUMBER}
            self._budgets[trial_id] = None if self.budget_of is None else float(self.budget_of(params))
        kept_now = float(result["keep_ratio"]) if _finite(result.get("keep_ratio")) else None
        costs = (self._budgets[trial_id], kept_now)
        return None if costs == (None, None) else costs

    def stop_all(self) -> bool:
        return False


def _describe(stage: str, costs: tuple[float | None, ...]) -> str:
    if stage == "finetune":
        return f"{costs[0]:.4g} MACs"
    budget, kept_now = costs
    parts = [] if budget is None else [f"budget {budget:.3g}"]
    return ", ".join(parts + ([] if kept_now is None else [f"kept {kept_now:.3f} now"]))
