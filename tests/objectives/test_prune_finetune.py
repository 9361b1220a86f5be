"""objectives.prune_finetune: one trial end to end, resumable at any epoch of either stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from objectives.prune_finetune import run_trial
from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig, TrialConfig
from p3b_search.reporting import TrialReporter
from p3b_search.surgery import ArchSpec

TINY = ModelConfig(name="vit_tiny_patch16_224",
                   overrides=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))


def tiny_trial(method: str = "dense", **method_config) -> TrialConfig:
    return TrialConfig(
        model=TINY, data=DataConfig(kind="digits", max_train_samples=256), method=method,
        method_config=method_config,
        training=TrainingConfig(prune=StageConfig(epochs=2, schedule="constant"),
                                finetune=StageConfig(epochs=2), batch_size=32),
    )


class Interrupt(Exception):
    pass


class InterruptingReporter(TrialReporter):
    """Raises after reporting epoch ``stop_after`` (0-based, counted over both stages)."""

    def __init__(self, stop_after: int):
        super().__init__()
        self.stop_after = stop_after
        self.last_checkpoint: Path | None = None

    def report_epoch(self, metrics, checkpoint_dir=None):
        super().report_epoch(metrics, checkpoint_dir)
        self.last_checkpoint = checkpoint_dir
        if metrics["epoch"] == self.stop_after:
            raise Interrupt


def test_trial_reports_every_epoch_and_saves_a_loadable_model(tmp_path):
    reporter = TrialReporter()
    objectives = run_trial(tiny_trial(), reporter, tmp_path)
    assert [e["epoch"] for e in reporter.epochs] == [0, 1, 2, 3]
    assert [e["stage"] for e in reporter.epochs] == [0, 0, 1, 1]
    assert reporter.final == objectives
    assert set(objectives) >= {"top1", "top5", "params", "kept_fraction", "macs", "nonzero_macs"}
    assert objectives["kept_fraction"] == 1.0  # dense keeps every parameter
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["state"] == "finished" and result["objectives"]["top1"] == objectives["top1"]
    spec = ArchSpec.load(tmp_path / "model" / "arch.json")
    assert spec.extra["preprocessing"]["input_size"] == [3, 16, 16]
    model = spec.build(load_file(tmp_path / "model" / "model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) == objectives["params"]


@pytest.mark.parametrize("method", ["dense", "global-taylor"])
def test_every_epoch_of_both_stages_reports_the_cost(tmp_path, method):
    """``macs``, ``kept_params`` and ``keep_ratio`` at every epoch (what a scheduler ranks a rung
    on); the fine-tune epochs report the pruned model's, the trial's final cost."""
    reporter = TrialReporter()
    objectives = run_trial(tiny_trial(method, **({} if method == "dense" else {"prune_ratio": 0.5})),
                           reporter, tmp_path)
    for epoch in reporter.epochs:
        assert {"macs", "kept_params", "keep_ratio"} <= set(epoch), epoch
    for epoch in reporter.epochs[2:]:  # fine-tune
        assert (epoch["macs"], epoch["kept_params"], epoch["keep_ratio"]) == (
            objectives["macs"], objectives["params"], objectives["kept_fraction"])
    if method == "dense":
        assert all(e["keep_ratio"] == 1.0 and e["macs"] == objectives["macs"] for e in reporter.epochs)
    else:
        assert reporter.epochs[0]["keep_ratio"] > objectives["kept_fraction"]  # the prune stage ramps down


@pytest.mark.parametrize("stop_after", [0, 2])  # inside the prune stage, inside the fine-tune stage
def test_resumed_trial_ends_exactly_like_an_uninterrupted_one(tmp_path, stop_after):
    config = tiny_trial()
    expected = run_trial(config, TrialReporter(), tmp_path / "straight")

    interrupted = InterruptingReporter(stop_after)
    with pytest.raises(Interrupt):
        run_trial(config, interrupted, tmp_path / "broken")
    # resume from a copy, as Ray hands a restored checkpoint to a retried trial
    import shutil
    copy = tmp_path / "restored"
    shutil.copytree(interrupted.last_checkpoint, copy)
    resumed = TrialReporter()
    result = run_trial(config, resumed, tmp_path / "broken", resume_from=copy)
    assert result == expected
    assert resumed.epochs[-1]["epoch"] == 3
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    again = load_file(tmp_path / "broken" / "model" / "model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_bad_method_config_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="prune_ratio"):
        run_trial(tiny_trial(prune_ratio=0.5), TrialReporter(), tmp_path)
    assert not (tmp_path / "checkpoint").exists()
