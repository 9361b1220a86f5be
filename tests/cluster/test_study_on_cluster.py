"""A study joined to a two-node Ray cluster with ``--address``, Optuna in PostgreSQL and MLflow on
a tracking server: trials run on both nodes, every store records each trial once, the fronts
agree; two studies at once on the same database and server keep to their own records."""
from __future__ import annotations

import optuna
import pytest

from p3b_search.search.trainable import RAY_NODE_ID
from tests.cluster.support import (
    STUDY_TIMEOUT_S,
    assert_complete_once,
    assert_fronts_agree,
    recorded,
    start_driver,
    write_cluster_study,
)
from tests.search.test_faults import _kill_session as kill_session

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_trials_run_on_both_nodes_and_every_store_agrees(tmp_path, postgres, tracking_server, ray_cluster):
    study = write_cluster_study(tmp_path, "nodes", postgres.create_database("nodes"), tracking_server.uri,
                                epoch_seconds=0.5)
    driver = start_driver(tmp_path, ray_cluster.address)
    try:
        output = driver.communicate(timeout=STUDY_TIMEOUT_S)[0]
    finally:
        kill_session(driver.pid)
    assert driver.returncode == 0, output
    assert f"joined the Ray cluster at {ray_cluster.address}: 2 node(s), 2 CPUs, 0 GPUs" in output

    records = recorded(study)
    assert_complete_once(records, 4)
    # two trials at a time, one CPU per node: both nodes ran trials
    assert set(records.table[RAY_NODE_ID]) == set(ray_cluster.node_ids.values())
    assert_fronts_agree(records)
    assert records.parent.info.status == "FINISHED"
    # the artifacts went through the server into its artifact folder, not into the study folder
    assert list((tracking_server.folder / "artifacts").rglob("allocations.parquet"))
    assert not (study.layout.root / "mlruns").exists()


def test_two_studies_at_once_on_one_database_and_server_do_not_cross_talk(tmp_path, postgres, tracking_server,
                                                                        ray_cluster):
    storage = postgres.create_database("shared")
    ranges = {"left": (0.2, 0.4), "right": (0.6, 0.8)}
    studies, drivers = {}, {}
    for name, ratios in ranges.items():
        (tmp_path / name).mkdir()
        studies[name] = write_cluster_study(tmp_path / name, name, storage, tracking_server.uri, n_trials=2,
                                            ratios=ratios)
    try:
        for name in studies:
            drivers[name] = start_driver(tmp_path / name, ray_cluster.address)
        outputs = {name: driver.communicate(timeout=STUDY_TIMEOUT_S)[0] for name, driver in drivers.items()}
    finally:
        for driver in drivers.values():
            kill_session(driver.pid)
    for name, driver in drivers.items():
        assert driver.returncode == 0, outputs[name]

    assert sorted(optuna.get_all_study_names(storage)) == ["left", "right"]
    run_ids = {}
    for name, (low, high) in ranges.items():
        records = recorded(studies[name])
        assert_complete_once(records, 2)
        sampled = [t.params["method_config.prune_ratio"] for t in records.optuna_trials[1:]]  # 0: the reference
        assert all(low <= ratio <= high for ratio in sampled), sampled  # only its own space's samples
        assert {run.info.run_name for run in records.runs.values()} == {f"{name}-trial-{n:04d}" for n in range(2)}
        run_ids[name] = set(records.table["mlflow_run_id"])
        assert run_ids[name] == {run.info.run_id for run in records.runs.values()}
        assert_fronts_agree(records)
    assert not run_ids["left"] & run_ids["right"]
