"""Shared prefixes (``shared_prefixes: true``): a trial starts from a prefix of its prune stage
that another trial trained, and ends exactly as it would have from scratch.

* For p3b, global-taylor and uniform-magnitude, a trial with other post-start knobs (prune ratio,
  alpha, gamma, tau, norm) that restores another trial's prefix ends bit-identical to the same
  trial trained from scratch: objectives, final weights, every epoch's metrics and allocation
  rows. The restored epochs are reported from the prefix, marked ``prefix_shared = 1``.
* A longer prefix grows from a shorter one; an incomplete prefix (no marker, or a ``.partial``
  folder a killed publisher left) is never used, and is cleaned; processes publishing the same
  prefix at once leave one complete, uncorrupted prefix.
* The key covers what acts before the start and nothing else (property test); a study whose
  trials can share nothing is refused in one line before any compute.
"""
from __future__ import annotations

import filecmp
import multiprocessing
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from objectives.prune_finetune import run_trial
from objectives.shared_prefix import prefix_inputs
from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig, TrialConfig
from p3b_search.methods import get_method
from p3b_search.reporting import TrialReporter
from p3b_search.study.front import pareto_summary
from p3b_search.study.front_report import summary_table
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from p3b_search.study.tables import table_text
from p3b_search.training.checkpoint import load_checkpoint, save_checkpoint
from p3b_search.training.prefixes import PARTIAL_SUFFIX, PrefixCache, prefix_key

TINY = ModelConfig(name="vit_tiny_patch16_224",
                   overrides=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))
SAMPLES, BATCH = 128, 32
STEPS = SAMPLES // BATCH  # micro-batches per epoch
#: Metrics that may differ between a restored epoch and a trained one (wall time, the flag itself).
UNSHARED_METRICS = ("epoch_seconds", "prefix_shared")


def trial(method: str, seed: int = 0, **knobs) -> TrialConfig:
    return TrialConfig(
        model=TINY, data=DataConfig(kind="digits", max_train_samples=SAMPLES), method=method, method_config=knobs,
        training=TrainingConfig(prune=StageConfig(epochs=3, lr=5e-2, schedule="constant"),
                                finetune=StageConfig(epochs=1, lr=5e-2), batch_size=BATCH, seed=seed),
    )


def run(config: TrialConfig, folder: Path, prefixes: Path | None = None) -> tuple[dict, TrialReporter]:
    reporter = TrialReporter()
    return run_trial(config, reporter, folder, prefixes=prefixes), reporter


def learning_curve(epochs: list[dict[str, float]]) -> list[dict[str, float]]:
    """A trial's reported epochs without what a restored epoch may report differently."""
    return [{k: v for k, v in epoch.items() if k not in UNSHARED_METRICS} for epoch in epochs]


def assert_same_trial(folder: Path, objectives: dict, reporter: TrialReporter,
                      expected_folder: Path, expected: dict, expected_reporter: TrialReporter) -> None:
    """Bit-identical: objectives, final weights, every epoch's metrics, allocation rows."""
    assert objectives == expected
    weights, expected_weights = (load_file(f / "model" / "model.safetensors") for f in (folder, expected_folder))
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert learning_curve(reporter.epochs) == learning_curve(expected_reporter.epochs)
    assert pd.DataFrame(reporter.allocations).equals(pd.DataFrame(expected_reporter.allocations))


def restored(reporter: TrialReporter) -> list[float]:
    return [epoch["prefix_shared"] for epoch in reporter.epochs]


def published(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*/*"))


#: Knobs of the Taylor methods in these trials: start at epoch 2 of 3, a mask update every 2 steps.
TAYLOR = dict(prune_start_epoch=2.0, prune_steps_update_mask=2)

# (method, knobs of the trial that trains the prefix, knobs of the one that restores it, epochs shared):
# a start at epoch 2 shares the 2 whole epochs before it; uniform-magnitude prunes after the
# backward of the step before its start, inside epoch 1, so it shares 1
SHARING = [
    pytest.param("p3b", dict(TAYLOR, prune_ratio=0.5, alpha=0.5, gamma=0.2),
                 dict(TAYLOR, prune_ratio=0.3, alpha=0.9, gamma=0.5, tau_max=0.05), 2, id="p3b"),
    pytest.param("global-taylor", dict(TAYLOR, prune_ratio=0.5), dict(TAYLOR, prune_ratio=0.3, tau_max=0.2), 2,
                 id="global-taylor"),
    pytest.param("uniform-magnitude", dict(prune_start_epoch=2.0, prune_ratio=0.5, norm="l2"),
                 dict(prune_start_epoch=2.0, prune_ratio=0.3, norm="l1"), 1, id="uniform-magnitude"),
]


@pytest.mark.parametrize("method, first, second, shared", SHARING)
def test_a_trial_restored_from_another_trials_prefix_ends_as_from_scratch(tmp_path, method, first, second, shared):
    cache = tmp_path / "prefixes"
    _, trainer = run(trial(method, **first), tmp_path / "first", cache)
    assert restored(trainer) == [0.0] * 4 and published(cache) == [f"epoch-{shared}"]

    objectives, reporter = run(trial(method, **second), tmp_path / "second", cache)
    assert restored(reporter) == [1.0] * shared + [0.0] * (4 - shared)
    assert [e["epoch"] for e in reporter.epochs] == [0, 1, 2, 3]
    # the restored epochs are the first trial's: before the start nothing depends on the knobs
    assert learning_curve(reporter.epochs)[:shared] == learning_curve(trainer.epochs)[:shared]

    expected, reference = run(trial(method, **second), tmp_path / "scratch")
    assert "prefix_shared" not in reference.epochs[0]  # without the cache: no flag, nothing published
    assert_same_trial(tmp_path / "second", objectives, reporter, tmp_path / "scratch", expected, reference)


def test_a_longer_prefix_grows_from_a_shorter_one(tmp_path):
    cache = tmp_path / "prefixes"
    knobs = dict(prune_ratio=0.5, prune_steps_update_mask=2)
    run(trial("p3b", prune_start_epoch=1.0, **knobs), tmp_path / "start1", cache)
    assert published(cache) == ["epoch-1"]

    objectives, reporter = run(trial("p3b", prune_start_epoch=2.0, **knobs), tmp_path / "start2", cache)
    assert restored(reporter) == [1.0, 0.0, 0.0, 0.0]  # the 1-epoch prefix, then epoch 1 trained and published
    assert published(cache) == ["epoch-1", "epoch-2"]
    expected, reference = run(trial("p3b", prune_start_epoch=2.0, **knobs), tmp_path / "scratch")
    assert_same_trial(tmp_path / "start2", objectives, reporter, tmp_path / "scratch", expected, reference)

    _, again = run(trial("p3b", prune_start_epoch=2.0, prune_ratio=0.7, prune_steps_update_mask=2),
                   tmp_path / "again", cache)
    assert restored(again) == [1.0, 1.0, 0.0, 0.0]


def test_other_seeds_and_heads_share_nothing(tmp_path):
    cache = tmp_path / "prefixes"
    run(trial("p3b", **TAYLOR), tmp_path / "first", cache)
    for name, config in {"seed": trial("p3b", seed=1, **TAYLOR),
                         "aux_head_lr": trial("p3b", aux_head_lr=1e-2, **TAYLOR),
                         "method": trial("global-taylor", **TAYLOR)}.items():
        _, reporter = run(config, tmp_path / name, cache)
        assert restored(reporter) == [0.0] * 4, name
    assert len(list(cache.iterdir())) == 4  # four keys, one prefix each


def test_an_incomplete_prefix_is_never_used_and_is_cleaned(tmp_path):
    cache = tmp_path / "prefixes"
    run(trial("global-taylor", **TAYLOR), tmp_path / "first", cache)
    (prefix,) = cache.glob("*/epoch-2")
    partial = prefix.parent / f".epoch-2-killed{PARTIAL_SUFFIX}"  # a publisher killed before its rename
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes((prefix / "checkpoint.pt").read_bytes()[:1000])
    (prefix / "prefix.json").unlink()  # no marker: not complete

    _, reporter = run(trial("global-taylor", prune_ratio=0.3, **TAYLOR), tmp_path / "second", cache)
    assert restored(reporter) == [0.0] * 4  # trained from scratch
    removed = PrefixCache(cache).clean_incomplete()
    assert sorted(removed) == sorted([prefix, partial]) and list(cache.iterdir()) == []

    run(trial("global-taylor", prune_ratio=0.3, **TAYLOR), tmp_path / "third", cache)
    assert published(cache) == ["epoch-2"]  # published again, complete
    _, reporter = run(trial("global-taylor", prune_ratio=0.4, **TAYLOR), tmp_path / "fourth", cache)
    assert restored(reporter) == [1.0, 1.0, 0.0, 0.0]


def _publish(cache: str, source: str, barrier, results) -> None:
    barrier.wait()
    results.put(PrefixCache(cache).publish("key", 3, source, {"source": source}))


def test_processes_publishing_one_prefix_at_once_leave_one_complete_prefix(tmp_path):
    source = tmp_path / "checkpoint.pt"
    state = {"epoch": 2, "model": {"w": torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))}}
    save_checkpoint(state, tmp_path)  # 16 MB: the copies overlap in time
    context = multiprocessing.get_context("fork")  # the publishers only copy files: no torch work after the fork
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_publish, args=(str(tmp_path / "cache"), str(source), barrier, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * 4
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == [False, False, False, True]

    cache = PrefixCache(tmp_path / "cache")
    found = cache.find("key", 3)
    assert found is not None and found.epochs == 3
    assert filecmp.cmp(found.checkpoint, source, shallow=False)
    assert torch.equal(load_checkpoint(found.checkpoint)["model"]["w"], state["model"]["w"])
    assert [p.name for p in (tmp_path / "cache" / "key").iterdir()] == ["epoch-3"]  # no partial left
    assert cache.find("key", 2) is None  # never a prefix longer than asked for


def _key(config: TrialConfig) -> str:
    cls = get_method(config.method)
    method = cls(cls.spec.config_cls(**config.method_config), num_classes=5, epochs=config.training.prune.epochs,
                 steps_per_epoch=STEPS)
    return prefix_key(prefix_inputs(config, method, STEPS))


@settings(max_examples=25, deadline=None)
@given(prune_ratio=st.floats(0.1, 0.8), alpha=st.floats(0.0, 1.0), gamma=st.floats(0.05, 1.0),
       tau_max=st.floats(0.01, 1.0), scale=st.floats(0.5, 20.0), start=st.sampled_from([1.0, 2.0]))
def test_knobs_that_act_from_the_start_on_leave_the_key_alone(prune_ratio, alpha, gamma, tau_max, scale, start):
    varied = trial("p3b", prune_ratio=prune_ratio, alpha=alpha, gamma=gamma, tau_max=tau_max,
                   block_importance_scale=scale, prune_start_epoch=start, prune_steps_update_mask=2)
    assert _key(varied) == _key(trial("p3b", **TAYLOR))


@settings(max_examples=25, deadline=None)
@given(change=st.sampled_from(["seed", "lr", "batch", "aux_head_lr", "aux_every", "aux_phase", "method", "model"]),
       value=st.integers(1, 3))
def test_what_acts_before_the_start_changes_the_key(change, value):
    base = trial("p3b", **TAYLOR)
    training = base.training
    changed = {
        "seed": lambda: trial("p3b", seed=value, **TAYLOR),
        "lr": lambda: base.model_copy(update={"training": training.model_copy(
            update={"prune": training.prune.model_copy(update={"lr": 0.01 * value})})}),
        "batch": lambda: base.model_copy(update={"training": training.model_copy(update={"batch_size": 8 * value})}),
        "aux_head_lr": lambda: trial("p3b", aux_head_lr=1e-3 * value, **TAYLOR),
        "aux_every": lambda: trial("p3b", prune_start_epoch=2.0, prune_steps_update_mask=4, aux_every=3 + value % 2),
        # the start moved by `value` steps within epoch 2: the heads' steps shift with it
        "aux_phase": lambda: trial("p3b", prune_start_epoch=2.0 + value / STEPS, prune_steps_update_mask=2),
        "method": lambda: trial("global-taylor", **TAYLOR),
        "model": lambda: base.model_copy(update={"model": TINY.model_copy(
            update={"overrides": {**TINY.overrides, "depth": 2 + value}})}),
    }[change]()
    if change == "aux_phase" and value % 2 == 0:
        assert _key(changed) == _key(base)  # an even shift keeps the heads on the same steps
    else:
        assert _key(changed) != _key(base)


# -- the study ----------------------------------------------------------------------------------

STUDY = """name: s
output_dir: {tmp}/runs
shared_prefixes: true
training: {{prune: {{epochs: 4}}}}
"""


@pytest.mark.parametrize("text, error", [
    pytest.param("method: {name: dimap}\n",
                 "shared_prefixes: nothing to share: dimap prunes from step 0: let trials start pruning later "
                 "(prune_start_epoch >= 1; above 1 for uniform-magnitude) or remove shared_prefixes", id="dimap"),
    pytest.param("search_space:\n  method_config.prune_start_epoch: {type: float, low: 0.0, high: 0.5}\n",
                 "shared_prefixes: nothing to share: p3b starts pruning in its first epoch "
                 "(method_config.prune_start_epoch): let trials start pruning later", id="p3b-start-below-1"),
    pytest.param("method: {name: uniform-magnitude, config: {prune_start_epoch: 1}}\n",
                 "uniform-magnitude starts pruning in its first epoch", id="uniform-magnitude-start-1"),
    pytest.param("method: {name: dense}\nsearch_space:\n  method: {type: categorical, choices: [dense, svite]}\n",
                 "nothing to share: dense trials differ only by seed; svite prunes from step 0", id="dense-svite"),
])
def test_a_study_whose_trials_share_nothing_is_refused(tmp_path, text, error):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(tmp=tmp_path) + text)
    with pytest.raises(StudyError, match="^" + re.escape(f"{path}: ")) as raised:
        load_study(path)
    assert error in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("text", [
    "search_space:\n  method_config.prune_start_epoch: {type: float, low: 0.0, high: 1.0}\n",  # some trials share
    "method: {name: uniform-magnitude, config: {prune_start_epoch: 1.5}}\n",
    "method: {name: dimap, config: {prune_start_epoch: 2}}\n"
    "search_space:\n  method: {type: categorical, choices: [dimap, global-taylor]}\n",
])
def test_a_study_where_some_trial_shares_is_accepted(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(tmp=tmp_path) + text)
    assert load_study(path).shared_prefixes


def test_the_summary_counts_the_trial_epochs_restored(tmp_path):
    trials = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE", "COMPLETE", "PRUNED"],
                           "method": ["p3b"] * 3, "top1": [80.0, 82.0, float("nan")],
                           "macs": [1e6, 2e6, float("nan")], "epochs_shared": [0, 2, 1]})
    summary = pareto_summary(trials, {"top1": "maximize", "macs": "minimize"}, [0.0, 3e6])
    assert summary.trial_epochs_shared == 3  # the stopped trial's restored epoch counts too
    assert summary_table(summary)["trial_epochs_shared"].tolist() == [3]
    assert "epochs_shared" in table_text(trials, ["top1", "macs"])
    assert "epochs_shared" not in table_text(trials.assign(epochs_shared=0), ["top1", "macs"])


# -- end to end ---------------------------------------------------------------------------------

E2E = """name: prefixes
output_dir: {runs}
model: {{name: vit_tiny_patch16_224, overrides: {{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}}}
data: {{kind: digits, max_train_samples: {samples}}}
training:
  prune: {{epochs: 2, lr: 5.0e-2, schedule: constant}}
  finetune: {{epochs: 1, lr: 5.0e-2}}
  batch_size: {batch}
  device: cpu
method: {{name: p3b, config: {{prune_start_epoch: 1.0, prune_steps_update_mask: 2}}}}
search_space:
  method_config.prune_ratio: {{type: float, low: 0.3, high: 0.7}}
shared_prefixes: true
sampler: {{name: random, seed: 0}}
n_trials: 3
concurrency: 1
"""


@pytest.mark.slow
def test_a_study_reports_the_trial_epochs_its_trials_shared(tmp_path, capsys):
    from mlflow import MlflowClient

    import search
    from p3b_search.study.results import read_epochs

    path = tmp_path / "study.yaml"
    path.write_text(E2E.format(runs=tmp_path / "runs", samples=SAMPLES, batch=BATCH))
    layout = load_study(path).layout
    killed = layout.prefixes / "key" / f".epoch-1-killed{PARTIAL_SUFFIX}"  # what a killed publisher left
    killed.mkdir(parents=True)
    assert search.main(["run", str(path), "--cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 incomplete shared prefix(es)" in out and not killed.exists()
    assert "shared prefixes: 2 trial-epochs restored from" in out

    study = load_study(path)
    trials = pd.read_parquet(layout.trials_table)
    assert trials["state"].tolist() == ["COMPLETE"] * 3
    assert trials["epochs_shared"].tolist() == [0, 1, 1]  # the first trial trained the prefix, the others restored it
    assert pd.read_parquet(layout.pareto_dir / "summary.parquet")["trial_epochs_shared"].tolist() == [2]
    curves = read_epochs(layout).sort_values(["trial", "epoch"])
    assert curves.groupby("trial")["prefix_shared"].apply(list).to_dict() == {
        0: [0.0, 0.0, 0.0], 1: [1.0, 0.0, 0.0], 2: [1.0, 0.0, 0.0]}
    assert [p.name for p in layout.prefixes.glob("*/*")] == ["epoch-1"]

    client = MlflowClient(study.tracking_uri)
    experiment = client.get_experiment_by_name(study.name)
    (parent,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{study.name}'")
    assert parent.data.metrics["trial_epochs_shared"] == 2

    assert search.main(["status", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert "epochs_shared" in out and "shared prefixes: 2 trial-epochs restored from" in out


def _data_parallel_worker(rank: int, store: str, folder: str) -> None:
    """Rank ``rank`` of two: a trial publishes its prefix, another restores it, and the same
    other trial runs from scratch (both ranks run every trial, as Ray Train's workers do)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        root, results = Path(folder), {}
        run_trial(trial("p3b", **TAYLOR), TrialReporter(), root / "first", prefixes=root / "prefixes")
        for name, cache in (("second", root / "prefixes"), ("scratch", None)):
            reporter = TrialReporter()
            results[name] = (run_trial(trial("p3b", prune_ratio=0.3, **TAYLOR), reporter, root / name,
                                       prefixes=cache), reporter.epochs)
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_ranks_restore_the_prefix_rank_0_chose(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for results in ranks:
        objectives, epochs = results["second"]
        assert [e["prefix_shared"] for e in epochs] == [1.0, 1.0, 0.0, 0.0]
        expected, expected_epochs = results["scratch"]
        assert objectives == expected and learning_curve(epochs) == learning_curve(expected_epochs)
    weights, expected_weights = (load_file(tmp_path / name / "model" / "model.safetensors")
                                 for name in ("second", "scratch"))
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
    assert published(tmp_path / "prefixes") == ["epoch-2"]
