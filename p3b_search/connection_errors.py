"""What a failed call to a store (Optuna's database, MLflow's tracking store) says: the store
could not be reached, another process is creating it, it refused us, or the failure may pass.

Drivers and libraries wrap the error that tells (SQLAlchemy wraps psycopg's, Optuna wraps
SQLAlchemy's, MLflow turns an HTTP failure into its own exception), so every question is asked
of the whole chain of :func:`causes`. MLflow's exceptions carry their kind as ``error_code`` (a
name such as ``"TEMPORARILY_UNAVAILABLE"``); it is read without importing MLflow, so the search
layer can ask about Optuna's errors without loading MLflow.
"""
from __future__ import annotations

from collections.abc import Iterator

#: Words of a connection-level failure (psycopg, PyMySQL, requests/urllib3), as opposed to a
#: rejected statement.
UNREACHABLE_MARKERS = (
    "connection", "server closed", "terminating", "shutting down", "starting up", "could not connect",
    "the database system is", "lost", "timeout", "timed out", "broken pipe",
)
#: Words of two processes creating one store's schema at once.
CREATION_RACE_MARKERS = (
    "already exists", "unique constraint", "duplicate", "database is locked",  # two creators collide
    "online migration expected", "out-of-date database schema",  # MLflow: another process is migrating
)
#: MLflow error codes of failures that may pass: a server error, busy, a timeout.
TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
)
#: MLflow error codes of a store that refused who we are or what we may do.
REFUSED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, as Python prints the
    chain (``raise ... from None`` ends it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ if error.__cause__ is not None else (
            None if error.__suppress_context__ else error.__context__)


def _mlflow_code(error: BaseException) -> str | None:
    code = getattr(error, "error_code", None)
    return code if isinstance(code, str) else None


def unreachable(error: BaseException) -> BaseException | None:
    """The first exception of the chain that says the store could not be reached or dropped the
    connection (down, restarting, network), or None. An MLflow error's own text is not read (it
    may quote the run's keys and values): the driver's error it wraps is."""
    for cause in causes(error):
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return cause
        text = str(cause).lower()
        if _mlflow_code(cause) is None and any(marker in text for marker in UNREACHABLE_MARKERS):
            return cause
    return None


def creation_race(error: BaseException) -> bool:
    """Whether ``error`` reads like another process creating the same store's schema."""
    return any(marker in str(cause).lower() for cause in causes(error) for marker in CREATION_RACE_MARKERS)


def transient(error: BaseException) -> bool:
    """Whether a call to a tracking store that failed with ``error`` may succeed later. An MLflow
    error says so by its code (:data:`TRANSIENT_CODES`: unreachable, busy, a server error); any
    other error when it is one of input/output (``OSError``: requests' errors are OSErrors too)
    or :func:`unreachable`."""
    code = _mlflow_code(error)
    if code is not None:
        return code in TRANSIENT_CODES
    return isinstance(error, OSError) or unreachable(error) is not None


def refused(error: BaseException) -> bool:
    """Whether the store refused our credentials or permissions: an MLflow code of
    :data:`REFUSED_CODES`, or a ``PermissionError`` in the chain."""
    return _mlflow_code(error) in REFUSED_CODES or any(isinstance(cause, PermissionError) for cause in causes(error))


__all__ = ["causes", "creation_race", "refused", "transient", "unreachable"]
