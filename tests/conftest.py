"""Shared fixtures: small timm models built from real configs (random init, nothing downloaded)."""
from __future__ import annotations

import os

import pytest
import timm
import torch

os.environ.setdefault("P3B_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "p3b_search"))
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared

#: Real timm architectures at reduced input size (widths, depths and heads as published).
MODEL_CONFIGS: dict[str, tuple[str, dict]] = {
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 64}),
    "deit_small": ("deit_small_patch16_224", {"img_size": 64}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {"img_size": 64}),  # LayerScale, no cls bias
}


def make_model(key: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A random-init model of configuration ``key`` in eval mode."""
    name, kwargs = MODEL_CONFIGS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():  # trained layer scales are far from their 1e-5 init: make them matter
        for module in model.modules():
            if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
                module.gamma.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def model_factory():
    return make_model
