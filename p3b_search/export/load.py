"""``load_pruned``: rebuild an exported (or a trial's saved) pruned model from its folder.

Reads only ``arch.json`` (an :class:`~p3b_search.surgery.ArchSpec`, plain JSON) and
``model.safetensors`` (tensors only), so nothing is ever unpickled. Imports torch, timm,
safetensors and :mod:`p3b_search.surgery`, nothing of the search stack (Optuna, Ray, MLflow,
pandas), so a deployment needs only those.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p3b_search.errors import first_line
from p3b_search.surgery import ArchSpec
from p3b_search.trial_folder import ARCH_FILE, WEIGHTS_FILE, ModelFolder


class ExportError(ValueError):
    """An exported folder or a trial that cannot be exported or loaded (one-line message)."""


def read_arch_spec(folder: str | Path) -> ArchSpec:
    """The :class:`ArchSpec` in ``folder/arch.json``; :class:`ExportError` naming the file if unreadable."""
    if not Path(folder).is_dir():
        raise ExportError(f"{folder}: no such folder (pass the folder written by `search.py export`)")
    path = ModelFolder(Path(folder)).arch
    if not path.is_file():
        raise ExportError(f"{path}: no such file (an exported model folder holds {ARCH_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        spec = ArchSpec.from_dict(data)
        if not isinstance(spec.model_name, str) or not isinstance(spec.model_kwargs, dict):
            raise ValueError("model_name must be a string and model_kwargs an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: corrupt or truncated arch spec ({first_line(error)})") from None
    return spec


def read_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors``; :class:`ExportError` naming the file if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ModelFolder(Path(folder)).weights
    if not path.is_file():
        raise ExportError(f"{path}: no such file (an exported model folder holds {ARCH_FILE} and {WEIGHTS_FILE})")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"{path}: corrupt or truncated safetensors file ({first_line(error)})") from None


def _check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, arch: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ExportError(f"{weights} does not match {arch} ({len(missing) + len(unexpected)} tensors differ, "
                          f"e.g. {what}): the two files come from different models")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ExportError(f"{weights} does not match {arch}: {key} has shape {tuple(value.shape)} in the "
                              f"weights but {tuple(expected[key].shape)} in the architecture")


def load_pruned(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The pruned model saved in ``folder`` (``arch.json`` + ``model.safetensors``), in eval mode.

    timm builds the dense architecture (random init, nothing downloaded), the arch spec cuts it
    to the kept units, then the weights are loaded strictly. The preprocessing recorded in
    ``arch.json`` (input size, mean/std, interpolation, crop) is set on ``model.pretrained_cfg``,
    so ``timm.data.resolve_model_data_config(model)`` gives the transform the model was trained with.
    Raises :class:`ExportError` (one line, naming the file) for a missing, corrupt or mismatched file.
    """
    files = ModelFolder(Path(folder))
    spec = read_arch_spec(files.root)
    state = read_weights(files.root)
    try:
        model = spec.build(None)
    except (ValueError, RuntimeError, KeyError, TypeError, NotImplementedError) as error:
        raise ExportError(f"{files.arch}: cannot build {spec.model_name!r} with timm "
                          f"({first_line(error)})") from None
    _check_weights_fit(model, state, files.weights, files.arch)
    model.load_state_dict(state, strict=True)
    preprocessing: dict[str, Any] = dict(spec.extra.get("preprocessing") or {})
    if preprocessing:
        for key in ("input_size", "mean", "std"):
            if isinstance(preprocessing.get(key), list):
                preprocessing[key] = tuple(preprocessing[key])
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **preprocessing}
    return model.to(device).eval()
