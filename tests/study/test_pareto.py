"""Pareto front, hypervolume and knee checked against brute force (hypothesis)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p3b_search.study.pareto import hypervolume, knee_index, pareto_mask

DIRECTION = st.sampled_from(["maximize", "minimize"])


@st.composite
def integer_points(draw, max_rows: int = 12, max_objectives: int = 3):
    """Small integer objective tables: many ties and duplicates, exact brute-force volumes."""
    m = draw(st.integers(2, max_objectives))
    n = draw(st.integers(1, max_rows))
    values = draw(st.lists(st.lists(st.integers(0, 5), min_size=m, max_size=m), min_size=n, max_size=n))
    directions = draw(st.lists(DIRECTION, min_size=m, max_size=m))
    return np.array(values, dtype=float), directions


def brute_force_front(values: np.ndarray, directions: list[str]) -> np.ndarray:
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    points = values * signs
    mask = []
    for i, p in enumerate(points):
        dominated = any(
            all(q <= p) and any(q < p) for j, q in enumerate(points) if j != i
        )
        mask.append(not dominated)
    return np.array(mask)


def brute_force_hypervolume(values: np.ndarray, directions: list[str], reference: list[int]) -> int:
    """Count the unit cells between the best corner and the reference that some row dominates."""
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    points = values * signs
    ref = np.array(reference) * signs
    low = np.minimum(points.min(axis=0), ref)
    cells = 0
    for corner in itertools.product(*(range(int(lo), int(r)) for lo, r in zip(low, ref))):
        cell = np.array(corner)
        if any((p <= cell).all() for p in points):
            cells += 1
    return cells


@settings(max_examples=200, deadline=None)
@given(integer_points())
def test_pareto_mask_matches_brute_force(table):
    values, directions = table
    np.testing.assert_array_equal(pareto_mask(values, directions), brute_force_front(values, directions))


@settings(max_examples=150, deadline=None)
@given(integer_points(max_rows=8), st.data())
def test_hypervolume_matches_cell_count(table, data):
    values, directions = table
    # Reference: worse than every point by a drawn margin (0 allowed: boundary points add nothing).
    margins = data.draw(st.lists(st.integers(0, 2), min_size=len(directions), max_size=len(directions)))
    reference = [
        int(values[:, k].min()) - margin if d == "maximize" else int(values[:, k].max()) + margin
        for k, (d, margin) in enumerate(zip(directions, margins))
    ]
    assert hypervolume(values, directions, reference) == brute_force_hypervolume(values, directions, reference)


@settings(max_examples=100, deadline=None)
@given(integer_points())
def test_hypervolume_depends_on_the_front_only(table):
    values, directions = table
    reference = [-1 if d == "maximize" else 6 for d in directions]
    front = values[pareto_mask(values, directions)]
    assert hypervolume(values, directions, reference) == pytest.approx(hypervolume(front, directions, reference))


@settings(max_examples=150, deadline=None)
@given(integer_points())
def test_knee_is_on_the_front_and_closest_to_the_ideal_point(table):
    values, directions = table
    mask = pareto_mask(values, directions)
    knee = knee_index(values, directions)
    assert mask[knee]
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    front = values[mask] * signs
    low, high = front.min(axis=0), front.max(axis=0)
    span = np.where(high > low, high - low, 1)
    distances = np.linalg.norm((values[mask] * signs - low) / span, axis=1)
    assert np.linalg.norm((values[knee] * signs - low) / span) == pytest.approx(distances.min())


def test_duplicates_of_a_front_point_are_all_on_the_front():
    values = np.array([[90.0, 1e6], [90.0, 1e6], [80.0, 2e6], [95.0, 3e6]])
    np.testing.assert_array_equal(pareto_mask(values, ["maximize", "minimize"]), [True, True, False, True])


def test_single_point_is_the_front_and_the_knee():
    values = np.array([[50.0, 10.0]])
    assert pareto_mask(values, ["maximize", "minimize"]).tolist() == [True]
    assert knee_index(values, ["maximize", "minimize"]) == 0
    assert hypervolume(values, ["maximize", "minimize"], [0.0, 20.0]) == pytest.approx(500.0)


def test_all_but_one_dominated():
    values = np.array([[99.0, 1.0], [98.0, 1.0], [99.0, 2.0], [10.0, 5.0]])
    assert pareto_mask(values, ["maximize", "minimize"]).tolist() == [True, False, False, False]


def test_nan_rows_are_ignored():
    values = np.array([[np.nan, 1.0], [80.0, 2.0], [70.0, 3.0]])
    assert pareto_mask(values, ["maximize", "minimize"]).tolist() == [False, True, False]
    assert hypervolume(values, ["maximize", "minimize"], [0.0, 4.0]) == pytest.approx(160.0)


def test_points_beyond_the_reference_add_nothing():
    values = np.array([[80.0, 5.0]])
    assert hypervolume(values, ["maximize", "minimize"], [0.0, 4.0]) == 0.0


def test_knee_of_a_convex_front():
    # Extremes (99 %, 10 MMACs) and (60 %, 1 MMACs); (95 %, 3 MMACs) is the obvious trade-off.
    values = np.array([[99.0, 10.0], [60.0, 1.0], [95.0, 3.0], [80.0, 2.0]])
    assert knee_index(values, ["maximize", "minimize"]) == 2


def test_bad_directions_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="use 'maximize' or 'minimize'"):
        pareto_mask(np.zeros((2, 2)), ["max", "minimize"])
    with pytest.raises(ValueError, match="2 directions given for 3 objective columns"):
        pareto_mask(np.zeros((2, 3)), ["maximize", "minimize"])
