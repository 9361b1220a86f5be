"""p3b_search.stats: Student t intervals of a mean and of a difference paired by seed."""
from __future__ import annotations

import math

import pytest

from p3b_search.stats import Interval, paired_difference, t_interval


def test_t_interval_matches_the_textbook_value():
    # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764: half width 2.7764 * 1.5811 / sqrt(5) = 1.9632
    interval = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert interval.n == 5 and interval.mean == 3.0
    assert interval.low == pytest.approx(1.03676, abs=1e-5) and interval.high == pytest.approx(4.96324, abs=1e-5)
    wider = t_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.99)
    assert wider.low < interval.low and wider.high > interval.high


def test_too_few_values_have_no_interval():
    one = t_interval([7.0])
    assert one.mean == 7.0 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    assert not one.excludes_zero
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)


def test_pairing_by_seed_removes_what_the_seed_does_to_both():
    """Method a is 1 point better than b on every seed, while the seeds spread results by 10
    points: unpaired, the two t intervals overlap; paired, the difference is clearly above 0."""
    seed_effect = {0: 80.0, 1: 90.0, 2: 85.0, 3: 75.0, 4: 88.0}
    a = {seed: value + 1.0 + 0.1 * seed for seed, value in seed_effect.items()}
    b = dict(seed_effect)
    alone_a, alone_b = t_interval(a.values()), t_interval(b.values())
    assert alone_a.low < alone_b.high  # unpaired: not separated
    paired = paired_difference(a, b)
    assert paired.n == 5 and paired.mean == pytest.approx(1.2)
    assert paired.excludes_zero and paired.low > 0.9


def test_paired_difference_uses_the_seeds_both_have():
    paired = paired_difference({0: 3.0, 1: 5.0, 2: 9.0}, {1: 4.0, 2: 6.0, 7: 0.0})
    assert paired.n == 2 and paired.mean == pytest.approx((1.0 + 3.0) / 2)


def test_an_interval_excludes_zero_on_either_side():
    assert Interval(-2.0, -3.0, -1.0, 5).excludes_zero
    assert Interval(2.0, 1.0, 3.0, 5).excludes_zero
    assert not Interval(0.5, -1.0, 2.0, 5).excludes_zero
