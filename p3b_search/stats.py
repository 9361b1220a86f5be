"""Statistics over seeds, through scipy.stats and statsmodels: Student t intervals of a mean and
of a paired difference, the paired t test, Holm's adjustment of a family of p-values, the
minimum detectable difference of a paired test, two one-sided tests of equivalence, and
Friedman's omnibus test.

Pure functions of numbers (no study, no pandas): the method comparison
(:mod:`p3b_search.study.compare`) calls them per method, pair of methods and prune ratio.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    """``mean`` of ``n`` values with its two-sided confidence interval ``[low, high]`` (NaN for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below zero (False when it is NaN)."""
        return self.low > 0 or self.high < 0


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student t interval ``mean ± t(1 - (1 - confidence) / 2, n - 1) · s / √n``
    (``[mean, mean]`` when every value is the same)."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(data) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    if min(data) == max(data):
        return Interval(mean, mean, mean, n)
    low, high = stats.ttest_1samp(data, 0.0).confidence_interval(confidence)
    return Interval(mean, float(low), float(high), n)


def _paired_values(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list[float], list[float]]:
    """The values of ``a`` and ``b`` at the keys both have, in ``a``'s key order."""
    keys = [key for key in a if key in b]
    return [float(a[key]) for key in keys], [float(b[key]) for key in keys]


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """``a - b`` paired by key (e.g. the seed): the t interval of the per-key differences over
    the keys both have. Pairing removes what a seed does to both (data order, initialisation)."""
    return t_interval((a[key] - b[key] for key in a if key in b), confidence)


@dataclass(frozen=True)
class PairedTest:
    """The paired t test of ``a - b`` over the keys both have: the mean difference with its
    confidence interval (``difference.n`` pairs), the standard deviation ``sd`` of the
    per-key differences, and the two-sided p-value of "mean difference = 0". ``p`` is NaN when
    there is no test: fewer than 2 pairs, or the same difference on every key (no spread)."""

    difference: Interval
    sd: float
    p: float

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p)


def paired_t_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                  confidence: float = CONFIDENCE) -> PairedTest:
    """:class:`PairedTest` of ``a - b`` paired by key (``scipy.stats.ttest_rel``)."""
    x, y = _paired_values(a, b)
    differences = [u - v for u, v in zip(x, y)]
    if not _has_spread(differences):
        return PairedTest(t_interval(differences, confidence), 0.0 if len(differences) >= 2 else math.nan, math.nan)
    result = stats.ttest_rel(x, y)
    low, high = result.confidence_interval(confidence)
    return PairedTest(Interval(statistics.fmean(differences), float(low), float(high), len(differences)),
                      statistics.stdev(differences), float(result.pvalue))


def _has_spread(differences: Sequence[float]) -> bool:
    """Whether a t test of ``differences`` is defined: >= 2 of them, not all the same."""
    return len(differences) >= 2 and min(differences) != max(differences)


@dataclass(frozen=True)
class Holm:
    """Holm's step-down adjustment of a family of ``m`` p-values (in the order given):
    ``adjusted`` p-values, ``rejected`` at family-wise level ``alpha``, and ``level``: the level
    Holm holds each raw p-value to, ``alpha / (m - k + 1)`` for the k-th smallest."""

    adjusted: list[float]
    rejected: list[bool]
    level: list[float]


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> Holm:
    """:class:`Holm` of ``pvalues``: the k-th smallest p value (k = 0, 1, ...) is adjusted to
    ``min(1, max over j <= k of (m - j) p_(j))`` and tested at ``alpha / (m - k)`` (the numbers
    of ``statsmodels.stats.multitest.multipletests(method="holm")``, without the garbage
    collection it runs on every call); an empty family gives empty lists."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, level = [0.0] * m, [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(pvalues[i])))
        adjusted[i], level[i] = running, alpha / (m - k)
    return Holm(adjusted, [p <= alpha for p in adjusted], level)


def minimum_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t test of ``n`` pairs at level
    ``alpha`` detects with probability ``power``, given the per-pair standard deviation ``sd``
    (in ``sd``'s unit): the standardised effect size that ``statsmodels``' ``TTestPower`` solves
    for, times ``sd``. NaN for fewer than 2 pairs; 0 when ``sd`` is 0."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(effect) * sd


def equivalence_p(a: Mapping[Hashable, float], b: Mapping[Hashable, float], margin: float) -> float:
    """p-value of two one-sided paired t tests (TOST, ``statsmodels``' ``ttost_paired``) of the
    null "the mean of ``a - b`` lies outside ``(-margin, +margin)``" over the keys both have;
    small: ``a`` and ``b`` are equivalent within ``margin``. NaN where :func:`paired_t_test`
    has no test (fewer than 2 pairs, or no spread)."""
    x, y = _paired_values(a, b)
    if not _has_spread([u - v for u, v in zip(x, y)]):
        return math.nan
    return float(ttost_paired(np.asarray(x), np.asarray(y), -margin, margin)[0])


@dataclass(frozen=True)
class Omnibus:
    """Friedman's test that ``k`` treatments rank alike over ``n`` blocks: chi-square
    ``statistic`` with ``k - 1`` degrees of freedom and its p-value (NaN when every block ties
    all treatments)."""

    statistic: float
    p: float
    k: int
    n: int


def friedman(groups: Sequence[Sequence[float]]) -> Omnibus:
    """:class:`Omnibus` of ``groups`` (one sequence per treatment, each over the same blocks in
    the same order; ``scipy.stats.friedmanchisquare``). Needs >= 3 groups and >= 2 blocks."""
    k, n = len(groups), len(groups[0]) if groups else 0
    if k < 3 or n < 2 or any(len(g) != n for g in groups):
        raise ValueError(f"Friedman's test needs >= 3 groups of the same length >= 2 (got {k} groups of "
                         f"lengths {sorted({len(g) for g in groups})})")
    if all(min(block) == max(block) for block in zip(*groups)):
        return Omnibus(math.nan, math.nan, k, n)
    result = stats.friedmanchisquare(*groups)
    return Omnibus(float(result.statistic), float(result.pvalue), k, n)
