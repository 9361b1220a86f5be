"""Study errors as one line: ``file: field.path: what to fix``.

:class:`StudyError` is what every study check raises; :func:`first_error` turns pydantic's
validation errors into such a line (the first error, an unknown key before the rest, with a
"did you mean" for typos), e.g.
``study.yaml: search_space.method_config.prune_ratio.high: must be < 1 (got 1.5)``.
"""
from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from p3b_search.study.dimensions import DIMENSIONS
from p3b_search.study.field_error import got
from p3b_search.study.sections import StudyConfig


class StudyError(ValueError):
    """A study file that cannot run; the message is one line: ``file: field.path: what to fix``.

    ``field`` (dotted path) and ``reason`` hold the two parts of the message where known."""

    def __init__(self, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field, self.reason = field, reason


def join_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a dotted path: ``("a", 0, "b")`` -> ``a[0].b``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, options: list[str]) -> str:
    """``"did you mean X? "`` for the option closest to ``word`` ("" when none is close)."""
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
            return DIMENSIONS.get(str(parts[1])) if len(parts) == 2 else None
        fields = current.model_fields
        if part not in fields:
            return None
        current = first_model(fields[part].annotation)
        if current is None:
            return None
    return current


def first_model(annotation: Any) -> Any:
    """The first pydantic model class in a type annotation (None when it holds none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = first_model(arg)
        if found is not None:
            return found
    return None


_BOUNDS = {"less_than": ("<", "lt"), "less_than_equal": ("<=", "le"),
           "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge")}


def message_of(error: dict[str, Any]) -> str:
    """A short instruction for one pydantic error (without the path)."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        return f"must be {symbol} {got(ctx[key])} (got {got(value)})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got(value)})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {got(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got(value)})"
    if kind == "string_type":
        return f"must be a string (got {got(value)})"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {got(value)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of key: value (got {got(value)})"
    if kind == "list_type":
        return f"must be a list (got {got(value)})"
    if kind == "missing":
        return "required: add it"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} entries (got {got(value)})"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return "needs type: float, int or categorical (e.g. {type: float, low: 0.3, high: 0.8})"
    if kind == "value_error":
        return f"{str(ctx.get('error', error['msg'])).removeprefix('Value error, ')}"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {got(value)})"


def first_error(error: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> tuple[str, str]:
    """(field path, instruction) for the first error of ``error`` (validated against ``model``)."""
    errors = error.errors(include_url=False)
    # An unknown key usually explains the other errors (a typo'd required key): report it first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    if len(loc) >= 3 and loc[0] == "search_space" and loc[2] in DIMENSIONS:
        loc = loc[:2] + loc[3:]
    if first["type"] == "extra_forbidden":
        holder = _model_at(model, tuple(first["loc"]))
        options = sorted(holder.model_fields) if holder else []
        return join_path(prefix + loc), (f"unknown key: {did_you_mean(str(loc[-1]), options)}"
                                     f"remove it or use one of {', '.join(options)}")
    return join_path(prefix + loc), message_of(first)



def format_params(params: dict[str, Any]) -> str:
    """Sampled parameters as ``key=value, ...`` for a message."""
    if not params:
        return "no sampled parameters"
    return ", ".join(f"{k}={short_value(v)}" for k, v in params.items())


def short_value(value: Any) -> str:
    """A value for a message: floats to 4 significant digits."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return got(value)
