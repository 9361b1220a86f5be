"""Build timm models from a :class:`~p3b_search.config.ModelConfig`, weights included."""
from __future__ import annotations

from torch import nn

from p3b_search.config import ModelConfig
from p3b_search.weights import WeightsError, load_pretrained_weights

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
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"model.weights='hub' could not fetch {cfg.name!r} pretrained weights ({first}): "
            "download the file and set model.weights to its local path"
        ) from None


def build_model(cfg: ModelConfig, num_classes: int, *, drop_path_rate: float | None = None,
                source_task: str = "digits") -> nn.Module:
    """The timm model ``cfg`` describes, with ``num_classes`` outputs and the weights of ``cfg.weights``.

    ``weights``: ``None`` random init; ``"hub"`` timm's pretrained tag (network needed);
    ``"source-pretrained"`` the cached pretraining of this architecture on the source domain of
    the embedded task ``source_task`` (``digits`` or ``glyphs``; head re-initialised, its
    classes being the source domain's); else a local file path.
    ``drop_path_rate`` (stochastic depth, e.g. ``TrainingConfig.drop_path``) overrides
    ``cfg.overrides``.
    """
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={cfg.num_classes} but the data set has {num_classes} classes: "
            "remove model.num_classes or make it match"
        )
    extra = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    model = create_timm_model(cfg, num_classes, pretrained=cfg.weights == HUB, **extra)
    if cfg.weights == SOURCE_PRETRAINED:
        from p3b_search.training.pretrain import source_pretrained_weights

        load_pretrained_weights(model, source_pretrained_weights(cfg, task=source_task),
                                reset_classifier=True)
    elif cfg.weights not in (None, HUB):
        load_pretrained_weights(model, cfg.weights)
    return model
