"""Preflight of a study's server stores: the Optuna database and the MLflow tracking server
answer, before Ray starts or a folder is written.

First every ``${NAME}`` of both URLs must name a set environment variable. Then
``storage:`` (and ``tracking.uri:`` when it names a database) with a server URL such as
``postgresql://p3b:${P3B_DB_PASSWORD}@host:5432/optuna``: the database driver is installed and
a connection opens within :data:`CONNECT_TIMEOUT_S` (wrong password, unknown database, nothing
listening all fail here). ``tracking.uri: http(s)://...``: the server's ``/health`` answers.
SQLite files and the embedded MLflow store need no check. Every failure is one
:class:`StudyError` line naming the setting and the fix, its URL's password shown as ``***``.
"""
from __future__ import annotations

import urllib.error
import urllib.request

from p3b_search.credentials import MissingVariable, redact_secrets, resolve_url
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig

CONNECT_TIMEOUT_S = 5
#: Python driver of each server database SQLAlchemy's plain URL scheme loads, and its install hint.
DRIVERS = {"postgresql": ("psycopg", 'pip install -e ".[cluster]"')}


def check_stores(study: StudyConfig) -> None:
    """One-line :class:`StudyError` when the study's storage or tracking server cannot be used."""
    uri = study.tracking.uri if study.tracking.enabled else None
    storage, uri = _resolved(study, "storage", study.storage), _resolved(study, "tracking.uri", uri)
    if storage is not None:
        _check_database(study, "storage", storage)
    if uri is None:
        return
    if uri.startswith(("http://", "https://")):
        _check_tracking_server(study, uri)
    elif "://" in uri:
        _check_database(study, "tracking.uri", uri)


def _resolved(study: StudyConfig, setting: str, url: str | None) -> str | None:
    """``url`` with its ``${NAME}`` references resolved; a one-line error for an unset variable."""
    if url is None:
        return None
    try:
        return resolve_url(url, setting)
    except MissingVariable as error:
        raise StudyError(f"{study.source}: {error}") from None


def _check_database(study: StudyConfig, setting: str, url: str) -> None:
    """The driver of a server database URL loads and a connection opens (SQLite: nothing to do)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StudyError(f"{study.source}: {setting}: {redact_secrets(url)!r} is not a database URL: use "
                         "postgresql://user:${PASSWORD_VARIABLE}@host:5432/database") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        driver, hint = DRIVERS.get(backend, (parsed.get_driver_name(), "install it"))
        raise StudyError(f"{study.source}: {setting}: {shown} needs the {backend} driver {driver}, which is not "
                         f"installed: {hint}") from None
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend == "postgresql" else {}
    engine = create_engine(parsed, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        reason = redact_secrets(_first_line(getattr(error, "orig", None) or error))
        raise StudyError(f"{study.source}: {setting}: cannot connect to {shown} ({reason}): start the database "
                         "or fix the host, port, user, password and database name in the URL") from None
    finally:
        engine.dispose()


def _check_tracking_server(study: StudyConfig, uri: str) -> None:
    """An MLflow tracking server answers ``GET <uri>/health``."""
    shown = redact_secrets(uri)
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise StudyError(f"{study.source}: tracking.uri: {shown} answers HTTP {error.code} where an MLflow tracking "
                         "server answers: fix tracking.uri") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StudyError(f"{study.source}: tracking.uri: no MLflow tracking server answers at {shown} "
                         f"({_first_line(reason)}): start `mlflow server` there, fix tracking.uri, "
                         "or set tracking.enabled: false") from None


def _first_line(error: object) -> str:
    lines = [line.strip() for line in str(getattr(error, "strerror", None) or error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


__all__ = ["check_stores"]
