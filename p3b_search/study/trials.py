"""Trial configurations: the study's fixed configuration with a trial's sampled parameters.

:func:`trial_config` is the one place a trial's configuration is made and checked, so a
combination no trial could run (a field out of range, a knob the method lacks, a learning
rate schedule that would rise, a prune schedule past the prune stage) fails here: before any
compute when the study is loaded (:mod:`p3b_search.study.checks` tries the bounds of every
dimension), and for a sampled point before its trial starts.
"""
from __future__ import annotations

import itertools
from typing import Any

from pydantic import ValidationError

from p3b_search.config import TrialConfig
from p3b_search.method_specs import method_spec
from p3b_search.study.dimensions import config_key
from p3b_search.study.field_error import got
from p3b_search.study.knobs import active_keys, method_knobs
from p3b_search.study.messages import StudyError, first_error, format_params
from p3b_search.study.sections import StudyConfig

#: Method knobs that name an epoch of the prune stage (``training.prune.epochs`` bounds them).
PRUNE_EPOCH_KNOBS = ("prune_start_epoch", "prune_sparse_epoch", "prune_finalize_epoch")


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def trial_budget(study: StudyConfig, params: dict[str, Any]) -> float:
    """The parameter budget of the trial with sampled ``params``: its kept fraction ``1 - prune_ratio``
    (dense: 1), known before it trains."""
    return 1.0 - float(trial_config(study, params).method_config.get("prune_ratio", 0.0))


def trial_config(study: StudyConfig, params: dict[str, Any]) -> TrialConfig:
    """The trial configuration: the study's fixed config with ``params`` (dotted paths) applied.

    The method's knobs (fixed ``method.config`` plus sampled ``method_config.*``) are validated
    by the method's ``config_cls`` and stored complete (defaults filled in). Raises
    :class:`StudyError` naming the parameter at fault.
    """
    method = str(params.get("method", study.method.name))
    config_cls = method_spec(method).config_cls
    knobs = {k: v for k, v in study.method.config.items() if k in method_knobs(method)}
    tree: dict[str, Any] = {
        "model": study.model.model_dump(mode="python"),
        "data": study.data.model_dump(mode="python"),
        "training": study.training.model_dump(mode="python"),
    }
    for path, value in params.items():
        if path.startswith("method_config."):
            knobs[path.removeprefix("method_config.")] = value
        elif path != "method":
            _set_path(tree, path, value)
    try:
        method_config = config_cls.model_validate(knobs)
        trial = TrialConfig.model_validate(
            {**tree, "method": method, "method_config": method_config.model_dump(mode="python")}
        )
    except ValidationError as error:
        model, prefix = (config_cls, ("method_config",)) if error.title == config_cls.__name__ else (TrialConfig, ())
        field, reason = first_error(error, model, prefix)
        raise StudyError(f"{study.source}: trial with {format_params(params)}: {field}: {reason}",
                         field, reason) from None
    problem = cross_section_problem(trial)
    if problem is not None:
        field, reason = problem
        raise StudyError(f"{study.source}: trial with {format_params(params)}: {field}: {reason}", field, reason)
    return trial


def cross_section_problem(trial: TrialConfig) -> tuple[str, str] | None:
    """(field path, instruction) of the first rule across fields that ``trial`` breaks, else None.

    * a stage's ``min_lr`` above its ``lr`` (the cosine schedule would rise);
    * a prune-stage epoch knob of the method (``prune_start_epoch``, ``prune_sparse_epoch``,
      ``prune_finalize_epoch``) past the prune stage's ``training.prune.epochs``, or a start
      epoch not before the stage's end when the finalize epoch is left to that end.
    """
    for name in ("prune", "finetune"):
        stage = getattr(trial.training, name)
        if stage.min_lr > stage.lr:
            return (f"training.{name}.min_lr", f"must be <= training.{name}.lr ({got(stage.lr)}) "
                                               f"(got {got(stage.min_lr)}): lower min_lr or raise lr")
    epochs = trial.training.prune.epochs
    for knob in PRUNE_EPOCH_KNOBS:
        value = trial.method_config.get(knob)
        if value is not None and float(value) > epochs:
            return (f"method_config.{knob}", f"must be <= training.prune.epochs ({epochs}) (got {got(value)}): "
                                             f"lower it or train the prune stage longer")
    start = trial.method_config.get("prune_start_epoch")
    at_stage_end = "prune_finalize_epoch" in trial.method_config and trial.method_config["prune_finalize_epoch"] is None
    if start is not None and at_stage_end and float(start) >= epochs:
        return ("method_config.prune_start_epoch", f"must be < training.prune.epochs ({epochs}) (got {got(start)}): "
                                                   "pruning must start before the prune stage ends")
    return None


def grid_configs(study: StudyConfig) -> list[dict[str, Any]]:
    """The grid's distinct valid trial configurations (sampled parameters by name), in grid order.

    The grid is the product of every dimension's
    :meth:`~p3b_search.study.dimensions.Dimension.grid_values`. A point keeps only the entries
    its method samples (:func:`active_keys`): points that differ only in a knob their method
    lacks or fixes (dense and ``prune_ratio``) are one configuration, run once. Points that are
    no valid trial configuration are left out (the searcher rejects them unrun).
    """
    keys = list(study.search_space)
    configs: dict[tuple, dict[str, Any]] = {}
    for values in itertools.product(*(dim.grid_values() for dim in study.search_space.values())):
        point = dict(zip(keys, values))
        method = str(point.get("method", study.method.name))
        params = {k: point[k] for k in keys if k == "method" or k in active_keys(study, method)}
        configs.setdefault(config_key(params), params)
    valid = []
    for params in configs.values():
        try:
            trial_config(study, params)
        except StudyError:
            continue
        valid.append(params)
    return valid

