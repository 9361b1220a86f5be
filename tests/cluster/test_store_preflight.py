"""Preflight of the server stores: an unreachable Postgres, a wrong password, a tracking server
that does not answer and a missing Postgres driver each stop ``search.py run`` with one line
naming the setting, before Ray starts or a folder is written.

The cases without a server are in this file too (not in test_bad_input), because the wrong
password needs the cluster tests' PostgreSQL and all four share one runner."""
from __future__ import annotations

import subprocess
import sys

import pytest

import search
from tests.search.test_runner import ROOT, write_study
from tests.test_bad_input import _ray_running, _tree

pytestmark = pytest.mark.cluster

HEAD = "name: s\n"


def _fails_before_compute(tmp_path, monkeypatch, capsys, study_text: str) -> str:
    """Run the study file ``study_text``; return its one error line after checking that nothing
    was started or written."""
    monkeypatch.chdir(tmp_path)
    write_study(tmp_path, HEAD + study_text)
    before = _tree(tmp_path)
    assert search.main(["run", str(tmp_path / "study.yaml"), "--objective", "tests.search_objective:run_trial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert _tree(tmp_path) == before  # no study folder, no store, no ray/
    assert not _ray_running()
    return err.removeprefix("error: ").rstrip("\n")


def test_unreachable_postgres_storage(tmp_path, monkeypatch, capsys, postgres):
    closed = postgres.url("optuna").replace(f":{postgres.port}/", ":1/")
    line = _fails_before_compute(tmp_path, monkeypatch, capsys, f"storage: {closed}\n")
    assert line == (f"{tmp_path}/study.yaml: storage: cannot connect to postgresql://p3b:***@127.0.0.1:1/optuna "
                    '(connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused): '
                    "start the database or fix the host, port, user, password and database name in the URL")


def test_wrong_postgres_password(tmp_path, monkeypatch, capsys, postgres):
    postgres.create_database("guarded")
    line = _fails_before_compute(tmp_path, monkeypatch, capsys,
                                 f"storage: {postgres.url('guarded', password='not-the-password')}\n")
    assert line == (f"{tmp_path}/study.yaml: storage: cannot connect to postgresql://p3b:***@127.0.0.1:"
                    f"{postgres.port}/guarded (connection failed: connection to server at \"127.0.0.1\", port "
                    f"{postgres.port} failed: FATAL:  password authentication failed for user \"p3b\"): start the "
                    "database or fix the host, port, user, password and database name in the URL")


def test_tracking_server_that_does_not_answer(tmp_path, monkeypatch, capsys):
    line = _fails_before_compute(tmp_path, monkeypatch, capsys, 'tracking: {uri: "http://127.0.0.1:1"}\n')
    assert line == (f"{tmp_path}/study.yaml: tracking.uri: no MLflow tracking server answers at http://127.0.0.1:1 "
                    "(Connection refused): start `mlflow server` there, fix tracking.uri, or set "
                    "tracking.enabled: false")


def test_missing_postgres_driver_names_the_extra(tmp_path):
    write_study(tmp_path, HEAD + "storage: postgresql://p3b:secret@127.0.0.1:1/optuna\n")
    # search.py in a Python where the driver cannot be imported
    hide_driver = ("import sys; sys.modules['psycopg'] = None; sys.argv = sys.argv[1:]; "
                   f"sys.path.insert(0, {str(ROOT)!r}); import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", hide_driver, str(ROOT / "search.py"), "run",
                          str(tmp_path / "study.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/study.yaml: storage: postgresql://p3b:***@127.0.0.1:1/optuna needs the postgresql "
        'driver psycopg, which is not installed: pip install -e ".[cluster]"')
    assert not (tmp_path / "runs").exists()
