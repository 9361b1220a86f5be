"""Optuna behind Ray Tune: the study in its storage, and an ``OptunaSearch`` that never puts a
half-trained trial on the front.

Why a subclass of Ray's ``OptunaSearch`` and not Optuna's ask/tell driven by hand: Ray Tune's
searcher interface already gives ``suggest`` (ask) and ``on_trial_complete`` (tell) at the right
moments, keeps the Ray-trial -> Optuna-trial mapping in its saved experiment state (so
``Tuner.restore`` resumes in-flight trials under their own Optuna numbers: none lost, none
duplicated), and works with ``ConcurrencyLimiter``. What it gets wrong with several objectives
is the tell: it tells the *last reported* values as COMPLETE for every ended trial, also for
a trial stopped early, and when a value is missing the tell raises and is only logged, leaving
the Optuna trial RUNNING forever. :class:`FrontSafeOptunaSearch` replaces that one method:

- COMPLETE only for the result the trainable sends after the objective returned
  (``trial_finished``) with every objective value finite;
- FAIL for errors (after Ray's retries) and for a finished trial with a missing/NaN objective;
- PRUNED for every other ended trial (stopped early): recorded, never on the front.

``suggest`` also checks each sampled configuration with the method's own validation (e.g. a
start epoch after the finalize epoch): an invalid one is told FAIL with its reason and Optuna
is asked again, so no compute is spent on it. With ``sampler: grid`` a grid point whose
configuration an earlier trial already has (dense at another prune ratio, a knob its method
lacks) is told FAIL with the user attr ``duplicate_of`` (that trial's number) the same way; the
trials table leaves such points out.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from p3b_search.search.optuna_storage import open_storage
from p3b_search.search.results import DUPLICATE_ATTR, FINAL_ATTR, FINAL_METRICS
from p3b_search.search.schema import StudyConfig, StudyError, config_key, grid_point_count, trial_config
from p3b_search.search.shared_store import open_shared_store
from p3b_search.search.space import create_sampler, reference_params, suggest_params
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER, objective_key

logger = logging.getLogger(__name__)

MAX_INVALID_SAMPLES = 100
REFERENCE_ATTR = "reference"


def open_optuna_study(study: StudyConfig, create: bool = True) -> optuna.Study:
    """The study's Optuna record in its storage (created with directions, metric names and the
    reference trial enqueued when it does not exist yet and ``create``)."""
    if study.storage is None:
        study.layout.root.mkdir(parents=True, exist_ok=True)
    storage = open_shared_store(lambda: open_storage(study.storage_url), study.storage_url,
                                "Optuna storage")
    names = study.metric_names
    try:
        existing = optuna.load_study(study_name=study.name, storage=storage, sampler=create_sampler(study))
    except KeyError:
        if not create:
            raise StudyError(f"no Optuna study named {study.name!r} in {study.storage_url}") from None
        existing = None
    if existing is not None:
        recorded = [d.name.lower() for d in existing.directions]
        if recorded != study.directions or (existing.metric_names or names) != names:
            raise StudyError(
                f"{study.source}: objectives: the stored study {study.name!r} optimizes "
                f"{existing.metric_names} ({recorded}): keep its objectives or choose another name"
            )
        return existing
    created = optuna.create_study(study_name=study.name, storage=storage, directions=study.directions,
                                  sampler=create_sampler(study))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        created.set_metric_names(names)
    if study.enqueue_reference and study.sampler.name != "grid":
        created.enqueue_trial(reference_params(study), user_attrs={REFERENCE_ATTR: True})
    return created


class FrontSafeOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` with a multi-objective-safe tell (see the module docstring)."""

    def __init__(self, study: StudyConfig):
        self._study_config = study
        super().__init__(
            space=functools.partial(suggest_params, study=study),
            metric=[objective_key(m) for m in study.metric_names],
            mode=["max" if d == "maximize" else "min" for d in study.directions],
            sampler=create_sampler(study),
            study_name=study.name,
            storage=open_storage(study.storage_url),
        )

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        grid = self._study_config.sampler.name == "grid"
        # on the grid every point comes once before any repeats: it runs out only when exhausted
        for _ in range(grid_point_count(self._study_config) if grid else MAX_INVALID_SAMPLES):
            params = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            rejection = self._rejection(ot_trial, params, grid)
            if rejection is None:
                ot_trial.set_user_attr("ray_trial_id", trial_id)
                return {**params, TRIAL_NUMBER: ot_trial.number}
            ot_trial.set_user_attr(*rejection)
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            del self._ot_trials[trial_id]
        source = self._study_config.source
        if grid:
            raise StudyError(f"{source}: n_trials: every configuration of the grid has run: lower n_trials")
        raise StudyError(
            f"{source}: search_space: {MAX_INVALID_SAMPLES} samples in a row were invalid "
            "trial configurations: narrow the ranges (see the trials' fail_reason)"
        )

    def _rejection(self, ot_trial: optuna.Trial, params: dict[str, Any], grid: bool) -> tuple[str, Any] | None:
        """Why ``params`` must not run, as the user attr to record (None: run it): on the grid,
        the configuration of an earlier trial; always, an invalid trial configuration."""
        if grid:
            key = config_key(params)
            for earlier in ot_trial.study.get_trials(deepcopy=False):
                if "ray_trial_id" in earlier.user_attrs and config_key(earlier.params) == key:
                    logger.info("trial %d: skipped, the configuration of trial %d", ot_trial.number, earlier.number)
                    return DUPLICATE_ATTR, earlier.number
        try:
            trial_config(self._study_config, params)
        except StudyError as error:
            reason = f"invalid sample: {error.field}: {error.reason}"
            logger.warning("trial %d: %s", ot_trial.number, reason)
            return "fail_reason", reason
        return None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        finished = bool(result.get(FINISHED))
        values = [result.get(key) for key in self.metric]
        missing = [name for name, value in zip(self._study_config.metric_names, values)
                   if not (isinstance(value, (int, float)) and math.isfinite(value))]
        attrs: dict[str, Any] = {}
        if finished:
            attrs = {f"{FINAL_ATTR}{name}": float(result[name]) for name in FINAL_METRICS
                     if isinstance(result.get(name), (int, float))}
        if error:
            state = TrialState.FAIL
        elif finished and not missing:
            state = TrialState.COMPLETE
        elif finished:
            state = TrialState.FAIL
            attrs["fail_reason"] = f"the objective returned no finite value for {', '.join(missing)}"
        else:
            state = TrialState.PRUNED
        try:
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:  # told before the driver died; Ray re-reports after a restore
            logger.warning("trial %d was already recorded; keeping its first record", ot_trial.number)
        self._ot_study.tell(ot_trial, values if state == TrialState.COMPLETE else None, state=state,
                            skip_if_finished=True)
        self._completed_trials.add(trial_id)
