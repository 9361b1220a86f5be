"""The driver's upkeep per trial does not grow with the number of trials.

A real study (local Ray, Optuna on SQLite, MLflow's embedded store, TPE, the small objective of
``tests/search_objective.py``) of a couple of hundred trials runs in this process, with the
cadence of the whole-table rewrites and of the front taken away (what is rewritten at a cadence
costs O(trials) by design, once per cadence, and is written once at the end here). What is left
is what the driver does at every trial's events; the test counts:

- the Parquet rows the driver writes (every table, part and front file goes through
  ``pyarrow.parquet.write_table``), per trial end: the same late in the study as early, where
  a trials table or front rewritten at each trial end would grow with the trials;
- the writes of Ray Tune's experiment state (all trials in one file): none while trials run
  (Ray's own periodic save is pushed past the test), where a save per reported checkpoint
  would write it at every epoch;

and then that the flush at the end leaves every table complete.
"""
from __future__ import annotations

import math
import re

import pandas as pd
import pyarrow.parquet as pq
import pytest

from p3b_search.launch import run_study
from p3b_search.search import progress
from p3b_search.study.loading import load_study
from p3b_search.study.results import read_trials
from tests.search.test_runner import OBJECTIVE, write_study

pytestmark = pytest.mark.slow

N_TRIALS, EARLY, LATE = 180, (20, 60), (140, 180)
STUDY = f"""name: scaling
method: {{name: p3b}}
training: {{prune: {{epochs: 1, lr: 0.01}}, finetune: {{epochs: 1, lr: 0.01}}, batch_size: 64}}
search_space:
  method_config.prune_ratio: {{type: float, low: 0.2, high: 0.9}}
  method_config.alpha: {{type: float, low: 0.0, high: 1.0}}
objectives: [top1, {{name: macs, reference: 3000}}]
sampler: {{name: tpe, seed: 0}}
n_trials: {N_TRIALS}
concurrency: 2
"""


def test_the_driver_writes_as_much_per_trial_after_180_trials_as_after_20(tmp_path, monkeypatch):
    study = load_study(write_study(tmp_path, STUDY))
    monkeypatch.setattr(progress, "TABLES_REFRESH_S", math.inf)
    monkeypatch.setattr(progress, "FRONT_REFRESH_S", math.inf)
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1000000")  # Ray's periodic save: not within the test
    rows = [0]
    real_write = pq.write_table

    def counting_write(table, where, *args, **kwargs):
        rows[0] += table.num_rows
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", counting_write)
    ended: list[tuple[int, int, float]] = []  # (trials ended, rows written so far, experiment state's mtime)

    def on_line(line: str) -> None:
        counts = re.search(r"(\d+)/\d+ done, \d+ running, (\d+) stopped, (\d+) failed", line)
        if counts:
            states = sorted(study.layout.ray_experiment.glob("experiment_state-*.json"))
            ended.append((sum(int(c) for c in counts.groups()), rows[0],
                          states[-1].stat().st_mtime if states else 0.0))

    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=on_line)
    assert not outcome.interrupted

    by_count = {count: written for count, written, _ in ended}  # the last line at each count

    def per_trial(window: tuple[int, int]) -> float:
        first, last = window
        return (by_count[last] - by_count[first]) / (last - first)

    early, late = per_trial(EARLY), per_trial(LATE)
    assert 0 < late <= 1.5 * early + 2, (early, late)
    saves = {mtime for count, _, mtime in ended if 0 < count < N_TRIALS}
    assert len(saves) <= 2, f"Ray's experiment state was written {len(saves)} times while trials ran"
    # Ray's own per-trial logs are not written: Ray would copy them all at every save of its state
    assert not [p.name for p in study.layout.ray_experiment.rglob("*") if p.name in ("result.json", "progress.csv")]

    # the flush at the end: every trial in trials.parquet itself, allocations merged, the front written
    table = pd.read_parquet(study.layout.trials_table)
    assert table["number"].tolist() == list(range(N_TRIALS)) and not (table["state"] == "RUNNING").any()
    pd.testing.assert_frame_equal(read_trials(study.layout), table)
    allocations = pd.read_parquet(study.layout.allocations_table)
    assert allocations.groupby("trial").size().to_dict() == {n: 2 for n in range(N_TRIALS)}
    summary = pd.read_parquet(study.layout.pareto_dir / "summary.parquet")
    assert summary["trials_finished"].item() == (table["state"] == "COMPLETE").sum()
    assert pd.read_parquet(study.layout.pareto_dir / "history.parquet")["number"].nunique() == N_TRIALS
