"""The search dimensions of a study: each kind of ``search_space`` entry and what it does, and the grid.

A dimension is one ``search_space`` entry, a :class:`Dimension` of the kind its ``type`` tag
names (:data:`DIMENSIONS`): :class:`FloatRange`, :class:`IntRange` or :class:`Choice`. Each
kind knows, in one place, its checks, its bounds, its grid values, its Optuna distribution, how
a trial samples it and how a trials table gives its values back; callers never ask which kind an
entry is. ``sampler: {name: grid}`` runs every distinct trial configuration of the grid once
(:func:`p3b_search.study.trials.grid_configs`).
"""
from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import BaseTrial
from pydantic import Field

from p3b_search.config import StrictModel
from p3b_search.study.field_error import FieldError, got

MAX_GRID_POINTS = 10_000


class Dimension(StrictModel):
    """One ``search_space`` entry. ``path`` arguments are where it sits in the study file
    (``search_space.<key>``); its errors name that path or one of its fields."""

    @abstractmethod
    def check(self, path: str) -> None:
        """Raise :class:`FieldError` when the entry alone cannot be sampled (bounds, step, duplicates)."""

    @abstractmethod
    def check_fits(self, path: str, key: str, kinds: set[type]) -> None:
        """Raise :class:`FieldError` when the entry cannot give values of the field ``key`` whose
        annotation allows the types ``kinds`` (``object``: any value)."""

    def check_grid(self, path: str) -> None:
        """Raise :class:`FieldError` when ``sampler: grid`` cannot list the entry's values."""

    @abstractmethod
    def distribution(self) -> BaseDistribution:
        """The Optuna distribution of the entry."""

    @abstractmethod
    def suggest(self, trial: BaseTrial, name: str) -> Any:
        """Sample the parameter ``name`` of ``trial`` from the entry (define-by-run)."""

    @abstractmethod
    def bounds(self) -> list[tuple[str, Any]]:
        """(field, value) of the entry's extremes: ``low`` and ``high``, or every choice."""

    @abstractmethod
    def grid_values(self) -> list[Any]:
        """The entry's values on the grid: its choices, or ``low, low + step, ..., high``."""

    @abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether the entry can sample ``value`` (of the type it samples, in range, on the step)."""

    @abstractmethod
    def from_table(self, value: Any) -> Any:
        """A trials-table value as the entry samples it (the table stores a knob a method lacks as
        NaN, so an int knob arrives as a float); ValueError when the entry cannot hold it."""

    def listed(self) -> list[Any] | None:
        """The entry's values where it lists them (``type: categorical``), else None."""
        return None


class _Range(Dimension):
    """A number in ``[low, high]``, optionally log-scaled or on a grid of ``step`` (the subclass
    declares ``low``, ``high``, ``log`` and ``step``)."""

    def check(self, path: str) -> None:
        if self.low > self.high:
            raise FieldError(f"{path}.low", f"must be <= high ({got(self.high)}) (got {got(self.low)}): swap them")
        if self.log and self.low <= 0:
            raise FieldError(f"{path}.low", f"must be > 0 with log: true (got {got(self.low)})")
        if self.log and self.step not in (None, 1):
            raise FieldError(f"{path}.step", "cannot be combined with log: true: remove one of them")
        if self.step is not None:
            steps = (self.high - self.low) / self.step
            if not math.isclose(steps, round(steps), abs_tol=1e-9):
                raise FieldError(f"{path}.high", f"high - low must be a multiple of step ({got(self.step)}) "
                                                  f"(got {got(self.high)})")

    def bounds(self) -> list[tuple[str, Any]]:
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        return self._on_step(value)

    @abstractmethod
    def _on_step(self, value: float) -> bool:
        """Whether ``value`` (a number within the bounds) lies on the entry's step."""


class FloatRange(_Range):
    """Uniform (or log-uniform) float in ``[low, high]``, optionally on a grid of ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    def check_fits(self, path: str, key: str, kinds: set[type]) -> None:
        if float not in kinds and object not in kinds:
            if int in kinds:
                raise FieldError(f"{path}.type", f"{key} is an integer: use type: int")
            raise FieldError(f"{path}.type", f"{key} is not a number: use type: categorical")

    def check_grid(self, path: str) -> None:
        if self.step is None:
            raise FieldError(path, "sampler grid needs the values of every dimension: add step (without log: true) "
                                   "or list them with type: categorical")

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: BaseTrial, name: str) -> Any:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def grid_values(self) -> list[Any]:
        if self.step is None:
            raise ValueError(f"{self!r} has no grid values: give it a step")
        low, step = Decimal(repr(self.low)), Decimal(repr(self.step))  # exact decimal steps: 0.1 + 0.2 = 0.3
        return [float(low + i * step) for i in range(round((self.high - self.low) / self.step) + 1)]

    def _on_step(self, value: float) -> bool:
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return math.isclose(steps, round(steps), abs_tol=1e-9)

    def from_table(self, value: Any) -> Any:
        return float(value)


class IntRange(_Range):
    """Integer in ``[low, high]`` (both included) on a grid of ``step``, optionally log-scaled."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def check_fits(self, path: str, key: str, kinds: set[type]) -> None:
        if not kinds & {int, float, object}:
            raise FieldError(f"{path}.type", f"{key} is not a number: use type: categorical")

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: BaseTrial, name: str) -> Any:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        return list(range(self.low, self.high + 1, self.step))

    def _on_step(self, value: float) -> bool:
        return float(value).is_integer() and (int(value) - self.low) % self.step == 0

    def from_table(self, value: Any) -> Any:
        return int(value)


class Choice(Dimension):
    """One of ``choices`` (strings, numbers, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=1)

    def check(self, path: str) -> None:
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise FieldError(f"{path}.choices", f"has duplicates: list each choice once (got {self.choices})")

    def check_fits(self, path: str, key: str, kinds: set[type]) -> None:
        """Any field takes a choice: the trial configuration's own validation checks each one."""

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(tuple(self.choices))

    def suggest(self, trial: BaseTrial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def bounds(self) -> list[tuple[str, Any]]:
        return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]

    def grid_values(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices)

    def from_table(self, value: Any) -> Any:
        flag = isinstance(value, (bool, np.bool_))  # a boolean never matches 1 or 0, nor they it
        for choice in self.choices:
            if isinstance(choice, bool) == flag and choice == value:
                return choice
        raise ValueError(f"{value!r} is none of the search space's choices {self.choices}")

    def listed(self) -> list[Any] | None:
        return list(self.choices)


SearchDimension = Annotated[Union[FloatRange, IntRange, Choice], Field(discriminator="type")]
#: The search-space entry class of each ``type`` tag.
DIMENSIONS: dict[str, type[Dimension]] = {"float": FloatRange, "int": IntRange, "categorical": Choice}


def grid_point_count(space: Mapping[str, Dimension]) -> int:
    """Points of the full grid of a study's ``search_space``: the product of every dimension's
    number of values."""
    return math.prod(len(dim.grid_values()) for dim in space.values())


def config_key(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A hashable identity of sampled parameters (``repr`` keeps ``1``, ``1.0`` and ``True`` apart)."""
    return tuple(sorted((name, repr(value)) for name, value in params.items()))
