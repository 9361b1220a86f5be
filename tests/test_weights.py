"""Loading timm weights from local files: layouts, head handling, resampling, clear errors."""
from __future__ import annotations

import argparse
import logging
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from p3b_search.config import ModelConfig
from p3b_search.models import create_timm_model
from p3b_search.training.build import build_model
from p3b_search.weights import WeightsError, load_pretrained_weights, read_state_dict

TINY = ModelConfig(
    name="vit_tiny_patch16_224",
    overrides=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
)


def _model(num_classes: int = 10, seed: int = 0, cfg: ModelConfig = TINY) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_timm_model(cfg, num_classes)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sb = b.state_dict()
    for key, value in a.state_dict().items():
        if not key.startswith(skip):
            assert torch.equal(value, sb[key]), key


@pytest.fixture()
def source() -> torch.nn.Module:
    return _model(seed=1)


def _write(kind: str, model: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    state = model.state_dict()
    if kind == "timm.pth":
        torch.save(state, path)
    elif kind == "deit.pth":  # DeiT's main.py: model + optimizer + scheduler + epoch + argparse args
        torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                    "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4)}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("kind", ["timm.pth", "deit.pth", "safetensors"])
def test_each_layout_loads_exactly(kind, source, tmp_path):
    path = _write(kind, source, tmp_path / f"w.{kind.split('.')[-1]}")
    target = _model(seed=2)
    load_pretrained_weights(target, path)
    _assert_same_weights(source, target)


def test_head_with_other_class_count_is_dropped_and_reinitialised(source, tmp_path, caplog):
    path = _write("safetensors", source, tmp_path / "w.safetensors")
    target = _model(num_classes=3, seed=2)
    fresh_head = target.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="p3b_search.weights"):
        load_pretrained_weights(target, path)
    _assert_same_weights(source, target, skip=("head.",))
    assert torch.equal(target.head.weight, fresh_head)
    assert "head.weight" in caplog.text and "re-initialised for 3 classes" in caplog.text


def test_reset_classifier_drops_a_same_shape_head(source, tmp_path):
    path = _write("timm.pth", source, tmp_path / "w.pth")
    target = _model(seed=2)
    fresh_head = target.head.weight.detach().clone()
    load_pretrained_weights(target, path, reset_classifier=True)
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_position_embeddings_are_resampled_by_timm_for_another_image_size(source, tmp_path):
    path = _write("timm.pth", source, tmp_path / "w.pth")
    bigger = ModelConfig(name=TINY.name, overrides={**TINY.overrides, "img_size": 32})
    target = _model(cfg=bigger)
    load_pretrained_weights(target, path)
    assert target.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])  # class token position kept
    _assert_same_weights(source, target, skip=("pos_embed",))


def test_distilled_deit_heads_follow_the_pretrained_config(tmp_path):
    cfg = ModelConfig(name="deit_tiny_distilled_patch16_224", overrides=TINY.overrides)
    src = _model(num_classes=7, seed=1, cfg=cfg)
    path = _write("deit.pth", src, tmp_path / "w.pth")
    target = _model(num_classes=4, seed=2, cfg=cfg)
    load_pretrained_weights(target, path)
    assert torch.equal(target.dist_token, src.dist_token)
    assert target.head.out_features == target.head_dist.out_features == 4


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_gives_one_line_error_naming_it(suffix, source, tmp_path):
    path = _write("timm.pth" if suffix == ".pth" else "safetensors", source, tmp_path / f"w{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as err:
        load_pretrained_weights(_model(), path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_garbage_and_missing_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="garbage.pth"):
        read_state_dict(garbage)
    with pytest.raises(WeightsError, match="not found: .*nope.safetensors"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="unsupported suffix"):
        (tmp_path / "w.npz").write_bytes(b"x")
        read_state_dict(tmp_path / "w.npz")


class _Payload:
    """Unpickling this would create a marker file: weights_only loading must refuse it."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        read_state_dict(path)
    assert not marker.exists()


def test_other_architecture_is_rejected_with_the_key(source, tmp_path):
    path = _write("safetensors", source, tmp_path / "w.safetensors")
    wider = ModelConfig(name=TINY.name, overrides={**TINY.overrides, "embed_dim": 48})
    with pytest.raises(WeightsError, match=r"w.safetensors does not match the model: .* has shape"):
        load_pretrained_weights(_model(cfg=wider), path)
    deeper = ModelConfig(name=TINY.name, overrides={**TINY.overrides, "depth": 3})
    with pytest.raises(WeightsError, match=r"missing \['blocks.2"):
        load_pretrained_weights(_model(cfg=deeper), path)


def test_build_model_loads_a_local_file(source, tmp_path):
    path = _write("deit.pth", source, tmp_path / "w.pth")
    model = build_model(TINY.model_copy(update={"weights": str(path)}), num_classes=10)
    _assert_same_weights(source, model)
