"""A study whose stores take a password: Optuna in PostgreSQL with the password given by
reference (``${P3B_TEST_DB_PASSWORD}``), MLflow in PostgreSQL with a password written into
the URL. The study connects to both (its trials log to MLflow from their Ray workers), and
neither password is left in any file it wrote (the study folder with Ray's experiment state
and pickles, MLflow's artifacts, Ray's session logs), in either database, or in its console
output. Each password holds a random hex token that any encoding of it keeps, so a search for
the token finds the password in whatever form it was written.

Also: a PostgreSQL URL without a password lets libpq take it from ``PGPASSWORD`` or
``PGPASSFILE``; a cluster node
without the variable of ``tracking.uri`` stops the study before any trial."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import optuna
import psycopg
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from psycopg import sql

from p3b_search.search.stores_preflight import check_stores
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from p3b_search.tracking.client import PARENT_TAG
from tests.search.test_cluster import _env as cluster_env
from tests.search.test_faults import STUDY
from tests.search.test_runner import ROOT
from tests.search.test_runner import _cli as cli

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STUDY_TIMEOUT_S = 400
REFERENCED = "P3B_TEST_DB_PASSWORD"


def _owner(postgres, role: str, password: str) -> str:
    """A login role with ``password`` and a database of the same name it owns; returns its name."""
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                               sql.Literal(password)))
        connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(role), sql.Identifier(role)))
    return role


def _database_text(postgres, database: str) -> str:
    """Every row of every table of ``database``, as text."""
    url = postgres.url(database)
    with psycopg.connect(url) as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'public'")]
        assert tables, f"{database} holds no tables"
        return "\n".join(str(row[0]) for table in tables
                         for row in connection.execute(f"SELECT t::text FROM {table} t"))


def _files_holding(folder: Path, tokens: list[str]) -> list[str]:
    """``path: token`` for every file under ``folder`` that holds one of ``tokens``."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path}: {token}" for token in tokens if token.encode() in data]
    return found


def test_no_password_leaves_the_study(tmp_path, postgres):
    suffix = secrets.token_hex(4)
    tokens = [secrets.token_hex(8), secrets.token_hex(8)]
    # URL-special characters around each token: the reference's value is percent-encoded when
    # resolved, the written one is written percent-encoded (and lifted out when the study is read)
    db_password, tracking_password = f"Db@:/% {tokens[0]}", f"Tr@ck:{tokens[1]}/%"
    optuna_role = _owner(postgres, f"optuna_{suffix}", db_password)
    mlflow_role = _owner(postgres, f"mlflow_{suffix}", tracking_password)
    server = f"127.0.0.1:{postgres.port}"
    given, work = tmp_path / "given", tmp_path / "work"
    given.mkdir()
    work.mkdir()
    study_file = given / "study.yaml"
    study_file.write_text(f"""name: secret
output_dir: {work / 'runs'}
storage: postgresql://{optuna_role}:${{{REFERENCED}}}@{server}/{optuna_role}
tracking: {{uri: 'postgresql://{mlflow_role}:{quote(tracking_password, safe="")}@{server}/{mlflow_role}'}}
search_space:
  method_config.prune_ratio: {{type: float, low: 0.2, high: 0.9}}
sampler: {{name: random, seed: 0}}
n_trials: 2
concurrency: 1
""" + STUDY)
    assert _files_holding(given, tokens) == [f"{study_file}: {tokens[1]}"]  # the search finds a written password
    ray_temp = tempfile.mkdtemp(prefix="p3bray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {key: value for key, value in os.environ.items() if not key.startswith(("P3B_STORAGE", "P3B_TRACKING"))}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_temp, **{REFERENCED: db_password})
    try:
        run = subprocess.run(cli("run", str(study_file)), cwd=work, env=env, capture_output=True, text=True,
                             timeout=STUDY_TIMEOUT_S)
        ray_logs = _files_holding(Path(ray_temp), tokens)
        worker_logs = any(Path(ray_temp).rglob("worker-*.out"))
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert worker_logs, "Ray's session logs were not where the test looks"

    # the study connected to both stores: Optuna holds its trials, MLflow the trials' runs
    storage = f"postgresql://{optuna_role}:{quote(db_password, safe='')}@{server}/{optuna_role}"
    trials = optuna.load_study(study_name="secret", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient(f"postgresql://{mlflow_role}:{quote(tracking_password, safe='')}@{server}/{mlflow_role}")
    runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 2
    assert all("final/top1" in r.data.metrics for r in children)  # logged by the trials' workers

    written = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()}
    for kept in ("runs/secret/ray/tune/tuner.pkl", "runs/secret/ray/tune/searcher-state-", "runs/secret/trials.parquet",
                 "mlruns/"):  # Ray's pickles and MLflow's artifacts are among the files searched
        assert any(name.startswith(kept) for name in written), (kept, sorted(written))

    # no password anywhere
    assert _files_holding(work, tokens) == []
    assert ray_logs == []
    output = run.stdout + run.stderr
    assert not [token for token in tokens if token in output], output
    for database in (optuna_role, mlflow_role):
        text = _database_text(postgres, database)
        assert not [token for token in tokens if token in text], database

    # the study folder's copy keeps the reference; the written password became one
    copy = (work / "runs" / "secret" / "study.yaml").read_text()
    assert f"${{{REFERENCED}}}@" in copy and "${P3B_TRACKING_PASSWORD}@" in copy


def test_libpq_takes_a_password_missing_from_the_url_from_its_environment_or_password_file(tmp_path, postgres,
                                                                                         monkeypatch):
    password = secrets.token_hex(12)
    role = _owner(postgres, f"pgpass_{secrets.token_hex(4)}", password)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\n"
                          f"storage: postgresql://{role}@127.0.0.1:{postgres.port}/{role}\n")
    study = load_study(study_file)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-file"))
    with pytest.raises(StudyError, match="no password supplied"):
        check_stores(study)
    monkeypatch.setenv("PGPASSWORD", password)
    check_stores(study)  # connects
    monkeypatch.delenv("PGPASSWORD")
    password_file = tmp_path / "pgpass"
    password_file.write_text(f"127.0.0.1:{postgres.port}:{role}:{role}:{password}\n")
    password_file.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(password_file))
    check_stores(study)  # connects


def test_a_node_without_the_tracking_password_variable_stops_the_study_before_any_trial(tmp_path, postgres,
                                                                                         ray_cluster):
    """The trials log to a database ``tracking.uri`` with their node's environment: every node
    must have the variable (the cluster's nodes were started without it)."""
    password = secrets.token_hex(12)
    role = _owner(postgres, f"nodes_{secrets.token_hex(4)}", password)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(f"name: nodes\noutput_dir: {tmp_path / 'runs'}\n"
                          f"tracking: {{uri: 'postgresql://{role}:${{P3B_TEST_NODE_PASSWORD}}@127.0.0.1:"
                          f"{postgres.port}/{role}'}}\n" + STUDY)
    run = subprocess.run(cli("run", str(study_file), "--address", ray_cluster.address), cwd=tmp_path,
                         env=cluster_env(P3B_TEST_NODE_PASSWORD=password), capture_output=True, text=True,
                         timeout=STUDY_TIMEOUT_S)
    assert run.returncode == 2, run.stdout + run.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(study_file))}: tracking.uri: environment variable P3B_TEST_NODE_PASSWORD is not set "
        r"on the Ray node at \S+ \(node [0-9a-f]{12}\): export it where `ray start` runs on every node \(the trials "
        r"log to the tracking store with it\)", run.stderr.strip().splitlines()[-1]), run.stderr
    assert not (tmp_path / "runs" / "nodes" / "trials.parquet").exists()
