"""Opening a database that another study may be creating at the same moment.

Optuna's RDB storage and MLflow's SQL tracking store create their schema on first use. Two
studies started together on one new shared store both try: the loser fails with "table ...
already exists", a unique-constraint error on the schema-version row, or (MLflow, whose
alembic migrations run one by one) a half-migrated schema. So:

* an SQLite file (one machine) is opened under an exclusive lock on ``<file>.lock``: one
  process creates the schema, the others wait and then open a complete store;
* a server database is opened again while the failure reads like such a creation race
  (:func:`p3b_search.connection_errors.creation_race`; the waits: :func:`p3b_search.retry.creation`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, TypeVar

from p3b_search import retry
from p3b_search.connection_errors import creation_race
from p3b_search.credentials import redact_secrets
from p3b_search.errors import first_line
from p3b_search.files import file_lock

logger = logging.getLogger(__name__)

T = TypeVar("T")


def sqlite_path(url: str) -> Path | None:
    """The file of an ``sqlite:///PATH`` URL (None for other URLs and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return None
    return Path(url[len(prefix):].split("?")[0])


def open_shared_store(open_store: Callable[[], T], url: str, what: str) -> T:
    """``open_store()`` for the store at ``url``: under the SQLite file's lock, and called again
    (:func:`p3b_search.retry.creation`: up to 6 attempts) while it fails with a schema-creation
    race; other errors pass at once. ``what`` names the store in the log."""
    database = sqlite_path(url)
    lock = file_lock(database.with_name(database.name + ".lock")) if database else contextlib.nullcontext()

    def on_retry(error: BaseException) -> None:
        logger.info("%s is being created by another process (%s); retrying", what, redact_secrets(first_line(error)))

    with lock:
        return retry.creation(creation_race, on_retry)(open_store)
