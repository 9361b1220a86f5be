"""The front a person reads: dense reference point, normalised hypervolume, flops, merged
points, method colours, run links, unit-labelled tables."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p3b_search.study.dense import DenseReference, dense_accuracy
from p3b_search.study.front import pareto_summary
from p3b_search.study.front_figures import merge_identical, pareto_plotly, pareto_png
from p3b_search.study.front_report import front_files, hover_text
from p3b_search.study.pareto import hypervolume, normalized_hypervolume
from p3b_search.study.results import trials_frame
from p3b_search.study.sections import StudyConfig
from p3b_search.study.tables import display_table
from p3b_search.units import column_title, count_text, prefix_for, value_text

DIRECTIONS = {"top1": "maximize", "macs": "minimize"}
DENSE_MACS = 4.6e9


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 80), st.floats(0, DENSE_MACS)), min_size=1, max_size=10),
       st.floats(1, 100))
def test_normalised_hypervolume_is_the_share_of_the_dense_box(points, dense_top1):
    values = np.array(points)
    reference, ideal = [0.0, DENSE_MACS], [dense_top1, 0.0]
    share = normalized_hypervolume(values, ["maximize", "minimize"], reference, ideal)
    assert share == pytest.approx(hypervolume(values, ["maximize", "minimize"], reference) / (dense_top1 * DENSE_MACS))
    if (values[:, 0] <= dense_top1).all():
        assert 0.0 <= share <= 1.0 + 1e-12
    free = normalized_hypervolume(np.vstack([values, [dense_top1, 0.0]]), ["maximize", "minimize"], reference, ideal)
    assert free == pytest.approx(1.0) or free > 1.0  # dense accuracy for free fills the box


def test_normalised_hypervolume_is_nan_without_a_dense_accuracy():
    assert math.isnan(normalized_hypervolume(np.array([[50.0, 1e9]]), ["maximize", "minimize"], [0.0, 4e9],
                                             [math.nan, 0.0]))


def trials(rows: list[tuple]) -> pd.DataFrame:
    """(number, method, top1, macs) rows as COMPLETE trials."""
    frame = pd.DataFrame(rows, columns=["number", "method", "top1", "macs"])
    return frame.assign(state="COMPLETE", params=frame["macs"] / 1000, kept_fraction=frame["macs"] / DENSE_MACS,
                        **{"param.method": frame["method"], "param.method_config.prune_ratio": 0.5})


def test_dense_trials_are_the_reference_never_the_front():
    frame = trials([(0, "p3b", 80.0, 2e9), (1, "dense", 90.0, DENSE_MACS), (2, "dense", 92.0, DENSE_MACS),
                    (3, "p3b", 70.0, 1e9)])
    study = StudyConfig(name="s")
    accuracy, source = dense_accuracy(study, frame)
    assert accuracy == {"top1": 91.0} and source == "mean of 2 dense trials"
    given_figure = StudyConfig(name="s", dense_reference={"top1": 88.5})
    assert dense_accuracy(given_figure, frame) == ({"top1": 88.5}, "dense_reference in the study file")
    dense = DenseReference({"top1": 91.0, "macs": DENSE_MACS}, source)
    state = pareto_summary(frame, DIRECTIONS, [0.0, DENSE_MACS], dense)
    assert list(state.finished["number"]) == [0, 3] and state.on_front.all()
    expected = (80 * 2.6e9 + 70 * 1e9) / (91.0 * DENSE_MACS)
    assert state.hypervolume_normalized == pytest.approx(expected)


def test_flops_are_twice_the_macs_in_the_trials_table():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[80.0, 3e9], params={}, distributions={}))
    frame = trials_frame(study.get_trials(), ["top1", "macs"], ["maximize", "minimize"], [0.0, DENSE_MACS])
    assert frame.loc[0, "flops"] == 6e9
    flops_study = optuna.create_study(directions=["maximize", "minimize"])
    flops_study.add_trial(optuna.trial.create_trial(values=[80.0, 6e9], params={}, distributions={},
                                                    user_attrs={"final_macs": 3e9}))
    assert trials_frame(flops_study.get_trials(), ["top1", "flops"], ["maximize", "minimize"],
                        [0.0, 2 * DENSE_MACS]).loc[0, "flops"] == 6e9


def test_units_read_as_a_person_writes_them():
    assert count_text(4.6e9) == "4.6G" and count_text(1.81e6) == "1.81M" and count_text(512) == "512"
    assert value_text("top1", 91.234) == "91.2%" and value_text("flops", 9.2e9) == "9.2G"
    assert prefix_for([3e6, 5.3e6]) == ("M", 1e6)
    assert column_title("macs", "G") == "MACs per image (G)" and column_title("flops", "G") == "FLOPs per image (G)"
    assert column_title("top1") == "top1 (%)"


def test_tables_show_one_method_column_units_and_the_dense_row_first():
    frame = trials([(0, "p3b", 80.0, 2.3e9), (1, "uniform-magnitude", 75.0, 1.1e9)])
    dense = DenseReference({"top1": 91.0, "macs": DENSE_MACS, "params": 22e6}, "mean of 2 dense trials")
    table = display_table(frame, ["top1", "macs"], dense)
    assert list(table.columns).count("method") == 1 and "param.method" not in table.columns
    assert {"prune_ratio", "top1 (%)", "MACs per image (G)", "params (M)", "kept fraction"} <= set(table.columns)
    assert table.iloc[0]["number"] == "dense" and table.iloc[0]["MACs per image (G)"] == "4.600"
    assert table.iloc[1]["MACs per image (G)"] == "2.300" and table.iloc[1]["kept fraction"] == "0.500"


def test_identical_trials_merge_into_one_labelled_point():
    frame = trials([(0, "p3b", 80.0, 2e9), (1, "p3b", 80.0, 2e9), (2, "p3b", 70.0, 1e9)])
    assert merge_identical(frame, ["top1", "macs"]) == [[0, 1], [2]]
    state = pareto_summary(frame, DIRECTIONS, [0.0, DENSE_MACS])
    hover = [f"trial {n}" for n in frame["number"]]
    fig = pareto_plotly(state.finished, DIRECTIONS, state.on_front, state.knee, hover, "front")
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert len(front.x) == 2 and "#0, #1 (×2)" in front.text
    assert "trial 0<br>―――<br>trial 1" in front.hovertext


def test_figure_marks_dense_knee_methods_units_and_links():
    frame = trials([(0, "p3b", 80.0, 2e9), (1, "uniform-magnitude", 75.0, 1e9), (2, "uniform-magnitude", 60.0, 3e9)])
    frame["mlflow_run_id"] = ["r0", "r1", "r2"]
    dense = DenseReference({"top1": 91.0, "macs": DENSE_MACS}, "mean of 3 dense trials")
    state = pareto_summary(frame, DIRECTIONS, [0.0, DENSE_MACS], dense)
    files = front_files(state, "s", link=lambda run: f"http://ui/{run}")
    fig = files["front.html"]
    names = [t.name for t in fig.data]
    assert {"p3b: front", "uniform-magnitude: front", "uniform-magnitude: dominated", "knee", "dense model"} <= set(names)
    dense_trace = next(t for t in fig.data if t.name == "dense model")
    assert dense_trace.x[0] == pytest.approx(4.6) and dense_trace.y[0] == 91.0  # MACs in G
    assert fig.layout.xaxis.title.text == "MACs per image (G), lower is better"
    p3b = next(t for t in fig.data if t.name == "p3b: front")
    assert list(p3b.customdata) == ["http://ui/r0"] and "click to open: http://ui/r0" in p3b.hovertext[0]
    png = files["front.png"]
    assert png.axes[0].get_xlabel() == "MACs per image (G), lower is better"
    assert any("fraction of the dense" in ax.get_xlabel() for ax in png.axes[0].child_axes)
    summary = files["summary.parquet"].iloc[0]
    assert summary["dense.top1"] == 91.0 and summary["hypervolume_normalized"] == pytest.approx(
        state.hypervolume_normalized) and summary["knee_trial"] in (0.0, 1.0)


def test_chosen_trial_is_ringed_and_unknown_dense_accuracy_draws_its_cost():
    frame = trials([(0, "p3b", 80.0, 2e9), (1, "p3b", 70.0, 1e9)])
    state = pareto_summary(frame, DIRECTIONS, [0.0, DENSE_MACS])
    dense = DenseReference({"macs": DENSE_MACS})
    png = pareto_png(state.finished, DIRECTIONS, state.on_front, state.knee, "front", dense=dense, chosen=1)
    labels = png.axes[0].get_legend_handles_labels()[1]
    assert "exported: trial 1" in labels and "dense cost (accuracy unknown)" in labels


def test_hover_lists_objectives_with_units_and_parameters():
    row = trials([(7, "p3b", 81.25, 2.5e9)]).iloc[0]
    text = hover_text(row, ["top1", "macs"], None)
    assert text.startswith("<b>trial 7</b> (p3b)") and "top1: 81.2%" in text and "macs: 2.5G" in text
    assert "param.method_config.prune_ratio: 0.5" in text and "kept_fraction" in text


def test_a_study_without_finished_trials_still_gets_its_files():
    frame = trials([(0, "p3b", 80.0, 2e9)]).assign(state="RUNNING")
    dense = DenseReference({"top1": 91.0, "macs": DENSE_MACS}, "mean of 1 dense trial")
    state = pareto_summary(frame, DIRECTIONS, [0.0, DENSE_MACS], dense)
    files = front_files(state, "s")
    assert files["front.parquet"].empty and state.hypervolume == 0.0 and state.hypervolume_normalized == 0.0
    assert [t.name for t in files["front.html"].data][-1] == "dense model"


def test_flops_objective_is_referenced_at_twice_the_dense_macs():
    from p3b_search.study.dense import dense_cost
    from p3b_search.study.front import reference_point

    study = StudyConfig(name="s", objectives=[{"name": "top1"}, {"name": "flops"}])
    cost = dense_cost(study)
    assert cost["flops"] == 2 * cost["macs"] > 0
    assert reference_point(study, cost) == [0.0, cost["flops"]]


def test_knee_pick_leaves_dense_trials_out():
    from p3b_search.export.load import ExportError
    from p3b_search.export.picks import Pick, select_trial

    # dense and trial 1 tie for the knee of the two points; the tie would go to the first row, dense
    frame = trials([(0, "dense", 90.0, DENSE_MACS), (1, "p3b", 10.0, 1e9)]).assign(pareto=[False, True])
    objectives = list(DIRECTIONS.items())
    assert select_trial(frame, Pick.parse("knee"), objectives)["number"] == 1
    with pytest.raises(ExportError, match="only dense trials"):
        select_trial(frame[frame["method"] == "dense"], Pick.parse("knee"), objectives)
