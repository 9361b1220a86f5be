"""Pretrained weights for timm models from a local file, without unpickling arbitrary code.

Accepted files: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` holding either a plain state dict
(timm layout) or a training checkpoint with the state dict under ``"model"`` (DeiT layout) or
``"state_dict"`` (timm train script). Torch files are read with ``torch.load(weights_only=True)``.
The model family's own timm ``checkpoint_filter_fn`` adapts the file to the model (e.g. resamples
ViT position embeddings and patch embeddings to another image or patch size). Classifier heads
whose shape differs from the model's (or all of them when ``reset_classifier``) are dropped and
keep the model's fresh initialisation.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from p3b_search.errors import first_line

_logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model (one-line message)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path`` (on CPU), unwrapped from a DeiT/timm checkpoint."""
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (set model.weights to an existing .pth/.safetensors file)")
    if path.suffix.lower() not in (*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX):
        raise WeightsError(
            f"weights file {path} has an unsupported suffix {path.suffix!r}: use .pth, .pt or .safetensors"
        )
    try:
        state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for truncated or corrupt files
        raise WeightsError(
            f"cannot read weights file {path} (corrupt, truncated or not a weights file): {first_line(error)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors (expected timm or DeiT layout)")
    return state


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the model's classifier head(s), from its timm pretrained config."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    return (names,) if isinstance(names, str) else tuple(names)


def _in_modules(key: str, modules: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def _family_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """timm's ``checkpoint_filter_fn`` of the module defining the model's class, if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_pretrained_weights(model: nn.Module, path: str | Path, *, reset_classifier: bool = False) -> None:
    """Load the weights in ``path`` into ``model`` in place.

    Every parameter and buffer except the classifier head(s) must be present with a matching
    shape (after timm's filter resampled positional/patch embeddings); otherwise a
    :class:`WeightsError` names the file and the first mismatching key.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    filter_fn = _family_filter(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as error:
            raise WeightsError(
                f"weights file {path} does not fit model {type(model).__name__}: {first_line(error)}"
            ) from None

    heads = classifier_names(model)
    model_state = model.state_dict()
    dropped = sorted(
        k for k in state
        if _in_modules(k, heads)
        and (reset_classifier or k not in model_state or state[k].shape != model_state[k].shape)
    )
    for key in dropped:
        del state[key]
    if dropped:
        classes = getattr(model, "num_classes", "?")
        reason = "reset requested" if reset_classifier else "shape differs from the model's"
        _logger.info(
            "weights %s: classifier %s dropped (%s) and re-initialised for %s classes",
            path.name, ", ".join(dropped), reason, classes,
        )

    missing = [k for k in model_state if k not in state and not _in_modules(k, heads)]
    unexpected = [k for k in state if k not in model_state]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(
            f"weights file {path} does not match the model ({len(missing) + len(unexpected)} keys differ, "
            f"e.g. {what}): check model.name and model.overrides"
        )
    for key, value in state.items():
        if value.shape != model_state[key].shape:
            raise WeightsError(
                f"weights file {path} does not match the model: {key} has shape {tuple(value.shape)} in the file "
                f"but {tuple(model_state[key].shape)} in the model (check model.name and model.overrides)"
            )
    model.load_state_dict(state, strict=False)  # only the dropped classifier keys are absent
