"""The search space as Optuna sees it: distributions, define-by-run sampling, the reference trial.

Parameter names are the study's dotted paths (``method_config.prune_ratio``,
``training.prune.lr``, ``method``), so Optuna's records, Ray's trial configs, MLflow params
and the Parquet columns all use the same names. With ``method`` searched the space is
conditional: a ``method_config.<knob>`` is sampled only when the sampled method has that knob
(and does not fix it, as dense its prune ratio).

Each entry samples itself (:meth:`~p3b_search.study.dimensions.Dimension.suggest`). ``sampler:
grid`` (:mod:`p3b_search.search.samplers`) is Optuna's ``GridSampler`` over the product of
every dimension's grid values (:meth:`~p3b_search.study.dimensions.Dimension.grid_values`). A
grid point whose method lacks a knob samples the same configuration as another point; the
searcher skips such repeats unrun (see :mod:`p3b_search.search.searcher`).
"""
from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from p3b_search.method_specs import method_spec
from p3b_search.study.knobs import active_keys
from p3b_search.study.sections import StudyConfig

METHOD = "method"
_KNOB = "method_config."


def distributions(study: StudyConfig) -> dict[str, BaseDistribution]:
    """Every entry of the space by name (conditional entries included)."""
    return {key: dim.distribution() for key, dim in study.search_space.items()}


def suggest_params(trial: optuna.Trial, study: StudyConfig) -> dict[str, Any]:
    """Define-by-run: sample one trial's parameters (``method`` first when it is searched)."""
    params: dict[str, Any] = {}
    method = study.method.name
    if METHOD in study.search_space:
        method = params[METHOD] = study.search_space[METHOD].suggest(trial, METHOD)
    for key in active_keys(study, str(method)):
        params[key] = study.search_space[key].suggest(trial, key)
    return params


def _fixed_value(study: StudyConfig, key: str) -> Any:
    """The value the study's fixed configuration gives ``key`` (a method default for knobs)."""
    if key.startswith(_KNOB):
        knob = key.removeprefix(_KNOB)
        return method_spec(study.method.name).config_cls.model_fields[knob].get_default(call_default_factory=True)
    node: Any = {"model": study.model, "data": study.data, "training": study.training}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


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
        if study.search_space[key].contains(value):
            params[key] = value
    return params
