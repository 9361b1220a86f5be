"""A data-parallel trial through the whole stack: ``workers_per_trial: 2`` runs the real objective
(P3B prune stage -> shrink -> fine-tune) as Ray Train's TorchTrainer under Ray Tune, gloo on CPU.

The training loop's data parallelism itself (same mask decisions on both ranks, 2 ranks of
batch B = 1 process of batch 2B) is tested without Ray in ``test_distributed.py``; here: the
trial completes, only rank 0 reports, checkpoints, writes allocation rows and the model, and
the saved model loads and reproduces the reported accuracy.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from p3b_search.config import DataConfig
from p3b_search.data import build_loaders
from p3b_search.export.load import load_pruned
from p3b_search.study.loading import load_study
from p3b_search.training.loop import evaluate

STUDY = """name: dp
model:
  name: vit_tiny_patch16_224
  overrides: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}
data: {kind: digits, max_train_samples: 256}
method:
  name: p3b
  config: {prune_ratio: 0.5, prune_start_epoch: 0, prune_sparse_epoch: 1, prune_steps_update_mask: 2}
training: {prune: {epochs: 2, lr: 0.05}, finetune: {epochs: 1, lr: 0.05}, batch_size: 32, device: cpu}
objectives: [top1, macs]
n_trials: 1
workers_per_trial: 2
resources_per_trial: {cpu: 0.5}
tracking: {enabled: false}
"""


@pytest.mark.slow
def test_two_worker_p3b_trial_completes_with_rank_0_writing_once(tmp_path):
    from p3b_search.launch import run_study

    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{STUDY}")
    study = load_study(path)
    outcome = run_study(study, num_cpus=2, printer=lambda line: None)
    assert not outcome.interrupted

    (record,) = optuna.load_study(study_name="dp", storage=study.storage_url).trials
    assert record.state == TrialState.COMPLETE, record.user_attrs
    trials = pd.read_parquet(study.layout.trials_table)
    assert trials["state"].tolist() == ["COMPLETE"] and trials.loc[0, "epochs_done"] == 3
    allocations = pd.read_parquet(study.layout.allocations_table)
    assert len(allocations) and not allocations.duplicated(["step", "sub_block"]).any()  # rank 0's rows, once
    assert Path(study.layout.ray_storage / "train" / "trial-00000").is_dir()

    model = load_pruned(study.layout.trial_dir(0) / "model")
    _, val, _ = build_loaders(DataConfig(kind="digits"), model, 32, seed=0)
    assert evaluate(model, val)["top1"] == pytest.approx(record.values[0], abs=1e-6)
