"""load_pruned: rebuild from arch.json + model.safetensors, light imports, one-line errors, no pickle."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import p3b_search
from p3b_search.export.load import ExportError, load_pruned
from p3b_search.surgery import ArchSpec, get_adapter, random_masks, shrink_model
from p3b_search.surgery.gates import random_residual
from tests.paths import REPO_ROOT as REPO

#: The digits task's tiny ViT (0.3M parameters): building it costs milliseconds.
MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4, "num_classes": 5}
PREPROCESSING = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bicubic", "crop_pct": 0.9}


def write_folder(folder: Path, seed: int, shared: bool = False) -> torch.nn.Module:
    """A shrunk model (per block, or with a ``shared`` residual) saved as export writes it; returns the model."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL_NAME, pretrained=False, **MODEL_KWARGS).eval()
    adapter = get_adapter(model)
    masks = random_masks(adapter, seed=seed, keep=0.6, dead_prob=0.1, shared=shared)
    residual = random_residual(adapter, keep=0.5, seed=seed) if shared else None
    shrunk = shrink_model(model, masks, residual).eval()
    folder.mkdir(parents=True)
    ArchSpec.from_model(shrunk, MODEL_NAME, MODEL_KWARGS,
                        extra={"preprocessing": PREPROCESSING, "structured": True}).save(folder / "arch.json")
    save_file({k: v.contiguous() for k, v in shrunk.state_dict().items()}, folder / "model.safetensors")
    return shrunk


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("pristine") / "export"
    return folder, write_folder(folder, seed=3)


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    """A fresh copy of the exported folder, free to damage."""
    return Path(shutil.copytree(pristine[0], tmp_path / "export"))


def test_rebuilds_the_same_model_with_its_preprocessing(pristine):
    from timm.data import resolve_model_data_config

    folder, shrunk = pristine
    model = p3b_search.load_pruned(folder)
    assert not model.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), shrunk(x), rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in shrunk.parameters())
    config = resolve_model_data_config(model)
    assert config["input_size"] == (3, 16, 16) and config["interpolation"] == "bicubic"


def test_rebuilds_a_shared_residual_model(tmp_path):
    shrunk = write_folder(tmp_path / "shared", seed=5, shared=True)
    model = load_pruned(tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / "arch.json").read_text())["residual"]["mode"] == "shared"
    assert model.embed_dim == shrunk.embed_dim < MODEL_KWARGS["embed_dim"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), shrunk(x), rtol=0, atol=0)


def test_weights_of_the_other_residual_mode_are_refused(folder, tmp_path):
    write_folder(tmp_path / "shared", seed=3, shared=True)
    (folder / "model.safetensors").write_bytes((tmp_path / "shared" / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"model.safetensors does not match .*arch.json"):
        load_pruned(folder)


@pytest.mark.slow
def test_import_is_light_and_loading_needs_no_search_stack(folder):
    script = textwrap.dedent(f"""
        import sys
        import p3b_search
        assert "torch" not in sys.modules, "import p3b_search imported torch"
        model = p3b_search.load_pruned({str(folder)!r})
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"optuna", "ray", "mlflow", "pandas", "pyarrow"}})
        print(heavy, type(model).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "VisionTransformer"]


def test_unknown_package_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_pruend'"):
        p3b_search.load_pruend  # noqa: B018


def _one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_name_the_file(folder, damage):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x00not safetensors" * 10, "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(ExportError, match="corrupt or truncated safetensors file") as error:
        load_pruned(folder)
    _one_line_naming(error, path)


@pytest.mark.parametrize("text", ['{"format": "p3b-search/arch-spec", "vers', "[1, 2]", '{"format": "other"}',
                                  '{"format": "p3b-search/arch-spec", "version": 1}'])
def test_corrupt_arch_spec_names_the_file(folder, text):
    path = folder / "arch.json"
    path.write_text(text)
    with pytest.raises(ExportError, match="corrupt or truncated arch spec") as error:
        load_pruned(folder)
    _one_line_naming(error, path)


def test_missing_files_and_folder(folder, tmp_path):
    with pytest.raises(ExportError, match="no such folder"):
        load_pruned(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="model.safetensors: no such file"):
        load_pruned(folder)


def test_weights_of_another_architecture_are_refused(folder, tmp_path):
    write_folder(tmp_path / "other", seed=11)  # other kept units: other tensor shapes
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"model.safetensors does not match .*arch.json") as error:
        load_pruned(folder)
    assert "\n" not in str(error.value)


class _Payload:
    """Unpickling this writes a marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(folder, tmp_path):
    marker = tmp_path / "marker"
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ExportError, match="corrupt or truncated safetensors file"):
        load_pruned(folder)
    assert not marker.exists()
    json.loads((folder / "arch.json").read_text())  # the spec itself is plain JSON
