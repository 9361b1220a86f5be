"""Faults a long study meets: a trial's worker SIGKILLed mid-epoch, a trial
that diverges (NaN loss) or runs out of memory, two studies sharing one Optuna storage and one
MLflow store. (Retries after an exception, Ctrl-C + resume, an unreachable tracking server and
corrupt checkpoints / weights are covered in search/test_runner, tracking/test_study_tracking, training/test_training,
test_weights and test_load_pruned; the driver SIGKILLed in test_driver_kill.)

Real local Ray, real Optuna and MLflow stores, and the small real objective of
``tests/search_objective.py`` (an MLP on scikit-learn's digits, pruned and fine-tuned).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from p3b_search.reporting import TrialReporter
from p3b_search.study.loading import load_study
from p3b_search.study.trials import trial_config
from p3b_search.tracking.client import PARENT_TAG, REASON_TAG, STATE_TAG, TRIAL_TAG
from tests.search.test_runner import OBJECTIVE, ROOT, write_study
from tests.search.test_runner import _cli as cli

pytestmark = pytest.mark.slow

STUDY = """method: {name: p3b}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 2, lr: 0.01}, batch_size: 64}
objectives: [top1, {name: macs, reference: 3000}]
"""


def _children(tracking_uri: str, experiment_name: str) -> tuple[object, list]:
    """The parent run and the child runs of the study logged as ``experiment_name``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert all(r.data.tags[PARENT_TAG] == parents[0].info.run_id for r in children)
    return parents[0], children


def _session_processes(session_id: int) -> list[int]:
    """Pids of the live processes in session ``session_id`` (the driver started with
    ``start_new_session``, and what it spawned: Ray's GCS, raylet and workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: the session id
            pids.append(int(entry.name))
    return pids


def _kill_session(session_id: int) -> None:
    """SIGKILL every process of the session (the process group first, then stragglers)."""
    try:
        os.killpg(session_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in _session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- trials that fail

# random sampler, seed 0: training.prune.lr = 0.01 (reference), 1e30, 0.01, 1e30
FAULTY = """name: faulty
search_space:
  training.prune.lr: {type: categorical, choices: [0.01, 1.0e+30]}
sampler: {name: random, seed: 0}
n_trials: 4
concurrency: 1
max_failures: 1
""" + STUDY
KILLED_TRIAL, DIVERGING_TRIAL, PLAIN_TRIAL, OOM_TRIAL = 0, 1, 2, 3


class _WorkerKiller(threading.Thread):
    """SIGKILLs the process running trial ``number`` during its epoch 2 (after the epoch's
    training steps, while it sleeps before writing its checkpoint)."""

    def __init__(self, workdir: Path, delay_s: float):
        super().__init__(daemon=True)
        self.workdir, self.delay_s = workdir, delay_s
        self.killed_pid: int | None = None

    def run(self) -> None:
        log = self.workdir / "epochs.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().split()) >= 2:
                time.sleep(self.delay_s)
                self.killed_pid = int((self.workdir / "pid").read_text())
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def faulty_study(tmp_path_factory):
    """A study of 4 trials, one at a time: trial 0's worker is SIGKILLed mid-epoch, trial 1
    diverges (lr 1e30: NaN loss), trial 2 runs plainly, trial 3 runs out of memory."""
    from p3b_search.launch import run_study

    tmp_path = tmp_path_factory.mktemp("faulty")
    study = load_study(write_study(tmp_path, FAULTY))
    layout = study.layout
    layout.root.mkdir(parents=True)
    (layout.root / "epoch-seconds").write_text("1.5")
    (layout.root / f"oom-{OOM_TRIAL}").touch()
    killer = _WorkerKiller(layout.trial_dir(KILLED_TRIAL), delay_s=0.8)
    killer.start()
    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lambda line: None)
    killer.join(timeout=1)
    return study, outcome, killer.killed_pid


def _failed_trial_is_recorded(study, number: int, reason: str) -> None:
    """Optuna FAIL, trials.parquet FAIL with ``reason``, MLflow run FAILED with ``reason``."""
    record = optuna.load_study(study_name=study.name, storage=study.storage_url).trials[number]
    assert record.state == TrialState.FAIL and record.values is None
    trials = pd.read_parquet(study.layout.trials_table).set_index("number")
    assert trials.loc[number, "state"] == "FAIL"
    assert reason in trials.loc[number, "fail_reason"], trials.loc[number, "fail_reason"]
    assert not trials.loc[number, "pareto"]
    _, children = _children(study.tracking_uri, study.name)
    run = next(r for r in children if r.data.tags[TRIAL_TAG] == str(number))
    assert run.info.status == "FAILED" and run.data.tags[STATE_TAG] == "failed"
    assert reason in run.data.tags[REASON_TAG], run.data.tags[REASON_TAG]


def test_study_goes_on_past_failing_trials(faulty_study):
    study, outcome, _ = faulty_study
    assert not outcome.interrupted
    records = optuna.load_study(study_name=study.name, storage=study.storage_url).trials
    assert [t.params["training.prune.lr"] for t in records] == [0.01, 1e30, 0.01, 1e30]  # the sampler's draws
    assert [t.state for t in records] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert outcome.trials["state"].tolist() == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]
    assert set(outcome.front["number"]) <= {KILLED_TRIAL, PLAIN_TRIAL}
    _, children = _children(study.tracking_uri, study.name)
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1, 2, 3]
    assert not [r for r in children if r.info.status == "RUNNING"]


def test_diverging_trial_is_recorded_failed_with_its_reason(faulty_study):
    study, _, _ = faulty_study
    _failed_trial_is_recorded(study, DIVERGING_TRIAL, "FloatingPointError: training loss became nan in epoch 0")
    assert not (study.layout.trial_dir(DIVERGING_TRIAL) / "epochs.log").exists()  # no epoch ever finished


def test_out_of_memory_trial_is_recorded_failed_with_its_reason(faulty_study):
    study, _, _ = faulty_study
    _failed_trial_is_recorded(study, OOM_TRIAL, "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")


def test_worker_killed_mid_epoch_resumes_from_its_checkpoint_with_the_same_result(faulty_study, tmp_path):
    study, outcome, killed_pid = faulty_study
    assert killed_pid is not None, "the worker of trial 0 was never killed"
    workdir = study.layout.trial_dir(KILLED_TRIAL)
    assert int((workdir / "pid").read_text()) != killed_pid  # a new worker process finished it
    assert (workdir / "epochs.log").read_text().split() == ["0", "1", "2", "3"]  # no epoch trained twice
    row = outcome.trials.set_index("number").loc[KILLED_TRIAL]
    assert row["state"] == "COMPLETE" and row["retries"] == 1

    # an undisturbed run of the same trial configuration, in this process
    record = optuna.load_study(study_name=study.name, storage=study.storage_url).trials[KILLED_TRIAL]
    config = trial_config(study, record.params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (resources_per_trial.cpu = 1)
    try:
        from tests.search_objective import run_trial

        direct_dir = tmp_path / "direct" / "trials" / "0000"
        direct_dir.mkdir(parents=True)
        direct = run_trial(config, TrialReporter(), direct_dir)
    finally:
        torch.set_num_threads(threads)
    assert record.values == [direct["top1"], direct["macs"]]
    assert record.user_attrs["final_params"] == direct["params"]
    resumed = torch.load(workdir / "checkpoint" / "state.pt")["model"]
    undisturbed = torch.load(direct_dir / "checkpoint" / "state.pt")["model"]
    assert resumed.keys() == undisturbed.keys()
    assert all(torch.equal(resumed[k], undisturbed[k]) for k in resumed)


# ----------------------------------------------------------------------------- two studies at once

def test_two_studies_sharing_storage_and_tracking_store_do_not_cross_talk(tmp_path):
    shared_optuna = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    shared_mlflow = f"sqlite:///{tmp_path / 'shared-mlflow.db'}"
    studies, drivers = {}, {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, low in (("left", 0.2), ("right", 0.6)):
        folder = tmp_path / name
        folder.mkdir()
        studies[name] = load_study(write_study(folder, f"""name: {name}
storage: {shared_optuna}
tracking: {{uri: "{shared_mlflow}"}}
search_space:
  method_config.prune_ratio: {{type: float, low: {low}, high: {low + 0.2}}}
n_trials: 2
concurrency: 1
""" + STUDY))
    try:
        for name in studies:
            drivers[name] = subprocess.Popen([*cli("run", str(tmp_path / name / "study.yaml")), "--cpus", "1"],
                                             cwd=tmp_path / name, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        outputs = {name: driver.communicate(timeout=240)[0] for name, driver in drivers.items()}
    finally:
        for driver in drivers.values():
            _kill_session(driver.pid)
    for name, driver in drivers.items():
        assert driver.returncode == 0, outputs[name]

    assert sorted(optuna.get_all_study_names(shared_optuna)) == ["left", "right"]
    run_ids: dict[str, set[str]] = {}
    for name, low in (("left", 0.2), ("right", 0.6)):
        study = studies[name]
        records = optuna.load_study(study_name=name, storage=shared_optuna).trials
        assert [t.number for t in records] == [0, 1] and all(t.state == TrialState.COMPLETE for t in records)
        ratios = [t.params["method_config.prune_ratio"] for t in records]
        assert all(low <= r <= low + 0.2 for r in ratios), ratios  # only its own space's samples
        trials = pd.read_parquet(study.layout.trials_table)
        assert trials["number"].tolist() == [0, 1]
        assert trials["param.method_config.prune_ratio"].tolist() == ratios
        allocations = pd.read_parquet(study.layout.allocations_table)
        assert allocations.groupby("trial").size().to_dict() == {0: 3, 1: 3}
        final = allocations[allocations["final"].fillna(False).astype(bool)]
        assert final["keep_ratio"].tolist() == [round((1 - r) * 32) / 32 for r in ratios]
        parent, children = _children(shared_mlflow, name)
        assert parent.info.status == "FINISHED"
        assert sorted((r.data.tags[TRIAL_TAG], r.info.run_name) for r in children) == [
            ("0", f"{name}-trial-0000"), ("1", f"{name}-trial-0001")]
        assert all(r.info.status == "FINISHED" for r in children)
        assert [float(c.data.params["method_config.prune_ratio"]) for c in
                sorted(children, key=lambda r: r.data.tags[TRIAL_TAG])] == ratios
        run_ids[name] = set(trials["mlflow_run_id"])
        assert run_ids[name] == {r.info.run_id for r in children}
    assert not run_ids["left"] & run_ids["right"]
