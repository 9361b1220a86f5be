"""The committed result tables agree with the committed raw data they were made from.

Each table listed in ``benchmarks/RESULTS.md`` ("Raw data and how each table is made") as having
its raw data in the repository is recomputed here from that Parquet or JSON file, with the table
code of the script that wrote it, and compared as text with the committed Markdown (the
``benchmarks/results/*.md`` file and, where RESULTS.md quotes the table, its copy there). Reads
files only: no study, no training.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"


def table_lines(text: str, header: str) -> list[str]:
    """The lines of the Markdown table in ``text`` whose header row is ``header``."""
    lines = text.splitlines()
    assert header in lines, f"no table with the header {header!r}"
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def assert_block_in(block: list[str], text: str, where: str) -> None:
    """``block`` (lines) occurs in ``text`` as consecutive lines."""
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if line == block[0]]
    assert any(lines[i:i + len(block)] == block for i in found), (
        f"{where} does not hold, as consecutive lines, the table recomputed from the raw data:\n" + "\n".join(block))


def test_quickstart_first_front_table_in_results_is_the_committed_trials() -> None:
    """RESULTS.md section 9: ``python -m benchmarks.quickstart_first_front table``."""
    from benchmarks.quickstart_first_front import table

    assert_block_in(table(max_macs=0.5, points=2.0).splitlines(), RESULTS_MD.read_text(), "RESULTS.md")


def test_early_stopping_savings_table_is_its_committed_runs() -> None:
    """``prune_stage_stopping_savings.md`` (and RESULTS.md section 8) from its ``.parquet``."""
    from benchmarks.early_stopping_savings import markdown

    committed = (RESULTS / "prune_stage_stopping_savings.md").read_text()
    command = committed.splitlines()[2].strip()  # the run's command, not in the per-run rows
    recomputed = markdown("prune_stage_stopping", pd.read_parquet(RESULTS / "prune_stage_stopping_savings.parquet"),
                          command)
    assert recomputed == committed
    lines = recomputed.splitlines()
    header = next(line for line in lines if line.startswith("| seed |"))
    assert_block_in(lines[lines.index(header):], RESULTS_MD.read_text(), "RESULTS.md section 8")


def test_glyphs_calibration_pilot_figures_are_its_committed_trials() -> None:
    """``glyphs_calibration_pilot.md`` below its command and recipe lines (the wall time is not
    in the trial rows), from its ``.parquet``, at the script's default prune ratio 0.75."""
    from benchmarks.task_calibration import figures

    committed = (RESULTS / "glyphs_calibration_pilot.md").read_text()
    recomputed = figures(pd.read_parquet(RESULTS / "glyphs_calibration_pilot.parquet"), 0.75)
    assert committed.endswith("\n" + recomputed), f"recomputed figures:\n{recomputed}"


@pytest.mark.parametrize(("name", "dense_from"), [
    ("methods", None), ("methods_lr1e-2", None), ("dimap_svite", None), ("dimap_swin", None),
    ("p3b_variants", "methods"),
])
def test_digits_method_tables_are_their_committed_trials(name: str, dense_from: str | None) -> None:
    """The digits-task tables of the former ``benchmarks/methods.py`` from their ``.parquet``
    (``python -m benchmarks.digits_methods_table``); the recipe and wall-time lines are not in the rows."""
    from benchmarks.digits_methods_table import dense_params, summary_table

    trials = pd.read_parquet(RESULTS / f"{name}.parquet")
    dense = dense_params(pd.read_parquet(RESULTS / f"{dense_from or name}.parquet"))
    recomputed = summary_table(trials, dense).splitlines()
    assert table_lines((RESULTS / f"{name}.md").read_text(), recomputed[0]) == recomputed


def test_framework_overhead_table_in_results_is_its_committed_timings() -> None:
    """RESULTS.md section 1's table and medians from ``framework_overhead.json``."""
    from benchmarks.framework_overhead import ratios, table

    runs = json.loads((RESULTS / "framework_overhead.json").read_text())["runs"]
    text = RESULTS_MD.read_text()
    assert_block_in(table(runs), text, "RESULTS.md section 1")
    medians = [statistics.median(ratios(runs, select)) for select in (slice(1, None), slice(0, 1))]
    assert f"**trial on a reused worker {medians[0]:.3f}; first trial of a worker {medians[1]:.3f};" in text


def test_tabular_dense_reference_in_results_is_its_committed_trials() -> None:
    """RESULTS.md section 9: the dense reference of the tabular recipe from ``tabular_glyphs_dense.parquet``."""
    trials = pd.read_parquet(RESULTS / "tabular_glyphs_dense.parquet").sort_values("param.training.seed")
    per_seed = ", ".join(f"{v:.2f}" for v in trials["top1"])
    quoted = f"**{trials['top1'].mean():.2f} %** ({per_seed}; std {trials['top1'].std(ddof=1):.2f})"
    assert quoted in RESULTS_MD.read_text()


def test_tabular_benchmark_rungs_and_verdicts_are_their_committed_raw_data() -> None:
    """RESULTS.md section 9: ``tabular_glyphs_rungs.md`` from ``tabular_glyphs.parquet`` and
    ``tabular_glyphs_verdicts.md`` from the replay's ``tabular_glyphs_replay.parquet``."""
    from benchmarks.tabular_benchmark import (
        HV_MARGIN,
        RUNG_ETA,
        rung_fidelity,
        rungs_markdown,
        verdict_tables,
        verdicts_markdown,
    )
    from p3b_search.study.tabular import read_table

    table = RESULTS / "tabular_glyphs.parquet"
    rungs = rungs_markdown(rung_fidelity(read_table(table), RUNG_ETA), RUNG_ETA,
                           "python benchmarks/tabular_benchmark.py rungs", table)
    assert rungs == (RESULTS / "tabular_glyphs_rungs.md").read_text()
    replay = RESULTS / "tabular_glyphs_replay.parquet"
    savings, reference = verdict_tables(pd.read_parquet(replay), HV_MARGIN)
    verdicts = verdicts_markdown(savings, reference, HV_MARGIN, "python benchmarks/tabular_benchmark.py verdicts", replay)
    assert verdicts == (RESULTS / "tabular_glyphs_verdicts.md").read_text()


def test_method_comparison_10seeds_report_is_its_committed_study() -> None:
    """RESULTS.md section 7: ``search.py compare`` over the committed tables of the 10-seed run
    (``benchmarks/results/studies/method_comparison_10seeds/``: study.yaml, trials.parquet,
    allocations.parquet) gives the committed report, word for word."""
    from p3b_search.study.compare import (
        benefit_by_depth,
        compare_methods,
        compare_plan,
        core_benefits,
        trial_allocations,
        trial_results,
    )
    from p3b_search.study.compare_report import command_line, markdown
    from p3b_search.study.loading import study_from_folder
    from p3b_search.study.results import read_trials

    study = study_from_folder(RESULTS / "studies" / "method_comparison_10seeds")
    plan = compare_plan(study)
    results = trial_results(study, read_trials(study.layout))
    comparison = compare_methods(results, plan, study.candidate_methods())
    prefix = Path("benchmarks/results/method_comparison_10seeds")
    text = markdown(study, comparison, command_line(study, plan, prefix))
    benefits = core_benefits(trial_allocations(study, results))
    text += "\n" + benefit_by_depth(benefits)
    assert text == (RESULTS / "method_comparison_10seeds.md").read_text()


def test_depth_benefit_table_is_its_committed_benefits() -> None:
    """RESULTS.md section 7: ``benchmarks/depth_benefit.py table`` from ``depth_benefit_rows.parquet``."""
    from benchmarks.depth_benefit import arrival_times, depth_correlations, markdown, summary

    benefits = pd.read_parquet(RESULTS / "depth_benefit_rows.parquet")
    text = markdown(summary(depth_correlations(arrival_times(benefits))), benefits)
    assert text + "\n" == (RESULTS / "depth_benefit.md").read_text()


def test_residual_price_table_is_its_committed_trials() -> None:
    """RESULTS.md section 3: ``benchmarks/residual_price.py table`` from ``residual_price.parquet``."""
    from benchmarks.residual_price import markdown

    assert markdown(pd.read_parquet(RESULTS / "residual_price.parquet")) == (RESULTS / "residual_price.md").read_text()


def test_search_evidence_table_is_its_committed_runs() -> None:
    """``search_evidence.md`` (and RESULTS.md section 9) from its runs and histories."""
    from benchmarks.early_stopping_savings import HV_MARGIN
    from benchmarks.search_evidence import markdown

    committed = (RESULTS / "search_evidence.md").read_text()
    command = committed.splitlines()[2].strip()
    recomputed = markdown("search_evidence", pd.read_parquet(RESULTS / "search_evidence_runs.parquet"),
                          pd.read_parquet(RESULTS / "search_evidence_history.parquet"), HV_MARGIN, command)
    assert recomputed == committed
    lines = recomputed.splitlines()
    header = next(line for line in lines if line.startswith("| seed |"))
    assert_block_in(lines[lines.index(header):], RESULTS_MD.read_text(), "RESULTS.md section 9")
