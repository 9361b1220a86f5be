"""``build_model``: the timm model of a :class:`~p3b_search.config.ModelConfig` with its weights."""
from __future__ import annotations

from torch import nn

from p3b_search.config import ModelConfig
from p3b_search.models import HUB, SOURCE_PRETRAINED, create_timm_model
from p3b_search.training.pretrain import source_pretrained_weights
from p3b_search.weights import load_pretrained_weights


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
        load_pretrained_weights(model, source_pretrained_weights(cfg, task=source_task),
                                reset_classifier=True)
    elif cfg.weights not in (None, HUB):
        load_pretrained_weights(model, cfg.weights)
    return model
