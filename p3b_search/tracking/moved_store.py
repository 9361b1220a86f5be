"""The embedded MLflow store of a study folder that has moved.

The embedded store (``mlflow.db`` and ``mlartifacts/`` in the study folder) holds absolute
artifact locations: its experiment's (``file:///<folder>/mlartifacts``) and, below it, each run's
and each logged model's. MLflow offers no way to change them, so after ``mv`` of a study folder
the resumed study's runs would log their artifacts into the old folder (creating it again) and
the UI would look for them there. :func:`follow_moved_folder` rewrites those locations, in the
study's own SQLite store, from the old folder's ``mlartifacts`` to the new one's.

It writes the columns of MLflow's SQL schema that hold them (:data:`LOCATION_COLUMNS`);
``tests/tracking/test_study_tracking.py`` pins that MLflow reads its locations from these columns, and
an MLflow upgrade that moves them fails there (or here, with "no such column").
"""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

#: (table, column) of every artifact location the embedded store records.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def follow_moved_folder(database: Path, experiment_name: str, artifacts: Path) -> str | None:
    """Point the locations of the SQLite store ``database`` that lie under its experiment
    ``experiment_name``'s artifact location at ``artifacts`` instead, when they differ (the study
    folder was moved since the experiment was created); returns the old location (None: nothing
    to do, or no such store or experiment)."""
    if not database.is_file():
        return None
    new = artifacts.absolute().as_uri()
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:  # one transaction
        row = connection.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                 (experiment_name,)).fetchone()
        if row is None or row[0] is None or row[0] == new:
            return None
        old = row[0]
        for table, column in LOCATION_COLUMNS:
            connection.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                (new, len(old) + 1, old, len(old) + 1, old + "/"))
    return old


__all__ = ["LOCATION_COLUMNS", "follow_moved_folder"]
