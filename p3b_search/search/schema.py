"""The study file (``studies/*.yaml``): what to train, what to search, how to run it.

A study composes the fixed trial configuration (``model``, ``data``, ``training``, ``method``)
with a **search space** whose keys are dotted paths into the trial configuration
(:class:`p3b_search.config.TrialConfig`)::

    search_space:
      method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}
      method_config.prune_start_epoch: {type: int, low: 0, high: 4}
      training.prune.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
      method: {type: categorical, choices: [p3b, uniform-magnitude]}

``method_config.<knob>`` addresses a knob of the method (validated by the method's own
``config_cls``); with ``method`` searched, a knob is sampled only for the methods that have it
(and do not fix it: dense ignores a searched ``prune_ratio``).

``sampler: {name: grid}`` runs every distinct trial configuration of the grid once (see
:func:`grid_configs`); every float range then needs a ``step``, an omitted ``n_trials`` means the
whole grid and a larger one is an error.
:func:`load_study` checks everything before any compute and raises :class:`StudyError` with
one line naming the field and the fix, e.g.
``study.yaml: search_space.method_config.prune_ratio.high: must be < 1 (got 1.5)``.
Relative paths (``output_dir``, ``data.root``, a ``model.weights`` file) are resolved against
the current directory when the study is loaded.
"""
from __future__ import annotations

import difflib
import itertools
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator

from p3b_search.config import DataConfig, ModelConfig, TrainingConfig, TrialConfig, _Strict
from p3b_search.methods import available_methods, get_method
from p3b_search.search.layout import StudyLayout

OBJECTIVE_NAMES = ("top1", "top5", "macs", "flops", "params", "latency_ms")
MAXIMIZED = ("top1", "top5")
_NAMED_WEIGHTS = ("source-pretrained", "hub")
_MAX_CROSS_CHECKS = 256
MAX_GRID_POINTS = 10_000


class StudyError(ValueError):
    """A study file that cannot run; the message is one line: ``file: field.path: what to fix``.

    ``field`` (dotted path) and ``reason`` hold the two parts of the message where known."""

    def __init__(self, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field, self.reason = field, reason


class FloatRange(_Strict):
    """Uniform (or log-uniform) float in ``[low, high]``, optionally on a grid of ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class IntRange(_Strict):
    """Integer in ``[low, high]`` (both included) on a grid of ``step``, optionally log-scaled."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


class Choice(_Strict):
    """One of ``choices`` (strings, numbers, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=1)


SearchDimension = Annotated[Union[FloatRange, IntRange, Choice], Field(discriminator="type")]
_DIMENSIONS: dict[str, type[BaseModel]] = {"float": FloatRange, "int": IntRange, "categorical": Choice}


class MethodSection(_Strict):
    """The pruning method (a registered name) and its fixed knobs (validated by its config_cls)."""

    name: str = "p3b"
    config: dict[str, Any] = Field(default_factory=dict)


class Objective(_Strict):
    """One objective. ``direction`` follows from the name (accuracies maximized, costs minimized).

    ``reference``: the hypervolume reference value (a value every useful trial beats);
    default 0 % for accuracies and the dense model's value for ``macs``/``flops``/``params``;
    ``latency_ms`` has no default. ``flops`` = 2 x ``macs`` (torch's counting convention).
    """

    name: Literal["top1", "top5", "macs", "flops", "params", "latency_ms"]
    direction: Literal["maximize", "minimize"] | None = None
    reference: float | None = None

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.name in MAXIMIZED else "minimize")


class DenseReference(_Strict):
    """The dense (unpruned) model's accuracy in %, drawn as the reference point of the front and
    the top of the normalised hypervolume's box. A figure given here wins; without one the mean
    of the study's finished ``dense`` trials is used (see ``p3b_search.search.dense``)."""

    top1: float | None = Field(None, ge=0, le=100)
    top5: float | None = Field(None, ge=0, le=100)


class SamplerConfig(_Strict):
    """Optuna sampler: ``tpe`` (default; multivariate, constant liar), ``nsga2``, ``gp``, ``random``,
    ``grid`` (each distinct configuration of the grid once, in an order shuffled by ``seed``) or a
    user's ``module:Class``; ``options``: keyword arguments of its constructor (see
    :mod:`p3b_search.search.samplers`, which checks the name before compute)."""

    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = {}


class Resources(_Strict):
    """Resources of one trial worker: CPUs and (fractional) GPUs."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class TrackingConfig(_Strict):
    """MLflow tracking: ``uri`` None = the embedded SQLite store in the study folder."""

    enabled: bool = True
    uri: str | None = None


class EarlyStopping(_Strict):
    """Stop a trial that another trial dominates at the same epoch of the same stage.

    Fine-tune stage (``finetune`` in ``stages``): from fine-tune epoch ``grace_epochs`` on, a
    trial stops when some other trial had, at the same fine-tune epoch, top-1 at least
    ``margin`` points higher with no more MACs (both pruned models measured).
    Prune stage (``prune`` in ``stages``): from prune-stage epoch ``grace_epochs`` on, a trial
    stops when some other trial had, at the same prune-stage epoch, top-1 at least ``margin``
    points higher with a budget (kept fraction 1 - prune_ratio) no larger and, where both report
    it, no larger a kept fraction at that epoch (so a trial that has not pruned yet cannot
    stop one that has). This saves the expensive part of a trial.
    A stopped trial is recorded as PRUNED in Optuna and never appears on the front.
    """

    enabled: bool = False
    stages: list[Literal["prune", "finetune"]] = Field(
        default_factory=lambda: ["finetune"], min_length=1,
        description="Stages whose epochs are compared: finetune, prune, or both.")
    grace_epochs: int = Field(1, ge=0, description="Epochs of each stage before a trial may be stopped.")
    margin: float = Field(5.0, ge=0, description="Top-1 points by which the other trial must be better.")


class StudyConfig(_Strict):
    """A whole study; see the module docstring and ``studies/*.yaml``."""

    name: str
    output_dir: Path = Path("runs")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    method: MethodSection = MethodSection()
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(name="top1"), Objective(name="macs")], min_length=1
    )
    dense_reference: DenseReference = DenseReference()
    sampler: SamplerConfig = SamplerConfig()
    n_trials: int = Field(20, ge=1)
    concurrency: int = Field(1, ge=1)
    resources_per_trial: Resources = Resources()
    workers_per_trial: int = Field(1, ge=1, description=">1: data-parallel trial (Ray Train TorchTrainer).")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial from its last checkpoint.")
    storage: str | None = Field(None, description="Optuna storage URL; None: SQLite in the study folder.")
    tracking: TrackingConfig = TrackingConfig()
    early_stopping: EarlyStopping = EarlyStopping()
    enqueue_reference: bool = Field(True, description="Run the methods' default knobs as the first trial "
                                                      "(not with sampler grid: every trial is a grid point).")

    _source: str = PrivateAttr("study.yaml")

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_shorthand(cls, value: Any) -> Any:
        """Allow ``objectives: [top1, macs]`` for ``[{name: top1}, {name: macs}]``."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def source(self) -> str:
        """The file this study was loaded from (for messages)."""
        return self._source

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.output_dir / self.name)

    @property
    def storage_url(self) -> str:
        return self.storage or self.layout.default_storage_url()

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or self.layout.default_tracking_uri()

    @property
    def metric_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objectives]

    def candidate_methods(self) -> list[str]:
        """The methods trials may use: the searched choices, else ``method.name``."""
        dim = self.search_space.get("method")
        return [str(c) for c in dim.choices] if isinstance(dim, Choice) else [self.method.name]

    def with_overrides(self, **changes: Any) -> "StudyConfig":
        """A copy with top-level fields replaced (e.g. ``n_trials``), re-validated."""
        data = self.model_dump(mode="python")
        data.update(changes)
        if "output_dir" in changes:
            data["output_dir"] = Path(changes["output_dir"]).expanduser().resolve()
        return _validated(data, self.source)


# ----------------------------------------------------------------------------- loading

def load_study(path: str | Path) -> StudyConfig:
    """Read and fully validate a study file; raise :class:`StudyError` (one line) on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise StudyError(f"{source}: cannot read the study file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise StudyError(f"{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise StudyError(f"{source}: the study file is empty: start from studies/quickstart.yaml")
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: the study file must be a mapping of key: value (got {type(raw).__name__})")
    return _validated(_resolve_paths(raw), source)


def _resolve_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Make relative paths absolute against the current directory (trials run elsewhere)."""
    raw = dict(raw)
    if isinstance(raw.get("output_dir", "runs"), str):
        raw["output_dir"] = str(Path(raw.get("output_dir", "runs")).expanduser().resolve())
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        raw["data"] = {**data, "root": str(Path(data["root"]).expanduser().resolve())}
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), str) and model["weights"] not in _NAMED_WEIGHTS:
        raw["model"] = {**model, "weights": str(Path(model["weights"]).expanduser().resolve())}
    return raw


def _validated(raw: dict[str, Any], source: str) -> StudyConfig:
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as error:
        field, reason = _first_error(error, StudyConfig)
        raise StudyError(f"{source}: {field}: {reason}", field, reason) from None
    study._source = source
    try:
        _check_study(study)
        if study.sampler.name == "grid":
            study = _with_grid_trials(study)
    except _FieldError as error:
        raise StudyError(f"{source}: {error.path}: {error.message}", error.path, error.message) from None
    return study


class _FieldError(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


# ----------------------------------------------------------------------------- messages

def _got(value: Any) -> str:
    """A value as the YAML file would show it (``1.0`` as ``1``, strings quoted)."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _join(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]}? " if close else ""


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the last element of ``loc`` (None: a free mapping)."""
    current: Any = model
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        if current is StudyConfig and part == "search_space":
            # search_space.<key>.<type tag>.<field>: the dimension class of that tag
            return _DIMENSIONS.get(str(parts[1])) if len(parts) == 2 else None
        fields = current.model_fields
        if part not in fields:
            return None
        current = _first_model(fields[part].annotation)
        if current is None:
            return None
    return current


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_BOUNDS = {"less_than": ("<", "lt"), "less_than_equal": ("<=", "le"),
           "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge")}


def _message(error: dict[str, Any]) -> str:
    """A short instruction for one pydantic error (without the path)."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        return f"must be {symbol} {_got(ctx[key])} (got {_got(value)})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {_got(value)})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {_got(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {_got(value)})"
    if kind == "string_type":
        return f"must be a string (got {_got(value)})"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {_got(value)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of key: value (got {_got(value)})"
    if kind == "list_type":
        return f"must be a list (got {_got(value)})"
    if kind == "missing":
        return "required: add it"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} entries (got {_got(value)})"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return "needs type: float, int or categorical (e.g. {type: float, low: 0.3, high: 0.8})"
    if kind == "value_error":
        return f"{str(ctx.get('error', error['msg'])).removeprefix('Value error, ')}"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {_got(value)})"


def _first_error(error: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> tuple[str, str]:
    """(field path, instruction) for the first error of ``error`` (validated against ``model``)."""
    errors = error.errors(include_url=False)
    # An unknown key usually explains the other errors (a typo'd required key): report it first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    if len(loc) >= 3 and loc[0] == "search_space" and loc[2] in _DIMENSIONS:
        loc = loc[:2] + loc[3:]
    if first["type"] == "extra_forbidden":
        holder = _model_at(model, tuple(first["loc"]))
        options = sorted(holder.model_fields) if holder else []
        return _join(prefix + loc), (f"unknown key: {did_you_mean(str(loc[-1]), options)}"
                                     f"remove it or use one of {', '.join(options)}")
    return _join(prefix + loc), _message(first)


# ----------------------------------------------------------------------------- semantic checks

def _method_class(name: str, path: str):
    try:
        return get_method(name)
    except ValueError:
        names = available_methods()
        raise _FieldError(path, f"unknown pruning method {name!r}: {did_you_mean(name, names)}"
                                f"choose one of {', '.join(names)}") from None


def _check_method_config(cls: Any, knobs: dict[str, Any], path: str) -> None:
    try:
        cls.config_cls.model_validate(knobs)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "extra_forbidden":
            knob = str(first["loc"][-1])
            raise _FieldError(f"{path}.{knob}", _not_a_knob(knob, [cls.name])) from None
        loc = tuple(first["loc"])
        raise _FieldError(_join((path, *loc)) if loc else path, _message(first)) from None


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


def _not_a_knob(knob: str, methods: list[str]) -> str:
    owners = [m for m in available_methods() if knob in method_knobs(m)]
    belongs = f" (it belongs to {', '.join(owners)})" if owners else ""
    which = f"method {methods[0]!r}" if len(methods) == 1 else f"any of the methods {', '.join(methods)}"
    knobs = sorted({k for m in methods for k in method_knobs(m)})
    if not knobs:
        return f"not a knob of {which}{belongs}: remove it ({which} has no knobs to set)"
    return (f"not a knob of {which}{belongs}: {did_you_mean(knob, knobs)}"
            f"remove it or use one of {', '.join(knobs)}")


def _check_study(study: StudyConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study.name):
        raise _FieldError("name", f"must be a folder name (letters, digits, '_', '-', '.') (got {study.name!r})")
    _check_method_section(study)
    for key, dim in study.search_space.items():
        _check_dimension(study, key, dim)
    _check_objectives(study)
    _check_resources(study)
    for field, url in (("storage", study.storage), ("tracking.uri", study.tracking.uri)):
        if url is not None and "://" not in url and not url.startswith("file:"):
            raise _FieldError(field, f"must be a URL such as sqlite:///path/db.sqlite or "
                                      f"postgresql://host/db (got {url!r})")
    for key, dim in study.search_space.items():
        _check_bounds(study, key, dim)


def _check_method_section(study: StudyConfig) -> None:
    method_dim = study.search_space.get("method")
    if method_dim is not None:
        if not isinstance(method_dim, Choice):
            raise _FieldError("search_space.method", "must be {type: categorical, choices: [method names]}")
        for i, choice in enumerate(method_dim.choices):
            _method_class(str(choice), f"search_space.method.choices[{i}]")
        if study.method.name not in [str(c) for c in method_dim.choices]:
            raise _FieldError("method.name", f"{study.method.name!r} (the reference method) must be one of "
                                             f"search_space.method.choices: add it there or change method.name")
    cls = _method_class(study.method.name, "method.name")
    candidates = study.candidate_methods()
    if method_dim is None:
        _check_method_config(cls, study.method.config, "method.config")
        return
    for knob in study.method.config:
        if not any(knob in method_knobs(m) for m in candidates):
            raise _FieldError(f"method.config.{knob}", _not_a_knob(knob, candidates))
    for method in candidates:
        knobs = {k: v for k, v in study.method.config.items() if k in method_knobs(method)}
        _check_method_config(get_method(method), knobs, "method.config")


def _field_at(path: str) -> Any:
    """The pydantic FieldInfo a non-method search-space path addresses (None below a dict field)."""
    parts = path.split(".")
    model: Any = TrialConfig
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[: i + 1])
        if part not in fields:
            raise _FieldError(f"search_space.{path}", f"{where} is not a field of the trial configuration: "
                                                      f"{did_you_mean(part, sorted(fields))}use one of "
                                                      f"{', '.join('.'.join(parts[:i] + [f]) for f in sorted(fields))}")
        info = fields[part]
        nested = _first_model(info.annotation)
        if nested is None:
            if i == len(parts) - 1:
                return info
            if getattr(info.annotation, "__origin__", None) is dict and i == len(parts) - 2:
                return None  # e.g. model.overrides.depth: any key of a free-form mapping
            raise _FieldError(f"search_space.{path}", f"{where} is a value, not a section: search {where} itself")
        model = nested
    raise _FieldError(f"search_space.{path}", f"{path} is a section, not a value: search one of its fields "
                                              f"({', '.join(sorted(model.model_fields))})")


def _annotation_kinds(annotation: Any) -> set[type]:
    args = getattr(annotation, "__args__", None)
    if args and getattr(annotation, "__origin__", None) is not Literal:
        return set().union(*(_annotation_kinds(a) for a in args))
    return {annotation} if isinstance(annotation, type) else {object}


def _check_dimension(study: StudyConfig, key: str, dim: Any) -> None:
    path = f"search_space.{key}"
    if isinstance(dim, (FloatRange, IntRange)):
        if dim.low > dim.high:
            raise _FieldError(f"{path}.low", f"must be <= high ({_got(dim.high)}) (got {_got(dim.low)}): swap them")
        if dim.log and dim.low <= 0:
            raise _FieldError(f"{path}.low", f"must be > 0 with log: true (got {_got(dim.low)})")
        if dim.log and dim.step not in (None, 1):
            raise _FieldError(f"{path}.step", "cannot be combined with log: true: remove one of them")
        if dim.step is not None:
            steps = (dim.high - dim.low) / dim.step
            if not math.isclose(steps, round(steps), abs_tol=1e-9):
                raise _FieldError(f"{path}.high", f"high - low must be a multiple of step ({_got(dim.step)}) "
                                                  f"(got {_got(dim.high)})")
    if isinstance(dim, Choice) and len(set(map(repr, dim.choices))) != len(dim.choices):
        raise _FieldError(f"{path}.choices", f"has duplicates: list each choice once (got {dim.choices})")
    if key == "method":
        return
    if key == "method_config":
        raise _FieldError(path, "name a knob of the method, e.g. method_config.prune_ratio")
    if key.startswith("method_config."):
        knob = key.removeprefix("method_config.")
        candidates = study.candidate_methods()
        owners = [m for m in candidates if knob in method_knobs(m)]
        if not owners:
            raise _FieldError(path, _not_a_knob(knob, candidates))
        if knob in study.method.config:
            raise _FieldError(path, f"{knob} is also fixed in method.config: remove it from one of the two")
        fields = [get_method(m).config_cls.model_fields[knob] for m in owners]
    else:
        info = _field_at(key)
        fields = [] if info is None else [info]
    for info in fields:
        kinds = _annotation_kinds(info.annotation)
        if isinstance(dim, FloatRange) and float not in kinds and object not in kinds:
            if int in kinds:
                raise _FieldError(f"{path}.type", f"{key} is an integer: use type: int")
            raise _FieldError(f"{path}.type", f"{key} is not a number: use type: categorical")
        if isinstance(dim, IntRange) and not kinds & {int, float, object}:
            raise _FieldError(f"{path}.type", f"{key} is not a number: use type: categorical")


def _bound_values(dim: Any) -> list[tuple[str, Any]]:
    """(sub-path, value) of a dimension's extremes: low and high, or every choice."""
    if isinstance(dim, Choice):
        return [(f"choices[{i}]", c) for i, c in enumerate(dim.choices)]
    return [("low", dim.low), ("high", dim.high)]


def _check_bounds(study: StudyConfig, key: str, dim: Any) -> None:
    """Every bound must give a valid trial configuration for some corner of the other dimensions.

    Field constraints (``prune_ratio < 1``) fail for every corner; a cross-field rule of a
    method (start epoch <= finalize epoch) fails only when no corner of the other searched
    knobs (their low/high or choices) makes the bound valid.
    """
    others = [(k, d) for k, d in study.search_space.items() if k != key]
    corners = itertools.product(*([v for _, v in _bound_values(d)] for _, d in others))
    corners = list(itertools.islice(corners, _MAX_CROSS_CHECKS))
    for sub, value in _bound_values(dim):
        first_error = None
        for corner in corners:
            params = {k: v for (k, _), v in zip(others, corner)}
            params[key] = value
            if "method" in params:
                knobs = method_knobs(str(params["method"]))
                if key.startswith("method_config.") and key.removeprefix("method_config.") not in knobs:
                    continue
                params = {k: v for k, v in params.items()
                          if not k.startswith("method_config.") or k.removeprefix("method_config.") in knobs}
            try:
                trial_config(study, params)
                first_error = None
                break
            except StudyError as error:
                first_error = first_error or error
        if first_error is not None:
            reason = first_error.reason
            if first_error.field != key:
                reason = f"gives no valid trial: {first_error.field}: {reason}"
            raise _FieldError(f"search_space.{key}.{sub}", reason)


def _check_objectives(study: StudyConfig) -> None:
    seen: set[str] = set()
    for i, objective in enumerate(study.objectives):
        if objective.name in seen:
            raise _FieldError(f"objectives[{i}].name", f"{objective.name} is listed twice: remove one")
        seen.add(objective.name)
        natural = "maximize" if objective.name in MAXIMIZED else "minimize"
        if objective.direction not in (None, natural):
            raise _FieldError(f"objectives[{i}].direction",
                              f"{objective.name} is always {natural}d: set {natural} or remove direction")
        if objective.name == "latency_ms" and objective.reference is None:
            raise _FieldError(f"objectives[{i}].reference", "latency_ms needs a reference (the milliseconds "
                                                            "a useful model must beat, e.g. the dense model's)")


def _check_resources(study: StudyConfig) -> None:
    gpu = study.resources_per_trial.gpu
    if gpu > 1 and not float(gpu).is_integer():
        raise _FieldError("resources_per_trial.gpu", f"fractions are only possible below 1 GPU (got {_got(gpu)})")
    if gpu > 1:
        raise _FieldError("resources_per_trial.gpu", f"is per worker: set gpu: 1 and workers_per_trial: "
                                                     f"{int(gpu)} for a data-parallel trial (got {_got(gpu)})")


# ----------------------------------------------------------------------------- trial configs

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
    config_cls = get_method(method).config_cls
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
        return TrialConfig.model_validate(
            {**tree, "method": method, "method_config": method_config.model_dump(mode="python")}
        )
    except ValidationError as error:
        model, prefix = (config_cls, ("method_config",)) if error.title == config_cls.__name__ else (TrialConfig, ())
        field, reason = _first_error(error, model, prefix)
        raise StudyError(f"{study.source}: trial with {_format_params(params)}: {field}: {reason}",
                         field, reason) from None


def _format_params(params: dict[str, Any]) -> str:
    if not params:
        return "no sampled parameters"
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return _got(value)


# ----------------------------------------------------------------------------- the grid

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


def grid_configs(study: StudyConfig) -> list[dict[str, Any]]:
    """The grid's distinct valid trial configurations (sampled parameters by name), in grid order.

    The grid is the product of every dimension's :func:`grid_values`. A point keeps only the
    entries its method samples (:func:`active_keys`): points that differ only in a knob their
    method lacks or fixes (dense and ``prune_ratio``) are one configuration, run once. Points
    that are no valid trial configuration are left out (the searcher rejects them unrun).
    """
    keys = list(study.search_space)
    configs: dict[tuple, dict[str, Any]] = {}
    for values in itertools.product(*(grid_values(dim) for dim in study.search_space.values())):
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


def _with_grid_trials(study: StudyConfig) -> StudyConfig:
    """Check a ``sampler: grid`` study (finite dimensions, a grid of runnable size, ``n_trials``
    within it); returns it with ``n_trials`` = the whole grid when the file omits ``n_trials``."""
    for key, dim in study.search_space.items():
        if isinstance(dim, FloatRange) and dim.step is None:
            raise _FieldError(f"search_space.{key}", "sampler grid needs the values of every dimension: add "
                                                     "step (without log: true) or list them with type: categorical")
    points = grid_point_count(study)
    if points > MAX_GRID_POINTS:
        raise _FieldError("search_space", f"the grid has {points} points (at most {MAX_GRID_POINTS}): use coarser "
                                          "steps, fewer choices or another sampler")
    size = len(grid_configs(study))
    if size == 0:
        raise _FieldError("search_space", "no point of the grid is a valid trial configuration: widen the grid "
                                          "(see search_space for each method's knobs)")
    if "n_trials" not in study.model_fields_set:
        return study.model_copy(update={"n_trials": size})
    if study.n_trials > size:
        raise _FieldError("n_trials", f"{study.n_trials} is more than the grid's {size} distinct trial "
                                      f"configurations: set n_trials: {size} or fewer (or omit it: the whole grid)")
    return study
