"""Confidence intervals over seeds: Student t intervals of a mean and of a paired difference.

Pure functions of numbers (no study, no pandas): the method comparison
(:mod:`p3b_search.study.compare`) calls them per method and prune ratio.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


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
    """Mean and Student t interval ``mean ± t(1 - (1 - confidence) / 2, n - 1) · s / √n``."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(data) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1))
    half = float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """``a - b`` paired by key (e.g. the seed): the t interval of the per-key differences over
    the keys both have. Pairing removes what a seed does to both (data order, initialisation)."""
    return t_interval((a[key] - b[key] for key in a if key in b), confidence)
