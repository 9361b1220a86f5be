"""Optuna storage that rides out a database restart.

For a server database (``postgresql://``, ``mysql://``) :func:`open_storage` gives Optuna's
RDB storage with ``pool_pre_ping`` (a pooled connection that the restart cut is discarded and
replaced, not used) behind :class:`RetryingStorage`, which retries a call that failed because
the database could not be reached, with a back-off from :data:`FIRST_WAIT_S` doubling up to
:data:`MAX_WAIT_S`, for up to :data:`PATIENCE_S` in all. SQLite and in-memory URLs get
Optuna's plain storage.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import BaseStorage

from p3b_search.errors import first_line

logger = logging.getLogger(__name__)

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 8.0
PATIENCE_S = 120.0
#: Words of a connection-level failure (psycopg, PyMySQL), as opposed to a rejected statement.
UNREACHABLE_MARKERS = (
    "connection", "server closed", "terminating", "shutting down", "starting up", "could not connect",
    "the database system is", "lost", "timeout", "timed out", "broken pipe",
)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) reads like a database that is down or restarting."""
    while error is not None:
        text = str(error).lower()
        if any(marker in text for marker in UNREACHABLE_MARKERS):
            return True
        error = error.__cause__
    return False


def _retrying(name: str) -> Callable[..., Any]:
    """Method ``name`` of :class:`RetryingStorage`: the inner storage's, retried while unreachable."""

    def call(self: "RetryingStorage", *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        wait, deadline, outage_since = FIRST_WAIT_S, time.monotonic() + PATIENCE_S, None
        while True:
            try:
                result = method(*args, **kwargs)
            except StorageInternalError as error:
                if not _unreachable(error) or time.monotonic() + wait > deadline:
                    raise
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.warning("Optuna storage unreachable (%s); retrying for up to %.0f s",
                                   first_line(error), PATIENCE_S)
                time.sleep(wait)
                wait = min(2 * wait, MAX_WAIT_S)
                continue
            if outage_since is not None:
                logger.warning("Optuna storage reachable again after %.0f s", time.monotonic() - outage_since)
            return result

    return functools.wraps(getattr(BaseStorage, name))(call)


class RetryingStorage(BaseStorage):
    """Every storage call of ``inner`` (an Optuna storage), retried while the database is
    unreachable (see the module docstring)."""

    def __init__(self, inner: BaseStorage):
        self.inner = inner


for _name in sorted(BaseStorage.__abstractmethods__ | {"get_trial_id_from_study_id_trial_number",
                                                       "check_trial_is_updatable", "get_n_trials", "get_best_trial"}):
    setattr(RetryingStorage, _name, _retrying(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage at ``url``; a server database's rides out a restart (module docstring)."""
    if url.startswith("sqlite") or "://" not in url:
        return optuna.storages.get_storage(url)
    return RetryingStorage(optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}))


__all__ = ["RetryingStorage", "open_storage"]
