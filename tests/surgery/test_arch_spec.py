"""ArchSpec: JSON description of a shrunk model, rebuilt from timm + a state dict."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from p3b_search.surgery import ArchSpec, get_adapter, random_masks, shrink_model
from p3b_search.surgery.gates import random_residual
from tests.conftest import MODEL_CONFIGS, make_model


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled", "swin_tiny"])
def test_rebuild_from_spec_and_safetensors_gives_the_same_logits(key, tmp_path):
    name, kwargs = MODEL_CONFIGS[key]
    model = make_model(key)
    masks = random_masks(get_adapter(model), seed=7, keep=0.6, dead_prob=0.1)
    shrunk = shrink_model(model, masks)
    spec = ArchSpec.from_model(shrunk, name, {**kwargs, "num_classes": 10})
    spec.save(tmp_path / "arch.json")
    save_file({k: v.contiguous() for k, v in shrunk.state_dict().items()}, tmp_path / "model.safetensors")
    json.loads((tmp_path / "arch.json").read_text())  # plain JSON

    rebuilt = ArchSpec.load(tmp_path / "arch.json").build(load_file(tmp_path / "model.safetensors")).eval()
    x = torch.randn(2, *get_adapter(model).input_size())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), shrunk(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in shrunk.parameters())


@pytest.mark.parametrize("key", ["deit_tiny_distilled", "swin_tiny"])
def test_shared_residual_spec_rebuilds_the_narrow_model(key, tmp_path):
    name, kwargs = MODEL_CONFIGS[key]
    model = make_model(key)
    adapter = get_adapter(model)
    residual = random_residual(adapter, keep=0.5, seed=4)
    shrunk = shrink_model(model, random_masks(adapter, seed=5, keep=0.6, dead_prob=0.1, shared=True), residual)
    spec = ArchSpec.from_model(shrunk, name, {**kwargs, "num_classes": 10})
    spec.save(tmp_path / "arch.json")
    data = json.loads((tmp_path / "arch.json").read_text())
    assert data["residual"] == {"mode": "shared", "kept": [residual[s].nonzero().flatten().tolist()
                                                           for s in sorted(residual)]}
    assert all(row["skipped"] or not {"in", "out"} & set(row["kept"]) for row in data["sub_blocks"])
    loaded = ArchSpec.load(tmp_path / "arch.json")
    assert loaded.residual_mode == "shared"
    rebuilt = loaded.build(shrunk.state_dict()).eval()
    x = torch.randn(2, *adapter.input_size())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), shrunk(x), rtol=0, atol=1e-6)


def test_per_block_spec_says_so_and_version_1_files_read_as_per_block(tmp_path):
    model = make_model("deit_tiny")
    spec = ArchSpec.from_model(shrink_model(model, random_masks(get_adapter(model), seed=1, keep=0.7)),
                               "deit_tiny_patch16_224", {"img_size": 64, "num_classes": 10})
    data = spec.to_dict()
    assert data["residual"] == {"mode": "per-block"} and data["version"] == 2
    old = {key: value for key, value in data.items() if key != "residual"} | {"version": 1}
    assert ArchSpec.from_dict(old).residual_mode == "per-block"
    with pytest.raises(ValueError, match="residual must be"):
        ArchSpec.from_dict(data | {"residual": {"mode": "narrow"}})
    with pytest.raises(ValueError, match="residual.kept must list"):
        ArchSpec.from_dict(data | {"residual": {"mode": "shared"}})


def test_dense_model_spec_keeps_everything():
    spec = ArchSpec.from_model(make_model("deit_tiny"), "deit_tiny_patch16_224", {"img_size": 64})
    assert all(not row["skipped"] and all(v is None for v in row["kept"].values()) for row in spec.sub_blocks)


def test_corrupt_spec_file_names_the_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="arch.json: corrupt arch spec"):
        ArchSpec.load(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a p3b-search arch spec"):
        ArchSpec.load(path)
