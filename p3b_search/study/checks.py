"""Every check of a study that needs more than one field: all run by
:func:`p3b_search.study.loading.load_study` before any compute.

Checks raise :class:`~p3b_search.study.messages.FieldError` (path + instruction); the loader
prefixes the file name. Cross-section rules of a trial (``min_lr`` <= ``lr``, prune epochs
within the prune stage) live in :func:`p3b_search.study.trials.cross_section_problem` and are
tried here on the fixed configuration and on every bound of the search space.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Literal

from pydantic import ValidationError

from p3b_search.config import TrialConfig
from p3b_search.credentials import REFERENCE
from p3b_search.method_specs import MethodSpec, method_names, method_spec
from p3b_search.study.dimensions import MAX_GRID_POINTS, Dimension, grid_point_count
from p3b_search.study.field_error import FieldError, got
from p3b_search.study.knobs import method_knobs
from p3b_search.study.messages import StudyError, did_you_mean, first_model, join_path, message_of
from p3b_search.study.rungs import EPOCH_COSTS
from p3b_search.study.sections import MAXIMIZED, StudyConfig
from p3b_search.study.trials import grid_configs, trial_config
from p3b_search.study.trials_table import DENSE_METHOD

_MAX_CROSS_CHECKS = 256


def check_study(study: StudyConfig) -> StudyConfig:
    """Run every check on ``study``; returns it, with ``n_trials`` = the whole grid for a
    ``sampler: grid`` study whose file omits ``n_trials``. Raises :class:`FieldError`."""
    _check_study(study)
    return _with_grid_trials(study) if study.sampler.name == "grid" else study


def _method_spec(name: str, path: str) -> MethodSpec:
    try:
        return method_spec(name)
    except ValueError:
        names = method_names()
        raise FieldError(path, f"unknown pruning method {name!r}: {did_you_mean(name, names)}"
                                f"choose one of {', '.join(names)}") from None


def _check_method_config(spec: MethodSpec, knobs: dict[str, Any], path: str) -> None:
    try:
        spec.config_cls.model_validate(knobs)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "extra_forbidden":
            knob = str(first["loc"][-1])
            raise FieldError(f"{path}.{knob}", _not_a_knob(knob, [spec.name])) from None
        loc = tuple(first["loc"])
        raise FieldError(join_path((path, *loc)) if loc else path, message_of(first)) from None



def _not_a_knob(knob: str, methods: list[str]) -> str:
    owners = [m for m in method_names() if knob in method_knobs(m)]
    belongs = f" (it belongs to {', '.join(owners)})" if owners else ""
    which = f"method {methods[0]!r}" if len(methods) == 1 else f"any of the methods {', '.join(methods)}"
    knobs = sorted({k for m in methods for k in method_knobs(m)})
    if not knobs:
        return f"not a knob of {which}{belongs}: remove it ({which} has no knobs to set)"
    return (f"not a knob of {which}{belongs}: {did_you_mean(knob, knobs)}"
            f"remove it or use one of {', '.join(knobs)}")


def _check_study(study: StudyConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study.name):
        raise FieldError("name", f"must be a folder name (letters, digits, '_', '-', '.') (got {study.name!r})")
    _check_method_section(study)
    for key, dim in study.search_space.items():
        _check_dimension(study, key, dim)
    _check_objectives(study)
    _check_resources(study)
    _check_compare(study)
    for field, url in (("storage", study.storage), ("tracking.uri", study.tracking.uri)):
        if url is not None:
            _check_url(field, url)
    fixed = _fixed_trial_error(study)
    if fixed is not None and not study.search_space:
        raise _at_fixed_field(fixed)
    for key, dim in study.search_space.items():
        _check_bounds(study, key, dim, fixed)
    _check_scheduler(study)
    if study.shared_prefixes:
        _check_something_shared(study)


def _check_url(field: str, url: str) -> None:
    """A store URL: ``scheme://...`` (or ``file:``), each ``${`` a reference ``${NAME}``, and no
    password in a tracking server's URL (MLflow takes it from its own variables)."""
    if "://" not in url and not url.startswith("file:"):
        shown = f"...@{url.rpartition('@')[2]}" if "@" in url else url  # never echo what may be a password
        raise FieldError(field, f"must be a URL such as sqlite:///path/db.sqlite or "
                                  f"postgresql://host/db (got {shown!r})")
    if "${" in REFERENCE.sub("", url):
        raise FieldError(field, "refers to an environment variable as ${NAME} (letters, digits and _, "
                                "not starting with a digit): fix the reference")
    if url.startswith(("http://", "https://")) and "@" in url.partition("://")[2].partition("/")[0]:
        raise FieldError(field, "a tracking server takes its user and password from MLflow's "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD variables: remove "
                                "user:password@ from the URL and export those")


def _fixed_trial_error(study: StudyConfig) -> StudyError | None:
    """What is wrong with the fixed configuration alone (nothing sampled), if anything."""
    try:
        trial_config(study, {})
    except StudyError as error:
        return error
    return None


def _at_fixed_field(error: StudyError) -> FieldError:
    """``error`` of the fixed configuration, at the field the study file sets (a fixed knob
    ``method_config.X`` is ``method.config.X`` there)."""
    field = error.field or "method"
    if field.startswith("method_config."):
        field = "method.config." + field.removeprefix("method_config.")
    return FieldError(field, error.reason or str(error))


def _check_method_section(study: StudyConfig) -> None:
    method_dim = study.search_space.get("method")
    if method_dim is not None:
        listed = method_dim.listed()
        if listed is None:
            raise FieldError("search_space.method", "must be {type: categorical, choices: [method names]}")
        for i, choice in enumerate(listed):
            _method_spec(str(choice), f"search_space.method.choices[{i}]")
        if study.method.name not in [str(c) for c in listed]:
            raise FieldError("method.name", f"{study.method.name!r} (the reference method) must be one of "
                                             f"search_space.method.choices: add it there or change method.name")
    spec = _method_spec(study.method.name, "method.name")
    candidates = study.candidate_methods()
    if method_dim is None:
        _check_method_config(spec, study.method.config, "method.config")
        return
    for knob in study.method.config:
        if not any(knob in method_knobs(m) for m in candidates):
            raise FieldError(f"method.config.{knob}", _not_a_knob(knob, candidates))
    for method in candidates:
        knobs = {k: v for k, v in study.method.config.items() if k in method_knobs(method)}
        _check_method_config(method_spec(method), knobs, "method.config")


def _field_at(path: str) -> Any:
    """The pydantic FieldInfo a non-method search-space path addresses (None below a dict field)."""
    parts = path.split(".")
    model: Any = TrialConfig
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[: i + 1])
        if part not in fields:
            raise FieldError(f"search_space.{path}", f"{where} is not a field of the trial configuration: "
                                                      f"{did_you_mean(part, sorted(fields))}use one of "
                                                      f"{', '.join('.'.join(parts[:i] + [f]) for f in sorted(fields))}")
        info = fields[part]
        nested = first_model(info.annotation)
        if nested is None:
            if i == len(parts) - 1:
                return info
            if getattr(info.annotation, "__origin__", None) is dict and i == len(parts) - 2:
                return None  # e.g. model.overrides.depth: any key of a free-form mapping
            raise FieldError(f"search_space.{path}", f"{where} is a value, not a section: search {where} itself")
        model = nested
    raise FieldError(f"search_space.{path}", f"{path} is a section, not a value: search one of its fields "
                                              f"({', '.join(sorted(model.model_fields))})")


def _annotation_kinds(annotation: Any) -> set[type]:
    args = getattr(annotation, "__args__", None)
    if args and getattr(annotation, "__origin__", None) is not Literal:
        return set().union(*(_annotation_kinds(a) for a in args))
    return {annotation} if isinstance(annotation, type) else {object}


def _check_dimension(study: StudyConfig, key: str, dim: Dimension) -> None:
    path = f"search_space.{key}"
    dim.check(path)
    if key == "method":
        return
    if key == "method_config":
        raise FieldError(path, "name a knob of the method, e.g. method_config.prune_ratio")
    if key.startswith("method_config."):
        knob = key.removeprefix("method_config.")
        candidates = study.candidate_methods()
        owners = [m for m in candidates if knob in method_knobs(m)]
        if not owners:
            raise FieldError(path, _not_a_knob(knob, candidates))
        if knob in study.method.config:
            raise FieldError(path, f"{knob} is also fixed in method.config: remove it from one of the two")
        fields = [method_spec(m).config_cls.model_fields[knob] for m in owners]
    else:
        info = _field_at(key)
        fields = [] if info is None else [info]
    for info in fields:
        dim.check_fits(path, key, _annotation_kinds(info.annotation))


def _check_bounds(study: StudyConfig, key: str, dim: Dimension, fixed: StudyError | None) -> None:
    """Every bound must give a valid trial configuration for some corner of the other dimensions.

    Field constraints (``prune_ratio < 1``) fail for every corner; a cross-field rule of a
    method (start epoch <= finalize epoch) fails only when no corner of the other searched
    knobs (their low/high or choices) makes the bound valid. A bound that fails exactly as the
    fixed configuration does (``fixed``), at a field nobody searches, is the fixed
    configuration's fault: the error names that field.
    """
    others = [(k, d) for k, d in study.search_space.items() if k != key]
    corners = itertools.product(*([v for _, v in d.bounds()] for _, d in others))
    corners = list(itertools.islice(corners, _MAX_CROSS_CHECKS))
    for sub, value in dim.bounds():
        first_error = None
        for corner in corners:
            params = {k: v for (k, _), v in zip(others, corner)}
            params[key] = value
            if "method" in params:
                knobs = method_knobs(str(params["method"]))
                if key.startswith("method_config.") and key.removeprefix("method_config.") not in knobs:
                    continue
                params = _method_params(params)
            try:
                trial_config(study, params)
                first_error = None
                break
            except StudyError as error:
                first_error = first_error or error
        if first_error is not None:
            if (fixed is not None and first_error.field not in study.search_space
                    and (first_error.field, first_error.reason) == (fixed.field, fixed.reason)):
                raise _at_fixed_field(fixed)
            reason = first_error.reason
            if first_error.field != key:
                reason = f"gives no valid trial: {first_error.field}: {reason}"
            raise FieldError(f"search_space.{key}.{sub}", reason)


def _method_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the ``method_config.*`` knobs its sampled ``method`` lacks."""
    if "method" not in params:
        return params
    knobs = method_knobs(str(params["method"]))
    return {k: v for k, v in params.items()
            if not k.startswith("method_config.") or k.removeprefix("method_config.") in knobs}


#: Micro-batches per epoch assumed where the data is not read yet: the most a start epoch can
#: share (a real epoch has fewer steps; a uniform-magnitude start of 1.5 then shares 1 epoch).
_MANY_STEPS = 10**6


def _shared_epochs(trial: TrialConfig) -> int:
    """Whole prune-stage epochs ``trial`` could share with others (0 when its method acts in
    its first epoch, or the configuration is one the method refuses)."""
    try:
        config = method_spec(trial.method).config_cls(**trial.method_config)
        return config.shared_epochs(trial.training.prune.epochs, _MANY_STEPS)
    except ValueError:  # pydantic's ValidationError too
        return 0


def _check_something_shared(study: StudyConfig) -> None:
    """``shared_prefixes`` needs some trial that trains a whole epoch before its method acts:
    tried on every corner of the search space (low/high, every choice; the extremes of the
    prune epochs). A space with more corners than are tried is not refused."""
    keys = list(study.search_space)
    bounds = [[v for _, v in study.search_space[k].bounds()] for k in keys]
    corners = list(itertools.islice(itertools.product(*bounds), _MAX_CROSS_CHECKS + 1))
    if len(corners) > _MAX_CROSS_CHECKS:
        return
    for corner in corners:
        try:
            trial = trial_config(study, _method_params(dict(zip(keys, corner))))
        except StudyError:
            continue
        if _shared_epochs(trial) > 0:
            return
    reasons = []
    for method in study.candidate_methods():
        if "prune_start_epoch" in method_spec(method).config_cls.model_fields:
            reasons.append(f"{method} starts pruning in its first epoch (method_config.prune_start_epoch)")
        elif method == DENSE_METHOD:
            reasons.append(f"{method} trials differ only by seed")
        else:
            reasons.append(f"{method} prunes from step 0")
    raise FieldError("shared_prefixes", f"nothing to share: {'; '.join(reasons)}: let trials start pruning "
                                         "later (prune_start_epoch >= 1; above 1 for uniform-magnitude) or "
                                         "remove shared_prefixes")


def _check_objectives(study: StudyConfig) -> None:
    seen: set[str] = set()
    for i, objective in enumerate(study.objectives):
        if objective.name in seen:
            raise FieldError(f"objectives[{i}].name", f"{objective.name} is listed twice: remove one")
        seen.add(objective.name)
        natural = "maximize" if objective.name in MAXIMIZED else "minimize"
        if objective.direction not in (None, natural):
            raise FieldError(f"objectives[{i}].direction",
                              f"{objective.name} is always {natural}d: set {natural} or remove direction")
        if objective.name == "latency_ms" and objective.reference is None:
            raise FieldError(f"objectives[{i}].reference", "latency_ms needs a reference (the milliseconds "
                                                            "a useful model must beat, e.g. the dense model's)")


def _fewest_epochs(study: StudyConfig) -> tuple[int, bool]:
    """The fewest epochs (both stages) a trial of ``study`` trains, and whether that is a searched
    bound (run after the bounds checks: every searched epoch count is a valid one)."""
    total, searched = 0, False
    for stage in ("prune", "finetune"):
        dim = study.search_space.get(f"training.{stage}.epochs")
        if dim is None:
            total += getattr(study.training, stage).epochs
        else:
            total += int(min(value for _, value in dim.bounds()))
            searched = True
    return total, searched


def _check_scheduler(study: StudyConfig) -> None:
    section = study.scheduler
    if section is None:
        return
    if study.early_stopping.enabled:
        raise FieldError("scheduler", "successive halving and early_stopping both stop trials: set "
                                      "early_stopping: {enabled: false} or remove scheduler")
    if section.eta < 2:
        raise FieldError("scheduler.eta", f"must be >= 2: the top 1/eta of each rung continue, e.g. eta: 3 keeps "
                                          f"a third (got {got(section.eta)})")
    epochs, searched = _fewest_epochs(study)
    for i, rung in enumerate(section.rungs):
        path = f"scheduler.rungs[{i}]"
        if rung < 1:
            raise FieldError(path, f"must be >= 1: a rung counts the epochs trained over both stages, 1 = after "
                                   f"the first epoch (got {got(rung)})")
        if rung >= epochs:
            fewest = "at the fewest " if searched else ""
            raise FieldError(path, f"must be below the {epochs} epochs a trial trains {fewest}(training.prune.epochs "
                                   f"+ training.finetune.epochs): a rung at the last epoch decides nothing; lower it "
                                   f"(got {got(rung)})")
        if rung in section.rungs[:i]:
            raise FieldError(path, f"{rung} is listed twice: list each rung once")
    if not any(o.name in EPOCH_COSTS for o in study.objectives):
        raise FieldError("scheduler", f"successive halving ranks each rung on accuracy and cost, and objectives "
                                      f"hold no cost that every epoch reports: add {', '.join(EPOCH_COSTS[:-1])} or "
                                      f"{EPOCH_COSTS[-1]} to objectives (got {', '.join(study.metric_names)})")


def method_pair_problem(pair: tuple[str, str], methods: list[str]) -> str | None:
    """What is wrong with comparing ``pair`` (A, B) in a study whose trials use ``methods``, if
    anything (an instruction for a one-line error)."""
    first, second = pair
    for name in pair:
        if name not in methods:
            pruning = [m for m in methods if m != DENSE_METHOD]
            return (f"{name!r} is not a method of this study: {did_you_mean(name, pruning)}"
                    f"use one of {', '.join(pruning)}")
    if DENSE_METHOD in pair:
        return (f"{DENSE_METHOD} is the reference (prune ratio 0) and pairs with no pruned method: "
                "name two pruning methods")
    if first == second:
        return f"compares {first} with itself: name two different methods"
    return None


def _check_compare(study: StudyConfig) -> None:
    methods = study.candidate_methods()
    declared = [("compare.primary", study.compare.primary_pair)]
    declared += [(f"compare.equivalence[{i}]", pair) for i, pair in enumerate(study.compare.equivalence_pairs)]
    for path, pair in declared:
        problem = None if pair is None else method_pair_problem(pair, methods)
        if problem:
            raise FieldError(path, problem)


def _check_resources(study: StudyConfig) -> None:
    gpu = study.resources_per_trial.gpu
    if gpu > 1 and not float(gpu).is_integer():
        raise FieldError("resources_per_trial.gpu", f"fractions are only possible below 1 GPU (got {got(gpu)})")
    if gpu > 1:
        raise FieldError("resources_per_trial.gpu", f"is per worker: set gpu: 1 and workers_per_trial: "
                                                     f"{int(gpu)} for a data-parallel trial (got {got(gpu)})")



def _with_grid_trials(study: StudyConfig) -> StudyConfig:
    """Check a ``sampler: grid`` study (finite dimensions, a grid of runnable size, ``n_trials``
    within it); returns it with ``n_trials`` = the whole grid when the file omits ``n_trials``."""
    for key, dim in study.search_space.items():
        dim.check_grid(f"search_space.{key}")
    points = grid_point_count(study.search_space)
    if points > MAX_GRID_POINTS:
        raise FieldError("search_space", f"the grid has {points} points (at most {MAX_GRID_POINTS}): use coarser "
                                          "steps, fewer choices or another sampler")
    size = len(grid_configs(study))
    if size == 0:
        raise FieldError("search_space", "no point of the grid is a valid trial configuration: widen the grid "
                                          "(see search_space for each method's knobs)")
    if "n_trials" not in study.model_fields_set:
        return study.model_copy(update={"n_trials": size})
    if study.n_trials > size:
        raise FieldError("n_trials", f"{study.n_trials} is more than the grid's {size} distinct trial "
                                      f"configurations: set n_trials: {size} or fewer (or omit it: the whole grid)")
    return study
