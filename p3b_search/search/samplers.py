"""Optuna samplers by name: a registry of the built-in ones, and a user's own ``module:Class``.

``sampler: {name: tpe, seed: 0, options: {...}}`` in a study file picks the sampler ``tpe``
(registered below with :func:`register_sampler`) and builds it seeded with ``seed``; ``options``
are keyword arguments of the sampler's constructor that replace the defaults chosen here. A name
with a colon, ``my_pkg.samplers:MySampler``, imports that class: it must subclass
``optuna.samplers.BaseSampler`` and is built as ``MySampler(seed=seed, **options)`` (``seed``
only when its constructor takes one).

:func:`create_sampler` raises a one-line :class:`StudyError` for an unknown name, a class that
is not a sampler or options its constructor refuses; the runner's preflight calls it, so a bad
sampler stops the study before any compute.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import optuna

from p3b_search.errors import first_line
from p3b_search.search.space import METHOD
from p3b_search.study.messages import StudyError, did_you_mean
from p3b_search.study.sections import StudyConfig

SamplerFactory = Callable[[StudyConfig, dict[str, Any]], optuna.samplers.BaseSampler]
"""Builds a sampler for a study from the keyword arguments the study gives it (``seed``, options)."""

_SAMPLERS: dict[str, SamplerFactory] = {}
_CLASS_HINT = "give module:Class of an optuna.samplers.BaseSampler subclass"


def register_sampler(name: str) -> Callable[[SamplerFactory], SamplerFactory]:
    """Decorator: make ``factory(study, kwargs)`` the sampler ``sampler.name: <name>`` builds."""

    def register(factory: SamplerFactory) -> SamplerFactory:
        if name in _SAMPLERS or ":" in name:
            raise ValueError(f"sampler name {name!r} is taken or contains ':'")
        _SAMPLERS[name] = factory
        return factory

    return register


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted."""
    return sorted(_SAMPLERS)


def _startup_trials(study: StudyConfig) -> int:
    """Random trials before model-based sampling: ``min(10, n_trials // 4)``, at least 1, so small
    studies also benefit."""
    return max(1, min(10, study.n_trials // 4))


@register_sampler("tpe")
def _tpe(study: StudyConfig, kwargs: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """Multivariate TPE with constant liar (parallel trials), grouping the conditional space when
    ``method`` is searched."""
    defaults = {"multivariate": True, "constant_liar": True, "group": METHOD in study.search_space,
                "n_startup_trials": _startup_trials(study)}
    return optuna.samplers.TPESampler(**{**defaults, **kwargs})


@register_sampler("nsga2")
def _nsga2(study: StudyConfig, kwargs: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(**kwargs)


@register_sampler("gp")
def _gp(study: StudyConfig, kwargs: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(**{"n_startup_trials": _startup_trials(study), **kwargs})


@register_sampler("random")
def _random(study: StudyConfig, kwargs: dict[str, Any]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(**kwargs)


class RayGridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` that leaves ending the study to Ray Tune.

    Optuna's calls ``study.stop()`` when the last grid point is told, which raises outside
    ``study.optimize``; here Ray Tune's searcher asks and tells, and the study ends after
    ``n_trials`` trials (at most the grid's size, see the schema).
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        """Nothing to do: no ``study.stop()``."""


@register_sampler("grid")
def _grid(study: StudyConfig, kwargs: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """Each grid point once, also to trials asked while others run: Optuna gives trial number
    ``k`` the ``k``-th point of its shuffled grid, and any later trial a point no running or
    ended trial has."""
    return RayGridSampler({key: dim.grid_values() for key, dim in study.search_space.items()}, **kwargs)


def _user_sampler(source: str, name: str) -> Callable[..., optuna.samplers.BaseSampler]:
    """The class ``module:Class`` names, checked to be an Optuna sampler."""
    module_name, _, class_name = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError as error:
        raise StudyError(f"{source}: sampler.name: cannot import {module_name!r} ({error}): "
                         f"{_CLASS_HINT}") from None
    if found is None:
        raise StudyError(f"{source}: sampler.name: module {module_name!r} has no {class_name!r}: {_CLASS_HINT}")
    if not (isinstance(found, type) and issubclass(found, optuna.samplers.BaseSampler)):
        raise StudyError(f"{source}: sampler.name: {name} is not a subclass of optuna.samplers.BaseSampler: "
                         f"{_CLASS_HINT}")
    return found


def _takes_seed(factory: Callable[..., Any]) -> bool:
    parameters = inspect.signature(factory).parameters.values()
    return any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def create_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the study's ``sampler`` section names, seeded, with its options.

    One-line :class:`StudyError` naming ``sampler.name`` or ``sampler.options`` when the name
    is unknown, the class is no sampler or the constructor refuses the options.
    """
    config, source = study.sampler, study.source
    kwargs = dict(config.options)
    if config.name in _SAMPLERS:
        build = functools.partial(_SAMPLERS[config.name], study, {"seed": config.seed, **kwargs})
    elif ":" in config.name:
        cls = _user_sampler(source, config.name)
        if _takes_seed(cls):
            kwargs = {"seed": config.seed, **kwargs}
        build = functools.partial(cls, **kwargs)
    else:
        names = available_samplers()
        raise StudyError(f"{source}: sampler.name: unknown sampler {config.name!r}: "
                         f"{did_you_mean(config.name, names)}choose one of {', '.join(names)}, or {_CLASS_HINT}")
    try:
        with warnings.catch_warnings():  # multivariate/group/GP are flagged experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return build()
    except (TypeError, ValueError) as error:
        reason = first_line(error)
        raise StudyError(f"{source}: sampler.options: sampler {config.name} refuses {dict(config.options)} "
                         f"({reason}): fix or remove the options") from None
