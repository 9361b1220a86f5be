"""Database statements per trial of a study whose Optuna storage is PostgreSQL.

    python -m benchmarks.storage_queries --trials 24
    python -m benchmarks.storage_queries --trials 24 --code /path/to/other/checkout   # e.g. before a change
    python -m benchmarks.storage_queries --trials 8 --sampler tpe --top 10

The study is the cluster tests' kind (``tests/cluster/support.write_cluster_study``: the
prune ratio searched, ``--trials`` trials two at a time, the small test objective
``tests.search_objective:run_trial``), its Optuna storage a database of a throw-away
PostgreSQL server started as the cluster tests start theirs (Debian's server binaries), with
``pg_stat_statements`` loaded, and MLflow on a SQLite file in the study folder (so the server
sees Optuna's traffic only). ``search.py run`` of the checkout ``--code`` (default: this one)
runs it on a local Ray. Optuna's tables are created and the statistics reset first, so what is
counted is the driver's work on the study.

Prints, per trial: statements the server ran on the study's database (all; of which SELECTs)
and the rows those returned; with ``--top N``, the N statements run most often.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import psycopg

from tests.cluster.conftest import Postgres, _postgres_bin, _service_account
from tests.cluster.support import STUDY_TIMEOUT_S, write_cluster_study
from tests.search.test_runner import OBJECTIVE

REPO = Path(__file__).resolve().parents[1]

DATABASE = "study"
TOTALS = """SELECT coalesce(sum(calls), 0), coalesce(sum(calls) FILTER (WHERE query ILIKE 'select%%'), 0),
                   coalesce(sum(rows) FILTER (WHERE query ILIKE 'select%%'), 0)
            FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"""
TOP = """SELECT calls, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 150)
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s
         ORDER BY calls DESC LIMIT %s"""


def run_study(server: Postgres, folder: Path, code: Path, trials: int, sampler: str) -> None:
    """``search.py run`` of ``code`` on a study of ``trials`` trials in database :data:`DATABASE`."""
    url = server.create_database(DATABASE)
    optuna.storages.RDBStorage(url).engine.dispose()  # Optuna's tables, so that their creation is not counted
    with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
        connection.execute("SELECT pg_stat_statements_reset()")
    write_cluster_study(folder, DATABASE, url, f"sqlite:///{folder}/mlflow.db", n_trials=trials, sampler=sampler)
    command = [sys.executable, str(code / "search.py"), "run", str(folder / "study.yaml"), "--objective", OBJECTIVE,
               "--cpus", "2"]
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO}"}  # the objective lives in REPO's tests
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=STUDY_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"the study failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--sampler", default="random", help="sampler name of the study (default: random, as the cluster tests)")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose search.py runs the study")
    parser.add_argument("--top", type=int, default=0, help="also list the N statements run most often")
    args = parser.parse_args()
    bin_dir = _postgres_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    scratch = Path(tempfile.mkdtemp(prefix="p3b-pg", dir="/tmp"))  # short: the socket path has a length limit
    server = Postgres(bin_dir, scratch, _service_account())
    try:
        server.start(shared_preload_libraries="pg_stat_statements")
        with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
            connection.execute("CREATE EXTENSION pg_stat_statements")
        folder = Path(tempfile.mkdtemp(prefix="p3b-study"))
        try:
            run_study(server, folder, args.code.resolve(), args.trials, args.sampler)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
            statements, selects, rows = connection.execute(TOTALS, (DATABASE,)).fetchone()
            top = connection.execute(TOP, (DATABASE, args.top)).fetchall() if args.top else []
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    n = args.trials
    print(f"code {args.code.resolve()}, sampler {args.sampler}, {n} trials")
    print(f"per trial: {statements / n:.1f} statements, of which {selects / n:.1f} SELECTs returning {rows / n:.1f} rows")
    for calls, returned, query in top:
        print(f"{calls:7d} calls {returned:7d} rows  {query}")


if __name__ == "__main__":
    main()
