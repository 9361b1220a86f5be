"""build_model: timm construction from a ModelConfig and its one-line errors."""
from __future__ import annotations

import pytest

from p3b_search.config import ModelConfig
from p3b_search.models import DIGITS_VIT
from p3b_search.training.build import build_model
from p3b_search.weights import WeightsError


def test_digits_vit_preset_has_twelve_sub_blocks_and_16px_input():
    model = build_model(DIGITS_VIT.model_copy(update={"weights": None}), num_classes=5)
    assert len(model.blocks) == 6 and model.patch_embed.img_size == (16, 16)
    assert model.head.out_features == 5
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 500_000


def test_drop_path_rate_reaches_the_blocks():
    model = build_model(DIGITS_VIT.model_copy(update={"weights": None}), 5, drop_path_rate=0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_bad_configs_fail_in_one_line():
    with pytest.raises(ValueError, match="model.name='vit_nonexistent' is not a timm model"):
        build_model(ModelConfig(name="vit_nonexistent"), 5)
    with pytest.raises(ValueError, match="model.overrides .* rejected by timm"):
        build_model(ModelConfig(overrides={"no_such_arg": 1}), 5)
    with pytest.raises(ValueError, match="model.num_classes=10 but the data set has 5 classes"):
        build_model(ModelConfig(num_classes=10), 5)


def test_hub_weights_offline_fail_with_a_hint(monkeypatch):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    cfg = ModelConfig(name="vit_tiny_patch16_224", weights="hub")
    with pytest.raises(WeightsError, match="model.weights='hub' could not fetch .*set model.weights to its local path"):
        build_model(cfg, 5)
