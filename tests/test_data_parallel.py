"""A data-parallel trial (workers_per_trial = 2): Ray Train's TorchTrainer under Ray Tune, gloo on CPU.

The objective (``tests/search_objective.py``) trains each rank on its own shard of the data and
decides which hidden units to keep from scores averaged over the ranks
(``p3b_search.distributed.average_across_ranks``, as the pruning methods do): both ranks
must keep the same units, and only rank 0 reports, checkpoints and writes allocation rows.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from p3b_search.search.schema import load_study

STUDY = """name: dp
method: {name: p3b, config: {prune_ratio: 0.5}}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 1, lr: 0.01}, batch_size: 64}
objectives: [top1, {name: macs, reference: 3000}]
n_trials: 1
workers_per_trial: 2
resources_per_trial: {cpu: 0.5}
tracking: {enabled: false}
"""


@pytest.mark.slow
def test_two_worker_trial_takes_one_mask_decision(tmp_path):
    from p3b_search.search.runner import run_study

    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{STUDY}")
    study = load_study(path)
    outcome = run_study(study, objective="tests.search_objective:run_trial", num_cpus=2, printer=lambda line: None)
    assert not outcome.interrupted

    (record,) = optuna.load_study(study_name="dp", storage=study.storage_url).trials
    assert record.state == TrialState.COMPLETE and record.values[1] == 64 * 16 + 16 * 10
    workdir = study.layout.trial_dir(0)
    kept = [(workdir / f"kept-rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(kept[0]) == 16 and kept[0] == kept[1]
    assert (workdir / "epochs.log").read_text().split() == ["0", "1", "2"]  # rank 0 only
    trials = pd.read_parquet(study.layout.trials_table)
    assert trials["state"].tolist() == ["COMPLETE"] and trials.loc[0, "epochs_done"] == 3
    allocations = pd.read_parquet(study.layout.allocations_table)
    assert len(allocations) == 3  # 2 prune epochs + the finalize row, from rank 0 only
    assert Path(study.layout.ray_storage / "train" / "trial-00000").is_dir()
