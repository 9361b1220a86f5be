"""The tabular benchmark's table (p3b_search.study.tabular) and the replay simulator over it
(p3b_search.search.replay), on a small synthetic table written in the exported format."""
from __future__ import annotations

import math
from pathlib import Path

import hypothesis
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import strategies as st

from p3b_search.search.replay import (
    EARLY_STOPPING,
    LADDER,
    REFERENCE,
    SCHEDULERS,
    SUCCESSIVE_HALVING,
    Arm,
    ReplaySettings,
    replay,
)
from p3b_search.study.messages import StudyError
from p3b_search.study.pareto import pareto_mask
from p3b_search.study.tabular import build_table, read_table, write_table

DENSE_MACS, DENSE_TOP1 = 1.0e7, 90.0
PRUNE_EPOCHS, FINETUNE_EPOCHS = 2, 1
STUDY = f"""name: synthetic
model: {{name: vit_tiny_patch16_224, overrides: {{img_size: 24, patch_size: 4, embed_dim: 64, depth: 6, num_heads: 4}}}}
data: {{kind: glyphs}}
training: {{prune: {{epochs: {PRUNE_EPOCHS}}}, finetune: {{epochs: {FINETUNE_EPOCHS}}}}}
method: {{name: p3b, config: {{prune_steps_update_mask: 27, gamma: 0.2, prune_start_epoch: 1.0}}}}
search_space:
  method: {{type: categorical, choices: [p3b, global-taylor]}}
  method_config.prune_ratio: {{type: categorical, choices: [0.5, 0.625, 0.75, 0.875]}}
  method_config.alpha: {{type: categorical, choices: [0.5, 0.8]}}
  training.seed: {{type: categorical, choices: [0, 1]}}
objectives: [top1, macs]
sampler: {{name: grid}}
tracking: {{enabled: false}}
"""


def synthetic_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A trials table (12 configurations x 2 seeds, all COMPLETE, one FAIL more) and learning
    curves: pruning from prune-stage epoch 1, accuracy falling with the prune ratio, every
    trial's epochs of distinct lengths (no two events at one second)."""
    configs = [("p3b", ratio, alpha) for ratio in LADDER for alpha in (0.5, 0.8)]
    configs += [("global-taylor", ratio, math.nan) for ratio in LADDER]
    trials, epochs = [], []
    for seed in (0, 1):
        for method, ratio, alpha in configs:
            number = len(trials)
            final = 88.0 - 30.0 * (ratio - 0.5) ** 2 * (1.5 if method == "global-taylor" else 1.0) \
                + (1.0 if alpha == 0.8 else 0.0) + 0.7 * seed * (-1) ** number
            macs = DENSE_MACS * (1.0 - ratio) * (1.05 if method == "global-taylor" else 1.0)
            seconds = [10.0 + 0.37 * number + 1.3 * epoch + (3.0 if method == "p3b" else 0.0)
                       for epoch in range(PRUNE_EPOCHS + FINETUNE_EPOCHS)]
            trials.append({"number": number, "state": "COMPLETE", "method": method, "param.method": method,
                           "param.method_config.prune_ratio": ratio, "param.method_config.alpha": alpha,
                           "param.training.seed": seed, "top1": final, "macs": macs,
                           "kept_fraction": 1.0 - ratio, "params": 5e5 * (1.0 - ratio),
                           "duration_s": sum(seconds) + 4.0})
            for epoch, second in enumerate(seconds):
                row = {"trial": number, "epoch": float(epoch), "stage": float(epoch >= PRUNE_EPOCHS),
                       "top1": final - 12.0 * (2 - epoch) / (1.0 + seed), "epoch_seconds": second,
                       "loss": 1.0}
                if epoch < PRUNE_EPOCHS:
                    kept = 1.0 if epoch == 0 else 1.0 - ratio
                    row.update(keep_ratio=kept, macs=DENSE_MACS * kept, kept_params=5e5 * kept)
                epochs.append(row)
    trials.append({"number": len(trials), "state": "FAIL", "method": "p3b", "param.method": "p3b",
                   "param.method_config.prune_ratio": 0.5, "param.method_config.alpha": 0.5,
                   "param.training.seed": 0, "top1": math.nan, "macs": math.nan, "kept_fraction": math.nan,
                   "params": math.nan, "duration_s": 3.0})
    return pd.DataFrame(trials), pd.DataFrame(epochs)


def synthetic_study():
    from p3b_search.study.loading import parse_study

    return parse_study(STUDY, "synthetic.yaml")


def write_synthetic(path: Path, trials: pd.DataFrame | None = None, epochs: pd.DataFrame | None = None) -> Path:
    default_trials, default_epochs = synthetic_frames()
    study = synthetic_study()
    table = build_table(study, default_trials if trials is None else trials,
                        default_epochs if epochs is None else epochs)
    write_table(table, {"dense": {"macs": DENSE_MACS, "params": 5e5, "top1": DENSE_TOP1},
                        "dense_source": "synthetic", "study": STUDY}, path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return read_table(write_synthetic(tmp_path_factory.mktemp("tabular") / "table.parquet"))


# ----------------------------------------------------------------------------- the table

def test_table_holds_complete_trials_with_whole_curves_and_the_fine_tune_cost_filled(bench):
    table = bench.table
    assert table["trial"].nunique() == 24 and len(table) == 24 * 3  # the FAIL trial left out
    finetune = table[table["stage"] == 1]
    assert np.array_equal(finetune["macs"].to_numpy(), finetune["final_macs"].to_numpy())
    assert np.array_equal(finetune["keep_ratio"].to_numpy(), finetune["final_kept_fraction"].to_numpy())
    assert "param.training.seed" not in table.columns and sorted(table["seed"].unique()) == [0, 1]
    assert len(bench.configs) == 12 and all(len(bench.curves(c)) == 2 for c in bench.configs)
    p3b = bench.curves({"method": "p3b", "method_config.prune_ratio": 0.75, "method_config.alpha": 0.8})
    assert sorted(p3b) == [0, 1] and p3b[0].epochs == 3
    assert bench.curves({"method": "p3b", "method_config.prune_ratio": 0.3, "method_config.alpha": 0.8}) == {}
    assert bench.dense.get("top1") == DENSE_TOP1 and bench.reference == [0.0, DENSE_MACS]


def test_a_trial_without_its_whole_curve_and_a_file_without_metadata_are_one_line_errors(tmp_path):
    trials, epochs = synthetic_frames()
    with pytest.raises(StudyError, match=r"trial\(s\) \[3\] finished without all 3 epochs"):
        build_table(synthetic_study(), trials, epochs[~((epochs["trial"] == 3) & (epochs["epoch"] == 2))])
    plain = tmp_path / "plain.parquet"
    trials.to_parquet(plain)
    with pytest.raises(StudyError, match="not a tabular benchmark table"):
        read_table(plain)


# ----------------------------------------------------------------------------- the replay

@given(seed=st.integers(0, 1000), trials=st.integers(1, 24), concurrency=st.integers(1, 3),
       scheduler=st.sampled_from(SCHEDULERS))
@example(seed=3, trials=10, concurrency=2, scheduler="none")
@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_workers_run_trials_back_to_back_on_the_recorded_epoch_times(bench, seed, trials, concurrency, scheduler):
    settings = ReplaySettings(trials=trials, concurrency=concurrency, rungs=(1, 2), margin=1.0)
    rows = replay(bench, Arm("random", scheduler), seed=seed, settings=settings)
    assert len(rows) == trials and rows["trial"].nunique() == trials
    curves = {c.trial: c for c in bench.all_curves()}
    # a trial ends after its recorded epoch times; a complete one after all of them
    ran = [curves[t].epoch_seconds[:n].sum() for t, n in zip(rows["table_trial"], rows["epochs"])]
    assert np.allclose(rows["wall_s"] - rows["start_s"], ran)
    assert (rows.loc[rows["state"] == "COMPLETE", "epochs"] == 3).all()
    assert (np.diff(rows["wall_s"]) >= 0).all()  # rows are trial ends in clock order
    # the first trials start at 0, every later one when an earlier one ends (its freed worker)
    starts, ends = sorted(rows["start_s"]), sorted(rows["wall_s"])
    first = min(concurrency, trials)
    assert starts[:first] == [0.0] * first and np.allclose(starts[first:], ends[: trials - first])
    for time in np.unique(np.concatenate([rows["start_s"], rows["wall_s"]])):
        assert ((rows["start_s"] <= time) & (rows["wall_s"] > time)).sum() <= concurrency
    assert rows["trial_epochs"].iloc[-1] == rows["epochs"].sum()
    assert (np.diff(rows["hypervolume"]) >= 0).all()


def test_successive_halving_counts_a_stopped_trials_epochs_and_keeps_it_off_the_front(bench):
    settings = ReplaySettings(trials=16, rungs=(1, 2), eta=3)
    rows = replay(bench, Arm("tpe", SUCCESSIVE_HALVING), seed=0, settings=settings)
    stopped = rows[rows["state"] == "PRUNED"]
    assert len(stopped) > 0 and set(stopped["epochs"]) <= {1, 2}
    assert stopped[["top1", "macs"]].isna().all().all()
    assert rows["trial_epochs"].iloc[-1] == rows["epochs"].sum() < 16 * 3
    complete = rows[rows["state"] == "COMPLETE"]
    finals = {c.trial: c.final for c in bench.all_curves()}
    assert np.allclose(complete[["top1", "macs"]].to_numpy(), np.array([finals[t] for t in complete["table_trial"]]))
    for end in range(len(rows)):  # each row's hypervolume: of the COMPLETE trials ended so far, only
        done = rows.iloc[: end + 1]
        values = done.loc[done["state"] == "COMPLETE", ["top1", "macs"]].to_numpy()
        assert rows["hypervolume"].iloc[end] == (bench.normalized_hypervolume(values) if len(values) else 0.0)


def test_prune_stage_early_stopping_stops_only_in_the_prune_stage_after_the_grace_epoch(bench):
    settings = ReplaySettings(trials=16, margin=1.0, grace_epochs=1)
    rows = replay(bench, Arm("random", EARLY_STOPPING), seed=1, settings=settings)
    stopped = rows[rows["state"] == "PRUNED"]
    assert len(stopped) > 0 and set(stopped["epochs"]) == {PRUNE_EPOCHS}  # prune-stage epoch index 1


def test_the_reference_arm_cycles_the_ladder_of_p3b_at_the_papers_settings(bench):
    rows = replay(bench, Arm(REFERENCE), seed=0, settings=ReplaySettings(trials=10)).sort_values("trial")
    table = bench.table.drop_duplicates("trial").set_index("trial")
    ratios = rows["table_trial"].map(table["param.method_config.prune_ratio"]).tolist()
    assert ratios == [LADDER[i % 4] for i in range(10)]
    assert (rows["table_trial"].map(table["param.method_config.alpha"]) == 0.5).all()
    assert (rows["method"] == "p3b").all() and len(set(rows["table_trial"].map(table["seed"]))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2", "gp"])
def test_every_arm_is_monotone_in_hypervolume_and_deterministic_for_a_seed(bench, sampler):
    settings = ReplaySettings(trials=8, rungs=(1, 2))
    for scheduler in SCHEDULERS:
        rows = replay(bench, Arm(sampler, scheduler), seed=5, settings=settings)
        assert len(rows) == 8 and (np.diff(rows["hypervolume"]) >= 0).all()
        assert (np.diff(rows["trial_epochs"]) > 0).all()
        again = replay(bench, Arm(sampler, scheduler), seed=5, settings=settings)
        pd.testing.assert_frame_equal(rows, again)
    reference = replay(bench, Arm(REFERENCE), seed=5, settings=settings)
    assert (np.diff(reference["hypervolume"]) >= 0).all()


def test_a_sampled_configuration_missing_from_the_table_fails_loudly_unless_allowed(tmp_path):
    trials, _ = synthetic_frames()
    gone = (trials["method"] == "global-taylor") & (trials["param.method_config.prune_ratio"] == 0.5)
    bench = read_table(write_synthetic(tmp_path / "partial.parquet", trials[~gone]))
    with pytest.raises(StudyError, match="which is not in the table"):
        replay(bench, Arm("random"), seed=0, settings=ReplaySettings(trials=40))
    rows = replay(bench, Arm("random"), seed=0, settings=ReplaySettings(trials=40, allow_missing=True))
    assert len(rows) == 40 and rows["missing"].iloc[-1] > 0


def test_the_best_hypervolume_is_the_whole_tables_front(bench):
    finals = np.array([c.final for c in bench.all_curves()])
    front = finals[pareto_mask(finals, bench.directions)]
    assert bench.best_hypervolume() == bench.normalized_hypervolume(front)
    assert 0 < bench.best_hypervolume() < 1
    rows = replay(bench, Arm("random"), seed=0, settings=ReplaySettings(trials=24))
    assert rows["hypervolume"].max() <= bench.best_hypervolume()


# ----------------------------------------------------------------------------- the benchmark's measures

def test_a_runs_hypervolume_at_a_budget_is_its_value_after_the_last_trial_end_within_it():
    from benchmarks.tabular_benchmark import epochs_to_reach, hypervolume_at

    runs = pd.DataFrame({"seed": [0, 0, 0, 1, 1], "trial_epochs": [3, 6, 9, 2, 8],
                         "hypervolume": [0.2, 0.2, 0.7, 0.5, 0.6]})
    assert hypervolume_at(runs, np.array([0, 2, 3, 5, 8, 9, 20])).tolist() == [
        [0.0, 0.0, 0.2, 0.2, 0.2, 0.7, 0.7], [0.0, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6]]
    assert epochs_to_reach(runs[runs["seed"] == 0], 0.6) == 9.0
    assert math.isnan(epochs_to_reach(runs[runs["seed"] == 1], 0.65))


def test_verdicts_pair_arms_by_seed_and_read_the_reference_at_each_runs_spend():
    from benchmarks.tabular_benchmark import verdict_tables

    rows = []
    for seed in range(6):
        jitter = 0.0005 * (seed % 3)
        # none: 4 trials of 6 epochs; early stopping: the same two first trials, then stops (half the epochs)
        for trial, hv in enumerate([0.5, 0.8, 0.85, 0.86 + jitter]):
            rows.append({"sampler": "tpe", "scheduler": "none", "seed": seed, "trial_epochs": 6 * (trial + 1),
                         "hypervolume": hv})
        for trial, hv in enumerate([0.5, 0.8, 0.855 + 0.0003 * (seed % 2)]):
            rows.append({"sampler": "tpe", "scheduler": "early-stopping", "seed": seed,
                         "trial_epochs": [6, 12, 12 + seed % 2][trial], "hypervolume": hv})
        for trial, hv in enumerate([0.7, 0.84]):  # the reference: 0.84 once it spent 12 trial-epochs
            rows.append({"sampler": "reference", "scheduler": "none", "seed": seed, "trial_epochs": 6 * (trial + 1),
                         "hypervolume": hv})
    savings, reference = verdict_tables(pd.DataFrame(rows), margin=0.01)
    half = savings[savings["arm"] == "none at half its trial-epochs"].iloc[0]
    assert half["diff"] == pytest.approx(0.8 - np.mean([0.86 + 0.0005 * (s % 3) for s in range(6)]))
    stopping = savings[savings["arm"] == "early-stopping"].iloc[0]
    assert stopping["epochs_ratio"] == pytest.approx(np.mean([(12 + s % 2) / 24 for s in range(6)]))
    differences = [0.855 + 0.0003 * (s % 2) - 0.86 - 0.0005 * (s % 3) for s in range(6)]
    assert stopping["diff"] == pytest.approx(np.mean(differences)) and stopping["tost_p"] < 0.05
    by_arm = reference.set_index("arm")
    assert by_arm.loc["none", "diff"] == pytest.approx(0.86 + 0.0005 - 0.84, abs=1e-3)  # reference at 24: 0.84
    assert by_arm.loc["early-stopping", "diff"] == pytest.approx(0.855 - 0.84, abs=1e-3)
    assert (reference["p_holm"] >= reference["p"]).all()


def test_a_rung_that_holds_the_final_objectives_ranks_every_trial_as_the_end_does(tmp_path):
    from benchmarks.tabular_benchmark import rung_fidelity

    trials, epochs = synthetic_frames()
    finals = trials.set_index("number")
    last_prune = epochs["epoch"] == PRUNE_EPOCHS - 1
    for column in ("top1", "macs"):
        epochs.loc[last_prune, column] = epochs.loc[last_prune, "trial"].map(finals[column])
    fidelity = rung_fidelity(read_table(write_synthetic(tmp_path / "t.parquet", epochs=epochs)), eta=3,
                             resamples=200)
    assert sorted(fidelity["rung"].unique()) == [1, 2] and set(fidelity["trials"]) == {12}
    exact = fidelity[fidelity["rung"] == PRUNE_EPOCHS]
    assert np.allclose(exact[["spearman", "kendall"]].to_numpy(), 1.0)
    assert (exact["front_kept"] == exact["front"].clip(upper=4)).all()  # 12 // 3 continue: the front first
    first = fidelity[fidelity["rung"] == 1]  # nothing pruned yet: equal MACs, ranked by top-1 alone
    assert (first["spearman"] < 1.0).all()
