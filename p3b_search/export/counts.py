"""Parameters and MACs of an exported model, counted as the trial's objective counts them.

Structured models are counted as they are. Unstructured ones (DIMAP, SViTE) keep dense shapes
with zeros listed in ``weight_masks.safetensors``: ``params`` counts the non-zeros, ``macs``
stays dense (no speed-up without sparse kernels) and ``nonzero_macs`` is what sparse kernels
could reach.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from p3b_search.cost import kept_cost, model_cost
from p3b_search.errors import first_line
from p3b_search.export.load import ExportError
from p3b_search.trial_folder import ModelFolder


@dataclass(frozen=True)
class ModelCounts:
    """``params`` (kept parameters), ``macs`` and ``nonzero_macs`` per image, ``dense_*`` of the parent."""

    params: int
    macs: int
    nonzero_macs: int
    dense_params: int
    dense_macs: int

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.dense_macs

    @property
    def params_ratio(self) -> float:
        return self.params / self.dense_params


def read_weight_masks(folder: str | Path) -> dict[str, torch.Tensor]:
    """Unstructured zero patterns (parameter name -> bool, True = kept); empty when none were saved."""
    from safetensors.torch import load_file

    path = ModelFolder(Path(folder)).masks
    if not path.is_file():
        return {}
    try:
        return {name: mask.bool() for name, mask in load_file(path).items()}
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise ExportError(f"{path}: corrupt or truncated safetensors file ({first_line(error)})") from None


def count_model(model: nn.Module, dense: nn.Module, weight_masks: dict[str, torch.Tensor]) -> ModelCounts:
    """Counts of ``model`` (shrunk or masked) next to its dense parent ``dense`` (same timm config)."""
    kept, dense_cost = kept_cost(model, weight_masks), model_cost(dense)
    return ModelCounts(params=kept.params, macs=kept.macs, nonzero_macs=kept.nonzero_macs,
                       dense_params=dense_cost.params, dense_macs=dense_cost.macs)
