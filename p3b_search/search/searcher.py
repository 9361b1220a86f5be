"""Optuna behind Ray Tune: the study in its storage, and a Ray Tune searcher that asks and tells
Optuna itself and never puts a half-trained trial on the front.

:class:`FrontSafeOptunaSearch` implements Ray Tune's public ``Searcher`` interface (``suggest``,
``on_trial_complete``, ``save``/``restore``) with Optuna's public ask/tell, so it works behind
``ConcurrencyLimiter`` and in ``Tuner.restore``. The tell, for several objectives:

- COMPLETE only for the result the trainable sends after the objective returned
  (``trial_finished``) with every objective value finite;
- FAIL for errors (after Ray's retries) and for a finished trial with a missing/NaN objective;
- PRUNED for every other ended trial (stopped early): recorded, never on the front.

``suggest`` also checks each sampled configuration with the method's own validation (e.g. a
start epoch after the finalize epoch): an invalid one is told FAIL with its reason and Optuna
is asked again, so no compute is spent on it (the trials table shows it as ``NEVER_RAN``: only a
trial handed to Ray carries the ``ray_trial_id`` user attr). With ``sampler: grid`` a grid point whose
configuration an earlier trial already has (dense at another prune ratio, a knob its method
lacks) is told FAIL with the user attr ``duplicate_of`` (that trial's number) the same way; the
trials table leaves such points out.

Resume, each sampled configuration exactly once: the searcher's saved state (which Ray keeps
with its experiment state) is the Optuna trial *number* of each Ray trial in flight, and the
sampler; ``Tuner.restore`` thus continues in-flight trials under their own numbers. An Optuna
trial RUNNING in the storage that no Ray trial holds was asked by a driver that stopped before
Ray recorded it: the next ``suggest`` hands that trial out again, same number, same parameters
(those it lacks, when the driver stopped half-way through sampling it, are sampled then),
instead of sampling a new one. Ray saves its experiment state every few seconds, not at every
event, so a restored Tuner may miss trials that started, or even ended, after its last save:
the former run again as lost trials (from the checkpoint they saved), and once ``n_trials``
trials have been handed out to Ray the searcher says ``FINISHED`` instead of sampling more.
The searcher pickles its study as a :class:`~p3b_search.search.session.LiveStudy` (its name):
restored, it opens the storage of the study the resumed driver loaded, wherever its folder is
now.
"""
from __future__ import annotations

import logging
import math
import pickle
import warnings
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from ray.tune.search import Searcher

from p3b_search.credentials import redact_secrets, resolve_url
from p3b_search.search.optuna_storage import open_storage
from p3b_search.search.samplers import create_sampler
from p3b_search.search.session import LiveStudy
from p3b_search.search.space import reference_params, suggest_params
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER, objective_key
from p3b_search.stores import open_shared_store
from p3b_search.study.dimensions import config_key, grid_point_count
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig
from p3b_search.study.trials import trial_config
from p3b_search.study.trials_table import DUPLICATE_ATTR, FAIL_REASON_ATTR, FINAL_ATTR, FINAL_METRICS, RAY_TRIAL_ATTR

logger = logging.getLogger(__name__)

MAX_INVALID_SAMPLES = 100
REFERENCE_ATTR = "reference"


def optuna_storage(study: StudyConfig) -> BaseStorage:
    """The study's Optuna storage (the study folder is created for the default SQLite file),
    its URL's ``${NAME}`` references resolved now (the config keeps them unresolved: Ray
    pickles it with this searcher)."""
    if study.storage is None:
        study.layout.root.mkdir(parents=True, exist_ok=True)
    url = resolve_url(study.storage_url, "storage")
    return open_shared_store(lambda: open_storage(url), url, "Optuna storage")


def open_optuna_study(study: StudyConfig, create: bool = True, sampler: optuna.samplers.BaseSampler | None = None,
                      storage: BaseStorage | None = None) -> optuna.Study:
    """The study's Optuna record in its storage (created with directions, metric names and the
    reference trial enqueued when it does not exist yet and ``create``), asking ``sampler``
    (default: a new one from the study's ``sampler`` section)."""
    storage = storage or optuna_storage(study)
    sampler = sampler or create_sampler(study)
    names = study.metric_names
    try:
        existing = optuna.load_study(study_name=study.name, storage=storage, sampler=sampler)
    except KeyError:
        if not create:
            raise StudyError(f"no Optuna study named {study.name!r} in {redact_secrets(study.storage_url)}") from None
        existing = None
    if existing is not None:
        recorded = [d.name.lower() for d in existing.directions]
        if recorded != study.directions or (existing.metric_names or names) != names:
            raise StudyError(
                f"{study.source}: objectives: the stored study {study.name!r} optimizes "
                f"{existing.metric_names} ({recorded}): keep its objectives or choose another name"
            )
        return existing
    created = optuna.create_study(study_name=study.name, storage=storage, directions=study.directions, sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        created.set_metric_names(names)
    if study.enqueue_reference and study.sampler.name != "grid":
        created.enqueue_trial(reference_params(study), user_attrs={REFERENCE_ATTR: True})
    return created


class FrontSafeOptunaSearch(Searcher):
    """Ray Tune searcher over Optuna's ask/tell with a multi-objective-safe tell and exactly-once
    resume (see the module docstring)."""

    def __init__(self, study: StudyConfig):
        super().__init__(metric=[objective_key(m) for m in study.metric_names],
                         mode=["max" if d == "maximize" else "min" for d in study.directions])
        self._study = LiveStudy(study)  # pickled as the study's name: see search.session
        self._sampler = create_sampler(study)
        self._numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number, for trials in flight
        self._storage: BaseStorage | None = None
        self._optuna: optuna.Study | None = None
        self._study_id: int | None = None  # the storage's id of the study, read when it is opened
        self._lost: list[int] | None = None  # trials a stopped driver asked, not handed out yet
        #: trials ever handed out to Ray (they carry a Ray trial id), and by configuration key
        self._handed: set[int] | None = None
        self._configs: dict[Any, set[int]] = {}

    # ------------------------------------------------------------------ state (Ray saves it)

    def get_state(self) -> dict[str, Any]:
        """Numbers of the trials in flight by Ray trial id, and the sampler (its random state)."""
        return {"numbers": dict(self._numbers), "sampler": self._sampler}

    def set_state(self, state: dict[str, Any]) -> None:
        self._numbers, self._sampler = dict(state["numbers"]), state["sampler"]
        self._optuna = self._lost = self._handed = None  # opened and read again

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.get_state(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.set_state(pickle.load(file))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray keeps the searcher in its experiment folder) without storage connections
        or what was read from the storage."""
        return {**self.__dict__, "_storage": None, "_optuna": None, "_study_id": None, "_lost": None, "_handed": None,
                "_configs": {}}

    @property
    def _study_config(self) -> StudyConfig:
        return self._study.config

    @property
    def optuna_study(self) -> optuna.Study:
        """The Optuna study, asking this searcher's sampler (opened on first use)."""
        self._open()
        return self._optuna

    def _open(self) -> tuple[BaseStorage, int]:
        """The storage and the study's id in it (the study opened on first use)."""
        if self._optuna is None:
            self._storage = optuna_storage(self._study_config)
            self._optuna = open_optuna_study(self._study_config, sampler=self._sampler, storage=self._storage)
            self._study_id = self._storage.get_study_id_from_name(self._optuna.study_name)
        return self._storage, self._study_id

    def _trial_id(self, number: int) -> int:
        """The storage's id of trial ``number``."""
        storage, study_id = self._open()
        return storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _set_attr(self, number: int, key: str, value: Any) -> None:
        """Set a user attr of trial ``number`` (through the storage: the trial may be asked by
        another driver, so no ``optuna.Trial`` object of it exists here)."""
        trial_id = self._trial_id(number)  # first: it opens the storage of a restored searcher
        self._storage.set_trial_user_attr(trial_id, key, value)

    def _fail(self, number: int, key: str, value: Any) -> None:
        self._set_attr(number, key, value)
        self.optuna_study.tell(number, state=TrialState.FAIL)

    def _hand_out(self, trial_id: str, number: int, params: dict[str, Any]) -> dict[str, Any]:
        self._set_attr(number, RAY_TRIAL_ATTR, trial_id)
        self._numbers[trial_id] = number
        self._record_handed_out(number, params)
        return {**params, TRIAL_NUMBER: number}

    def _handed_out(self) -> set[int]:
        """Numbers of the trials ever handed out to Ray (they carry a Ray trial id): read from
        the storage once, then kept up to date by :meth:`_hand_out` (with ``_configs``)."""
        if self._handed is None:
            trials = self.optuna_study.get_trials(deepcopy=False)
            self._handed, self._configs = set(), {}
            for other in trials:
                if RAY_TRIAL_ATTR in other.user_attrs:
                    self._handed.add(other.number)
                    self._configs.setdefault(config_key(other.params), set()).add(other.number)
        return self._handed

    def _record_handed_out(self, number: int, params: dict[str, Any]) -> None:
        self._handed_out().add(number)
        self._configs.setdefault(config_key(params), set()).add(number)

    # ------------------------------------------------------------------ ask

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The configuration of Ray trial ``trial_id``: a trial lost by a stopped driver first,
        else a new valid sample (with its Optuna number under ``trial_number``); ``FINISHED``
        once ``n_trials`` trials have been handed out to Ray (a study resumed from experiment
        state that Ray saved before some trials started or ended)."""
        grid = self._study_config.sampler.name == "grid"
        lost = self._lost_trial(grid)
        if lost is not None:
            number, params = lost
            logger.warning("trial %d: asked before the driver stopped and never run: running it now", number)
            return self._hand_out(trial_id, number, params)
        if len(self._handed_out()) >= self._study_config.n_trials:
            return Searcher.FINISHED
        # on the grid every point comes once before any repeats: it runs out only when exhausted
        for _ in range(grid_point_count(self._study_config.search_space) if grid else MAX_INVALID_SAMPLES):
            trial = self.optuna_study.ask()
            params = suggest_params(trial, self._study_config)
            rejection = self._rejection(trial.number, params, grid)
            if rejection is None:
                return self._hand_out(trial_id, trial.number, params)
            self._fail(trial.number, *rejection)
        source = self._study_config.source
        if grid:
            raise StudyError(f"{source}: n_trials: every configuration of the grid has run: lower n_trials")
        raise StudyError(
            f"{source}: search_space: {MAX_INVALID_SAMPLES} samples in a row were invalid "
            "trial configurations: narrow the ranges (see the trials' fail_reason)"
        )

    def _lost_trial(self, grid: bool) -> tuple[int, dict[str, Any]] | None:
        """The first Optuna trial RUNNING in the storage that no Ray trial holds, with its
        parameters, when it can run; lost trials that cannot (invalid) are told FAIL on the way.

        Only a driver that stopped leaves such trials, so the storage is read for them once, at
        the first call (every trial asked after that is this searcher's own). A trial lost
        half-way through its sampling is sampled to the end: Optuna returns the recorded value
        of a parameter already suggested and samples only the missing ones."""
        study = self.optuna_study
        if self._lost is None:
            held = set(self._numbers.values())
            self._lost = [record.number for record in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                          if record.number not in held]
        while self._lost:
            number = self._lost.pop(0)
            # Optuna's own Trial of the stored record (no public call hands out a trial another
            # driver asked): define-by-run sampling continues it. tests/search/test_runner.py pins what
            # this relies on (test_optunas_trial_of_a_stored_running_trial_continues_its_sampling).
            try:
                params = suggest_params(optuna.Trial(study, self._trial_id(number)), self._study_config)
            except ValueError as error:  # a recorded value outside today's search space
                self._fail(number, FAIL_REASON_ATTR, f"lost, and its parameters no longer fit: {error}")
                continue
            rejection = self._rejection(number, params, grid)
            if rejection is None:
                return number, params
            self._fail(number, *rejection)
        return None

    def _rejection(self, number: int, params: dict[str, Any], grid: bool) -> tuple[str, Any] | None:
        """Why ``params`` of trial ``number`` must not run, as the user attr to record (None:
        run it): on the grid, the configuration of another trial; always, an invalid trial
        configuration."""
        if grid:
            self._handed_out()
            others = sorted(self._configs.get(config_key(params), set()) - {number})
            if others:
                logger.info("trial %d: skipped, the configuration of trial %d", number, others[0])
                return DUPLICATE_ATTR, others[0]
        try:
            trial_config(self._study_config, params)
        except StudyError as error:
            reason = f"invalid sample: {error.field}: {error.reason}"
            logger.warning("trial %d: %s", number, reason)
            return FAIL_REASON_ATTR, reason
        return None

    # ------------------------------------------------------------------ tell

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tell Optuna how Ray trial ``trial_id`` ended (once; a repeated call does nothing)."""
        number = self._numbers.get(trial_id)
        if number is None:
            return
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
            attrs[FAIL_REASON_ATTR] = f"the objective returned no finite value for {', '.join(missing)}"
        else:
            state = TrialState.PRUNED
        try:
            for key, value in attrs.items():
                self._set_attr(number, key, value)
        except UpdateFinishedTrialError:  # told before the driver died; Ray re-reports after a restore
            logger.warning("trial %d was already recorded; keeping its first record", number)
        self.optuna_study.tell(number, values if state == TrialState.COMPLETE else None, state=state,
                               skip_if_finished=True)
        del self._numbers[trial_id]  # after the tell: a tell that failed leaves the trial held, not lost
