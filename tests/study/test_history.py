"""The hypervolume history (p3b_search.study.history): against a brute-force recomputation."""
from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from p3b_search.study.history import hypervolume_history, replay
from p3b_search.study.pareto import hypervolume

NAMES, DIRECTIONS, REFERENCE, IDEAL = ["top1", "macs"], ["maximize", "minimize"], [0.0, 10.0], [100.0, 0.0]

trial = st.tuples(st.sampled_from(["COMPLETE", "PRUNED", "FAIL", "RUNNING"]), st.sampled_from(["p3b", "dense"]),
                  st.integers(0, 6), st.integers(0, 2), st.sampled_from([0.0, 20.0, 50.0, 80.0, 95.0, np.nan]),
                  st.sampled_from([1.0, 2.5, 5.0, 9.0, 12.0]))


def _table(trials: list[tuple], ends: list[int]) -> pd.DataFrame:
    frame = pd.DataFrame(trials, columns=["state", "method", "epochs_done", "epochs_shared", "top1", "macs"])
    frame["epochs_shared"] = np.minimum(frame["epochs_shared"], frame["epochs_done"])
    frame.insert(0, "number", range(len(frame)))
    frame["end"] = pd.Timestamp("2026-12-06") + pd.to_timedelta(ends[:len(frame)], unit="s")
    return frame


@given(st.lists(trial, min_size=0, max_size=25), st.lists(st.integers(0, 50), min_size=25, max_size=25))
@settings(max_examples=150, deadline=None)
def test_each_step_is_the_hypervolume_of_the_complete_trials_ended_so_far(trials, ends):
    frame = _table(trials, ends)
    history = hypervolume_history(frame, NAMES, DIRECTIONS, REFERENCE, IDEAL)
    ended = frame[frame["state"] != "RUNNING"].sort_values(["end", "number"], kind="stable")
    assert history["number"].tolist() == ended["number"].tolist()
    trained = (ended["epochs_done"] - ended["epochs_shared"]).to_numpy()
    assert history["trial_epochs"].tolist() == np.cumsum(trained).tolist()
    for k in range(len(history)):
        so_far = ended.iloc[: k + 1]
        points = so_far[(so_far["state"] == "COMPLETE") & (so_far["method"] != "dense")][NAMES].to_numpy(float)
        expected = hypervolume(points, DIRECTIONS, REFERENCE) if len(points) else 0.0
        assert history["hypervolume"].iloc[k] == expected or abs(history["hypervolume"].iloc[k] - expected) < 1e-9
        assert abs(history["hypervolume_normalized"].iloc[k] - expected / 1000.0) < 1e-12
    assert (np.diff(history["hypervolume"].to_numpy()) >= 0).all()


def test_a_stopped_trial_spends_epochs_and_never_moves_the_front():
    frame = _table([("COMPLETE", "p3b", 6, 0, 80.0, 5.0), ("PRUNED", "p3b", 2, 0, 99.0, 1.0),
                    ("COMPLETE", "p3b", 6, 2, 90.0, 9.0)], [0, 1, 2])
    history = hypervolume_history(frame, NAMES, DIRECTIONS, REFERENCE, IDEAL)
    assert history["trial_epochs"].tolist() == [6, 8, 12]
    assert history["hypervolume"].iloc[1] == history["hypervolume"].iloc[0] == 80.0 * 5.0
    assert history["hypervolume"].iloc[2] == 80.0 * 5.0 + 10.0 * 1.0


def test_an_empty_study_has_an_empty_history():
    assert hypervolume_history(pd.DataFrame(), NAMES, DIRECTIONS, REFERENCE, IDEAL).empty


@given(st.lists(trial, min_size=0, max_size=25), st.lists(st.integers(0, 50), min_size=25, max_size=25),
       st.integers(0, 6))
@settings(max_examples=150, deadline=None)
def test_best_ranks_the_front_as_a_sort_of_its_points(trials, ends, limit):
    frame = _table(trials, ends)
    front = replay(frame, NAMES, DIRECTIONS, REFERENCE)
    numbers, values = front.front_values()
    ranked = sorted(zip(numbers, values.tolist()), key=lambda item: (*(-v for v in item[1]), item[0]))
    assert front.best() == [number for number, _ in ranked]
    assert front.best(limit) == [number for number, _ in ranked][:limit]
    assert set(front.best()) == front.numbers
