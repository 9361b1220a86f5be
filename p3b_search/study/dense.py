"""The dense (unpruned) model as the study's reference point: what pruning cost.

Its cost (``params``, ``macs``, ``flops`` per image) is counted on timm's dense model of the
study's configuration. Its accuracy (``top1``, ``top5`` in %) comes from, in this order:

1. ``dense_reference: {top1: ..., top5: ...}`` in the study file (a figure you measured);
2. the mean of the study's COMPLETE ``dense`` trials (a method comparison runs them);
3. nowhere: the figure then marks only the dense cost and the normalised hypervolume is NaN.

The reference is never a point of the front (dense trials are left out of it). It also gives
the *ideal point* of the normalised hypervolume: the dense accuracy at zero cost.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from p3b_search.config import EMBEDDED_TASKS
from p3b_search.study.sections import MAXIMIZED, StudyConfig
from p3b_search.study.trials_table import STATE, complete_rows, is_dense
from p3b_search.units import FLOPS_PER_MAC, value_text

ACCURACIES = ("top1", "top5")


@dataclass(frozen=True)
class DenseReference:
    """The dense model's figures by objective name, and where its accuracy came from
    (``source``: empty when no accuracy is known)."""

    values: Mapping[str, float] = field(default_factory=dict)
    source: str = ""

    def get(self, name: str) -> float:
        """The dense value of ``name`` (NaN when unknown)."""
        value = self.values.get(name)
        return math.nan if value is None else float(value)

    def ideal(self, names: Sequence[str]) -> list[float]:
        """The ideal point of the normalised hypervolume: the dense accuracies, zero costs
        (NaN where a dense accuracy is unknown)."""
        return [self.get(name) if name in MAXIMIZED else 0.0 for name in names]

    def describe(self) -> str:
        """``dense: top-1 93.9 % (study file), 4.61M MACs per image``-style summary."""
        known = [f"{name} {value_text(name, self.get(name))}" for name in ("top1", "top5", "macs", "params")
                 if math.isfinite(self.get(name))]
        accuracy = f" (accuracy: {self.source})" if self.source else (
            " (accuracy unknown: set dense_reference.top1 in the study file or run a dense trial)")
        return "dense: " + ", ".join(known) + accuracy


def dense_accuracy(study: StudyConfig, frame: pd.DataFrame) -> tuple[dict[str, float], str]:
    """The dense accuracies (% by name) and their source, by the rules of the module docstring."""
    given = {name: getattr(study.dense_reference, name) for name in ACCURACIES}
    given = {name: float(value) for name, value in given.items() if value is not None}
    if given:
        return given, "dense_reference in the study file"
    if len(frame) == 0 or STATE not in frame.columns:
        return {}, ""
    rows = complete_rows(frame)
    rows = rows[is_dense(rows)]
    means = {name: float(rows[name].mean()) for name in ACCURACIES if name in rows.columns and rows[name].notna().any()}
    if not means:
        return {}, ""
    return means, f"mean of {len(rows)} dense trial{'s' if len(rows) != 1 else ''}"


def dense_reference(study: StudyConfig, frame: pd.DataFrame, cost: Mapping[str, float]) -> DenseReference:
    """The study's :class:`DenseReference`: ``cost`` (``params``, ``macs``, ``flops`` of the
    dense model, see :func:`dense_cost`) and the accuracy of :func:`dense_accuracy`."""
    accuracy, source = dense_accuracy(study, frame)
    return DenseReference({**cost, **accuracy}, source)


def _class_count(study: StudyConfig) -> int:
    """Classes of the target data set (for the dense model's cost)."""
    if study.model.num_classes is not None:
        return study.model.num_classes
    data = study.data
    if data.kind in EMBEDDED_TASKS:
        from p3b_search.data.loaders import embedded_class_count

        return embedded_class_count(data.kind)
    if data.kind in ("cifar10", "cifar100"):
        return 10 if data.kind == "cifar10" else 100
    return sum(1 for p in (data.root / "train").iterdir() if p.is_dir())


def dense_cost(study: StudyConfig) -> dict[str, float]:
    """``params``, ``macs`` and ``flops`` (= 2 x MACs) per image of the dense model, counted on
    the meta device."""
    import torch

    from p3b_search.cost import model_cost
    from p3b_search.models import create_timm_model

    with torch.device("meta"):
        model = create_timm_model(study.model, _class_count(study))
    cost = model_cost(model)
    return {"params": float(cost.params), "macs": float(cost.macs), "flops": float(FLOPS_PER_MAC * cost.macs)}
