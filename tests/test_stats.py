"""p3b_search.stats: Student t intervals, the paired t test, Holm's adjustment, the minimum
detectable difference, equivalence (TOST) and Friedman's test, against textbook values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests

from p3b_search.stats import (
    Holm,
    Interval,
    equivalence_p,
    friedman,
    holm,
    minimum_detectable_difference,
    paired_difference,
    paired_t_test,
    t_interval,
)


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


def test_paired_t_test_matches_the_textbook_value():
    # differences 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5) / sqrt(5)) = 4.2426 on 4 df: p = 0.01324
    test = paired_t_test({s: 10.0 + d for s, d in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])}, {s: 10.0 for s in range(5)})
    assert test.tested and test.difference.n == 5 and test.difference.mean == pytest.approx(3.0)
    assert test.sd == pytest.approx(math.sqrt(2.5)) and test.p == pytest.approx(0.01324, abs=1e-5)
    assert [test.difference.low, test.difference.high] == pytest.approx([1.03676, 4.96324], abs=1e-5)


def test_paired_t_test_has_no_test_without_two_pairs_or_without_spread():
    one = paired_t_test({0: 1.0, 1: 2.0}, {1: 0.0})
    assert one.difference.n == 1 and not one.tested
    shifted = paired_t_test({s: s + 1.0 for s in range(4)}, {s: float(s) for s in range(4)})
    assert shifted.difference.mean == 1.0 and shifted.sd == 0.0 and not shifted.tested


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=8), st.lists(st.floats(-50, 50), min_size=8, max_size=8))
def test_a_shared_seed_effect_leaves_the_paired_test_unchanged(differences, seed_effects):
    """Pairing: whatever a seed does to both methods drops out of the test."""
    assume(max(differences) - min(differences) > 0.1)
    b = {s: 80.0 for s in range(len(differences))}
    a = {s: 80.0 + d for s, d in enumerate(differences)}
    moved_a = {s: v + seed_effects[s] for s, v in a.items()}
    moved_b = {s: v + seed_effects[s] for s, v in b.items()}
    plain, moved = paired_t_test(a, b), paired_t_test(moved_a, moved_b)
    assert moved.p == pytest.approx(plain.p, rel=1e-6, abs=1e-9)
    assert moved.difference.low == pytest.approx(plain.difference.low, abs=1e-9)


def test_holm_on_a_hand_case():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04) = 0.06;
    # step-down: 0.005 <= 0.05/4 and 0.01 <= 0.05/3 rejected, 0.03 > 0.05/2 stops
    result = holm([0.01, 0.04, 0.03, 0.005])
    assert result.adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert result.rejected == [True, False, False, True]
    assert result.level == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    assert result.adjusted == pytest.approx(list(multipletests([0.01, 0.04, 0.03, 0.005], method="holm")[1]))
    assert holm([]) == Holm([], [], [])


@pytest.mark.parametrize("seed", range(4))
def test_holm_gives_statsmodels_numbers(seed):
    pvalues = np.random.default_rng(seed).uniform(0, 0.2, size=3 + 5 * seed).tolist()
    pvalues[-1] = pvalues[0]  # a tie
    rejected, adjusted, _, _ = multipletests(pvalues, method="holm")
    result = holm(pvalues)
    assert result.adjusted == pytest.approx(list(adjusted), rel=1e-12, abs=0)
    assert result.rejected == list(rejected)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_holm_never_lowers_a_p_value_and_keeps_their_order(pvalues):
    result = holm(pvalues)
    assert all(adjusted >= p - 1e-12 for adjusted, p in zip(result.adjusted, pvalues))
    pairs = sorted(zip(pvalues, result.adjusted))
    assert all(a2 >= a1 - 1e-12 for (_, a1), (_, a2) in zip(pairs, pairs[1:]))
    assert result.rejected == [p <= 0.05 for p in result.adjusted]


def test_the_minimum_detectable_difference_is_detected_with_80_percent_power():
    """The issue's case: 5 seeds, paired sd 1.5 points. The MDD is the Δ at which a two-sided
    paired t test (non-central t, checked here with scipy) has 80 % power; 1 point is far below it."""
    mdd = minimum_detectable_difference(1.5, 5)
    critical = stats.t.ppf(0.975, 4)
    noncentral = stats.nct(4, mdd / 1.5 * math.sqrt(5))
    assert noncentral.sf(critical) + noncentral.cdf(-critical) == pytest.approx(0.8, abs=1e-4)
    assert 2.4 < mdd < 2.6
    one_point = stats.nct(4, 1 / 1.5 * math.sqrt(5))
    assert one_point.sf(critical) + one_point.cdf(-critical) == pytest.approx(0.21, abs=0.01)
    assert minimum_detectable_difference(1.5, 5, alpha=0.05 / 8) > mdd > minimum_detectable_difference(1.5, 10)
    assert minimum_detectable_difference(3.0, 5) == pytest.approx(2 * mdd)
    assert math.isnan(minimum_detectable_difference(1.5, 1)) and minimum_detectable_difference(0.0, 5) == 0.0


def test_equivalence_is_shown_for_a_small_spread_and_not_for_a_large_one():
    b = {s: 85.0 + s for s in range(6)}
    close = {s: v + (0.1 if s % 2 else -0.1) for s, v in b.items()}
    spread = {s: v + (3.0 if s % 2 else -3.0) for s, v in b.items()}
    assert equivalence_p(close, b, 1.0) < 0.001
    assert equivalence_p(spread, b, 1.0) > 0.2
    shifted = {s: v + 1.5 + (0.1 if s % 2 else -0.1) for s, v in b.items()}
    assert equivalence_p(shifted, b, 1.0) > 0.5  # close together, but 1.5 points apart: outside ±1
    assert equivalence_p(shifted, b, 2.0) < 0.001
    assert math.isnan(equivalence_p({0: 1.0}, {0: 1.0}, 1.0))


def test_friedman_on_a_hand_case():
    # 4 seeds all ranking a < b < c: rank sums 4, 8, 12; chi2 = 12 / (4 * 3 * 4) * 224 - 3 * 4 * 4 = 8 on 2 df
    result = friedman([[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0], [9.0, 9.5, 9.7, 9.9]])
    assert (result.k, result.n) == (3, 4)
    assert result.statistic == pytest.approx(8.0) and result.p == pytest.approx(math.exp(-4.0))
    assert math.isnan(friedman([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]).p)  # every seed ties all methods
    with pytest.raises(ValueError, match="needs >= 3 groups"):
        friedman([[1.0, 2.0], [2.0, 3.0]])
