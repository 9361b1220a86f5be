"""The real-study evidence of issue 22 (``benchmarks/search_evidence.py``): the arms it builds
from a study file, and its verdicts on hand-made runs whose answer is known."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest

from benchmarks.search_evidence import arm_study, hypervolume_at, markdown
from p3b_search.search.replay import LADDER, PAPER_RECIPE
from p3b_search.study.loading import load_study
from tests.paths import REPO_ROOT

STUDY = REPO_ROOT / "studies" / "search_evidence.yaml"


def test_arms_differ_only_in_what_they_compare() -> None:
    base = load_study(STUDY)
    default, full, reference = (arm_study(base, arm, 2, 12) for arm in ("default", "full", "reference"))
    assert default.early_stopping.enabled and default.shared_prefixes
    assert not full.early_stopping.enabled and full.scheduler is None and not full.shared_prefixes
    assert (default.sampler.seed, default.training.seed, full.sampler.seed) == (2, 2, 2)
    assert default.search_space == full.search_space == base.search_space
    assert len({default.name, full.name, reference.name}) == 3
    # the reference: the paper's knobs fixed, a grid of the ladder x 3 training seeds = 12 trials
    assert reference.method.name == PAPER_RECIPE["method"]
    assert all(reference.method.config[key.removeprefix("method_config.")] == value
               for key, value in PAPER_RECIPE.items() if key != "method")
    grid = [reference.search_space[k].choices for k in ("method_config.prune_ratio", "training.seed")]
    assert tuple(grid[0]) == LADDER and len(list(itertools.product(*grid))) == reference.n_trials == 12
    assert reference.scheduler is None and not reference.shared_prefixes and not reference.early_stopping.enabled


def test_reference_trials_must_fill_the_ladder() -> None:
    with pytest.raises(SystemExit, match="multiple of 4"):
        arm_study(load_study(STUDY), "reference", 0, 10)


def history(seed: int, arm: str, spent: list[int], hv: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"seed": seed, "arm": arm, "trial_epochs": spent, "hypervolume_normalized": hv})


def test_verdicts_on_runs_with_known_answers() -> None:
    runs, histories = [], []
    for seed in range(4):
        wobble = 0.001 * (seed % 2)  # default within 0.002 of full: equivalent within 0.01
        rows = {"default": (60, 0.800 + wobble), "full": (144, 0.801), "reference": (72, 0.700)}
        for arm, (epochs, hv) in rows.items():
            runs.append({"seed": seed, "arm": arm, "trials": 12, "stopped": 0, "trial_epochs": epochs,
                         "trial_epochs_shared": 0, "hypervolume_normalized": hv})
        histories.append(history(seed, "reference", [24, 48, 72], [0.5, 0.6 + 0.01 * seed, 0.7]))
    text = markdown("s", pd.DataFrame(runs), pd.concat(histories), 0.01, "cmd")
    assert "equivalence within ±0.01" in text and ", equivalent." in text
    assert "**met**" in text and "41.7%" in text  # 60 / 144 trial-epochs
    # at 60 trial-epochs the reference had ended 2 trials: 0.60, 0.61, 0.62, 0.63
    assert "0: 0.6000, 1: 0.6100, 2: 0.6200, 3: 0.6300" in text and "(separated)" in text
    assert "Not at equal compute" not in text  # every reference spent 72 >= 60 trial-epochs
    runs[0]["trial_epochs"] = 100  # seed 0's default spent more than its reference could
    text = markdown("s", pd.DataFrame(runs), pd.concat(histories), 0.01, "cmd")
    assert "Not at equal compute for seed 0 (72 of 100)" in text


def test_hypervolume_before_any_trial_ended_is_zero() -> None:
    assert hypervolume_at(history(0, "r", [6, 12], [0.3, 0.4]), 5) == 0.0
    assert hypervolume_at(history(0, "r", [6, 12], [0.3, 0.4]), 12) == 0.4


@pytest.mark.slow
def test_history_of_a_finished_study(tmp_path) -> None:
    """``history_of`` on a real finished study (the quickstart's space, the test objective, 3
    trials): one row per ended trial, its hypervolume normalised by the study's dense top-1 (100 %
    here: the test objective's MLP beats the quickstart's dense ViT)."""
    from benchmarks.search_evidence import history_of
    from p3b_search.launch import run_study
    from p3b_search.study.loading import with_overrides

    study = with_overrides(load_study(REPO_ROOT / "studies" / "quickstart.yaml"), n_trials=3,
                          output_dir=str(tmp_path), tracking={"enabled": False}, dense_reference={"top1": 100.0})
    run_study(study, objective="tests.search_objective:run_trial", num_cpus=2, printer=lambda line: None)
    history = history_of(study)
    assert len(history) == 3
    assert history["hypervolume_normalized"].between(0, 1).all() and history["hypervolume_normalized"].iloc[-1] > 0
    assert history["trial_epochs"].is_monotonic_increasing
    with pytest.raises(SystemExit, match="dense_reference.top1"):
        history_of(with_overrides(study, dense_reference={}))
