"""Parquet results: the trials table from Optuna's records, allocation parts, safe rewrites."""
from __future__ import annotations

import threading

import hypothesis.strategies as st
import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from p3b_search.study.layout import StudyLayout
from p3b_search.study.pareto import pareto_mask
from p3b_search.study.results import (
    TrialPartWriter,
    annotations_of,
    merge_allocations,
    read_allocations,
    read_trials,
    trials_frame,
    write_trials,
)
from p3b_search.study.trials_table import RAY_TRIAL_ATTR, ended_count, study_done

NAMES, DIRECTIONS, REFERENCE = ["top1", "macs"], ["maximize", "minimize"], [0.0, 4e6]
RATIO = FloatDistribution(0.2, 0.9)


def recorded_study() -> optuna.Study:
    """Trials in every state, as the searcher leaves them."""
    study = optuna.create_study(directions=DIRECTIONS)

    def ask(ratio: float, ran: bool = True) -> optuna.Trial:
        study.enqueue_trial({"method_config.prune_ratio": ratio})
        trial = study.ask({"method_config.prune_ratio": RATIO})
        if ran:  # handed to Ray, as the searcher marks it
            trial.set_user_attr(RAY_TRIAL_ATTR, f"ray{trial.number}")
        return trial

    for ratio, values in [(0.5, [90.0, 2e6]), (0.7, [85.0, 1e6]), (0.3, [80.0, 3e6]), (0.6, [90.0, 2e6])]:
        trial = ask(ratio)
        trial.set_user_attr("final_top5", 99.0)
        study.tell(trial, values)
    study.tell(ask(0.4), state=TrialState.PRUNED)
    invalid = ask(0.8, ran=False)
    invalid.set_user_attr("fail_reason", "invalid sample: method_config: start after finalize")
    study.tell(invalid, state=TrialState.FAIL)
    crashed = ask(0.45)
    crashed.set_user_attr("fail_reason", "CUDA error")
    study.tell(crashed, state=TrialState.FAIL)
    ask(0.5)  # running
    study.enqueue_trial({"method_config.prune_ratio": 0.5})  # waiting: not a row
    return study


def test_trials_frame_has_one_row_per_started_trial():
    study = recorded_study()
    frame = trials_frame(study.get_trials(), NAMES, DIRECTIONS, REFERENCE, {7: {"epochs_done": 3, "ray_trial_id": "abc"}},
                         default_method="p3b")
    assert frame["number"].tolist() == list(range(8))
    # the invalid sample never ran: no failure, and no trial towards n_trials
    assert frame["state"].tolist() == ["COMPLETE"] * 4 + ["PRUNED", "NEVER_RAN", "FAIL", "RUNNING"]
    assert ended_count(frame["state"]) == 6 and study_done(frame["state"], 6) and not study_done(frame["state"], 7)
    assert (frame["method"] == "p3b").all()
    assert frame.loc[0, "param.method_config.prune_ratio"] == 0.5
    assert frame.loc[0, "top5"] == 99.0 and np.isnan(frame.loc[4, "top1"])
    assert frame.loc[5, "fail_reason"] == "invalid sample: method_config: start after finalize"
    assert frame.loc[6, "fail_reason"] == "CUDA error"
    assert frame.loc[7, "epochs_done"] == 3 and frame.loc[7, "ray_trial_id"] == "abc"
    assert frame["duration_s"].iloc[:7].ge(0).all() and np.isnan(frame.loc[7, "duration_s"])
    complete = frame["state"] == "COMPLETE"
    expected = pareto_mask(frame.loc[complete, NAMES].to_numpy(), DIRECTIONS)
    assert frame.loc[complete, "pareto"].tolist() == expected.tolist() == [True, True, False, True]
    assert not frame.loc[~complete, "pareto"].any()  # a stopped trial is never on the front


def test_trials_table_round_trips_through_parquet(tmp_path):
    layout = StudyLayout(tmp_path)
    study = recorded_study()
    frame = trials_frame(study.get_trials(), NAMES, DIRECTIONS, REFERENCE)
    write_trials(frame, layout)
    again = read_trials(layout)
    pd.testing.assert_frame_equal(again, frame, check_dtype=False)
    notes = annotations_of(again)
    assert set(notes) == set(range(8)) and notes[0]["retries"] == 0


def test_mixed_type_choices_are_stored_as_text(tmp_path):
    study = optuna.create_study(directions=DIRECTIONS)
    dist = {"model.overrides.depth": CategoricalDistribution((None, 4, "auto"))}
    for value in (None, 4, "auto"):
        study.enqueue_trial({"model.overrides.depth": value})
        trial = study.ask(dist)
        assert trial.params["model.overrides.depth"] == value
        study.tell(trial, [1.0, 1.0])
    write_trials(trials_frame(study.get_trials(), NAMES, DIRECTIONS, REFERENCE), StudyLayout(tmp_path))
    column = read_trials(StudyLayout(tmp_path))["param.model.overrides.depth"].tolist()
    assert pd.isna(column[0]) and column[1:] == ["4", "auto"]


def test_readers_never_see_a_partial_trials_table(tmp_path):
    layout = StudyLayout(tmp_path)
    study = recorded_study()
    frame = trials_frame(study.get_trials(), NAMES, DIRECTIONS, REFERENCE)
    write_trials(frame, layout)
    errors, reads = [], []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                reads.append(len(pd.read_parquet(layout.trials_table)))
            except Exception as error:  # noqa: BLE001
                errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(60):
        write_trials(frame, layout)
    done.set()
    thread.join()
    assert not errors and reads and set(reads) == {len(frame)}
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]  # no temporary files left


def rows(update: int, blocks: int = 3) -> list[dict]:
    return [{"step": update * 10, "layer": b // 2, "kind": "attn" if b % 2 == 0 else "mlp", "sub_block": b,
             "keep_ratio": 1.0 - 0.1 * update} for b in range(blocks)]


def test_allocation_parts_merge_and_survive_a_retry(tmp_path):
    layout = StudyLayout(tmp_path)
    first = TrialPartWriter(layout.allocation_parts, 0)
    for epoch in range(3):
        first.write(rows(epoch), epoch)
    # trial 0 failed after epoch 2's rows; Ray restarts it from the checkpoint of epoch 1
    first.clear_from(2)
    first.write(rows(2), 2)
    first.write(rows(3), 3)
    TrialPartWriter(layout.allocation_parts, 1).write(rows(0, blocks=2), 0)
    table = read_allocations(layout)
    assert len(table) == 4 * 3 + 2
    assert not table.duplicated(["trial", "step", "sub_block"]).any()
    assert merge_allocations(layout) == 14
    merged = pq.read_table(layout.allocations_table).to_pandas()
    assert sorted(merged["trial"].unique().tolist()) == [0, 1]
    assert merged.loc[merged["trial"] == 0, "step"].tolist() == [0] * 3 + [10] * 3 + [20] * 3 + [30] * 3


def test_a_folder_kept_without_its_parts_reads_its_merged_allocations(tmp_path):
    import shutil

    layout = StudyLayout(tmp_path)
    for trial in (0, 1):
        TrialPartWriter(layout.allocation_parts, trial).write(rows(trial), 0)
    merge_allocations(layout)
    before = read_allocations(layout)
    shutil.rmtree(layout.allocation_parts)  # what a committed copy of the study's tables keeps
    after = read_allocations(layout)
    assert len(after) == 6
    pd.testing.assert_frame_equal(after.reset_index(drop=True), before.reset_index(drop=True), check_like=True)


def test_no_allocations_yet(tmp_path):
    layout = StudyLayout(tmp_path)
    assert read_allocations(layout).empty and merge_allocations(layout) == 0
    assert not layout.allocations_table.exists()


def test_a_merge_reads_again_only_the_parts_of_trials_still_running(tmp_path):
    from p3b_search.study.results import PartsMerger

    layout = StudyLayout(tmp_path)
    merger = PartsMerger(layout.allocation_parts, layout.allocations_table)
    TrialPartWriter(layout.allocation_parts, 0).write(rows(0), 0)
    TrialPartWriter(layout.allocation_parts, 1).write(rows(0), 0)
    assert merger.merge(final_trials={0}) == 6
    for part in (layout.allocation_parts / "00000").iterdir():
        part.unlink()  # trial 0 ended: its parts are not read again
    TrialPartWriter(layout.allocation_parts, 1).write(rows(1), 1)  # trial 1 runs on
    assert merger.merge(final_trials={0}) == 9
    merged = pq.read_table(layout.allocations_table).to_pandas()
    assert merged.groupby("trial").size().to_dict() == {0: 3, 1: 6}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=30))
def test_repeated_merges_equal_one_merge_of_every_part(tmp_path_factory, events):
    """Trials write parts and end in any order (some write none): after each merge the merged
    table holds every part in trial and part order, as a single merge of all of them would."""
    from p3b_search.study.results import PartsMerger

    layout = StudyLayout(tmp_path_factory.mktemp("merges"))
    merger = PartsMerger(layout.allocation_parts, layout.allocations_table)
    written: dict[int, int] = {}
    ended: set[int] = set()
    for number, ends in events:
        if number not in ended:
            TrialPartWriter(layout.allocation_parts, number).write(rows(written.get(number, 0)), written.get(number, 0))
            written[number] = written.get(number, 0) + 1
        if ends:
            ended.add(number)
        merger.merge(final_trials=frozenset(ended))
        expected = read_allocations(layout).reset_index(drop=True)
        merged = pq.read_table(layout.allocations_table).to_pandas()
        pd.testing.assert_frame_equal(merged, expected[merged.columns])
