"""Optuna storage that rides out a database restart.

For a server database (``postgresql://``, ``mysql://``) :func:`open_storage` gives Optuna's
RDB storage with ``pool_pre_ping`` (a pooled connection that the restart cut is discarded and
replaced, not used) behind :class:`RetryingStorage`, itself behind the cache that Optuna puts in
front of a bare RDB storage (:class:`~p3b_search.search.trial_cache.CachedStorage`: finished
trials are read once). RetryingStorage calls again a storage method that failed because the
database could not be reached (:func:`p3b_search.connection_errors.unreachable`), with a
back-off from :data:`FIRST_WAIT_S` doubling up to :data:`MAX_WAIT_S`, for up to
:data:`PATIENCE_S` in all (:func:`p3b_search.retry.outage`). SQLite and in-memory URLs get
Optuna's plain ``RDBStorage`` (a study opened on it caches its finished trials itself).

A call that failed mid-way may have committed: the server can commit and the connection drop
before the answer arrives. The error text tells a failure to connect (nothing sent) from one
mid-call, but not for a whole storage call: ``RDBStorage.create_new_trial`` itself tries up to
five times, and ``create_new_study`` commits in one session and reads the id in a second, so
the last attempt's error says nothing of an earlier one. Each method therefore follows a
policy that is exact whether or not a failed attempt committed:

======================================  ===================================================
method                                  after a failure while the database is unreachable
======================================  ===================================================
reads (``get_*``)                       call again
upserts (``set_trial_param``,           call again: a second identical call overwrites the
``set_trial_*_attr``,                   row with the same value (attrs, intermediate values,
``set_trial_intermediate_value``,       study attrs) or hits the unique (trial, param) key,
``set_study_*_attr``)                   which Optuna ignores
``create_new_trial``                    look for the trial by its creation token
                                        (:data:`TOKEN_KEY`): found, its id; else call again
``set_trial_state_values``              the trial already in that state with those values:
                                        True; else call again
``create_new_study``                    a study of that name with those directions: its id;
                                        else call again (a name is chosen first when none
                                        is given, so that the retry means the same study)
``delete_study``                        no study of that id: done; else call again
``remove_session``                      no database call: the inner storage's, as it is
======================================  ===================================================

The look-up runs once the database answers again; after a restart the server process that held
the cut connection is gone, so what it committed is visible and nothing more of it can commit.
The policies assume one process asks and tells a study's trials (this project: one driver per
study); see :meth:`RetryingStorage.set_trial_state_values` for what two would risk.
"""
from __future__ import annotations

import copy
import logging
import uuid
from datetime import datetime
from typing import Any, Callable, Container, Sequence, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import StorageInternalError
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from p3b_search import retry
from p3b_search.connection_errors import unreachable
from p3b_search.credentials import redact_secrets
from p3b_search.errors import first_line
from p3b_search.search.trial_cache import CachedStorage

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 8.0
PATIENCE_S = 120.0
#: Trial system attr: a uuid4 hex of the :meth:`RetryingStorage.create_new_trial` call that made it.
TOKEN_KEY = "p3b:create_token"
#: Trial system attr of a trial that RDBStorage's own retry created twice: the kept trial's number.
DUPLICATE_KEY = "p3b:duplicate_of"
#: libpq options: give up a connect after 10 s, and a connection whose server went silent (no
#: answer to keepalives for ~25 s, or sent data unacknowledged for 30 s) instead of waiting on it.
POSTGRES_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                         "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000}
DEFAULT_STUDY_NAME_PREFIX = "no-name-"  # Optuna's, for a study created without a name


def _unreachable_database(error: BaseException) -> bool:
    """Optuna's error for a database that is down or restarting (its other errors pass at once)."""
    return isinstance(error, StorageInternalError) and unreachable(error) is not None


class _Retry:
    """What a look-up after a failed attempt returns when that attempt took no effect."""


RETRY = _Retry()


def _with_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """``template`` (default: the trial ``RDBStorage`` creates without one: RUNNING, started now,
    nothing else) with the system attr :data:`TOKEN_KEY` = ``token``."""
    if template is None:
        return FrozenTrial(number=0, state=TrialState.RUNNING, value=None, values=None,
                           datetime_start=datetime.now(), datetime_complete=None, params={}, distributions={},
                           user_attrs={}, system_attrs={TOKEN_KEY: token}, intermediate_values={}, trial_id=0)
    trial = copy.deepcopy(template)
    trial.system_attrs = {**trial.system_attrs, TOKEN_KEY: token}
    return trial


class RetryingStorage(BaseStorage):
    """``inner`` (an Optuna RDB storage) whose calls ride out an unreachable database, each method
    exactly once (see the module docstring for the policies).

    Methods that BaseStorage builds on these (``get_n_trials``, ``get_trial_params``,
    ``get_trial_number_from_id``, ``check_trial_is_updatable``) are inherited and so retried too.
    """

    def __init__(self, inner: BaseStorage, first_wait_s: float = FIRST_WAIT_S, max_wait_s: float = MAX_WAIT_S,
                 patience_s: float = PATIENCE_S):
        self.inner = inner
        self.first_wait_s, self.max_wait_s, self.patience_s = first_wait_s, max_wait_s, patience_s

    def _call(self, method: Callable[..., T], *args: Any, settle: Callable[[], T | _Retry] | None = None) -> T:
        """``method(*args)``, called again while it fails for an unreachable database
        (:func:`p3b_search.retry.outage`; other errors pass at once, the last one when the
        patience is spent). Before each new call, ``settle()`` (when given) looks whether the
        failed one took effect: its result, or :data:`RETRY`."""
        policy = retry.outage(_unreachable_database, self.first_wait_s, self.max_wait_s, self.patience_s,
                              on_outage=self._warn_outage)
        for attempt in policy:
            with attempt:
                failed_before = attempt.retry_state.attempt_number > 1
                outcome = settle() if settle is not None and failed_before else RETRY
                result = method(*args) if isinstance(outcome, _Retry) else outcome
        if failed_before:
            logger.warning("Optuna storage reachable again after %.0f s", attempt.retry_state.seconds_since_start)
        return result

    def _warn_outage(self, error: BaseException) -> None:
        logger.warning("Optuna storage unreachable (%s); retrying for up to %.0f s",
                       redact_secrets(first_line(unreachable(error) or error)), self.patience_s)

    # ------------------------------------------------------------------ studies

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        """Once: after a failure, a study ``study_name`` with ``directions`` is the one the failed
        call created (the call would have raised DuplicatedStudyError had it existed before)."""
        name = study_name or DEFAULT_STUDY_NAME_PREFIX + str(uuid.uuid4())

        def settle() -> int | _Retry:
            try:
                study_id = self.inner.get_study_id_from_name(name)
            except KeyError:
                return RETRY
            return study_id if self.inner.get_study_directions(study_id) == list(directions) else RETRY

        return self._call(self.inner.create_new_study, directions, name, settle=settle)

    def delete_study(self, study_id: int) -> None:
        """Once: after a failure, a study no longer there is deleted (KeyError only when it was not
        there before the first call)."""

        def settle() -> None | _Retry:
            try:
                self.inner.get_study_name_from_id(study_id)
            except KeyError:
                return None
            return RETRY

        self._call(self.inner.delete_study, study_id, settle=settle)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_study_user_attr, study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_study_system_attr, study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call(self.inner.get_study_id_from_name, study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call(self.inner.get_study_name_from_id, study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call(self.inner.get_study_directions, study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call(self.inner.get_study_user_attrs, study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call(self.inner.get_study_system_attrs, study_id)

    def get_all_studies(self) -> list[Any]:
        """Optuna's FrozenStudy records (a class Optuna does not export)."""
        return self._call(self.inner.get_all_studies)

    # ------------------------------------------------------------------ trials

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Exactly once: the trial is created from a template carrying a fresh :data:`TOKEN_KEY`
        (without ``template_trial``, one equal to what RDBStorage creates without: RUNNING, started
        now, the next number; the token is a system attr no part of Optuna reads).
        After a failure the study's trial with the token is the result; with none the call is
        made again. RDBStorage's own retry of a committed attempt can leave a second trial with
        the token: the one with the lower number is kept and the other told FAIL
        (:data:`DUPLICATE_KEY`)."""
        token = uuid.uuid4().hex
        state = template_trial.state if template_trial is not None else TrialState.RUNNING

        def create() -> int:
            return self.inner.create_new_trial(study_id, _with_token(template_trial, token))

        def settle() -> int | _Retry:
            found = self._trial_with_token(study_id, token, states=None)
            return RETRY if found is None else found

        created = self._call(create, settle=settle)
        kept = self._call(self._trial_with_token, study_id, token, (state,))
        return created if kept is None else kept

    def _trial_with_token(self, study_id: int, token: str, states: Container[TrialState] | None) -> int | None:
        """Id of the study's trial (among ``states``) created with ``token``, the first by number;
        unfinished later ones are told FAIL. None: no such trial."""
        found = [trial for trial in self.inner.get_all_trials(study_id, deepcopy=False, states=states)
                 if trial.system_attrs.get(TOKEN_KEY) == token]
        if not found:
            return None
        kept, *extra = sorted(found, key=lambda trial: trial.number)
        for trial in extra:
            if not trial.state.is_finished():
                trial_id = self.inner.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                logger.warning("trial %d: created twice by the storage's own retry; told FAIL, trial %d kept",
                               trial.number, kept.number)
                self.inner.set_trial_system_attr(trial_id, DUPLICATE_KEY, kept.number)
                self.inner.set_trial_state_values(trial_id, TrialState.FAIL)
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, kept.number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Once: after a failure, a trial already in ``state`` with ``values`` is the failed
        call's doing, so True (not UpdateFinishedTrialError, nor False for RUNNING).

        For ``state`` RUNNING (``Study.ask`` popping a WAITING trial) that holds while one process
        pops the study's waiting trials, as here: the trial is RUNNING only by this call. Were two
        drivers to share a study, one whose pop failed ambiguously while the other popped the same
        trial would run it too: a trial run twice, never one left RUNNING with no one running it.
        """

        def settle() -> bool | _Retry:
            trial = self.inner.get_trial(trial_id)
            done = trial.state == state and (values is None or trial.values == list(values))
            return True if done else RETRY

        return self._call(self.inner.set_trial_state_values, trial_id, state, values, settle=settle)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._call(self.inner.set_trial_param, trial_id, param_name, param_value_internal, distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call(self.inner.set_trial_intermediate_value, trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call(self.inner.set_trial_system_attr, trial_id, key, value)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call(self.inner.get_trial_id_from_study_id_trial_number, study_id, trial_number)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._call(self.inner.get_trial_param, trial_id, param_name)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call(self.inner.get_trial, trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._call(self.inner.get_all_trials, study_id, deepcopy, states)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._call(self.inner.get_best_trial, study_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call(self.inner.get_trial_user_attrs, trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call(self.inner.get_trial_system_attrs, trial_id)

    def remove_session(self) -> None:
        self.inner.remove_session()


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage at ``url``; a server database's rides out a restart (module docstring)."""
    if url.startswith("sqlite") or "://" not in url:
        return optuna.storages.RDBStorage(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = POSTGRES_CONNECT_ARGS
    return CachedStorage(RetryingStorage(optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)))


__all__ = ["RetryingStorage", "open_storage"]
