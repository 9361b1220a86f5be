"""The retry policies of a study's calls to its stores, as tenacity ``Retrying`` controllers.

====================  ==========================================  =========================================
policy                calls again                                 waits; gives up
====================  ==========================================  =========================================
:func:`outage`        a call that failed because the store cannot  exponential back-off (Optuna's database:
                      be reached (which errors: the caller's       0.5 s doubling to 8 s); the last error once
                      ``retry_on``)                                the next wait would pass the patience
                                                                   (120 s), or never (a trial's MLflow calls,
                                                                   until their sender closes)
:func:`creation`      opening a store whose schema another         jittered back-off from 0.2 s; the last
                      process is creating                          error after 6 attempts
====================  ==========================================  =========================================

Which errors are worth another call is :mod:`p3b_search.connection_errors`'s question; what a
call that failed half-way may have done is the caller's (see
:class:`~p3b_search.search.optuna_storage.RetryingStorage`, which looks before it calls again).
Each controller warns once, through ``on_outage``, when its first call fails.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_never,
    wait_exponential,
    wait_random_exponential,
)

CREATION_FIRST_WAIT_S = 0.2
CREATION_ATTEMPTS = 6


class Closed(Exception):
    """Raised instead of waiting again once the ``closing`` event of :func:`outage` is set."""


def _interruptible(closing: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        if closing.wait(seconds):
            raise Closed
    return sleep


def _first_failure(on_outage: Callable[[BaseException], None] | None) -> Callable[[RetryCallState], None] | None:
    """A ``before_sleep`` hook that hands the first failed call's error to ``on_outage``."""
    if on_outage is None:
        return None

    def hook(state: RetryCallState) -> None:
        if state.attempt_number == 1 and state.outcome is not None:
            on_outage(state.outcome.exception())
    return hook


def outage(retry_on: Callable[[BaseException], bool], first_wait_s: float, max_wait_s: float,
           patience_s: float | None = None, on_outage: Callable[[BaseException], None] | None = None,
           closing: threading.Event | None = None) -> Retrying:
    """Call again while the call fails with an error ``retry_on`` accepts (others are raised at
    once), waiting ``first_wait_s`` doubling up to ``max_wait_s``; the last error is raised once
    the next wait would pass ``patience_s`` in all (None: never). With ``closing``, a wait ends
    early by raising :class:`Closed` when that event is set."""
    return Retrying(
        retry=retry_if_exception(retry_on),
        wait=wait_exponential(multiplier=first_wait_s, max=max_wait_s),
        stop=stop_never if patience_s is None else stop_before_delay(patience_s),
        sleep=time.sleep if closing is None else _interruptible(closing),
        before_sleep=_first_failure(on_outage),
        reraise=True,
    )


def creation(retry_on: Callable[[BaseException], bool], on_retry: Callable[[BaseException], None]) -> Retrying:
    """Call again, up to :data:`CREATION_ATTEMPTS` calls in all, while the call fails with an
    error ``retry_on`` accepts (another process creating the store), after a random wait of up
    to :data:`CREATION_FIRST_WAIT_S` doubling with each attempt (racing processes spread out);
    ``on_retry`` hears of each such failure."""
    return Retrying(
        retry=retry_if_exception(retry_on),
        wait=wait_random_exponential(multiplier=CREATION_FIRST_WAIT_S),
        stop=stop_after_attempt(CREATION_ATTEMPTS),
        before_sleep=lambda state: on_retry(state.outcome.exception()),
        reraise=True,
    )


__all__ = ["Closed", "creation", "outage"]
