"""Faults of the cluster's parts during a study joined to the two-node Ray cluster, Optuna in
PostgreSQL and MLflow on a tracking server backed by it:

- the database is stopped for 5 s mid-study and started again: no trial lost or duplicated in
  Optuna, MLflow holds every trial once;
- the tracking server is down for 20 s: trials go on, what they logged arrives afterwards;
- the second Ray node is killed mid-trial: its trial is retried from its last checkpoint on the
  head and ends with the metrics of an undisturbed run; the study completes;
- the driver joined to the cluster is SIGKILLed while a trial reports, then ``resume --address``:
  Ray ends the dead driver's trials (never more than ``concurrency`` at a time across the two
  drivers), every trial completes once, and the cluster itself keeps running.
"""
from __future__ import annotations

import signal
import time

import pytest
import torch
from mlflow import MlflowClient

from p3b_search.reporting import TrialReporter
from p3b_search.search.trainable import RAY_NODE_ID
from p3b_search.study.trials import trial_config
from tests.cluster.support import (
    STUDY_TIMEOUT_S,
    assert_complete_once,
    assert_fronts_agree,
    recorded,
    start_driver,
    wait_for_rows,
    write_cluster_study,
)
from tests.search.test_faults import _kill_session as kill_session
from tests.search_objective import most_running

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

DATABASE_DOWN_S = 5.0
TRACKING_DOWN_S = 20.0
EPOCHS = 4  # prune + fine-tune epochs of the study (tests.search.test_faults.STUDY)


def _mid_trial(frame) -> bool:
    """Some trial is running with an epoch done (and so a checkpoint saved)."""
    return bool(((frame["state"] == "RUNNING") & (frame["epochs_done"] >= 1)).any())


def _finish(driver) -> str:
    try:
        return driver.communicate(timeout=STUDY_TIMEOUT_S)[0]
    finally:
        kill_session(driver.pid)


def test_database_restart_mid_study_loses_and_duplicates_no_trial(tmp_path, postgres, tracking_server, ray_cluster):
    study = write_cluster_study(tmp_path, "restart", postgres.create_database("restart"), tracking_server.uri,
                                epoch_seconds=1.0)
    driver = start_driver(tmp_path, ray_cluster.address)
    try:
        wait_for_rows(study, _mid_trial, driver)
        postgres.stop()  # fast shutdown: every open connection (Optuna's, the server's) is cut
        time.sleep(DATABASE_DOWN_S)
        postgres.start()
        output = _finish(driver)
    finally:
        if postgres.process.poll() is not None:
            postgres.start()  # the other tests need it
        kill_session(driver.pid)
    assert driver.returncode == 0, output
    records = recorded(study)
    assert_complete_once(records, 4)
    assert_fronts_agree(records)


def test_tracking_server_outage_delays_logging_but_not_trials(tmp_path, postgres, tracking_server, ray_cluster):
    study = write_cluster_study(tmp_path, "outage", postgres.create_database("outage"), tracking_server.uri,
                                epoch_seconds=1.5)
    driver = start_driver(tmp_path, ray_cluster.address)
    try:
        at_stop = wait_for_rows(study, _mid_trial, driver)
        tracking_server.stop()
        time.sleep(TRACKING_DOWN_S)
        during = wait_for_rows(study, lambda frame: True, driver)
        tracking_server.start()
        output = _finish(driver)
    finally:
        if tracking_server.process.poll() is not None:
            tracking_server.start()
        kill_session(driver.pid)
    assert driver.returncode == 0, output
    # the trials went on while the server was down
    assert during["epochs_done"].sum() > at_stop["epochs_done"].sum()
    records = recorded(study)
    assert_complete_once(records, 4)
    assert_fronts_agree(records)
    # every epoch of every trial reached the server, once
    client = MlflowClient(tracking_server.uri)
    for number, run in records.runs.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "top1")]
        assert steps == list(range(EPOCHS)), (number, steps)


def _undisturbed(study, params: dict, folder) -> dict[str, float]:
    """The objective's values for ``params`` run start to end in this process, one thread (as a
    worker with resources_per_trial.cpu = 1)."""
    from tests.search_objective import run_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder.mkdir(parents=True)
        return run_trial(trial_config(study, params), TrialReporter(), folder)
    finally:
        torch.set_num_threads(threads)


def test_lost_node_trial_resumes_on_the_head_from_its_checkpoint(tmp_path, postgres, tracking_server, own_ray_cluster):
    cluster = own_ray_cluster
    study = write_cluster_study(tmp_path, "lost-node", postgres.create_database("lost_node"), tracking_server.uri,
                                n_trials=2, epoch_seconds=2.0)
    second = cluster.node_ids["p3b_second"]
    driver = start_driver(tmp_path, cluster.address)
    try:
        # a trial on the second node, a checkpoint of it registered: kill the node
        frame = wait_for_rows(study, lambda f: bool(((f["state"] == "RUNNING") & (f[RAY_NODE_ID] == second)
                                                     & (f["epochs_saved"] >= 1)).any()), driver)
        lost = int(frame.loc[(frame[RAY_NODE_ID] == second) & (frame["state"] == "RUNNING"), "number"].iloc[0])
        cluster.kill_second()
        output = _finish(driver)
    finally:
        kill_session(driver.pid)
    assert driver.returncode == 0, output
    records = recorded(study)
    assert_complete_once(records, 2)
    row = records.table.set_index("number").loc[lost]
    assert row["retries"] == 1 and row[RAY_NODE_ID] == cluster.node_ids["p3b_head"]
    epochs = (study.layout.trial_dir(lost) / "epochs.log").read_text().split()
    assert epochs.count("0") == 1, epochs  # the retry continued from the checkpoint, not from scratch
    record = records.optuna_trials[lost]
    direct = _undisturbed(study, record.params, tmp_path / "direct" / "trials" / "0000")
    assert record.values == [direct["top1"], direct["macs"]]


def test_driver_killed_on_the_cluster_resumes_every_trial_once(tmp_path, postgres, tracking_server, ray_cluster):
    study = write_cluster_study(tmp_path, "driver-kill", postgres.create_database("driver_kill"),
                                tracking_server.uri, epoch_seconds=1.0)
    driver = start_driver(tmp_path, ray_cluster.address, kill_at=("reporting", 1))
    resumed = None
    try:
        output = driver.communicate(timeout=STUDY_TIMEOUT_S)[0]
        assert driver.returncode == -signal.SIGKILL, output
        resumed = start_driver(tmp_path, ray_cluster.address, str(study.layout.root), command="resume")
        output = _finish(resumed)
    finally:
        kill_session(driver.pid)
        if resumed is not None:
            kill_session(resumed.pid)
    assert resumed.returncode == 0, output
    assert ray_cluster.head.poll() is None and ray_cluster.second.poll() is None  # not the driver's to end
    records = recorded(study)
    assert_complete_once(records, 4)
    assert_fronts_agree(records)
    assert most_running(study.layout.root) <= 2
    epochs = (study.layout.trial_dir(1) / "epochs.log").read_text().split()
    assert sorted(set(epochs)) == [str(e) for e in range(EPOCHS)] and epochs.count("0") == 1, epochs
