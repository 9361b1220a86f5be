"""Joining a running Ray cluster (``search.py run --address``), the path of a multi-node study.

A head node is started with ``ray start --head --block`` in its own session, with its own port,
temp folder and authentication token, and 3 CPUs, so it cannot be mistaken for the 2-CPU local
Ray the other tests start. The study joins it, runs its trials on the cluster's workers and, when
it ends, only disconnects: the cluster keeps running. Ray 2.60 sends a cluster's
token only from a driver in token mode, so the study's driver gets ``RAY_AUTH_MODE=token``; without
it the study stops with a one-line error.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from p3b_search.study.loading import load_study
from tests.search.test_faults import STUDY, _kill_session
from tests.search.test_runner import ROOT, write_study
from tests.search.test_runner import _cli as cli

pytestmark = pytest.mark.slow

HEAD_CPUS = 3
CLUSTER_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
JOINED = """name: joined
search_space:
  method_config.prune_ratio: {type: float, low: 0.2, high: 0.9}
sampler: {name: random, seed: 0}
n_trials: 3
concurrency: 2
tracking: {enabled: false}
""" + STUDY


def _env(with_token: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a cluster process: this one's, with the repository on the path (the
    workers import the test objective from it, as a real node imports the installed project)
    and, ``with_token``, the cluster's token in token mode."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    return {**env, "PYTHONPATH": str(ROOT), **(CLUSTER_AUTH if with_token else {}), **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """Address of a one-node Ray cluster with ``HEAD_CPUS`` CPUs, torn down after the test."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = tmp_path / "ray-head.log"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
               f"--num-cpus={HEAD_CPUS}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", "--block"]
    with log.open("w") as out:
        head = subprocess.Popen(command, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, f"ray start failed:\n{log.read_text()}"
            time.sleep(0.3)
        yield head, f"127.0.0.1:{port}"
    finally:
        _kill_session(head.pid)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_study_joins_a_running_cluster_and_leaves_it_running(tmp_path, ray_head):
    head, address = ray_head
    study = load_study(write_study(tmp_path, JOINED))
    run = subprocess.run(cli("run", str(tmp_path / "study.yaml"), "--address", address), cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # the trials ran on the cluster it joined, not on a local Ray of its own (which would have 2 CPUs)
    assert f"joined the Ray cluster at {address}: 1 node(s), {HEAD_CPUS} CPUs, 0 GPUs" in run.stdout
    assert "warning" not in run.stdout
    assert "finished after" in run.stdout

    records = optuna.load_study(study_name="joined", storage=study.storage_url).trials
    assert [t.state for t in records] == [TrialState.COMPLETE] * 3
    trials = pd.read_parquet(study.layout.trials_table)
    assert trials["state"].tolist() == ["COMPLETE"] * 3
    assert trials["epochs_done"].tolist() == [4, 4, 4]
    assert head.poll() is None, "the study shut the cluster down instead of disconnecting"


def test_a_trial_bigger_than_the_cluster_is_announced(tmp_path, ray_head):
    head, address = ray_head
    write_study(tmp_path, JOINED.replace("n_trials: 3", "n_trials: 1\nresources_per_trial: {cpu: 4}"))
    driver = subprocess.Popen(cli("run", str(tmp_path / "study.yaml"), "--address", address), cwd=tmp_path,
                              env=_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    # the trial waits for a node that never joins: read the announcement, then stop the driver
    # (the timer ends a driver that never says it, so the loop below always ends)
    timer = threading.Timer(120, _kill_session, [driver.pid])
    timer.start()
    try:
        lines = []
        while not lines or not lines[-1].startswith("warning:"):
            line = driver.stdout.readline()
            assert line, "the driver ended without the warning:\n" + "".join(lines)
            lines.append(line)
    finally:
        timer.cancel()
        _kill_session(driver.pid)
        driver.wait(timeout=30)
    assert lines[-1].strip() == ("warning: one trial needs 4 CPUs and 0 GPUs, more than the cluster has now: "
                                 "trials wait until nodes join (or lower resources_per_trial)")
    assert head.poll() is None


def test_a_driver_without_the_cluster_token_gets_a_one_line_error(tmp_path, ray_head):
    _, address = ray_head
    write_study(tmp_path, JOINED)
    run = subprocess.run(cli("run", str(tmp_path / "study.yaml"), "--address", address), cwd=tmp_path,
                         env=_env(with_token=False), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --address {address}: the cluster refused our authentication token: export RAY_AUTH_MODE=token, "
        "with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    assert not (tmp_path / "runs").exists(), "the refused study left files behind"
