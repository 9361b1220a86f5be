"""Several processes creating one new Optuna storage and one MLflow store at the same moment."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import optuna
import pytest

from p3b_search.stores import open_shared_store

PROCESSES = 4


def _open_both(folder: str, index: int, start: multiprocessing.Barrier) -> None:
    from mlflow import MlflowClient

    start.wait()  # all at once
    optuna_url, mlflow_url = f"sqlite:///{folder}/optuna.db", f"sqlite:///{folder}/mlflow.db"
    storage = open_shared_store(lambda: optuna.storages.RDBStorage(optuna_url), optuna_url, "optuna")
    optuna.create_study(study_name=f"study-{index}", storage=storage)
    client = open_shared_store(lambda: MlflowClient(mlflow_url), mlflow_url, "mlflow")
    open_shared_store(lambda: client.get_experiment_by_name("shared") or client.create_experiment("shared"),
                      mlflow_url, "mlflow")


@pytest.mark.slow
def test_processes_creating_one_store_at_once_all_open_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    workers = [context.Process(target=_open_both, args=(str(tmp_path), i, start)) for i in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [w.exitcode for w in workers] == [0] * PROCESSES
    names = optuna.get_all_study_names(f"sqlite:///{Path(tmp_path) / 'optuna.db'}")
    assert sorted(names) == [f"study-{i}" for i in range(PROCESSES)]
    from mlflow import MlflowClient

    experiments = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()
    assert sorted(e.name for e in experiments) == ["Default", "shared"]


def test_errors_other_than_a_creation_race_are_not_retried():
    calls = []

    def open_store():
        calls.append(1)
        raise ValueError("no such host")

    with pytest.raises(ValueError, match="no such host"):
        open_shared_store(open_store, "postgresql://db.example/optuna", "store")
    assert len(calls) == 1


def test_a_server_store_is_opened_again_while_its_schema_is_being_created(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # tenacity's waits
    failures = ["(psycopg.errors.DuplicateTable) relation \"studies\" already exists",
                "duplicate key value violates unique constraint \"version_info_pkey\""]

    def open_store():
        if failures:
            raise RuntimeError(failures.pop(0))
        return "store"

    assert open_shared_store(open_store, "postgresql://db.example/optuna", "store") == "store"
    assert not failures
