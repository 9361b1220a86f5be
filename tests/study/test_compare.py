"""Method comparison: per-trial results from the trials table, the methods table, every pair of
methods tested (paired t tests, Holm over the report, MDD, equivalence, Friedman), top-1 at
matched MACs, the report, and ``search.py compare`` on a study folder and on a small real grid
study (Ray, concurrency 2)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests

import search
from p3b_search.stats import minimum_detectable_difference
from p3b_search.study.compare import (
    benefit_by_depth,
    benefit_timing,
    compare_methods,
    compare_plan,
    matched_top1,
    summary_table,
    trial_results,
)
from p3b_search.study.compare_report import markdown
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from p3b_search.study.pairwise import PairPlan
from p3b_search.study.results import read_trials, write_trials
from tests.study.test_figures import benefit_rows
from tests.test_search_cli import study_folder  # noqa: F401  (fixture: a study folder with 3 trials)

OBJECTIVE = "tests.search_objective:run_trial"
METHODS = ["dense", "p3b", "uniform-magnitude", "global-taylor"]
NO_PLAN = PairPlan(None, (), 1.0)


def study_from(tmp_path: Path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n{text}")
    return load_study(path)


def results(rows: list[tuple[str, float, int, float]], macs: dict[tuple[str, float], float] | None = None
            ) -> pd.DataFrame:
    """Per-trial results from (method, prune ratio, seed, top-1) rows; MACs 1e6 x (1 - ratio)
    unless ``macs`` gives a (method, ratio)'s."""
    frame = pd.DataFrame(rows, columns=["method", "prune_ratio", "seed", "top1"])
    default = 1e6 * (1 - frame["prune_ratio"])
    given_macs = [(macs or {}).get((m, r), d) for m, r, d in zip(frame["method"], frame["prune_ratio"], default)]
    return frame.assign(number=range(len(frame)), kept_fraction=1 - frame["prune_ratio"], macs=given_macs, params=0.0)


def pair_row(comparison, ratio: float, a: str, b: str) -> dict:
    pairs = comparison.pairs
    rows = pairs[(pairs["prune_ratio"] == ratio) & (pairs["a"] == a) & (pairs["b"] == b)]
    assert len(rows) == 1, (ratio, a, b, pairs[["prune_ratio", "a", "b"]])
    return rows.iloc[0].to_dict()


SEEDS = {0: 80.0, 1: 90.0, 2: 85.0, 3: 75.0, 4: 88.0}  # what a seed does to every method
TRIALS = results(
    [("dense", 0.0, s, v + 5) for s, v in SEEDS.items()]
    + [("p3b", 0.5, s, v + 2 + 0.1 * s) for s, v in SEEDS.items()]
    + [("uniform-magnitude", 0.5, s, v) for s, v in SEEDS.items()]
    + [("global-taylor", 0.5, s, v - 1 + 0.3 * (s % 2)) for s, v in SEEDS.items()]
    + [("p3b", 0.75, s, SEEDS[s] + 1) for s in range(3)]
    + [("uniform-magnitude", 0.75, s, SEEDS[s] + (0.5 if s else 0)) for s in range(3)]
)


def noisy_trials(shifts: dict[str, float], seeds: int, noise: float, ratios=(0.5, 0.75)) -> pd.DataFrame:
    """Every method of ``shifts`` at every ratio over ``seeds`` seeds: a shared seed effect, the
    method's shift, and independent noise of sd ``noise`` (a fixed generator)."""
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(85.0, 3.0, seeds)
    return results([(m, r, s, seed_effect[s] + shift + rng.normal(0.0, noise))
                    for r in ratios for m, shift in shifts.items() for s in range(seeds)])


def test_methods_table_rows_and_intervals():
    table = summary_table(TRIALS, METHODS)
    assert list(zip(table["method"], table["prune_ratio"])) == [
        ("dense", 0.0), ("p3b", 0.5), ("uniform-magnitude", 0.5), ("global-taylor", 0.5),
        ("p3b", 0.75), ("uniform-magnitude", 0.75)]
    rows = table.set_index(["method", "prune_ratio"])
    assert rows.loc[("dense", 0.0), "top1"] == pytest.approx(88.6) and rows.loc[("dense", 0.0), "n"] == 5
    assert rows.loc[("p3b", 0.75), "kept_fraction"] == pytest.approx(0.25) and rows.loc[("p3b", 0.75), "macs"] == 2.5e5
    assert rows.loc[("p3b", 0.5), "top1_low"] < rows.loc[("uniform-magnitude", 0.5), "top1_high"]  # unpaired: overlap
    assert table["top1_at_matched_macs"].isna().all()  # no primary: no matched MACs


def test_every_pair_at_every_ratio_is_tested_and_holm_adjusted_over_all_of_them():
    comparison = compare_methods(TRIALS, NO_PLAN, METHODS)
    pairs = comparison.pairs
    assert list(zip(pairs["prune_ratio"], pairs["a"], pairs["b"])) == [
        (0.5, "p3b", "uniform-magnitude"), (0.5, "p3b", "global-taylor"), (0.5, "uniform-magnitude", "global-taylor"),
        (0.75, "p3b", "uniform-magnitude")]
    assert (pairs["role"] == "pair").all() and pairs["p_tost"].isna().all() and (pairs["equivalence"] == "").all()
    assert pairs["p_holm"].tolist() == pytest.approx(list(multipletests(pairs["p"], method="holm")[1]))
    row = pair_row(comparison, 0.5, "p3b", "uniform-magnitude")
    a = [v + 2 + 0.1 * s for s, v in SEEDS.items()]
    expected = stats.ttest_rel(a, list(SEEDS.values()))
    assert row["pairs"] == 5 and row["diff"] == pytest.approx(2.2) and row["p"] == pytest.approx(expected.pvalue)
    assert [row["diff_low"], row["diff_high"]] == pytest.approx(list(expected.confidence_interval(0.95)))
    assert row["verdict"] == "p3b better" and row["separated"]
    assert pair_row(comparison, 0.5, "uniform-magnitude", "global-taylor")["verdict"] == "uniform-magnitude better"


def test_a_clear_difference_over_ten_seeds_is_separated_after_holm():
    """Four methods at two ratios: a family of 12 tests. P3B 3 points above the others, seed
    noise 0.5 points: separated in every pair it is in, whichever side it is on."""
    trials = noisy_trials({"p3b": 3.0, "uniform-magnitude": 0.0, "global-taylor": 0.0, "s2vite": 0.0}, 10, 0.5)
    comparison = compare_methods(trials, PairPlan(("global-taylor", "p3b"), (), 1.0), METHODS)
    assert len(comparison.pairs) == 12
    for ratio in (0.5, 0.75):
        assert pair_row(comparison, ratio, "p3b", "uniform-magnitude")["verdict"] == "p3b better"
        declared = pair_row(comparison, ratio, "global-taylor", "p3b")  # as declared: B is p3b
        assert declared["verdict"] == "p3b better" and declared["diff"] < -2 and declared["p_holm"] < 0.05


def test_a_tiny_difference_is_not_separated_and_says_its_minimum_detectable_difference():
    trials = noisy_trials({"p3b": 0.1, "uniform-magnitude": 0.0}, 5, 1.0, ratios=(0.5,))
    row = pair_row(compare_methods(trials, NO_PLAN, METHODS), 0.5, "p3b", "uniform-magnitude")
    assert not row["separated"] and row["holm_level"] == 0.05  # a family of one
    mdd = minimum_detectable_difference(row["sd"], 5, 0.05)
    assert row["mdd"] == pytest.approx(mdd) and mdd > 1.0
    assert row["verdict"] == f"not separated (MDD {mdd:.1f} points at 80% power)"


def test_holm_over_the_report_undoes_a_lone_p_below_005():
    """The issue's case: a pair at p < 0.05 on its own is one of eight tests; over the family it
    is not separated, and its MDD is that of the stricter level Holm holds it to."""
    diffs = [2.0, 0.5, 3.5, 1.0, 3.0]
    lone = results([("p3b", 0.75, s, 85.0 + d) for s, d in enumerate(diffs)]
                   + [("uniform-magnitude", 0.75, s, 85.0) for s in range(5)])
    alone = pair_row(compare_methods(lone, NO_PLAN, METHODS), 0.75, "p3b", "uniform-magnitude")
    assert 0.01 < alone["p"] < 0.05 and alone["verdict"] == "p3b better"
    others = results([(m, r, s, 85.0 + (0.4 if (s + i) % 2 else -0.4)) for r in (0.5, 0.75)
                      for i, m in enumerate(["global-taylor", "s2vite"]) for s in range(5)]
                     + [(m, 0.5, s, 85.0 + 0.2 * s) for m in ("p3b", "uniform-magnitude") for s in range(5)])
    comparison = compare_methods(pd.concat([lone, others]), NO_PLAN, METHODS)
    within = pair_row(comparison, 0.75, "p3b", "uniform-magnitude")
    tested = comparison.pairs["p"].notna().sum()
    assert tested >= 8 and within["p"] == pytest.approx(alone["p"])
    assert within["p_holm"] > 0.05 and not within["separated"]
    smaller = int((comparison.pairs["p"] < within["p"]).sum())
    assert within["holm_level"] == pytest.approx(0.05 / (tested - smaller)) and within["holm_level"] < 0.05 / 2
    assert within["mdd"] > alone["mdd"]
    assert within["verdict"].startswith("not separated (MDD")


def test_equivalence_is_shown_for_near_identical_methods_with_a_small_spread_only():
    b = {s: 85.0 + s for s in range(6)}
    trials = results([("uniform-magnitude", 0.5, s, v) for s, v in b.items()]
                     + [("p3b", 0.5, s, v + (0.1 if s % 2 else -0.1)) for s, v in b.items()]
                     + [("global-taylor", 0.5, s, v + (3.0 if s % 2 else -3.0)) for s, v in b.items()])
    plan = PairPlan(("p3b", "uniform-magnitude"), (("global-taylor", "uniform-magnitude"),), 1.0)
    comparison = compare_methods(trials, plan, METHODS)
    close = pair_row(comparison, 0.5, "p3b", "uniform-magnitude")
    wide = pair_row(comparison, 0.5, "global-taylor", "uniform-magnitude")
    assert (close["role"], wide["role"]) == ("primary", "equivalence")
    assert close["equivalence"] == "equivalent within ±1" and close["p_tost_holm"] < 0.05
    assert wide["equivalence"] == "not shown equivalent (±1)"
    assert pair_row(comparison, 0.5, "p3b", "global-taylor")["equivalence"] == ""  # not asked about
    strict = compare_methods(trials, PairPlan(("p3b", "uniform-magnitude"), (), 0.05), METHODS)
    assert pair_row(strict, 0.5, "p3b", "uniform-magnitude")["equivalence"] == "not shown equivalent (±0.05)"


def test_declared_pairs_come_first_as_declared_and_once():
    plan = PairPlan(("global-taylor", "p3b"), (("p3b", "global-taylor"), ("global-taylor", "uniform-magnitude")), 1.0)
    pairs = compare_methods(TRIALS, plan, METHODS).pairs
    assert list(zip(pairs["prune_ratio"], pairs["a"], pairs["b"], pairs["role"])) == [
        (0.5, "global-taylor", "p3b", "primary"), (0.5, "global-taylor", "uniform-magnitude", "equivalence"),
        (0.5, "p3b", "uniform-magnitude", "pair"), (0.75, "p3b", "uniform-magnitude", "pair")]
    assert pairs["diff"].iloc[0] == pytest.approx(-(3 + 0.1 * 2 - 0.3 * 2 / 5))


def test_pairs_without_a_test_are_said_so_and_left_out_of_the_family():
    trials = results([("p3b", 0.5, 0, 80.0), ("p3b", 0.5, 1, 81.0), ("uniform-magnitude", 0.5, 1, 79.0)]
                     + [("p3b", 0.75, s, 80.0 + s) for s in range(3)]
                     + [("uniform-magnitude", 0.75, s, 79.5 + s) for s in range(3)])
    comparison = compare_methods(trials, NO_PLAN, METHODS)
    assert pair_row(comparison, 0.5, "p3b", "uniform-magnitude")["verdict"] == "not tested (1 common seed)"
    same = pair_row(comparison, 0.75, "p3b", "uniform-magnitude")
    assert same["verdict"] == "not tested (Δ +0.50 on every seed)" and math.isnan(same["p_holm"])
    assert comparison.pairs["p"].notna().sum() == 0


def test_friedman_omnibus_per_ratio_over_the_seeds_every_method_ran():
    trials = pd.concat([TRIALS, results([("global-taylor", 0.75, s, 70.0 + s) for s in range(2)])])
    omnibus = compare_methods(trials, NO_PLAN, METHODS).omnibus.set_index("prune_ratio")
    # ratio 0.5: every seed ranks p3b > uniform-magnitude > global-taylor: rank sums 15, 10, 5 over
    # 5 seeds; chi2 = 12 / (5 * 3 * 4) * 350 - 3 * 5 * 4 = 10 on 2 df, p = exp(-5)
    assert omnibus.loc[0.5, "statistic"] == pytest.approx(10.0) and omnibus.loc[0.5, "p"] == pytest.approx(math.exp(-5))
    assert (omnibus.loc[0.5, "methods"], omnibus.loc[0.5, "seeds"]) == (3, 5)
    assert omnibus.loc[0.75, "seeds"] == 2 and omnibus.loc[0.75, "note"] == ""  # seeds 0 and 1 only
    two = compare_methods(TRIALS, NO_PLAN, METHODS).omnibus.set_index("prune_ratio")
    assert two.loc[0.75, "note"] == "needs >= 3 methods; got 2" and math.isnan(two.loc[0.75, "p"])
    assert 0.0 not in two.index  # dense is in no pair and no omnibus


LADDER = {0.25: 7.5e5, 0.5: 5e5, 0.75: 2.5e5}  # global-taylor's MACs per ratio; top-1 = 60 + 4e-5 x MACs


def test_top1_at_matched_macs_is_exact_on_a_linear_ladder_and_na_outside_it():
    """P3B keeps more MACs than global-taylor at each ratio: global-taylor's top-1 is read at
    P3B's MACs along its own ladder (exact here, where top-1 is linear in MACs), never beyond it."""
    p3b_macs = {0.25: 8e5, 0.5: 6e5, 0.75: 3e5}
    trials = results([("global-taylor", r, s, 60 + 4e-5 * m + (0.5 if s else -0.5)) for r, m in LADDER.items()
                      for s in range(2)]
                     + [("p3b", r, s, 90.0 - 10 * r) for r in LADDER for s in range(2)]
                     + [("svite", r, s, 80.0) for r in LADDER for s in range(2)],
                     macs={**{("global-taylor", r): m for r, m in LADDER.items()},
                           **{("p3b", r): m for r, m in p3b_macs.items()}, **{("svite", r): 1e6 for r in LADDER}})
    table = summary_table(trials, METHODS, primary="p3b").set_index(["method", "prune_ratio"])
    assert table.loc[("global-taylor", 0.5), "matched_macs"] == 6e5
    assert table.loc[("global-taylor", 0.5), "top1_at_matched_macs"] == pytest.approx(84.0)
    assert table.loc[("global-taylor", 0.75), "top1_at_matched_macs"] == pytest.approx(72.0)
    assert math.isnan(table.loc[("global-taylor", 0.25), "top1_at_matched_macs"])  # 8e5 is above its ladder
    assert table.loc[("p3b", 0.5), "top1_at_matched_macs"] == pytest.approx(85.0)  # the primary: itself
    assert math.isnan(table.loc[("svite", 0.5), "top1_at_matched_macs"])  # its MACs never change: no function of MACs


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1e5, 1e7), min_size=2, max_size=6, unique=True), st.floats(-1e-5, 1e-5),
       st.floats(0.0, 1.0), st.floats(-1.0, 2.0))
def test_matched_top1_is_linear_between_rungs_and_never_extrapolates(macs, slope, where, outside):
    top1 = [50.0 + slope * m for m in macs]
    low, high = min(macs), max(macs)
    inside = low + where * (high - low)
    assert matched_top1(macs, top1, inside) == pytest.approx(50.0 + slope * inside, rel=1e-9, abs=1e-9)
    beyond = low + outside * (high - low)
    if not low <= beyond <= high:
        assert math.isnan(matched_top1(macs, top1, beyond))
    assert math.isnan(matched_top1(macs + [macs[0]], top1 + [top1[0] + 1], inside))  # two rungs, same MACs


def test_markdown_reports_the_family_the_primary_first_and_every_ratio(tmp_path):
    study = study_from(tmp_path, "name: cmp\n")
    comparison = compare_methods(TRIALS, PairPlan(("p3b", "uniform-magnitude"), (), 1.0), METHODS)
    text = markdown(study, comparison, "python search.py compare cmp --primary p3b:uniform-magnitude")
    lines = text.splitlines()
    assert lines[0].startswith("Method comparison of study cmp (vit_tiny_patch16_224, data digits)")
    assert "Holm-adjusted over the family of all 4 paired tests of this report (every pair at every prune ratio)" \
        in lines[0]
    assert lines[2].startswith("Recipe: 10 prune (constant) + 5 fine-tune (cosine) epochs")
    assert "Command: `python search.py compare cmp --primary p3b:uniform-magnitude`" in text
    headings = [line for line in lines if line.startswith("#")]
    assert headings == ["## Methods", "## Primary comparison: A = p3b, B = uniform-magnitude (declared)",
                        "## All pairs (family: the 4 paired t tests of this report, every pair at every prune ratio, "
                        "Holm-adjusted together)", "### Prune ratio 0.5", "### Prune ratio 0.75"]
    assert ("| method | structured | prune ratio | n (seeds) | top-1 % | top-1 95% CI | kept params | "
            "MACs/image (M) | top-1 % at p3b's MACs |") in lines
    assert "| dense | yes | 0 | 5 | 88.60 | [81.02, 96.18] | 1.000 | 1 | — |" in lines
    assert ("Friedman omnibus over 3 methods x 5 seeds every method ran: χ²(2) = 10.00, p = 0.007 "
            "(unadjusted).") in lines
    assert "Friedman omnibus: n/a (needs >= 3 methods; got 2)." in lines
    primary = lines[lines.index(headings[1]) + 4]
    assert primary.startswith("| 0.5 | 5 | +2.20 | [+2.00, +2.40] | < 0.001 | < 0.001 | p3b better | "
                              "not shown equivalent (±1) | 83.60 | +2.20 |")
    plain = markdown(study, compare_methods(TRIALS, NO_PLAN, METHODS))
    assert "None declared (`--primary A:B`" in plain and "equivalence" not in plain.split("## All pairs")[1]


def test_compare_plan_takes_the_command_line_over_the_study_file_and_checks_it(tmp_path):
    study = study_from(tmp_path, GRID_STUDY.replace("tracking: {enabled: false}\n", "tracking: {enabled: false}\n"
                                                    "compare: {primary: \"p3b:uniform-magnitude\", margin: 0.5}\n"))
    assert compare_plan(study) == PairPlan(("p3b", "uniform-magnitude"), (), 0.5)
    assert compare_plan(study, primary="uniform-magnitude:p3b", margin=2.0, equivalence=["p3b:uniform-magnitude"]) \
        == PairPlan(("uniform-magnitude", "p3b"), (("p3b", "uniform-magnitude"),), 2.0)
    bad = {("p3b:uniform-magnitud", None): "--primary p3b:uniform-magnitud: 'uniform-magnitud' is not a method of "
                                           "this study: did you mean uniform-magnitude? use one of p3b, "
                                           "uniform-magnitude (study 'cmp')",
           ("p3b", None): "--primary p3b: must be two method names as A:B, e.g. p3b:global-taylor (got 'p3b')",
           ("dense:p3b", None): "--primary dense:p3b: dense is the reference (prune ratio 0) and pairs with no "
                                "pruned method: name two pruning methods (study 'cmp')",
           (None, "p3b:p3b"): "--equivalence p3b:p3b: compares p3b with itself: name two different methods "
                              "(study 'cmp')"}
    for (primary, equivalence), message in bad.items():
        with pytest.raises(StudyError) as error:
            compare_plan(study, primary=primary, equivalence=[equivalence] if equivalence else None)
        assert str(error.value) == message


def comparison_folder(tmp_path: Path, compare_section: str = "") -> Path:
    """A study folder of GRID_STUDY as a run leaves it for compare (study.yaml, trials.parquet):
    p3b 2 points above uniform-magnitude on 5 seeds at both ratios, dense once per seed."""
    study = study_from(tmp_path, GRID_STUDY + compare_section)
    study.layout.root.mkdir(parents=True)
    study.layout.study_file.write_text((tmp_path / "study.yaml").read_text())
    rows = [("dense", math.nan, s, 90.0 + s, 4e3) for s in range(5)]
    rows += [(m, r, s, 80.0 + s + (2.0 + 0.3 * (s % 2) if m == "p3b" else 0.0),
              4e3 * (1 - r) * (1.1 if m == "p3b" else 1.0))
             for r in (0.5, 0.75) for m in ("p3b", "uniform-magnitude") for s in range(5)]
    frame = pd.DataFrame({"number": range(len(rows)), "state": "COMPLETE",
                          "method": [r[0] for r in rows], "param.method": [r[0] for r in rows],
                          "param.method_config.prune_ratio": [r[1] for r in rows],
                          "param.training.seed": [r[2] for r in rows], "top1": [r[3] for r in rows],
                          "macs": [r[4] for r in rows], "kept_fraction": [1 - (0 if math.isnan(r[1]) else r[1])
                                                                          for r in rows], "params": 0.0})
    write_trials(frame, study.layout)
    return study.layout.root


def test_search_py_compare_writes_the_report_and_its_tables(tmp_path, capsys):
    folder = comparison_folder(tmp_path)
    prefix = tmp_path / "out" / "cmp"
    argv = ["compare", str(folder), "--primary", "p3b:uniform-magnitude", "--margin", "0.5", "--out", str(prefix)]
    assert search.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Method comparison of study cmp") and "all 2 paired tests" in out.splitlines()[0]
    assert f"wrote {prefix}.md" in out and f"wrote {prefix}_pairs.parquet" in out
    pairs = pd.read_parquet(f"{prefix}_pairs.parquet")
    assert pairs[["prune_ratio", "a", "b", "role"]].values.tolist() == [
        [0.5, "p3b", "uniform-magnitude", "primary"], [0.75, "p3b", "uniform-magnitude", "primary"]]
    assert (pairs["verdict"] == "p3b better").all() and (pairs["margin"] == 0.5).all()
    methods = pd.read_parquet(f"{prefix}.parquet")
    assert methods["method"].tolist() == ["dense", "p3b", "uniform-magnitude", "p3b", "uniform-magnitude"]
    # p3b keeps 10 % more MACs: uniform-magnitude read at p3b's MACs along its own ladder (1000 to 2000 MACs)
    um = methods[methods["method"] == "uniform-magnitude"].set_index("prune_ratio")
    assert um.loc[0.75, "matched_macs"] == pytest.approx(1100.0)
    assert um.loc[0.75, "top1_at_matched_macs"] == pytest.approx(um.loc[0.75, "top1"])  # same top-1 on both rungs
    assert math.isnan(um.loc[0.5, "top1_at_matched_macs"])  # 2200 MACs: above its ladder
    assert pd.read_parquet(f"{prefix}_omnibus.parquet")["note"].tolist() == ["needs >= 3 methods; got 2"] * 2
    assert "Command: `python search.py compare cmp --primary p3b:uniform-magnitude --margin 0.5 --out " \
           f"{prefix}`" in Path(f"{prefix}.md").read_text()


def test_a_study_file_named_on_the_command_line_brings_its_compare_section(tmp_path, capsys):
    folder = comparison_folder(tmp_path)
    (tmp_path / "study.yaml").write_text((tmp_path / "study.yaml").read_text()
                                         + "compare: {primary: \"uniform-magnitude:p3b\"}\n")
    assert search.main(["compare", str(folder)]) == 0
    assert "None declared" in capsys.readouterr().out  # the folder's copy declares nothing
    assert search.main(["compare", str(tmp_path / "study.yaml")]) == 0
    assert "## Primary comparison: A = uniform-magnitude, B = p3b (declared)" in capsys.readouterr().out


def test_search_py_compare_rejects_a_bad_primary_in_one_line(tmp_path, capsys):
    folder = comparison_folder(tmp_path)
    assert search.main(["compare", str(folder), "--primary", "p3b:global-taylor"]) == 2
    assert capsys.readouterr().err == ("error: --primary p3b:global-taylor: 'global-taylor' is not a method of this "
                                       "study: use one of p3b, uniform-magnitude (study 'cmp')\n")
    with pytest.raises(SystemExit):
        search.main(["compare", str(folder), "--margin", "0"])
    assert capsys.readouterr().err.splitlines()[-1] == ("search.py compare: error: argument --margin: must be a "
                                                        "number > 0 (got '0')")


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
    assert search.main(["compare", "cmp", "--output-dir", str(tmp_path / "runs"), "--primary", "p3b:uniform-magnitude",
                        "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Method comparison of study cmp")
    assert f"wrote {prefix}.md" in out and f"wrote {prefix}_depth.png" in out
    table = pd.read_parquet(f"{prefix}.parquet")
    assert table["method"].tolist() == ["dense", "p3b", "uniform-magnitude", "p3b", "uniform-magnitude"]
    assert table["n"].tolist() == [5] * 5 and table["kept_fraction"].iloc[0] == 1.0
    # the test objective trains p3b and uniform-magnitude alike: identical per seed, also at matched MACs
    pairs = pd.read_parquet(f"{prefix}_pairs.parquet")
    assert (pairs["diff"] == 0).all() and (pairs["verdict"] == "not tested (Δ +0.00 on every seed)").all()
    same = table[table["method"] == "uniform-magnitude"]
    assert same["top1_at_matched_macs"].tolist() == pytest.approx(same["top1"].tolist())
    assert Path(f"{prefix}.md").read_text().startswith("Method comparison of study cmp")


def test_compare_of_a_search_study_folder(study_folder, capsys):  # noqa: F811
    """Any study folder compares: a P3B-only search gives one row per sampled prune ratio, no pairs."""
    assert search.main(["compare", str(study_folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Method comparison of study cli") and "all 0 paired tests" in out.splitlines()[0]
    methods = out.split("## Methods")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in methods.splitlines() if line.startswith("| p3b")] == ["| p3b"] * 3
    empty = study_folder.parent / "empty"
    empty.mkdir()
    (empty / "study.yaml").write_text((study_folder / "study.yaml").read_text().replace("name: cli", "name: empty"))
    assert search.main(["compare", str(empty)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "(no finished trials yet)"
