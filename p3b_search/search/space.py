"""The search space as Optuna sees it: distributions, define-by-run sampling, the reference trial.

Parameter names are the study's dotted paths (``method_config.prune_ratio``,
``training.prune.lr``, ``method``), so Optuna's records, Ray's trial configs, MLflow params
and the Parquet columns all use the same names. With ``method`` searched the space is
conditional: a ``method_config.<knob>`` is sampled only when the sampled method has that knob
(and does not fix it, as dense its prune ratio).

``sampler: grid`` (:mod:`p3b_search.search.samplers`) is Optuna's ``GridSampler`` over the
product of every dimension's grid values (:func:`~p3b_search.study.dimensions.grid_values`). A
grid point whose method lacks a knob samples the same configuration as another point; the
searcher skips such repeats unrun (see :mod:`p3b_search.search.searcher`).
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from p3b_search.methods import get_method
from p3b_search.study.dimensions import active_keys
from p3b_search.study.sections import Choice, FloatRange, IntRange, StudyConfig

METHOD = "method"
_KNOB = "method_config."


def distribution(dim: FloatRange | IntRange | Choice) -> BaseDistribution:
    """The Optuna distribution of one search-space entry."""
    if isinstance(dim, FloatRange):
        return FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    if isinstance(dim, IntRange):
        return IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
    return CategoricalDistribution(tuple(dim.choices))


def distributions(study: StudyConfig) -> dict[str, BaseDistribution]:
    """Every entry of the space by name (conditional entries included)."""
    return {key: distribution(dim) for key, dim in study.search_space.items()}


def suggest_params(trial: optuna.Trial, study: StudyConfig) -> dict[str, Any]:
    """Define-by-run: sample one trial's parameters (``method`` first when it is searched)."""
    params: dict[str, Any] = {}
    method = study.method.name
    if METHOD in study.search_space:
        method = params[METHOD] = trial.suggest_categorical(METHOD, study.search_space[METHOD].choices)
    for key in active_keys(study, str(method)):
        dim = study.search_space[key]
        if isinstance(dim, FloatRange):
            params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
        elif isinstance(dim, IntRange):
            params[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            params[key] = trial.suggest_categorical(key, dim.choices)
    return params


def _fixed_value(study: StudyConfig, key: str) -> Any:
    """The value the study's fixed configuration gives ``key`` (a method default for knobs)."""
    if key.startswith(_KNOB):
        knob = key.removeprefix(_KNOB)
        return get_method(study.method.name).config_cls.model_fields[knob].get_default(call_default_factory=True)
    node: Any = {"model": study.model, "data": study.data, "training": study.training}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


def _contains(dim: FloatRange | IntRange | Choice, value: Any) -> bool:
    if isinstance(dim, Choice):
        return any(type(value) is type(c) and value == c for c in dim.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not dim.low <= value <= dim.high:
        return False
    if isinstance(dim, IntRange):
        return float(value).is_integer() and (int(value) - dim.low) % dim.step == 0
    if dim.step is None:
        return True
    steps = (value - dim.low) / dim.step
    return math.isclose(steps, round(steps), abs_tol=1e-9)


def reference_params(study: StudyConfig) -> dict[str, Any]:
    """The reference trial: ``method.name`` with its ``config_cls`` defaults (and the study's
    fixed values for other entries), for every entry whose reference value lies in the space.

    Entries whose reference value falls outside the space are left out: Optuna samples them
    when the enqueued trial runs.
    """
    params: dict[str, Any] = {}
    if METHOD in study.search_space:
        params[METHOD] = study.method.name
    for key in active_keys(study, study.method.name):
        value = _fixed_value(study, key)
        if _contains(study.search_space[key], value):
            params[key] = value
    return params
