"""Study files: every mistake is caught before compute, in one line naming the field and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from p3b_search.config import TrialConfig
from p3b_search.method_specs import method_names, method_spec
from p3b_search.study.dimensions import Choice, FloatRange
from p3b_search.study.loading import load_study, with_overrides
from p3b_search.study.messages import StudyError
from p3b_search.study.trials import trial_config
from tests.paths import REPO_ROOT

STUDIES = sorted((REPO_ROOT / "studies").glob("*.yaml"))


def methods() -> str:
    return ", ".join(method_names())


def knobs(method: str) -> str:
    return ", ".join(sorted(method_spec(method).config_cls.model_fields))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


# (study file, expected message after "<path>: "); lists that depend on the registry are built
# from it so a newly registered method does not break the test.
BAD_STUDIES = [
    pytest.param("name: s\nn_trial: 3\n",
                 lambda: "n_trial: unknown key: did you mean n_trials? remove it or use one of compare, concurrency, data, "
                         "dense_reference, early_stopping, enqueue_reference, max_failures, method, model, n_trials, name, objectives, "
                         "output_dir, resources_per_trial, sampler, scheduler, search_space, shared_prefixes, storage, tracking, "
                         "training, workers_per_trial", id="unknown-key"),
    pytest.param("name: s\nsearch_space:\n  method_config.prune_ratio: {type: float, low: 0.3, high: 1.5}\n",
                 lambda: "search_space.method_config.prune_ratio.high: must be < 1 (got 1.5)", id="ratio-above-1"),
    pytest.param("name: s\nmethod: {name: p3bb}\n",
                 lambda: f"method.name: unknown pruning method 'p3bb': did you mean p3b? choose one of {methods()}",
                 id="unknown-method"),
    pytest.param("name: s\nmethod: {name: uniform-magnitude}\nsearch_space:\n"
                 "  method_config.alpha: {type: float, low: 0.1, high: 0.9}\n",
                 lambda: "search_space.method_config.alpha: not a knob of method 'uniform-magnitude' (it belongs to "
                         f"p3b): remove it or use one of {knobs('uniform-magnitude')}", id="knob-of-another-method"),
    pytest.param("name: s\nmethod: {name: dimap, config: {alpha: 0.3}}\n",
                 lambda: "method.config.alpha: not a knob of method 'dimap' (it belongs to p3b): remove it or use one "
                         f"of {knobs('dimap')}", id="fixed-knob-of-another-method"),
    pytest.param("name: s\nsearch_space:\n  training.prune.lrr: {type: float, low: 1.0e-4, high: 1.0e-3}\n",
                 lambda: "search_space.training.prune.lrr: training.prune.lrr is not a field of the trial "
                         "configuration: did you mean lr? use one of training.prune.epochs, training.prune.lr, "
                         "training.prune.min_lr, training.prune.schedule, training.prune.warmup_epochs",
                 id="path-not-in-trial-config"),
    pytest.param("name: s\nsearch_space:\n  training.prune: {type: float, low: 0.1, high: 0.9}\n",
                 lambda: "search_space.training.prune: training.prune is a section, not a value: search one of its "
                         "fields (epochs, lr, min_lr, schedule, warmup_epochs)", id="path-is-a-section"),
    pytest.param("name: s\nsearch_space:\n  training.prune.epochs: {type: int, low: 8, high: 4}\n",
                 lambda: "search_space.training.prune.epochs.low: must be <= high (4) (got 8): swap them",
                 id="low-above-high"),
    pytest.param("name: s\nsearch_space:\n  training.prune.epochs: {type: float, low: 2, high: 8}\n",
                 lambda: "search_space.training.prune.epochs.type: training.prune.epochs is an integer: use type: int",
                 id="float-range-on-int-field"),
    pytest.param("name: s\ntraining: {prune: {epochs: 30}}\nmethod: {name: p3b, config: {prune_finalize_epoch: 25}}\n"
                 "search_space:\n  method_config.prune_start_epoch: {type: int, low: 5, high: 30}\n",
                 lambda: "search_space.method_config.prune_start_epoch.high: gives no valid trial: method_config: "
                         "prune_start_epoch=30 is not before prune_finalize_epoch=25: start pruning earlier or "
                         "finalize later", id="start-after-finalize"),
    pytest.param("name: s\nsearch_space:\n  method_config.prune_ratio: {low: 0.3, high: 0.8}\n",
                 lambda: "search_space.method_config.prune_ratio: needs type: float, int or categorical "
                         "(e.g. {type: float, low: 0.3, high: 0.8})", id="missing-type"),
    pytest.param("name: s\nsearch_space:\n  method_config.prune_ratio: {type: float, low: 0.3, hihg: 0.8}\n",
                 lambda: "search_space.method_config.prune_ratio.hihg: unknown key: did you mean high? remove it or "
                         "use one of high, log, low, step, type", id="typo-in-range"),
    pytest.param("name: s\nsearch_space:\n  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8, step: 0.15}\n",
                 lambda: "search_space.method_config.prune_ratio.high: high - low must be a multiple of step (0.15) "
                         "(got 0.8)", id="step-does-not-divide"),
    pytest.param("name: s\nsearch_space:\n  training.prune.lr: {type: float, low: 0, high: 1.0e-3, log: true}\n",
                 lambda: "search_space.training.prune.lr.low: must be > 0 with log: true (got 0)", id="log-from-zero"),
    pytest.param("name: s\nmethod: {name: p3b, config: {alpha: 0.5}}\nsearch_space:\n"
                 "  method_config.alpha: {type: float, low: 0.1, high: 0.9}\n",
                 lambda: "search_space.method_config.alpha: alpha is also fixed in method.config: remove it from one "
                         "of the two", id="fixed-and-searched"),
    pytest.param("name: s\nsearch_space:\n  method: {type: categorical, choices: [p3b, svitee]}\n",
                 lambda: f"search_space.method.choices[1]: unknown pruning method 'svitee': did you mean svite? "
                         f"choose one of {methods()}", id="unknown-method-choice"),
    pytest.param("name: s\nsearch_space:\n  data.kind: {type: categorical, choices: [digits, mnist]}\n",
                 lambda: "search_space.data.kind.choices[1]: must be one of 'digits', 'glyphs', 'imagefolder', "
                         "'cifar10' or 'cifar100' (got 'mnist')", id="bad-choice-value"),
    pytest.param("name: s\nobjectives: [top1, {name: macs, direction: maximize}]\n",
                 lambda: "objectives[1].direction: macs is always minimized: set minimize or remove direction",
                 id="wrong-direction"),
    pytest.param("name: s\nobjectives: [top1, gflops]\n",
                 lambda: "objectives[1].name: must be one of 'top1', 'top5', 'macs', 'flops', 'params' or 'latency_ms' "
                         "(got 'gflops')", id="unknown-objective"),
    pytest.param("name: s\ndense_reference: {top1: 120}\n",
                 lambda: "dense_reference.top1: must be <= 100 (got 120)", id="dense-top1-above-100"),
    pytest.param("name: s\ndense_reference: {top_1: 90}\n",
                 lambda: "dense_reference.top_1: unknown key: did you mean top1? remove it or use one of top1, top5",
                 id="dense-reference-typo"),
    pytest.param("name: s\nobjectives: [top1, latency_ms]\n",
                 lambda: "objectives[1].reference: latency_ms needs a reference (the milliseconds a useful model "
                         "must beat, e.g. the dense model's)", id="latency-without-reference"),
    pytest.param("name: s\ndata: {kind: imagenet}\n",
                 lambda: "data.kind: must be one of 'digits', 'glyphs', 'imagefolder', 'cifar10' or 'cifar100' "
                         "(got 'imagenet')", id="bad-data-kind"),
    pytest.param("name: s\ntraining: {prune: {epochs: -1}}\n",
                 lambda: "training.prune.epochs: must be >= 0 (got -1)", id="nested-bound"),
    pytest.param("name: s\nresources_per_trial: {cpu: 4, gpu: 4}\n",
                 lambda: "resources_per_trial.gpu: is per worker: set gpu: 1 and workers_per_trial: 4 for a "
                         "data-parallel trial (got 4)", id="gpus-per-trial"),
    pytest.param("name: s\nsearch_space:\n  method: {type: categorical, choices: [p3b, global-taylor]}\n"
                 "compare: {primary: \"p3b:global-tailor\"}\n",
                 lambda: "compare.primary: 'global-tailor' is not a method of this study: did you mean global-taylor? "
                         "use one of p3b, global-taylor", id="compare-primary-not-in-study"),
    pytest.param("name: s\ncompare: {equivalence: [\"p3b:p3b\", p3b]}\n",
                 lambda: "compare.equivalence[1]: must be two method names as A:B, e.g. p3b:global-taylor (got 'p3b')",
                 id="compare-equivalence-not-a-pair"),
    pytest.param("name: s\ncompare: {margin: -1}\n", lambda: "compare.margin: must be > 0 (got -1)",
                 id="compare-margin-not-positive"),
    pytest.param("name: my study\n",
                 lambda: "name: must be a folder name (letters, digits, '_', '-', '.') (got 'my study')",
                 id="name-with-space"),
    # successive halving: rungs are epoch counts over both stages (here 4 + 2)
    pytest.param("name: s\ntraining: {prune: {epochs: 4}, finetune: {epochs: 2}}\n"
                 "scheduler: {name: successive-halving, rungs: [4, 6]}\n",
                 lambda: "scheduler.rungs[1]: must be below the 6 epochs a trial trains (training.prune.epochs + "
                         "training.finetune.epochs): a rung at the last epoch decides nothing; lower it (got 6)",
                 id="rung-at-the-last-epoch"),
    pytest.param("name: s\ntraining: {prune: {epochs: 4}, finetune: {epochs: 4}}\n"
                 "search_space:\n  training.finetune.epochs: {type: int, low: 1, high: 4}\n"
                 "scheduler: {name: successive-halving, rungs: [5]}\n",
                 lambda: "scheduler.rungs[0]: must be below the 5 epochs a trial trains at the fewest "
                         "(training.prune.epochs + training.finetune.epochs): a rung at the last epoch decides "
                         "nothing; lower it (got 5)", id="rung-past-the-shortest-trial"),
    pytest.param("name: s\nscheduler: {name: successive-halving, rungs: [0]}\n",
                 lambda: "scheduler.rungs[0]: must be >= 1: a rung counts the epochs trained over both stages, 1 = "
                         "after the first epoch (got 0)", id="rung-zero"),
    pytest.param("name: s\nscheduler: {name: successive-halving, rungs: [4, 2, 4]}\n",
                 lambda: "scheduler.rungs[2]: 4 is listed twice: list each rung once", id="rung-twice"),
    pytest.param("name: s\nscheduler: {name: successive-halving, rungs: [4], eta: 1}\n",
                 lambda: "scheduler.eta: must be >= 2: the top 1/eta of each rung continue, e.g. eta: 3 keeps a "
                         "third (got 1)", id="eta-below-2"),
    pytest.param("name: s\nobjectives: [top1, {name: latency_ms, reference: 5}]\n"
                 "scheduler: {name: successive-halving, rungs: [4]}\n",
                 lambda: "scheduler: successive halving ranks each rung on accuracy and cost, and objectives hold no "
                         "cost that every epoch reports: add macs, flops or params to objectives (got top1, "
                         "latency_ms)", id="scheduler-without-cost"),
    pytest.param("name: s\nearly_stopping: {enabled: true}\nscheduler: {name: successive-halving, rungs: [4]}\n",
                 lambda: "scheduler: successive halving and early_stopping both stop trials: set early_stopping: "
                         "{enabled: false} or remove scheduler", id="scheduler-and-early-stopping"),
    pytest.param("name: s\nscheduler: {name: asha, rungs: [4]}\n",
                 lambda: "scheduler.name: must be one of 'successive-halving' (got 'asha')", id="unknown-scheduler"),
    pytest.param("method: {name: p3b}\n", lambda: "name: required: add it", id="missing-name"),
    pytest.param("", lambda: "the study file is empty: start from studies/quickstart.yaml", id="empty-file"),
]


@pytest.mark.parametrize("text, expected", BAD_STUDIES)
def test_bad_study_file_gives_one_exact_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert str(error.value) == f"{path}: {expected()}"
    assert "\n" not in str(error.value)


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "name: s\nmethod: {name: p3b\n")
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert str(error.value) == f"{path}:3:1: invalid YAML: expected ',' or '}}', but got '<stream end>'"


def test_minimal_study_gets_the_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study(write(tmp_path, "name: s\n"))
    assert study.metric_names == ["top1", "macs"] and study.directions == ["maximize", "minimize"]
    assert study.sampler.name == "tpe" and study.method.name == "p3b"
    assert study.output_dir == tmp_path / "runs"  # resolved against the current directory
    assert study.storage_url == f"sqlite:///{tmp_path / 'runs' / 's' / 'optuna.db'}"
    assert study.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 's' / 'mlflow.db'}"


def test_trial_config_merges_sampled_params_and_validates_with_the_method(tmp_path):
    study = load_study(write(tmp_path, (
        "name: s\nmethod: {name: p3b, config: {prune_finalize_epoch: 8}}\n"
        "training: {prune: {epochs: 8}}\n"
        "search_space:\n"
        "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}\n"
        "  method_config.prune_start_epoch: {type: int, low: 0, high: 6}\n"
        "  training.prune.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n")))
    config = trial_config(study, {"method_config.prune_ratio": 0.6, "method_config.prune_start_epoch": 2,
                                  "training.prune.lr": 3e-4})
    assert isinstance(config, TrialConfig)
    assert config.method == "p3b" and config.training.prune.lr == 3e-4 and config.training.prune.epochs == 8
    assert config.method_config["prune_ratio"] == 0.6 and config.method_config["prune_finalize_epoch"] == 8
    assert config.method_config["alpha"] == 0.5  # the method's defaults are filled in
    with pytest.raises(StudyError) as error:
        trial_config(study, {"method_config.prune_start_epoch": 9})
    assert str(error.value) == (
        f"{study.source}: trial with method_config.prune_start_epoch=9: method_config: prune_start_epoch=9 is not "
        "before prune_finalize_epoch=8: start pruning earlier or finalize later")


def test_method_as_a_choice_samples_each_methods_own_knobs(tmp_path):
    study = load_study(write(tmp_path, (
        "name: s\nmethod: {name: p3b, config: {prune_start_epoch: 1}}\n"
        "search_space:\n"
        "  method: {type: categorical, choices: [p3b, uniform-magnitude, dimap]}\n"
        "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}\n"
        "  method_config.alpha: {type: float, low: 0.2, high: 0.8}\n")))
    assert study.candidate_methods() == ["p3b", "uniform-magnitude", "dimap"]
    dimap = trial_config(study, {"method": "dimap", "method_config.prune_ratio": 0.4})
    assert dimap.method == "dimap" and "prune_start_epoch" not in dimap.method_config  # not a dimap knob
    magnitude = trial_config(study, {"method": "uniform-magnitude", "method_config.prune_ratio": 0.4})
    assert magnitude.method_config["prune_start_epoch"] == 1
    with pytest.raises(StudyError, match="method_config.alpha: unknown key"):
        trial_config(study, {"method": "dimap", "method_config.alpha": 0.5})


def test_with_overrides_revalidates(tmp_path):
    study = load_study(write(tmp_path, "name: s\n"))
    assert with_overrides(study, n_trials=3).n_trials == 3
    with pytest.raises(StudyError, match="n_trials: must be >= 1"):
        with_overrides(study, n_trials=0)


def test_search_space_types_parse(tmp_path):
    study = load_study(write(tmp_path, (
        "name: s\nsearch_space:\n"
        "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8, step: 0.1}\n"
        "  method_config.block_params_only: {type: categorical, choices: [true, false]}\n")))
    assert isinstance(study.search_space["method_config.prune_ratio"], FloatRange)
    assert isinstance(study.search_space["method_config.block_params_only"], Choice)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_loads(path):
    study = load_study(path)
    assert study.name == path.stem
    assert study.n_trials >= 1


def test_studies_are_shipped():
    assert {p.stem for p in STUDIES} >= {"quickstart", "p3b_deit_small_cifar100", "deit_tiny_inat19",
                                        "deit_small_food101", "swin_t_dimap", "method_shootout"}
