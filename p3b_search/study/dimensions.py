"""The search dimensions of a study: which keys a trial of a method samples, and the grid.

A dimension is one ``search_space`` entry (:class:`~p3b_search.study.sections.FloatRange`,
``IntRange`` or ``Choice``). ``sampler: {name: grid}`` runs every distinct trial configuration
of the grid once (:func:`p3b_search.study.trials.grid_configs`).
"""
from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from p3b_search.methods import get_method
from p3b_search.study.sections import Choice, FloatRange, IntRange, StudyConfig

MAX_GRID_POINTS = 10_000


def method_knobs(method: str) -> list[str]:
    """The knobs (config fields) a study may set or search for a registered method, sorted
    (the method's ``fixed_knobs`` left out)."""
    config_cls = get_method(method).config_cls
    return sorted(set(config_cls.model_fields) - config_cls.fixed_knobs)


def active_keys(study: StudyConfig, method: str) -> list[str]:
    """The search-space entries a trial of ``method`` samples: all but ``method`` itself and the
    ``method_config.<knob>`` entries whose knob ``method`` lacks (or fixes)."""
    knobs = {f"method_config.{knob}" for knob in method_knobs(method)}
    return [key for key in study.search_space
            if key != "method" and (not key.startswith("method_config.") or key in knobs)]


def grid_values(dim: FloatRange | IntRange | Choice) -> list[Any]:
    """The values of one dimension on the grid: its choices, or ``low, low + step, ..., high``."""
    if isinstance(dim, Choice):
        return list(dim.choices)
    if isinstance(dim, IntRange):
        return list(range(dim.low, dim.high + 1, dim.step))
    low, step = Decimal(repr(dim.low)), Decimal(repr(dim.step))  # exact decimal steps: 0.1 + 0.2 = 0.3
    return [float(low + i * step) for i in range(round((dim.high - dim.low) / dim.step) + 1)]


def grid_point_count(study: StudyConfig) -> int:
    """Points of the full grid: the product of every dimension's number of values."""
    return math.prod(len(grid_values(dim)) for dim in study.search_space.values())


def config_key(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A hashable identity of sampled parameters (``repr`` keeps ``1``, ``1.0`` and ``True`` apart)."""
    return tuple(sorted((name, repr(value)) for name, value in params.items()))
