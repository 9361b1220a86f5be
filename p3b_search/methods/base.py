"""The protocol every pruning method implements, and the registry of the implementations by name.

A method is a :class:`~p3b_search.methods.hooks.TrainingHooks` for the *prune stage*, plus
``prepare`` (before the optimizer exists), ``finalize`` (end of the prune stage: a pruned model
without gates or auxiliary heads) and ``finetune_hooks`` (what the *fine-tune stage* needs, e.g.
keeping unstructured zeros at zero). Methods know nothing of Optuna, Ray or MLflow: per mask
update they append allocation rows that the search layer drains with ``pop_allocation_rows``.

A method's name, knobs and facts are its :class:`~p3b_search.method_specs.MethodSpec` (torch-free,
what the study driver reads); :func:`register_method` makes a class the implementation of its
spec, which trial workers and the export find with :func:`get_method`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from p3b_search.method_specs import MethodConfig, MethodSpec, register_spec
from p3b_search.methods.hooks import TrainingHooks


@dataclass
class PrunedModel:
    """What a method hands back at the end of the prune stage.

    ``model`` carries no gates and no auxiliary heads. ``structured`` is True when the model is
    physically smaller (a real speed-up); unstructured results keep dense shapes and list their
    zero patterns in ``weight_masks`` (parameter name -> bool tensor, True = kept), which the
    fine-tune stage must keep at zero.
    """

    model: nn.Module
    structured: bool
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SharedPrefix:
    """The start of a method's prune stage that trials may share (``shared_prefixes``).

    ``epochs``: whole prune-stage epochs that train alike (model, optimizer, method state, RNG)
    whatever the method's knobs outside ``knobs`` are: nothing the method does in them depends
    on those knobs, so their checkpoint serves every such trial. 0: nothing to share (the method
    acts from its first micro-batch). ``knobs``: what the method's training of those epochs
    depends on besides the trial's model, data, training configuration and the method's name
    (JSON values; they belong in the key of the shared checkpoint)."""

    epochs: int
    knobs: Mapping[str, Any] = field(default_factory=dict)


class PruningMethod(TrainingHooks):
    """Base class: subclasses set ``spec`` (name, knobs, facts) and register with :func:`register_method`."""

    spec: ClassVar[MethodSpec]

    def __init__(self, config: MethodConfig, *, num_classes: int, epochs: int, steps_per_epoch: int):
        self.config = config
        self.num_classes = num_classes
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self._allocation_rows: list[dict[str, Any]] = []

    def prepare(self, model: nn.Module) -> None:
        """Install gates / auxiliary heads on ``model`` before the optimizer is built."""

    def finalize(self, model: nn.Module) -> PrunedModel:
        """End of the prune stage: remove gates and heads and return the pruned model."""
        raise NotImplementedError

    def finetune_hooks(self, pruned: PrunedModel) -> TrainingHooks:
        """Hooks for the fine-tune stage of ``pruned`` (default: plain fine-tuning)."""
        return TrainingHooks()

    def shared_prefix(self) -> SharedPrefix:
        """What of this trial's prune stage other trials may share (see :class:`SharedPrefix`).
        Default: the config's :meth:`~p3b_search.method_specs.MethodConfig.shared_epochs` (0, as
        for a method that prunes or draws masks before its first step, unless the config says
        otherwise), keyed by nothing."""
        return SharedPrefix(self.config.shared_epochs(self.epochs, self.steps_per_epoch))

    def pop_allocation_rows(self) -> list[dict[str, Any]]:
        """Per-sub-block allocation rows recorded since the last call (one per mask update)."""
        rows, self._allocation_rows = self._allocation_rows, []
        return rows


_IMPLEMENTATIONS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` the implementation of ``cls.spec`` (registering the spec
    too, see :func:`~p3b_search.method_specs.register_spec`)."""
    name = register_spec(cls.spec).name
    if _IMPLEMENTATIONS.get(name, cls) is not cls:
        raise ValueError(f"pruning method {name!r} implemented twice: register one class per spec")
    _IMPLEMENTATIONS[name] = cls
    return cls


def get_method(name: str) -> type[PruningMethod]:
    """The implementation of method ``name``; a one-line error lists the implemented names."""
    import p3b_search.methods  # noqa: F401  (registers the shipped methods)

    try:
        return _IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {name!r}: choose one of {', '.join(sorted(_IMPLEMENTATIONS))}"
        ) from None


def available_methods() -> list[str]:
    """Names of every implemented method, sorted."""
    import p3b_search.methods  # noqa: F401

    return sorted(_IMPLEMENTATIONS)
