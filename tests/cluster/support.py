"""What the cluster tests share: the study file, the driver's command line, and what a finished
study left in Optuna, Parquet and MLflow."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from p3b_search.credentials import resolve_url
from p3b_search.search.trainable import RAY_NODE_ID
from p3b_search.study.loading import load_study
from p3b_search.study.results import read_trials
from p3b_search.study.sections import StudyConfig
from p3b_search.tracking.client import PARETO_TAG, TRIAL_TAG
from tests.driver_kill import killing
from tests.search.test_cluster import _env as cluster_env
from tests.search.test_faults import STUDY, _children
from tests.search.test_runner import _cli as cli
from tests.search.test_runner import write_study

STUDY_TIMEOUT_S = 300


def write_cluster_study(folder: Path, name: str, storage: str, tracking_uri: str, n_trials: int = 4,
                        ratios: tuple[float, float] = (0.2, 0.9), epoch_seconds: float = 0.0,
                        sampler: str = "random") -> StudyConfig:
    """A study of ``n_trials`` two at a time, Optuna in ``storage``, MLflow at ``tracking_uri``,
    sampled by ``sampler`` (seed 0); each epoch sleeps ``epoch_seconds`` (so trials overlap, or a
    fault lands mid-trial)."""
    low, high = ratios
    study = load_study(write_study(folder, f"""name: {name}
storage: {storage}
tracking: {{uri: "{tracking_uri}"}}
search_space:
  method_config.prune_ratio: {{type: float, low: {low}, high: {high}}}
sampler: {{name: {sampler}, seed: 0}}
n_trials: {n_trials}
concurrency: 2
""" + STUDY))
    study.layout.root.mkdir(parents=True)
    if epoch_seconds:
        (study.layout.root / "epoch-seconds").write_text(str(epoch_seconds))
    return study


def start_driver(folder: Path, address: str, *arguments: str, command: str = "run",
                 kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    """``search.py COMMAND <folder>/study.yaml --address <address>`` in a session of its own (for
    ``resume``, give the study folder as the only argument); ``kill_at``: (moment, trial) at
    which the driver SIGKILLs itself (see ``tests/driver_kill.py``)."""
    search = cli(command, *(arguments or (str(folder / "study.yaml"),)), "--address", address)
    if kill_at is not None:
        search = killing(search, *kill_at)
    return subprocess.Popen(search, cwd=folder, env=cluster_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_rows(study: StudyConfig, condition, driver: subprocess.Popen,
                  timeout_s: float = STUDY_TIMEOUT_S) -> pd.DataFrame:
    """The trials table once ``condition(frame)`` holds (fails if the driver ends first). Read as
    ``status`` reads it (:func:`~p3b_search.study.results.read_trials`: ``trials.parquet`` and the
    row updates written since), so a running trial's row is at most seconds old."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended early:\n" + driver.stdout.read()
        if study.layout.trials_table.exists():
            frame = read_trials(study.layout)
            if condition(frame):
                return frame
        time.sleep(0.2)
    raise AssertionError("the study did not reach the expected state in time")


@dataclass
class Recorded:
    """What a finished study left: Optuna's trials, the trials table and MLflow's child runs by
    trial number."""

    optuna_trials: list[optuna.trial.FrozenTrial]
    optuna_front: set[int]  # numbers of Optuna's best trials
    table: pd.DataFrame
    runs: dict[int, object]
    parent: object


def recorded(study: StudyConfig) -> Recorded:
    """Optuna, Parquet and MLflow records of ``study``; each trial number once in each."""
    optuna_study = optuna.load_study(study_name=study.name, storage=resolve_url(study.storage_url, "storage"))
    table = pd.read_parquet(study.layout.trials_table)
    parent, children = _children(resolve_url(study.tracking_uri, "tracking.uri"), study.name)
    numbers = [int(run.data.tags[TRIAL_TAG]) for run in children]
    assert len(numbers) == len(set(numbers)), f"an MLflow run per trial expected, got trials {sorted(numbers)}"
    return Recorded(optuna_study.trials, {t.number for t in optuna_study.best_trials}, table, {int(run.data.tags[TRIAL_TAG]): run for run in children}, parent)


def assert_complete_once(records: Recorded, n_trials: int) -> None:
    """Trials 0..n-1, each COMPLETE once in Optuna, Parquet and MLflow (run FINISHED, with the
    same objective values and node)."""
    numbers = list(range(n_trials))
    assert [t.number for t in records.optuna_trials] == numbers
    assert [t.state for t in records.optuna_trials] == [TrialState.COMPLETE] * n_trials
    assert records.table["number"].tolist() == numbers
    assert records.table["state"].tolist() == ["COMPLETE"] * n_trials
    assert sorted(records.runs) == numbers
    for trial, (_, row) in zip(records.optuna_trials, records.table.iterrows()):
        run = records.runs[trial.number]
        assert run.info.status == "FINISHED", (trial.number, run.info.status, run.data.tags)
        assert [row["top1"], row["macs"]] == trial.values
        assert [run.data.metrics["final/top1"], run.data.metrics["final/macs"]] == trial.values
        assert run.data.tags[RAY_NODE_ID] == row[RAY_NODE_ID]


def assert_fronts_agree(records: Recorded) -> None:
    """The front in Optuna (best trials), the trials table (``pareto``) and MLflow (``tags.pareto``)."""
    optuna_front = records.optuna_front
    table_front = set(records.table.loc[records.table["pareto"], "number"])
    mlflow_front = {number for number, run in records.runs.items() if run.data.tags.get(PARETO_TAG) == "true"}
    assert optuna_front == table_front == mlflow_front, (optuna_front, table_front, mlflow_front)
    assert optuna_front

