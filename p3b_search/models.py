"""timm models of a :class:`~p3b_search.config.ModelConfig` (random init or timm's hub tag), and
the model configurations of the embedded tasks. Loading other weights (a file, the cached
source-domain pretraining) is :func:`p3b_search.training.build.build_model`."""
from __future__ import annotations

from torch import nn

from p3b_search.config import ModelConfig
from p3b_search.errors import first_line
from p3b_search.weights import WeightsError

SOURCE_PRETRAINED = "source-pretrained"
HUB = "hub"

#: The tiny ViT of the embedded digits transfer task: 16x16 inputs cut into 4x4 patches
#: (16 tokens + class token), 6 layers = 12 prunable sub-blocks, about 0.3M parameters.
DIGITS_VIT = ModelConfig(
    name="vit_tiny_patch16_224",
    overrides=dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0),
    weights=SOURCE_PRETRAINED,
)

#: The ViT of the embedded glyphs transfer task: 24x24 inputs cut into 4x4 patches (36 tokens +
#: class token), 6 layers = 12 prunable sub-blocks, width 64, about 0.3M parameters.
GLYPHS_VIT = ModelConfig(
    name="vit_tiny_patch16_224",
    overrides=dict(img_size=24, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0),
    weights=SOURCE_PRETRAINED,
)


def create_timm_model(cfg: ModelConfig, num_classes: int, *, pretrained: bool = False, **extra) -> nn.Module:
    """``timm.create_model(cfg.name, num_classes=..., **cfg.overrides, **extra)`` with one-line errors."""
    import timm

    if not timm.is_model(cfg.name):
        raise ValueError(f"model.name={cfg.name!r} is not a timm model: pick one from timm.list_models()")
    kwargs = {**cfg.overrides, **extra}
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ValueError(f"model.overrides {kwargs} rejected by timm for {cfg.name!r}: {error}") from None
    except OSError as error:  # hub download failures (offline, no such file) are OSErrors
        raise WeightsError(
            f"model.weights='hub' could not fetch {cfg.name!r} pretrained weights ({first_line(error)}): "
            "download the file and set model.weights to its local path"
        ) from None
