"""One contract for every kind of search-space entry (as Optuna runs every storage through one
test suite): each kind in ``DIMENSIONS`` is parsed from the file's form, its Optuna distribution
survives JSON and an RDB storage and is what a trial records, its grid and bounds lie in the
space, table values read back, and its checks refuse bad input in one line naming the field and
the fix. A new kind fails here until it has cases."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import distribution_to_json, json_to_distribution
from pydantic import TypeAdapter

from p3b_search.search.samplers import RayGridSampler
from p3b_search.study.dimensions import DIMENSIONS, Dimension, SearchDimension
from p3b_search.study.field_error import FieldError

PATH = "search_space.x"


@dataclass(frozen=True)
class Case:
    """A valid entry of one kind, values it cannot sample, and whether ``sampler: grid`` lists it."""

    spec: dict[str, Any]
    outside: list[Any]
    grid: bool = True


@dataclass(frozen=True)
class Bad:
    """An entry its own checks refuse: the field the error names and the whole instruction."""

    spec: dict[str, Any]
    field: str
    message: str
    check: str = "check"
    kinds: set[type] = field(default_factory=set)


GOOD = [
    Case({"type": "float", "low": 0.3, "high": 0.8}, [0.2, 0.81, True, "0.5", None], grid=False),
    Case({"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, [1e-5, 0.02], grid=False),
    Case({"type": "float", "low": 0.1, "high": 0.7, "step": 0.1}, [0.15, 0.0, 0.8, False]),
    Case({"type": "float", "low": -1.0, "high": 1.0, "step": 0.5}, [0.25, -1.5]),
    Case({"type": "int", "low": 0, "high": 4}, [-1, 5, 1.5, True, "2"]),
    Case({"type": "int", "low": 50, "high": 250, "step": 50}, [75, 300, 0]),
    Case({"type": "int", "low": 1, "high": 64, "log": True}, [0, 65]),
    Case({"type": "categorical", "choices": ["p3b", "dense"]}, ["svite", 0, None]),
    Case({"type": "categorical", "choices": [True, False]}, [1, 0, "true"]),
    Case({"type": "categorical", "choices": [None, 1, 1.5, "a"]}, [1.0, True, "b"]),
]
BAD = [
    Bad({"type": "float", "low": 0.8, "high": 0.3}, "low", "must be <= high (0.3) (got 0.8): swap them"),
    Bad({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "low", "must be > 0 with log: true (got 0)"),
    Bad({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "step",
        "cannot be combined with log: true: remove one of them"),
    Bad({"type": "float", "low": 0.3, "high": 0.8, "step": 0.15}, "high",
        "high - low must be a multiple of step (0.15) (got 0.8)"),
    Bad({"type": "float", "low": 0.3, "high": 0.8}, "", "sampler grid needs the values of every dimension: add "
        "step (without log: true) or list them with type: categorical", check="check_grid"),
    Bad({"type": "float", "low": 1.0, "high": 8.0}, "type", "x is an integer: use type: int",
        check="check_fits", kinds={int}),
    Bad({"type": "float", "low": 1.0, "high": 8.0}, "type", "x is not a number: use type: categorical",
        check="check_fits", kinds={str, bool}),
    Bad({"type": "int", "low": 8, "high": 4}, "low", "must be <= high (4) (got 8): swap them"),
    Bad({"type": "int", "low": 0, "high": 8, "log": True}, "low", "must be > 0 with log: true (got 0)"),
    Bad({"type": "int", "low": 1, "high": 9, "log": True, "step": 2}, "step",
        "cannot be combined with log: true: remove one of them"),
    Bad({"type": "int", "low": 0, "high": 5, "step": 2}, "high", "high - low must be a multiple of step (2) (got 5)"),
    Bad({"type": "int", "low": 0, "high": 4}, "type", "x is not a number: use type: categorical",
        check="check_fits", kinds={str}),
    Bad({"type": "categorical", "choices": ["a", "b", "a"]}, "choices",
        "has duplicates: list each choice once (got ['a', 'b', 'a'])"),
    Bad({"type": "categorical", "choices": [1, 1]}, "choices", "has duplicates: list each choice once (got [1, 1])"),
]


def parse(spec: dict[str, Any]) -> Dimension:
    """The entry as a study file's ``search_space`` gives it (the ``type`` tag picks the kind)."""
    return TypeAdapter(SearchDimension).validate_python(spec)


def case_id(case: Case | Bad) -> str:
    return "-".join(f"{k}={v}" for k, v in case.spec.items()).replace(" ", "")


@pytest.mark.parametrize("kind", sorted(DIMENSIONS))
def test_every_kind_is_a_full_dimension_with_cases(kind):
    cls = DIMENSIONS[kind]
    assert issubclass(cls, Dimension) and not cls.__abstractmethods__
    assert any(c.spec["type"] == kind for c in GOOD), f"add valid {kind} entries to GOOD"
    assert any(b.spec["type"] == kind for b in BAD), f"add refused {kind} entries to BAD"
    assert all(isinstance(parse(c.spec), cls) for c in GOOD if c.spec["type"] == kind)
    with pytest.raises(TypeError, match="abstract"):
        Dimension()


@pytest.mark.parametrize("case", GOOD, ids=case_id)
def test_valid_entries_pass_their_checks(case):
    dim = parse(case.spec)
    dim.check(PATH)
    dim.check_fits(PATH, "x", {object})
    if case.grid:
        dim.check_grid(PATH)
    else:
        with pytest.raises(FieldError):
            dim.check_grid(PATH)


@pytest.mark.parametrize("case", GOOD, ids=case_id)
def test_distribution_round_trips_through_json_and_a_storage(case, tmp_path):
    dim = parse(case.spec)
    distribution = dim.distribution()
    assert json_to_distribution(distribution_to_json(distribution)) == distribution
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(12):
        trial = study.ask()
        sampled.append(dim.suggest(trial, "x"))
        study.tell(trial, 0.0)
    assert all(dim.contains(value) for value in sampled), sampled
    stored = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.params["x"] for t in stored] == sampled
    assert all(t.distributions["x"] == distribution for t in stored)


@pytest.mark.parametrize("case", GOOD, ids=case_id)
def test_bounds_and_outside_values(case):
    dim = parse(case.spec)
    bounds = dim.bounds()
    assert bounds and all(dim.contains(value) for _, value in bounds)
    assert all(not dim.contains(value) for value in case.outside), case.outside
    for sub, _ in bounds:  # each bound names a field of the entry as the file writes it
        assert sub.partition("[")[0] in case.spec


@pytest.mark.parametrize("case", [c for c in GOOD if c.grid], ids=case_id)
def test_grid_values_lie_in_the_space_and_optunas_grid_sampler_gives_each_once(case):
    dim = parse(case.spec)
    values = dim.grid_values()
    assert len({repr(v) for v in values}) == len(values)
    assert all(dim.contains(value) for value in values)
    assert {repr(v) for _, v in dim.bounds()} <= {repr(v) for v in values}  # the grid reaches every extreme
    study = optuna.create_study(sampler=RayGridSampler({"x": values}, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a grid value lies outside the distribution
        suggested = []
        for _ in values:
            trial = study.ask()
            suggested.append(dim.suggest(trial, "x"))
            study.tell(trial, 0.0)
    assert sorted(map(repr, suggested)) == sorted(map(repr, values))


@pytest.mark.parametrize("case", [c for c in GOOD if c.grid], ids=case_id)
def test_table_values_read_back_as_the_space_samples_them(case):
    dim = parse(case.spec)
    for value in dim.grid_values():
        # a column with NaN holds ints as floats; a boolean column holds numpy booleans
        cells = [np.bool_(value), value] if isinstance(value, bool) else [float(value) if isinstance(value, int) else value]
        for cell in cells:
            back = dim.from_table(cell)
            assert back == value and type(back) is type(value)


def test_a_table_value_no_choice_holds_is_refused():
    with pytest.raises(ValueError, match=r"^'svite' is none of the search space's choices \['p3b', 'dense'\]$"):
        parse({"type": "categorical", "choices": ["p3b", "dense"]}).from_table("svite")


@pytest.mark.parametrize("bad", BAD, ids=lambda b: f"{b.check}-{case_id(b)}")
def test_bad_entries_fail_in_one_line_naming_the_field_and_the_fix(bad):
    dim = parse(bad.spec)
    with pytest.raises(FieldError) as caught:
        if bad.check == "check_fits":
            dim.check_fits(PATH, "x", bad.kinds)
        else:
            getattr(dim, bad.check)(PATH)
    error = caught.value
    assert error.path == (f"{PATH}.{bad.field}" if bad.field else PATH)
    assert error.message == bad.message
    assert "\n" not in str(error)


def test_a_boolean_choice_and_a_number_choice_never_stand_for_each_other():
    flags, numbers = parse({"type": "categorical", "choices": [True, False]}), parse({"type": "categorical", "choices": [1, 0]})
    assert flags.from_table(np.bool_(True)) is True and numbers.from_table(1.0) == 1
    for dim, cell in ((flags, 1.0), (numbers, np.bool_(True)), (numbers, False)):
        with pytest.raises(ValueError, match="is none of the search space's choices"):
            dim.from_table(cell)
