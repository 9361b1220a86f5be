"""Bad input, as a user meets it: study files, data folders, weights files, CLI arguments and
export picks. Each case checks the exact one-line error and the exit status, and that nothing
was started or left behind (no study folder, no Optuna or MLflow store, no Ray, no export folder).

Every case calls ``search.main(argv)`` in this process: what ``python search.py ...`` runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import search
from p3b_search.method_specs import method_names, method_spec
from p3b_search.study.sections import StudyConfig
from tests.test_search_cli import study_folder  # noqa: F401  (fixture: a study folder with 3 trials)

ROOT = Path(__file__).parent.parent
HEAD = "name: s\noutput_dir: {tmp}/runs\n"
TIMM_VIT = "model: {{name: vit_tiny_patch16_224, weights: {weights}}}\n"
SAFETENSORS_TRUNCATED = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"  # header says 16 bytes, file ends early


def _keys() -> str:
    return ", ".join(sorted(StudyConfig.model_fields))


# (files to create under tmp: path -> text | bytes | None for a folder; argv; expected stderr after
# "error: "). "{tmp}" stands for the test's folder in all three.
STUDY_CASES = [
    pytest.param({"s.yaml": HEAD + "n_trial: 3\n"}, ["run", "{tmp}/s.yaml"],
                 lambda: "{tmp}/s.yaml: n_trial: unknown key: did you mean n_trials? remove it or use one of "
                         + _keys(), id="study-unknown-key"),
    pytest.param({"s.yaml": HEAD + "n_trials: many\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: n_trials: must be a whole number (got 'many')", id="study-bad-type"),
    pytest.param({"s.yaml": HEAD + "method: {name: p3bb}\n"}, ["run", "{tmp}/s.yaml"],
                 lambda: "{tmp}/s.yaml: method.name: unknown pruning method 'p3bb': did you mean p3b? choose one of "
                         + ", ".join(method_names()), id="study-unknown-method"),
    pytest.param({"s.yaml": HEAD + "search_space:\n  method_config.prune_ratio: {type: float, low: 0.8, high: 0.3}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: search_space.method_config.prune_ratio.low: must be <= high (0.3) (got 0.8): swap them",
                 id="study-bad-range"),
    pytest.param({"s.yaml": HEAD + "early_stopping: {enabled: true, stages: [warmup]}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: early_stopping.stages[0]: must be one of 'prune' or 'finetune' (got 'warmup')",
                 id="early-stopping-unknown-stage"),
    pytest.param({"s.yaml": HEAD + "training: {prune: {epochs: 2}, finetune: {epochs: 2}}\n"
                            "scheduler: {name: successive-halving, rungs: [2, 4], eta: 3}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: scheduler.rungs[1]: must be below the 4 epochs a trial trains (training.prune.epochs "
                 "+ training.finetune.epochs): a rung at the last epoch decides nothing; lower it (got 4)",
                 id="scheduler-rung-past-the-epochs"),
    pytest.param({"s.yaml": HEAD + "scheduler: {name: successive-halving, rungs: [2], eta: 1}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: scheduler.eta: must be >= 2: the top 1/eta of each rung continue, e.g. eta: 3 keeps a "
                 "third (got 1)", id="scheduler-eta-below-2"),
    pytest.param({"s.yaml": HEAD + "objectives: [top1]\nscheduler: {name: successive-halving, rungs: [2]}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: scheduler: successive halving ranks each rung on accuracy and cost, and objectives "
                 "hold no cost that every epoch reports: add macs, flops or params to objectives (got top1)",
                 id="scheduler-without-cost-objective"),
    pytest.param({"s.yaml": HEAD + "method: {name: p3b, config: {prune_steps_update_mask: 2, aux_every: 3}}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: method.config: aux_every=3 exceeds prune_steps_update_mask=2: a window would measure "
                 "no benefit; lower aux_every or update the masks less often", id="p3b-aux-every-beyond-update"),
    pytest.param({"s.yaml": HEAD + "method: {name: p3b, config: {residual: both}}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: method.config.residual: must be one of 'per-block' or 'shared' (got 'both')",
                 id="residual-unknown-mode"),
    pytest.param({"s.yaml": HEAD + "method: {name: dimap, config: {residual: shared}}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: method.config.residual: not a knob of method 'dimap' (it belongs to global-taylor, "
                 "p3b, uniform-magnitude): remove it or use one of mlp_prune_ratio, prj_prune_ratio, prune_ratio, "
                 "qkv_prune_ratio", id="residual-on-a-method-without-gates"),
    pytest.param({"s.yaml": HEAD + "method: {name: svite}\nsearch_space:\n"
                            "  method_config.residual: {type: categorical, choices: [per-block, shared]}\n"},
                 ["run", "{tmp}/s.yaml"],
                 lambda: "{tmp}/s.yaml: search_space.method_config.residual: not a knob of method 'svite' (it belongs "
                         "to global-taylor, p3b, uniform-magnitude): remove it or use one of "
                         + ", ".join(sorted(method_spec("svite").config_cls.model_fields)),
                 id="residual-searched-for-a-method-without-gates"),
    pytest.param({"s.yaml": HEAD + "n_trials: [\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml:4:1: invalid YAML: expected the node content, but found '<stream end>'",
                 id="study-invalid-yaml"),
    pytest.param({"s.yaml": ""}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: the study file is empty: start from studies/quickstart.yaml", id="study-empty"),
    pytest.param({}, ["run", "{tmp}/missing.yaml"],
                 "{tmp}/missing.yaml: cannot read the study file (No such file or directory)", id="study-missing"),
    pytest.param({"s.yaml": HEAD + "model: {name: vit_tiny_patch16_2244}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: model.name: 'vit_tiny_patch16_2244' is not a timm model: pick one from "
                 "timm.list_models()", id="study-unknown-model"),
    pytest.param({"s.yaml": HEAD + "resources_per_trial: {cpu: 3}\n"}, ["run", "{tmp}/s.yaml", "--cpus", "2"],
                 "{tmp}/s.yaml: resources_per_trial.cpu: a trial needs 3 CPUs, local Ray has 2: lower it (or join "
                 "a cluster with --address)", id="study-too-many-cpus"),
    pytest.param({"s.yaml": HEAD}, ["run", "{tmp}/s.yaml", "--address", "127.0.0.1:1"],
                 "--address 127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused): start the head node "
                 "with `ray start --head --port 1`, or fix --address", id="cli-address-unreachable"),
    pytest.param({"s.yaml": HEAD}, ["run", "{tmp}/s.yaml", "--address", "head-node"],
                 "--address head-node: expected HOST:PORT (the head's GCS port, 6379 by default), ray://HOST:10001 "
                 "or auto", id="cli-address-malformed"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: tpee}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: sampler.name: unknown sampler 'tpee': did you mean tpe? choose one of gp, grid, "
                 "nsga2, random, tpe, or give module:Class of an optuna.samplers.BaseSampler subclass",
                 id="sampler-unknown-name"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: 'collections:OrderedDict'}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: sampler.name: collections:OrderedDict is not a subclass of "
                 "optuna.samplers.BaseSampler: give module:Class of an optuna.samplers.BaseSampler subclass",
                 id="sampler-class-not-a-sampler"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: 'no_such_module:Sampler'}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: sampler.name: cannot import 'no_such_module' (No module named 'no_such_module'): "
                 "give module:Class of an optuna.samplers.BaseSampler subclass", id="sampler-module-missing"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: random, options: {n_startup: 3}}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: sampler.options: sampler random refuses {'n_startup': 3} (RandomSampler.__init__() "
                 "got an unexpected keyword argument 'n_startup'): fix or remove the options",
                 id="sampler-options-refused"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: grid}\nsearch_space:\n"
                            "  training.seed: {type: categorical, choices: [0, 1, 2]}\n"},
                 ["run", "{tmp}/s.yaml", "--trials", "4"],
                 "{tmp}/s.yaml: n_trials: 4 is more than the grid's 3 distinct trial configurations: set n_trials: 3 "
                 "or fewer (or omit it: the whole grid)", id="cli-trials-beyond-grid"),
    pytest.param({"s.yaml": HEAD + "sampler: {name: grid}\nsearch_space:\n"
                            "  method_config.alpha: {type: float, low: 0.0, high: 1.0}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: search_space.method_config.alpha: sampler grid needs the values of every dimension: "
                 "add step (without log: true) or list them with type: categorical", id="study-grid-float-without-step"),
    # rules across fields, checked when the study loads (not inside a trial)
    pytest.param({"s.yaml": HEAD + "training: {prune: {epochs: 2, lr: 0.001, min_lr: 0.01}}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: training.prune.min_lr: must be <= training.prune.lr (0.001) (got 0.01): lower min_lr "
                 "or raise lr", id="study-min-lr-above-lr"),
    pytest.param({"s.yaml": HEAD + "training: {finetune: {epochs: 2, lr: 0.001, min_lr: 0.01}}\nsearch_space:\n"
                            "  method_config.prune_ratio: {type: float, low: 0.3, high: 0.6}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: training.finetune.min_lr: must be <= training.finetune.lr (0.001) (got 0.01): lower "
                 "min_lr or raise lr", id="study-min-lr-above-lr-beside-a-search-space"),
    pytest.param({"s.yaml": HEAD + "training: {prune: {epochs: 2}}\n"
                            "method: {name: p3b, config: {prune_finalize_epoch: 3}}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: method.config.prune_finalize_epoch: must be <= training.prune.epochs (2) (got 3): "
                 "lower it or train the prune stage longer", id="study-finalize-after-prune-stage"),
    pytest.param({"s.yaml": HEAD + "training: {prune: {epochs: 2}}\nsearch_space:\n"
                            "  method_config.prune_finalize_epoch: {type: float, low: 1, high: 4}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: search_space.method_config.prune_finalize_epoch.high: must be <= training.prune.epochs "
                 "(2) (got 4): lower it or train the prune stage longer", id="study-searched-finalize-after-prune-stage"),
    pytest.param({"s.yaml": HEAD + "shared_prefixes: true\nmethod: {name: dimap}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: shared_prefixes: nothing to share: dimap prunes from step 0: let trials start pruning "
                 "later (prune_start_epoch >= 1; above 1 for uniform-magnitude) or remove shared_prefixes",
                 id="study-shared-prefixes-nothing-to-share"),
    # data folders
    pytest.param({"s.yaml": HEAD + "data: {kind: imagefolder}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: data: data.root is required for data.kind='imagefolder': set it to the data set "
                 "folder", id="data-root-missing"),
    pytest.param({"s.yaml": HEAD + "data: {kind: imagefolder, root: {tmp}/food}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: data.root: folder {tmp}/food does not exist: point it at the data set",
                 id="data-folder-nonexistent"),
    pytest.param({"s.yaml": HEAD + "data: {kind: imagefolder, root: {tmp}/food}\n", "food/train/pizza": None,
                  "food/val/pizza": None}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: data.root: {tmp}/food/train holds no images in class folders: expected "
                 "root/train/<class>/*.jpg and root/val/<class>/*.jpg", id="data-imagefolder-empty"),
    pytest.param({"s.yaml": HEAD + "data: {kind: imagefolder, root: {tmp}/food}\n", "food/train/pizza/1.jpg": b"",
                  "food/valid/pizza/1.jpg": b""}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: data.root: {tmp}/food has no val/ folder: expected root/train/<class>/*.jpg and "
                 "root/val/<class>/*.jpg", id="data-imagefolder-without-val"),
    pytest.param({"s.yaml": HEAD + "data: {kind: cifar100, root: {tmp}/cifar}\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: data.root: folder {tmp}/cifar does not exist: point it at the data set",
                 id="data-cifar-nonexistent"),
    # weights files
    pytest.param({"s.yaml": HEAD + TIMM_VIT.format(weights="{tmp}/deit.pth")}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: model.weights: file {tmp}/deit.pth does not exist: set a local .pth/.safetensors",
                 id="weights-missing"),
    pytest.param({"s.yaml": HEAD + TIMM_VIT.format(weights="{tmp}/deit.safetensors"),
                  "deit.safetensors": SAFETENSORS_TRUNCATED}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: model.weights: cannot read weights file {tmp}/deit.safetensors (corrupt, truncated "
                 "or not a weights file): Error while deserializing header: invalid header length",
                 id="weights-truncated-safetensors"),
    pytest.param({"s.yaml": HEAD + TIMM_VIT.format(weights="{tmp}/deit.pth"), "deit.pth": b"PK\x03\x04 garbage"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: model.weights: cannot read weights file {tmp}/deit.pth (corrupt, truncated or not a "
                 "weights file): PytorchStreamReader failed reading zip archive: not a ZIP archive. This is an internal "
                 "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is "
                 "corrupted. This can happen if the checkpoint was not saved properly, was transferred incorrectly, "
                 "or the file was modified after saving.",
                 id="weights-corrupt-pth"),
    pytest.param({"s.yaml": HEAD + TIMM_VIT.format(weights="{tmp}/deit.npz"), "deit.npz": b"\x93NUMPY"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: model.weights: weights file {tmp}/deit.npz has an unsupported suffix '.npz': use "
                 ".pth, .pt or .safetensors", id="weights-unsupported-suffix"),
    # store URLs: a password by reference (${NAME}), never written into a tracking server's URL
    pytest.param({"s.yaml": HEAD + "storage: postgresql://p3b:${P3B_TEST_UNSET_PASSWORD}@127.0.0.1:1/optuna\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: storage: environment variable P3B_TEST_UNSET_PASSWORD is not set: export it (the URL's "
                 "${P3B_TEST_UNSET_PASSWORD} stands for its value)", id="storage-variable-unset"),
    pytest.param({"s.yaml": HEAD + "tracking: {uri: 'postgresql://p3b:${P3B_TEST_UNSET_PASSWORD}@127.0.0.1:1/mlflow'}"
                                   "\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: tracking.uri: environment variable P3B_TEST_UNSET_PASSWORD is not set: export it (the "
                 "URL's ${P3B_TEST_UNSET_PASSWORD} stands for its value)", id="tracking-variable-unset"),
    pytest.param({"s.yaml": HEAD + "storage: postgresql://p3b:${P3B-PASSWORD}@127.0.0.1:1/optuna\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: storage: refers to an environment variable as ${NAME} (letters, digits and _, not "
                 "starting with a digit): fix the reference", id="storage-malformed-reference"),
    pytest.param({"s.yaml": HEAD + "tracking: {uri: 'http://p3b:${P3B_TEST_UNSET_PASSWORD}@127.0.0.1:1'}\n"},
                 ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: tracking.uri: a tracking server takes its user and password from MLflow's "
                 "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD variables: remove user:password@ from the "
                 "URL and export those", id="tracking-server-password-in-url"),
    pytest.param({"s.yaml": HEAD + "storage: p3b:hunter2@db/optuna\n"}, ["run", "{tmp}/s.yaml"],
                 "{tmp}/s.yaml: storage: must be a URL such as sqlite:///path/db.sqlite or postgresql://host/db "
                 "(got '...@db/optuna')", id="storage-not-a-url-password-not-echoed"),
    # objective
    pytest.param({"s.yaml": HEAD}, ["run", "{tmp}/s.yaml", "--objective", "objectives.prune_finetuen:run_trial"],
                 "--objective objectives.prune_finetuen:run_trial: cannot import 'objectives.prune_finetuen' (No "
                 "module named 'objectives.prune_finetuen'): check the module name and that it is importable here "
                 "(PYTHONPATH)", id="objective-unknown-module"),
    pytest.param({"s.yaml": HEAD}, ["run", "{tmp}/s.yaml", "--objective", "objectives.prune_finetune:run"],
                 "--objective objectives.prune_finetune:run: module 'objectives.prune_finetune' has no function "
                 "'run': name one with the run_trial signature", id="objective-unknown-function"),
]

EXPORT_CASES = [
    pytest.param(["--pick", "best"], "--pick 'best': use max-accuracy, knee or 'trial N' (N: an Optuna trial number)",
                 id="export-unknown-pick"),
    pytest.param(["--pick", "knee", "--max-macs", "0.5M"],
                 "--max-macs 5e+05: no COMPLETE trial qualifies; the smallest macs available is 1e+06 (trial 1, "
                 "top-1 85.00 %)", id="export-nothing-meets-constraint"),
    pytest.param(["--pick", "trial", "7"], "--pick trial 7: the study has no such trial (trials: 0..2)",
                 id="export-no-such-trial"),
    pytest.param(["--pick", "knee", "--max-params", "lots"],
                 "--max-params: must be a positive number such as 1.2e9 or 350M (got 'lots')", id="export-bad-amount"),
    pytest.param(["--pick", "trial", "1", "--max-macs", "2M"],
                 "--max-macs/--max-params/--max-latency apply to max-accuracy and knee, not to --pick trial N: "
                 "remove them or pick by rule", id="export-limit-with-trial"),
]

# the command line itself: (argv, last line of stderr)
CLI_CASES = {
    "cli-status-unknown-study": (["status", "nope", "--output-dir", "{tmp}"],
                                 "error: study 'nope': no study folder {tmp}/nope: pass the folder printed by "
                                 "`search.py run`, the study file, or set --output-dir to where the study ran"),
    "cli-resume-unknown-study": (["resume", "nope", "--output-dir", "{tmp}"],
                                 "error: study 'nope': no study folder {tmp}/nope: pass the folder printed by "
                                 "`search.py run`, the study file, or set --output-dir to where the study ran"),
    "cli-export-unknown-study": (["export", "nope", "--pick", "knee", "--out", "{tmp}/out", "--output-dir", "{tmp}"],
                                 "error: study 'nope': no study folder {tmp}/nope: pass the folder printed by "
                                 "`search.py run`, the study file, or set --output-dir to where the study ran"),
    "cli-trials-not-a-number": (["run", "studies/quickstart.yaml", "--trials", "ten", "--output-dir", "{tmp}"],
                                "search.py run: error: argument --trials: must be a whole number >= 1 (got 'ten')"),
    "cli-trials-zero": (["run", "studies/quickstart.yaml", "--trials", "0", "--output-dir", "{tmp}"],
                        "search.py run: error: argument --trials: must be a whole number >= 1 (got '0')"),
    "cli-unknown-command": (["staus", "quickstart"],
                            "search.py: error: unknown command 'staus': did you mean status? choose one of run, resume, "
                            "status, pareto, compare, ui, export, bench"),
}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.mark.parametrize(("files", "argv", "expected"), STUDY_CASES)
def test_bad_study_input_fails_in_one_line_before_compute(files, argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a store or folder created relative to the working folder would show
    for name, content in files.items():
        path = tmp_path / name
        if content is None:
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(content, tmp_path))
    before = _tree(tmp_path)
    argv = [_fill(a, tmp_path) for a in argv]
    if "--objective" not in argv:
        argv += ["--objective", "tests.search_objective:run_trial"]
    assert search.main(argv) == 2
    err = capsys.readouterr().err
    message = expected() if callable(expected) else expected
    assert err == f"error: {_fill(message, tmp_path)}\n"
    assert _tree(tmp_path) == before  # no study folder, optuna.db, mlflow.db, mlruns/ or ray/
    assert not _ray_running()


@pytest.mark.parametrize(("argv", "expected"), EXPORT_CASES)
def test_bad_export_pick_fails_in_one_line_and_writes_nothing(argv, expected, study_folder, tmp_path, capsys):  # noqa: F811
    before = _tree(tmp_path)
    out = tmp_path / "exported"
    assert search.main(["export", str(study_folder), *argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert not out.exists() and _tree(tmp_path) == before


def _exit_code(argv: list[str]) -> int:
    """``search.main(argv)``'s exit status, also where argparse ends it with ``SystemExit``."""
    try:
        return search.main(argv)
    except SystemExit as stop:
        return int(stop.code)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_command_line_fails_with_a_clear_last_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # where a newcomer runs `python search.py ...`
    argv, expected = CLI_CASES[case]
    assert _exit_code([_fill(a, tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == _fill(expected, tmp_path)
    assert "Traceback" not in err
    assert _tree(tmp_path) == set()  # nothing written: no study folder, no store, no export folder
    assert not _ray_running()
