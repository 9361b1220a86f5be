"""The search space as Optuna sees it: distributions, conditional sampling, the reference trial."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from p3b_search.method_specs import method_spec
from p3b_search.search.samplers import available_samplers, create_sampler
from p3b_search.search.space import distributions, reference_params, suggest_params
from p3b_search.study.loading import load_study
from p3b_search.study.trials import trial_config
from tests.paths import REPO_ROOT

SHOOTOUT = REPO_ROOT / "studies" / "method_shootout.yaml"


def study_from(tmp_path: Path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return load_study(path)


def test_distributions_follow_the_schema(tmp_path):
    study = study_from(tmp_path, (
        "name: s\nsearch_space:\n"
        "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8, step: 0.1}\n"
        "  training.prune.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "  method_config.prune_steps_update_mask: {type: int, low: 50, high: 250, step: 50}\n"
        "  method_config.block_params_only: {type: categorical, choices: [true, false]}\n"))
    dists = distributions(study)
    assert dists["method_config.prune_ratio"] == FloatDistribution(0.3, 0.8, step=0.1)
    assert dists["training.prune.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["method_config.prune_steps_update_mask"] == IntDistribution(50, 250, step=50)
    assert dists["method_config.block_params_only"] == CategoricalDistribution((True, False))


def test_conditional_space_samples_only_the_chosen_methods_knobs():
    study = load_study(SHOOTOUT)
    optuna_study = optuna.create_study(directions=["maximize", "minimize"],
                                       sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = optuna_study.ask()
        params = suggest_params(trial, study)
        method = params["method"]
        seen.add(method)
        knobs = set(method_spec(method).config_cls.model_fields)
        assert {k.removeprefix("method_config.") for k in params if k.startswith("method_config.")} <= knobs
        assert ("method_config.alpha" in params) == (method == "p3b")
        assert ("method_config.death_rate" in params) == (method == "s2vite")
        config = trial_config(study, params)  # every sample is a valid trial
        assert config.method == method
        optuna_study.tell(trial, [50.0, 1e6])
    assert seen == set(study.candidate_methods())


def test_reference_trial_is_the_methods_defaults_within_the_space(tmp_path):
    study = study_from(tmp_path, (
        "name: s\nmethod: {name: p3b}\nsearch_space:\n"
        "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}\n"
        "  method_config.alpha: {type: float, low: 0.0, high: 1.0}\n"
        "  method_config.gamma: {type: float, low: 0.3, high: 0.9}\n"        # default 0.2 lies outside
        "  method_config.prune_steps_update_mask: {type: int, low: 10, high: 200, step: 10}\n"
        "  training.prune.lr: {type: float, low: 1.0e-4, high: 1.0e-3}\n"))  # fixed 5e-4 lies inside
    reference = reference_params(study)
    assert reference == {"method_config.prune_ratio": 0.5, "method_config.alpha": 0.5,
                         "method_config.prune_steps_update_mask": 100, "training.prune.lr": 5e-4}
    optuna_study = optuna.create_study(directions=["maximize", "minimize"])
    optuna_study.enqueue_trial(reference)
    params = suggest_params(optuna_study.ask(), study)
    assert {k: params[k] for k in reference} == reference
    assert 0.3 <= params["method_config.gamma"] <= 0.9  # sampled, the default being outside


def test_reference_of_a_method_choice_is_method_name():
    study = load_study(SHOOTOUT)
    reference = reference_params(study)
    assert reference["method"] == "p3b" and reference["method_config.prune_ratio"] == 0.5
    assert "method_config.death_rate" not in reference  # an s2vite knob


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler),
                                       ("gp", optuna.samplers.GPSampler), ("random", optuna.samplers.RandomSampler)])
def test_sampler_by_name(tmp_path, name, cls):
    study = study_from(tmp_path, f"name: s\nsampler: {{name: {name}, seed: 3}}\n")
    assert isinstance(create_sampler(study), cls)


def test_sampler_options_replace_the_defaults_and_a_users_class_is_built_seeded(tmp_path):
    tpe = create_sampler(study_from(tmp_path, "name: s\nsampler: {name: tpe, options: {n_startup_trials: 2}}\n"))
    assert isinstance(tpe, optuna.samplers.TPESampler)
    study = study_from(tmp_path, "name: s\nsampler: {name: 'optuna.samplers:QMCSampler', seed: 3, "
                                 "options: {qmc_type: halton}}\n")
    sampler = create_sampler(study)
    assert type(sampler) is optuna.samplers.QMCSampler
    assert available_samplers() == ["gp", "grid", "nsga2", "random", "tpe"]


def test_seeded_sampler_repeats_its_samples(tmp_path):
    study = study_from(tmp_path, "name: s\nn_trials: 4\nsearch_space:\n"
                                 "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}\n")

    def samples() -> list[float]:
        optuna_study = optuna.create_study(directions=["maximize", "minimize"], sampler=create_sampler(study))
        values = []
        for i in range(4):
            trial = optuna_study.ask()
            values.append(suggest_params(trial, study)["method_config.prune_ratio"])
            optuna_study.tell(trial, [float(i), float(-i)])
        return values

    assert samples() == samples()


def test_residual_mode_is_a_searched_dimension_of_the_gated_methods(tmp_path):
    """``method_config.residual`` is sampled for the methods with gates only, and reaches the trial."""
    study = study_from(tmp_path, (
        "name: s\nmethod: {name: p3b}\nobjectives: [top1, macs]\nsearch_space:\n"
        "  method: {type: categorical, choices: [p3b, global-taylor, dimap]}\n"
        "  method_config.residual: {type: categorical, choices: [per-block, shared]}\n"))
    assert distributions(study)["method_config.residual"] == CategoricalDistribution(("per-block", "shared"))
    optuna_study = optuna.create_study(directions=["maximize", "minimize"],
                                       sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = optuna_study.ask()
        params = suggest_params(trial, study)
        config = trial_config(study, params)
        if params["method"] == "dimap":
            assert "method_config.residual" not in params and "residual" not in config.method_config
        else:
            assert config.method_config["residual"] == params["method_config.residual"]
            seen.add((params["method"], params["method_config.residual"]))
        optuna_study.tell(trial, [50.0, 1e6])
    assert seen == {(m, r) for m in ("p3b", "global-taylor") for r in ("per-block", "shared")}
