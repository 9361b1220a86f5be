"""The driver's trials table kept trial by trial (p3b_search.study.live_table): whatever order
trials start, report and end in, and whenever the table is rewritten, what readers read and the
Pareto summary are those of a table rebuilt from every trial."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from p3b_search.study.front import pareto_summary
from p3b_search.study.live_table import LiveTrialsTable
from p3b_search.study.pareto import pareto_mask
from p3b_search.study.results import read_trials, trials_frame, update_parts
from p3b_search.study.trials_table import RAY_TRIAL_ATTR

NAMES, DIRECTIONS, REFERENCE = ["top1", "macs"], ["maximize", "minimize"], [0.0, 10.0]
OBJECTIVES = dict(zip(NAMES, DIRECTIONS))
T0 = datetime(2026, 12, 6, 12)
ENDS = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED, "FAIL": TrialState.FAIL,
        "NEVER_RAN": TrialState.FAIL}


def frozen(number: int, state: TrialState, method: str, values: list[float] | None, start: int,
           end: int | None, ran: bool = True) -> FrozenTrial:
    """Optuna's record of a trial; ``ran``: handed to Ray (a sample told FAIL unrun is not)."""
    params = {"method": method, "method_config.prune_ratio": 0.1 * (number % 9)}
    return FrozenTrial(number=number, state=state, value=None, values=values,
                       datetime_start=T0 + timedelta(seconds=start),
                       datetime_complete=None if end is None else T0 + timedelta(seconds=end), params=params,
                       distributions={"method": CategoricalDistribution(("p3b", "dense")),
                                      "method_config.prune_ratio": FloatDistribution(0.0, 1.0)},
                       user_attrs={RAY_TRIAL_ATTR: f"ray{number}"} if ran else {}, system_attrs={},
                       intermediate_values={}, trial_id=number)


def number_end(record: FrozenTrial) -> datetime:
    """When a trial ended (the history's order)."""
    return record.datetime_complete


def assert_same_table(left: pd.DataFrame, right: pd.DataFrame) -> None:
    """The same rows and values; a missing text is None in memory and null in Parquet, however
    pandas reads it back (None or NaN)."""
    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.astype(object).where(frame.notna(), None)

    pd.testing.assert_frame_equal(plain(left), plain(right), check_dtype=False)


# one trial: its method, how it ends, its objectives, when it ends (s), epochs trained and shared
trial = st.tuples(st.sampled_from(["p3b", "p3b", "dense"]), st.sampled_from(["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "NEVER_RAN"]),
                  st.sampled_from([20.0, 50.0, 80.0, 95.0, np.nan]), st.sampled_from([1.0, 2.5, 5.0, 9.0, 12.0]),
                  st.integers(0, 40), st.integers(0, 6), st.integers(0, 2))


@given(st.lists(trial, min_size=1, max_size=10), st.data())
@settings(max_examples=25, deadline=None)
def test_the_live_table_reads_as_the_table_rebuilt_from_every_trial(tmp_path_factory, trials, data):
    layout_root = tmp_path_factory.mktemp("study")
    from p3b_search.study.layout import StudyLayout

    layout = StudyLayout(layout_root)
    table = LiveTrialsTable(layout, NAMES, DIRECTIONS, REFERENCE, "p3b")
    records: dict[int, FrozenTrial] = {}
    notes: dict[int, dict] = {}
    # events: each trial starts, then ends; the order interleaves trials (ends may come out of
    # time order: a trial recorded late)
    events = [("start", n) for n in range(len(trials))] + [("end", n) for n in range(len(trials))]
    order = data.draw(st.permutations(events))
    order = sorted(order, key=lambda event: (event[1], event[0] == "end")) if data.draw(st.booleans()) else [
        e for e in order if e[0] == "start"] + [e for e in order if e[0] == "end"]
    for kind, number in order:
        method, state, top1, macs, end, done, shared = trials[number]
        ran = state != "NEVER_RAN"
        if kind == "start":  # a sample that never ran was only asked
            records[number] = frozen(number, TrialState.RUNNING, method, None, number, None, ran)
            notes[number] = {"epochs_done": 0, "ray_trial_id": f"ray{number}"} if ran else {}
        else:
            values = [top1, macs] if state == "COMPLETE" and np.isfinite(top1) else None
            records[number] = frozen(number, ENDS[state] if values or state != "COMPLETE" else TrialState.FAIL,
                                     method, values, number, number + end, ran)
            if ran:
                notes[number] = {**notes[number], "epochs_done": done, "epochs_shared": min(shared, done)}
        changed = table.update([records[n] for n in sorted(records)], notes, {number})
        assert number in changed
        if data.draw(st.booleans()):
            table.rewrite()
        rebuilt = trials_frame([records[n] for n in sorted(records)], NAMES, DIRECTIONS, REFERENCE, notes, "p3b")
        read = read_trials(layout)
        assert_same_table(read, rebuilt)
        assert_same_table(table.frame(), rebuilt)
        live = pareto_summary(rebuilt, OBJECTIVES, REFERENCE, front=table.front)
        batch = pareto_summary(rebuilt, OBJECTIVES, REFERENCE)
        assert live.on_front.tolist() == batch.on_front.tolist()
        # the one front: the pareto column, the summary's, and the Pareto set computed independently
        expected = pareto_mask(live.finished[NAMES].to_numpy(), DIRECTIONS)
        assert live.on_front.tolist() == expected.tolist()
        assert rebuilt.loc[rebuilt["pareto"], "number"].tolist() == live.front["number"].tolist()
        # a sample that never ran is a row, but no ended trial and no point of the history
        ran_and_ended = rebuilt["state"].isin(["COMPLETE", "PRUNED", "FAIL"])
        assert live.history["number"].tolist() == sorted(rebuilt.loc[ran_and_ended, "number"],
                                                         key=lambda n: (number_end(records[n]), n))
        assert live.knee == batch.knee and live.hypervolume == batch.hypervolume
        pd.testing.assert_frame_equal(live.history, batch.history, check_dtype=False)
        assert +table.counts == dict(rebuilt["state"].value_counts())
    table.rewrite()
    assert update_parts(layout) == []  # a rewrite holds every update written before it


def test_an_update_writes_only_the_rows_that_changed(tmp_path):
    from p3b_search.study.layout import StudyLayout

    layout = StudyLayout(tmp_path)
    table = LiveTrialsTable(layout, NAMES, DIRECTIONS, REFERENCE, "p3b")
    records, notes = {}, {}
    for number in range(50):
        records[number] = frozen(number, TrialState.COMPLETE, "p3b", [50.0 + number % 7, 10.0 - number % 5],
                                 number, number + 1)
        notes[number] = {"epochs_done": 3}
        before = table.rows_written
        changed = table.update([records[n] for n in sorted(records)], notes, set())
        # the new row, and the rows it pushed off the front
        assert number in changed and table.rows_written - before == len(changed)
    assert table.update([records[n] for n in sorted(records)], notes, set()) == set()
    notes[3]["retries"] = 1  # a note on an ended trial rebuilds that row only
    assert table.update([records[n] for n in sorted(records)], notes, {3}) == {3}
    assert read_trials(layout).set_index("number").loc[3, "retries"] == 1


def test_readers_see_every_update_while_the_table_is_rewritten(tmp_path):
    from p3b_search.study.layout import StudyLayout

    layout = StudyLayout(tmp_path)
    table = LiveTrialsTable(layout, NAMES, DIRECTIONS, REFERENCE, "p3b")
    errors, seen = [], []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(len(read_trials(layout)))
            except Exception as error:  # noqa: BLE001
                errors.append(error)

    records = {}
    thread = threading.Thread(target=reader)
    thread.start()
    for number in range(80):
        records[number] = frozen(number, TrialState.COMPLETE, "p3b", [float(number), 5.0], number, number + 1)
        table.update([records[n] for n in sorted(records)], {}, set())
        if number % 7 == 0:
            table.rewrite()
    done.set()
    thread.join()
    assert not errors and seen and seen == sorted(seen) and len(read_trials(layout)) == 80
