"""Rung ranking of multi-objective successive halving (p3b_search.study.rungs)."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p3b_search.study.rungs import (
    continues_at_rung,
    crowding_distances,
    nondominated_ranks,
    promotion_quota,
    rung_order,
)

DIRECTIONS = ("maximize", "minimize")  # top-1 up, MACs down
values_2d = arrays(np.float64, st.tuples(st.integers(1, 12), st.just(2)),
                   elements=st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, math.nan]))


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    better_or_equal = a[0] >= b[0] and a[1] <= b[1]
    return better_or_equal and (a[0] > b[0] or a[1] < b[1])


@given(values_2d)
@settings(max_examples=200, deadline=None)
def test_ranks_peel_fronts_off_one_by_one(values):
    ranks = nondominated_ranks(values, DIRECTIONS)
    finite = np.isfinite(values).all(axis=1)
    for i in np.flatnonzero(finite):
        # a row of rank r is dominated by some row of rank r - 1 and by no row of rank >= r
        dominators = [j for j in np.flatnonzero(finite) if _dominates(values[j], values[i])]
        assert all(ranks[j] < ranks[i] for j in dominators)
        if ranks[i] > 0:
            assert any(ranks[j] == ranks[i] - 1 for j in dominators)
    if (~finite).any():
        assert (ranks[~finite] > ranks[finite].max(initial=-1)).all()


@given(values_2d, st.integers(2, 5))
@settings(max_examples=200, deadline=None)
def test_order_is_a_permutation_by_rank_and_the_quota_continues(values, eta):
    order = rung_order(values, DIRECTIONS)
    assert sorted(order.tolist()) == list(range(len(values)))
    ranks = nondominated_ranks(values, DIRECTIONS)
    assert (np.diff(ranks[order]) >= 0).all()
    continuing = [row for row in range(len(values)) if continues_at_rung(values, DIRECTIONS, row, eta)]
    assert len(continuing) == promotion_quota(len(values), eta)
    assert set(continuing) == set(order[:len(continuing)].tolist())


def test_crowding_puts_the_ends_of_a_front_first_and_the_lonely_point_next():
    front = np.array([[90.0, 10.0], [80.0, 5.0], [79.0, 4.8], [60.0, 1.0]])  # top-1, MACs
    distance = crowding_distances(front, DIRECTIONS)
    assert math.isinf(distance[0]) and math.isinf(distance[3])
    assert distance[1] > distance[2] or distance[2] > distance[1]
    order = rung_order(front, DIRECTIONS)
    assert set(order[:2].tolist()) == {0, 3}


def test_a_dominated_trial_stops_and_a_dominating_one_continues():
    rung = np.array([[80.0, 5.0], [70.0, 6.0], [75.0, 5.5], [60.0, 9.0]])
    assert continues_at_rung(rung, DIRECTIONS, 0, eta=2)
    assert not continues_at_rung(rung, DIRECTIONS, 3, eta=2)
    assert not continues_at_rung(rung, DIRECTIONS, 1, eta=2)


def test_the_first_trial_at_a_rung_continues_and_quotas_follow_eta():
    assert continues_at_rung(np.array([[10.0, 1.0]]), DIRECTIONS, 0, eta=3)
    assert [promotion_quota(n, 3) for n in (1, 2, 3, 5, 6, 9)] == [1, 1, 1, 1, 2, 3]


def test_rule_decides_on_rungs_only_and_a_repeated_report_replaces_the_record():
    from p3b_search.study.rungs import SuccessiveHalvingRule

    rule = SuccessiveHalvingRule(rungs=[2, 4], eta=2, directions=DIRECTIONS)
    assert rule.decide("a", 2, [80.0, 5.0])           # first at the rung
    assert not rule.decide("b", 2, [70.0, 6.0])       # dominated by a: 1 of 2 continues
    assert rule.decide("b", 3, [10.0, 9.0])           # epoch 3 is no rung
    assert rule.decide("b", 2, [90.0, 4.0])           # b again at rung 2 (a retry), now ahead
    assert len(rule.records[2]) == 2 and rule.records[4] == {}


def test_rule_refuses_eta_below_two():
    import pytest

    from p3b_search.study.rungs import SuccessiveHalvingRule

    with pytest.raises(ValueError, match="eta"):
        SuccessiveHalvingRule(rungs=[1], eta=1, directions=DIRECTIONS)
