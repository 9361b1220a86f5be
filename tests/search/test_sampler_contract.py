"""Every registered sampler through the same contract (as Optuna's tests run every storage
through one suite): built from a study file, it samples a conditional two-objective space of
floats, ints and choices within the study's bounds, repeats itself for a seed, and takes the
trials' values back."""
from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from p3b_search.search.samplers import available_samplers, create_sampler
from p3b_search.search.space import suggest_params
from p3b_search.study.loading import load_study

ROUNDS = 12
SPACE = """
search_space:
  method: {type: categorical, choices: [p3b, global-taylor]}
  method_config.prune_ratio: {type: float, low: 0.25, high: 0.75, step: 0.125}
  method_config.prune_steps_update_mask: {type: int, low: 8, high: 32, step: 8}
  method_config.alpha: {type: categorical, choices: [0.5, 0.8]}
"""


def _study(tmp_path: Path, sampler: str, seed: int):
    path = tmp_path / f"{sampler}-{seed}.yaml"
    path.write_text(f"name: contract\nmethod: {{name: p3b}}\nn_trials: {ROUNDS}\n"
                    f"sampler: {{name: {sampler}, seed: {seed}}}\n" + SPACE)
    return load_study(path)


def _run(study) -> list[dict]:
    """``ROUNDS`` ask/tell rounds of a two-objective study (top-1 up, MACs down)."""
    optuna_study = optuna.create_study(directions=["maximize", "minimize"], sampler=create_sampler(study))
    sampled = []
    for _ in range(ROUNDS):
        trial = optuna_study.ask()
        params = suggest_params(trial, study)
        sampled.append(params)
        ratio = params["method_config.prune_ratio"]
        optuna_study.tell(trial, [90.0 - 20 * ratio + (params["method"] == "p3b"), 1e9 * (1 - ratio)])
    assert [t.state for t in optuna_study.trials] == [optuna.trial.TrialState.COMPLETE] * ROUNDS
    return sampled


@pytest.mark.parametrize("name", available_samplers())
def test_every_sampler_samples_the_space_repeatably_for_its_seed(tmp_path, name):
    study = _study(tmp_path, name, seed=7)
    assert isinstance(create_sampler(study), optuna.samplers.BaseSampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        first, again = _run(study), _run(_study(tmp_path, name, seed=7))
        other = _run(_study(tmp_path, name, seed=8))
    for params in first:
        method = params["method"]
        # a method's own knobs only: global-taylor has no alpha
        assert ("method_config.alpha" in params) == (method == "p3b"), params
        for key, value in params.items():
            assert study.search_space[key].contains(value), (key, value)
    assert first == again
    assert first != other
