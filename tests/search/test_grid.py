"""``sampler: grid``: the grid from the search space, one trial per distinct configuration (dense
once per seed, a knob its method lacks ignored), also with trials in flight; seeds as a dimension."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from p3b_search.search.samplers import RayGridSampler, create_sampler
from p3b_search.search.searcher import FrontSafeOptunaSearch, open_optuna_study
from p3b_search.search.space import suggest_params
from p3b_search.search.trainable import FINISHED, TRIAL_NUMBER, objective_key
from p3b_search.study.dimensions import config_key
from p3b_search.study.loading import load_study, with_overrides
from p3b_search.study.messages import StudyError
from p3b_search.study.results import trials_frame
from p3b_search.study.trials import grid_configs, trial_config
from p3b_search.study.trials_table import DUPLICATE_ATTR
from tests.paths import REPO_ROOT

COMPARISON = REPO_ROOT / "studies" / "method_comparison.yaml"
GRID = """name: grid
method: {name: p3b}
search_space:
  method: {type: categorical, choices: [dense, p3b, uniform-magnitude]}
  method_config.prune_ratio: {type: categorical, choices: [0.5, 0.75]}
  method_config.alpha: {type: float, low: 0.0, high: 1.0, step: 0.5}   # a P3B knob
  training.seed: {type: int, low: 0, high: 4, step: 2}
sampler: {name: grid, seed: 3}
"""


def study_from(tmp_path: Path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{text}")
    return load_study(path)


def test_grid_values_of_each_dimension_type(tmp_path):
    study = study_from(tmp_path, GRID + "  \n")
    space = study.search_space
    assert space["method_config.alpha"].grid_values() == [0.0, 0.5, 1.0]
    assert space["training.seed"].grid_values() == [0, 2, 4]
    assert space["method_config.prune_ratio"].grid_values() == [0.5, 0.75]
    fine = study_from(tmp_path, "name: s\nsampler: {name: grid}\nsearch_space:\n"
                                "  method_config.prune_ratio: {type: float, low: 0.1, high: 0.7, step: 0.1}\n")
    assert fine.search_space["method_config.prune_ratio"].grid_values() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def test_grid_holds_each_effective_configuration_once(tmp_path):
    study = study_from(tmp_path, GRID)
    configs = grid_configs(study)
    by_method = Counter(c["method"] for c in configs)
    # dense: no prune ratio, no alpha -> once per seed; uniform-magnitude: no alpha
    assert by_method == {"dense": 3, "p3b": 2 * 3 * 3, "uniform-magnitude": 2 * 3}
    assert all(set(c) == {"method", "training.seed"} for c in configs if c["method"] == "dense")
    assert study.n_trials == len(configs) == 27  # n_trials omitted: the whole grid
    assert trial_config(study, configs[0]).training.seed in (0, 2, 4)


def test_shipped_method_comparison_runs_dense_once_per_seed():
    study = load_study(COMPARISON)
    configs = grid_configs(study)
    methods = study.search_space["method"].choices
    pruned = (len(methods) - 1) * len(study.search_space["method_config.prune_ratio"].choices) * 5
    assert study.sampler.name == "grid" and study.n_trials == len(configs) == pruned + 5
    assert Counter(c["method"] for c in configs)["dense"] == 5
    dense = [trial_config(study, c) for c in configs if c["method"] == "dense"]
    assert {c.method_config["prune_ratio"] for c in dense} == {0.0}
    assert sorted(c.training.seed for c in dense) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("text, field, expected", [
    pytest.param("  method_config.gamma: {type: float, low: 0.1, high: 0.5}\n", "search_space.method_config.gamma",
                 "sampler grid needs the values of every dimension: add step (without log: true) or list them with "
                 "type: categorical", id="float-without-step"),
    pytest.param("n_trials: 30\n", "n_trials",
                 "30 is more than the grid's 27 distinct trial configurations: set n_trials: 27 or fewer (or omit "
                 "it: the whole grid)", id="more-trials-than-grid"),
    pytest.param("  training.batch_size: {type: int, low: 1, high: 1000}\n", "search_space",
                 "the grid has 54000 points (at most 10000): use coarser steps, fewer choices or another sampler",
                 id="grid-too-large"),
])
def test_grid_mistakes_are_one_line(tmp_path, text, field, expected):
    head, _, rest = GRID.partition("sampler:")
    with pytest.raises(StudyError) as error:
        study_from(tmp_path, head + text + "sampler:" + rest if text.startswith("  ") else GRID + text)
    assert str(error.value) == f"{tmp_path / 'study.yaml'}: {field}: {expected}"
    assert "\n" not in str(error.value)


def test_fewer_trials_than_the_grid_run_that_many_points(tmp_path):
    study = study_from(tmp_path, GRID + "n_trials: 4\n")
    assert study.n_trials == 4
    assert with_overrides(study, n_trials=27).n_trials == 27
    with pytest.raises(StudyError, match="n_trials: 28 is more than the grid's 27"):
        with_overrides(study, n_trials=28)


def test_seed_is_a_dimension_through_its_dotted_path(tmp_path):
    study = study_from(tmp_path, "name: s\nsearch_space:\n  training.seed: {type: categorical, choices: [0, 1, 2]}\n")
    assert trial_config(study, {"training.seed": 2}).training.seed == 2
    with pytest.raises(StudyError, match="search_space.training.seed.type: training.seed is an integer: use type: int"):
        study_from(tmp_path, "name: s\nsearch_space:\n  training.seed: {type: float, low: 0, high: 4}\n")


def test_dense_ignores_a_searched_prune_ratio_with_any_sampler(tmp_path):
    study = study_from(tmp_path, GRID.replace("{name: grid, seed: 3}", "{name: random, seed: 0}"))
    from optuna import create_study

    optuna_study = create_study(directions=["maximize", "minimize"], sampler=create_sampler(study))
    for _ in range(30):
        params = suggest_params(optuna_study.ask(), study)
        trial_config(study, params)  # always valid
        if params["method"] == "dense":
            assert set(params) == {"method", "training.seed"}


def _finish(searcher: FrontSafeOptunaSearch, trial_id: str) -> None:
    searcher.on_trial_complete(trial_id, {FINISHED: True, objective_key("top1"): 90.0, objective_key("macs"): 1e6,
                                          "top1": 90.0, "macs": 1e6})


def test_searcher_runs_each_grid_configuration_once_with_trials_in_flight(tmp_path):
    """All trials are asked before any ends (the most a ConcurrencyLimiter ever has in flight):
    still every configuration once; the repeats are told FAIL with ``duplicate_of`` and are no
    rows of the trials table; telling the last grid point does not raise (no ``study.stop()``)."""
    study = study_from(tmp_path, GRID.replace("high: 4, step: 2", "high: 2, step: 2"))  # seeds 0, 2
    optuna_study = open_optuna_study(study)
    searcher = FrontSafeOptunaSearch(study)
    assert isinstance(create_sampler(study), RayGridSampler)
    configs = [searcher.suggest(f"t{i}") for i in range(study.n_trials)]
    asked = [config_key({k: v for k, v in c.items() if k != TRIAL_NUMBER}) for c in configs]
    assert sorted(asked) == sorted(config_key(c) for c in grid_configs(study))
    for i in range(study.n_trials):
        _finish(searcher, f"t{i}")
    trials = optuna_study.get_trials()
    skipped = [t for t in trials if DUPLICATE_ATTR in t.user_attrs]
    assert len(trials) <= 3 * 2 * 3 * 2 and len(skipped) == len(trials) - 18  # repeats skipped, not run
    assert all(t.state == TrialState.FAIL for t in skipped)
    assert all(optuna_study.trials[t.user_attrs[DUPLICATE_ATTR]].params == t.params for t in skipped)
    frame = trials_frame(trials, study.metric_names, study.directions, [0.0, 1e15])  # top1 %, MACs
    assert len(frame) == 18 and (frame["state"] == "COMPLETE").all()
    assert "param.training.seed" in frame.columns


def test_no_reference_trial_is_enqueued_on_the_grid(tmp_path):
    study = study_from(tmp_path, GRID)
    assert study.enqueue_reference  # the default, moot on the grid
    assert open_optuna_study(study).get_trials(states=(TrialState.WAITING,)) == []
