"""Method comparison: per-trial results from the trials table, the table with its intervals and
verdicts, and ``search.py compare`` on a small real grid study (Ray, concurrency 2)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import search
from p3b_search.stats import paired_difference
from p3b_search.study.compare import benefit_by_depth, benefit_timing, comparison_table, markdown, trial_results
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from p3b_search.study.results import read_trials
from tests.test_figures import benefit_rows
from tests.test_search_cli import study_folder  # noqa: F401  (fixture: a study folder with 3 trials)

OBJECTIVE = "tests.search_objective:run_trial"
METHODS = ["dense", "p3b", "uniform-magnitude", "global-taylor"]


def study_from(tmp_path: Path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{text}")
    return load_study(path)


def results(rows: list[tuple[str, float, int, float]]) -> pd.DataFrame:
    """Per-trial results from (method, prune ratio, seed, top-1) rows."""
    frame = pd.DataFrame(rows, columns=["method", "prune_ratio", "seed", "top1"])
    return frame.assign(number=range(len(frame)), kept_fraction=1 - frame["prune_ratio"],
                        macs=1e6 * (1 - frame["prune_ratio"]), params=0.0)


SEEDS = {0: 80.0, 1: 90.0, 2: 85.0, 3: 75.0, 4: 88.0}  # what a seed does to every method
TRIALS = results(
    [("dense", 0.0, s, v + 5) for s, v in SEEDS.items()]
    + [("p3b", 0.5, s, v + 2 + 0.1 * s) for s, v in SEEDS.items()]
    + [("uniform-magnitude", 0.5, s, v) for s, v in SEEDS.items()]
    + [("global-taylor", 0.5, s, v - 1 + 0.3 * (s % 2)) for s, v in SEEDS.items()]
    + [("p3b", 0.75, s, SEEDS[s] + 1) for s in range(3)]
    + [("uniform-magnitude", 0.75, s, SEEDS[s] + (0.5 if s else 0)) for s in range(3)]
)


def test_table_rows_roles_and_verdicts():
    table = comparison_table(TRIALS, METHODS)
    assert list(zip(table["method"], table["prune_ratio"])) == [
        ("dense", 0.0), ("p3b", 0.5), ("uniform-magnitude", 0.5), ("global-taylor", 0.5),
        ("p3b", 0.75), ("uniform-magnitude", 0.75)]
    rows = {(m, r): row for m, r, row in zip(table["method"], table["prune_ratio"], table.to_dict("records"))}
    assert rows["dense", 0.0]["verdict"] == "reference" and rows["dense", 0.0]["baseline"] == ""
    assert rows["dense", 0.0]["top1"] == pytest.approx(88.6) and rows["dense", 0.0]["n"] == 5
    assert rows["uniform-magnitude", 0.5]["verdict"] == "best baseline"
    p3b = rows["p3b", 0.5]
    assert p3b["baseline"] == "uniform-magnitude" and p3b["pairs"] == 5 and p3b["verdict"] == "separated"
    expected = paired_difference({s: v + 2 + 0.1 * s for s, v in SEEDS.items()}, SEEDS)
    assert [p3b["diff"], p3b["diff_low"], p3b["diff_high"]] == pytest.approx([expected.mean, expected.low,
                                                                             expected.high])
    assert p3b["top1_low"] < rows["uniform-magnitude", 0.5]["top1_high"]  # unpaired, the intervals overlap
    assert rows["global-taylor", 0.5]["diff"] == pytest.approx(-1 + 0.3 * 2 / 5)
    assert rows["p3b", 0.75]["verdict"] == "not separated (n = 3 < 5)"
    assert rows["p3b", 0.75]["kept_fraction"] == pytest.approx(0.25) and rows["p3b", 0.75]["macs"] == 2.5e5


def test_unstructured_methods_are_marked_rows_never_the_best_baseline():
    trials = pd.concat([TRIALS, results([("svite", 0.5, s, v + 9) for s, v in SEEDS.items()])])
    rows = comparison_table(trials, METHODS).set_index(["method", "prune_ratio"])
    assert not rows.loc[("svite", 0.5), "structured"] and rows.loc[("p3b", 0.5), "structured"]
    assert rows.loc[("p3b", 0.5), "baseline"] == rows.loc[("svite", 0.5), "baseline"] == "uniform-magnitude"
    assert rows.loc[("svite", 0.5), "diff"] == pytest.approx(9.0)


def test_benefit_timing_compares_the_first_and_last_third_of_each_trial():
    timing = benefit_timing(benefit_rows()).set_index(["kind", "layer"])
    # updates 0-2 vs 6-8: cls gain = 6 * layer; patch flat within a trial
    assert timing.loc[("mlp", 2), "benefit_cls_gain"] == pytest.approx(12.0)
    assert timing.loc[("attn", 0), "benefit_cls_gain"] == pytest.approx(0.0)
    assert timing.loc[("attn", 1), "benefit_cls_first"] == pytest.approx(0.1 + 1.0)
    assert timing["benefit_patch_gain"].abs().max() == pytest.approx(0.0)
    assert timing.loc[("attn", 1), "benefit_patch_last"] == pytest.approx(0.7)  # mean over the two trials


def test_benefit_timing_is_nan_where_a_trial_has_fewer_than_three_updates():
    timing = benefit_timing(benefit_rows(updates=2))
    assert timing["benefit_cls_first"].isna().all() and timing["benefit_cls_last"].notna().all()


def test_benefit_by_depth_reports_when_each_sub_block_gains_and_the_depth_correlation():
    rows = pd.concat([benefit_rows(patch_slope=-0.01).assign(prune_ratio=r) for r in (0.5, 0.75)])
    text = benefit_by_depth(rows)
    assert text.count("ρ(depth, cls gain) = +1.00, ρ(depth, patch gain) = -1.00") == 2
    assert "Prune ratio 0.75 (2 trials)" in text
    assert "| L02.mlp | 2.1000 | 14.1000 | +12.0000 |" in text


def test_a_difference_whose_interval_holds_zero_is_not_separated():
    noisy = results([("p3b", 0.5, s, 80.0 + (1 if s % 2 else -1)) for s in range(6)]
                    + [("s2vite", 0.5, s, 80.0) for s in range(6)])
    row = comparison_table(noisy).iloc[0]
    assert row["baseline"] == "s2vite" and row["pairs"] == 6 and row["verdict"] == "not separated"
    only_p3b = comparison_table(results([("p3b", 0.5, s, 80.0) for s in range(2)]))
    assert only_p3b.loc[0, "verdict"] == "no baseline" and math.isnan(only_p3b.loc[0, "diff"])


def test_markdown_has_a_title_and_one_row_per_group(tmp_path):
    study = study_from(tmp_path, "name: cmp\n")
    text = markdown(study, comparison_table(TRIALS, METHODS))
    lines = text.splitlines()
    assert lines[0].startswith("Method comparison of study cmp (vit_tiny_patch16_224, data digits)")
    assert lines[2].startswith("Recipe: 10 prune (constant) + 5 fine-tune (cosine) epochs")
    assert lines[4].startswith("| method | structured | prune ratio | n (seeds) | top-1 % | top-1 95% CI | "
                               "kept params |")
    assert len(lines) == 6 + 6 and lines[6].startswith("| dense | yes | 0 | 5 | 88.60 | [")
    assert "Command: `python search.py compare cmp`" in markdown(study, comparison_table(TRIALS), "python search.py "
                                                                  "compare cmp")
    assert "| p3b | yes | 0.75 | 3 |" in text and "not separated (n = 3 < 5) |" in text


GRID_STUDY = """name: cmp
method: {name: p3b}
training: {prune: {epochs: 2, lr: 0.01}, finetune: {epochs: 2, lr: 0.01}, batch_size: 64}
search_space:
  method: {type: categorical, choices: [dense, p3b, uniform-magnitude]}
  method_config.prune_ratio: {type: categorical, choices: [0.5, 0.75]}
  training.seed: {type: int, low: 0, high: 4}
objectives: [top1, {name: macs, reference: 3000}]
sampler: {name: grid}
concurrency: 2
tracking: {enabled: false}
"""


def test_trial_results_take_method_ratio_and_seed_from_the_trial_configuration(tmp_path):
    study = study_from(tmp_path, GRID_STUDY.replace("  training.seed: {type: int, low: 0, high: 4}\n", "")
                       .replace("batch_size: 64}", "batch_size: 64, seed: 7}"))
    trials = pd.DataFrame({
        "number": [0, 1, 2, 3], "state": ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"],
        "param.method": ["dense", "p3b", "p3b", "uniform-magnitude"],
        "param.method_config.prune_ratio": [np.nan, 0.75, 0.5, 0.5],
        "top1": [90.0, 85.0, np.nan, 84.0], "kept_fraction": [1.0, 0.25, np.nan, 0.5],
        "macs": [4e3, 1e3, np.nan, 2e3], "params": [2410.0, 600.0, np.nan, 1200.0]})
    got = trial_results(study, trials)
    assert got[["method", "prune_ratio", "seed"]].values.tolist() == [
        ["dense", 0.0, 7], ["p3b", 0.75, 7], ["uniform-magnitude", 0.5, 7]]
    assert got["kept_fraction"].tolist() == [1.0, 0.25, 0.5]
    twice = pd.concat([trials, trials.iloc[[1]].assign(number=9)], ignore_index=True)
    with pytest.raises(StudyError) as error:
        trial_results(study, twice)
    assert str(error.value) == (
        "study 'cmp': trials 1, 9 all ran p3b at prune ratio 0.75 with seed 7: compare needs one trial per method, "
        "prune ratio and seed (search only method, method_config.prune_ratio and training.seed, e.g. on a grid)")


@pytest.mark.slow
def test_grid_study_runs_each_point_once_and_compares(tmp_path, capsys):
    """A real grid study (3 methods x 2 ratios x 5 seeds, dense once per seed: 25 trials) through
    Ray Tune with 2 trials at a time, then ``search.py compare --out``."""
    from p3b_search.launch import run_study

    study = study_from(tmp_path, GRID_STUDY)
    assert study.n_trials == 25
    outcome = run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lambda line: None)
    assert not outcome.interrupted
    frame = read_trials(study.layout)
    assert len(frame) == 25 and (frame["state"] == "COMPLETE").all()
    runs = frame.assign(ratio=frame["param.method_config.prune_ratio"].fillna(0.0))
    assert not runs.duplicated(["method", "ratio", "param.training.seed"]).any()
    assert (frame["kept_fraction"][frame["method"] == "dense"] == 1.0).all()
    records = optuna.load_study(study_name="cmp", storage=study.storage_url).get_trials()
    assert len(records) - len(frame) == sum("duplicate_of" in t.user_attrs for t in records) <= 5

    assert search.main(["status", str(study.layout.root)]) == 0
    assert "training.seed" in capsys.readouterr().out  # the seed is a column of the trials table
    prefix = tmp_path / "out" / "cmp"
    assert search.main(["compare", "cmp", "--output-dir", str(tmp_path / "runs"), "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Method comparison of study cmp")
    assert "not separated" in out and f"wrote {prefix}.md" in out and f"wrote {prefix}_depth.png" in out
    table = pd.read_parquet(f"{prefix}.parquet")
    assert table["method"].tolist() == ["dense", "p3b", "uniform-magnitude", "p3b", "uniform-magnitude"]
    assert table["n"].tolist() == [5] * 5 and table["kept_fraction"].iloc[0] == 1.0
    # the test objective trains p3b and uniform-magnitude alike: identical per seed
    p3b = table[table["method"] == "p3b"]
    assert (p3b["diff"] == 0).all() and (p3b["verdict"] == "not separated").all()
    assert Path(f"{prefix}.md").read_text().startswith("Method comparison of study cmp")


def test_compare_of_a_search_study_folder(study_folder, capsys):  # noqa: F811
    """Any study folder compares: a P3B-only search gives one row per sampled prune ratio."""
    assert search.main(["compare", str(study_folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Method comparison of study cli") and len(lines) == 2 + 3
    assert all(line.split()[0] == "p3b" and line.endswith("no baseline") for line in lines[2:])
    empty = study_folder.parent / "empty"
    empty.mkdir()
    (empty / "study.yaml").write_text((study_folder / "study.yaml").read_text().replace("name: cli", "name: empty"))
    assert search.main(["compare", str(empty)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "(no finished trials yet)"
