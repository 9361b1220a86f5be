"""A pruning method as the study layer knows it: its knobs (a :class:`MethodConfig` subclass)
and the facts of a :class:`MethodSpec`, registered by name (:func:`register_spec`,
:func:`method_spec`). Nothing here imports torch; the implementations
(:mod:`p3b_search.methods`) register against the same names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class MethodConfig(BaseModel):
    """Base of every method's knobs: unknown keys are rejected, values validated.

    ``fixed_knobs``: fields the method pins to their default (dense's ``prune_ratio`` = 0); a
    study never sets or searches them for this method (its trials ignore such a search entry).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    fixed_knobs: ClassVar[frozenset[str]] = frozenset()

    prune_ratio: float = Field(
        0.5, ge=0.0, lt=1.0, description="Fraction of parameters removed (not FLOPs), in [0, 1)."
    )

    def kept_target(self, dense_params: int) -> float:
        """Parameters the method should keep of a model of ``dense_params``: ``(1 - prune_ratio) x dense_params``
        (the one budget of every method, see :mod:`p3b_search.methods.target`)."""
        return (1.0 - self.prune_ratio) * dense_params

    def shared_epochs(self, epochs: int, steps_per_epoch: int) -> int:
        """Whole epochs at the start of a prune stage of ``epochs`` x ``steps_per_epoch``
        micro-batches that train alike whatever this method's knobs are (see
        :class:`~p3b_search.methods.SharedPrefix`). Default 0: the method acts from its first
        micro-batch. A configuration the method refuses for such a stage raises ``ValueError``."""
        return 0


@dataclass(frozen=True)
class MethodSpec:
    """What the study and search layers know of a pruning method: its ``name`` in study files,
    its knobs ``config_cls``, and whether its pruned model is ``structured`` (physically
    smaller: a real speed-up; False: dense shapes with zeros)."""

    name: str
    config_cls: type[MethodConfig]
    structured: bool


_SPECS: dict[str, MethodSpec] = {}


def register_spec(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` selectable by ``spec.name`` in study files; returns it. Registering the same
    spec again is a no-op; another spec under a taken name is a ``ValueError``."""
    if _SPECS.get(spec.name, spec) != spec:
        raise ValueError(f"pruning method {spec.name!r} registered twice: give the second one another name")
    _SPECS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec registered as ``name``; a one-line error lists the valid names."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}: choose one of {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_SPECS)
