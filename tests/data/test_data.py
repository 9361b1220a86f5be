"""Data: the digits transfer task, ImageFolder trees and CIFAR pickle folders via timm."""
from __future__ import annotations

import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from p3b_search.config import DataConfig, ModelConfig
from p3b_search.data import EpochShuffleSampler, build_loaders
from p3b_search.data.digits import digits_datasets
from p3b_search.models import create_timm_model


def _vit(img_size: int, num_classes: int = 5) -> torch.nn.Module:
    cfg = ModelConfig(overrides=dict(img_size=img_size, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    return create_timm_model(cfg, num_classes)


# ----------------------------------------------------------------------------- digits

def test_digits_domains_are_disjoint_stratified_and_deterministic():
    mean, std = (0.5,) * 3, (0.5,) * 3
    src_train, src_val, n_src = digits_datasets("source", 16, mean, std)
    tgt_train, tgt_val, n_tgt = digits_datasets("target", 16, mean, std)
    assert n_src == n_tgt == 5
    assert len(src_train) + len(src_val) + len(tgt_train) + len(tgt_val) == 1797  # all of load_digits
    assert len(src_val) == pytest.approx(0.2 * (len(src_train) + len(src_val)), abs=1)
    val_counts = Counter(tgt_val.tensors[1].tolist())
    all_counts = val_counts + Counter(tgt_train.tensors[1].tolist())
    assert sorted(val_counts) == [0, 1, 2, 3, 4]
    assert all(abs(val_counts[c] - 0.2 * all_counts[c]) <= 1 for c in all_counts)  # stratified
    again, _, _ = digits_datasets("target", 16, mean, std)
    assert torch.equal(again.tensors[0], tgt_train.tensors[0])
    # target images are digits 5-9: none equals a source image
    src = {t.numpy().tobytes() for t in src_train.tensors[0]}
    assert not any(t.numpy().tobytes() in src for t in tgt_train.tensors[0])
    assert tgt_train.tensors[0].shape[1:] == (3, 16, 16)
    assert tgt_train.tensors[0].min() == pytest.approx(-1.0) and tgt_train.tensors[0].max() <= 1.0 + 1e-6


def test_digits_loaders_follow_the_model_input_size_and_subsample():
    model = _vit(24)
    data = DataConfig(kind="digits", max_train_samples=100)
    train, val, classes = build_loaders(data, model, batch_size=32, seed=0, domain="source")
    images, labels = next(iter(train))
    assert images.shape == (32, 3, 24, 24) and classes == 5 and labels.max() < 5
    assert len(train.dataset) == 100 and len(train) == 3  # last incomplete batch dropped
    assert len(val.dataset) == 181


def test_bad_requests_fail_in_one_line(tmp_path):
    model = _vit(16)
    with pytest.raises(ValueError, match="batch_size=2000 exceeds the 716 training samples"):
        build_loaders(DataConfig(), model, batch_size=2000, seed=0)
    with pytest.raises(ValueError, match="data.image_size=32 but the model takes 16x16"):
        build_loaders(DataConfig(image_size=32), model, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="domain='source' exists only for the embedded tasks digits, glyphs"):
        build_loaders(DataConfig(kind="cifar10", root=tmp_path), model, 8, 0, domain="source")


def test_epoch_shuffle_sampler_depends_on_seed_and_epoch_only():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochShuffleSampler(50, seed=4)) != first


# ----------------------------------------------------------------------------- ImageFolder

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _image_folder(root, splits=("train", "val"), classes=tuple(COLOURS), per_class=4):
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 18), COLOURS[name]).save(folder / f"{i}.png")
    return root


def test_image_folder_through_timm_transforms(tmp_path):
    root = _image_folder(tmp_path)
    train, val, classes = build_loaders(DataConfig(kind="imagefolder", root=root), _vit(32), batch_size=4, seed=0)
    assert classes == 3
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 32, 32)
    images, labels = (torch.cat(parts) for parts in zip(*val))
    # eval transform: resize + centre crop + normalise with the ViT's mean/std (0.5, 0.5): red -> (1, -1, -1)
    red = images[labels == 2]
    assert torch.allclose(red.mean(dim=(0, 2, 3)), torch.tensor([1.0, -1.0, -1.0]), atol=1e-2)


def test_val_uses_train_class_indices_when_a_class_is_absent(tmp_path):
    _image_folder(tmp_path, splits=("train",))
    _image_folder(tmp_path, splits=("val",), classes=("green", "red"))
    _, val, classes = build_loaders(DataConfig(kind="imagefolder", root=tmp_path), _vit(16), 4, 0)
    assert classes == 3
    assert sorted(set(t for _, t in val.dataset.reader.samples)) == [1, 2]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("no_val", "has no val/ folder"),
        ("empty_train", "no images in .*train"),
    ],
)
def test_missing_or_empty_folders_are_named(tmp_path, layout, message):
    root = tmp_path / "ds"
    if layout == "no_val":
        _image_folder(root, splits=("train",))
    elif layout == "empty_train":
        (root / "train" / "red").mkdir(parents=True)
        (root / "val" / "red").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=message) as err:
        build_loaders(DataConfig(kind="imagefolder", root=root), _vit(16), 4, 0)
    assert str(root) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- CIFAR

def _cifar_batch(n: int, label_key: str, classes: int, offset: int) -> dict:
    labels = [(offset + i) % classes for i in range(n)]
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        data[i, label % 3] = 255  # image of class c is pure red/green/blue by c % 3
    return {"data": data.reshape(n, 3072), label_key: labels, "batch_label": "generated"}


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar10_folder(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i in range(1, 6):
        _write_pickle(base / f"data_batch_{i}", _cifar_batch(4, "labels", 10, offset=4 * i))
    _write_pickle(base / "test_batch", _cifar_batch(6, "labels", 10, offset=0))
    _write_pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return base


def test_cifar10_pickle_folder(tmp_path):
    _cifar10_folder(tmp_path)
    train, val, classes = build_loaders(DataConfig(kind="cifar10", root=tmp_path), _vit(32, 10), 4, 0)
    assert classes == 10 and len(train.dataset) == 20 and len(val.dataset) == 6
    assert val.dataset.classes[3] == "c3"
    images, labels = next(iter(val))
    assert labels.tolist() == [0, 1, 2, 3]
    assert images.shape == (4, 3, 32, 32)
    assert torch.allclose(images[1].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=1e-2)  # label 1: green


def test_cifar_root_may_be_the_batches_folder_itself(tmp_path):
    base = _cifar10_folder(tmp_path)
    _, _, classes = build_loaders(DataConfig(kind="cifar10", root=base), _vit(32, 10), 4, 0)
    assert classes == 10


def test_cifar100_pickle_folder(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    _write_pickle(base / "train", _cifar_batch(8, "fine_labels", 100, offset=90))
    _write_pickle(base / "test", _cifar_batch(4, "fine_labels", 100, offset=0))
    train, val, classes = build_loaders(DataConfig(kind="cifar100", root=tmp_path), _vit(32, 100), 4, 0)
    assert classes == 100 and train.dataset.targets == list(range(90, 98)) and len(val.dataset) == 4
    assert train.dataset.classes is None  # no meta file: class names unknown, indices still valid


def test_missing_cifar_files_are_named(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1 not found"):
        build_loaders(DataConfig(kind="cifar10", root=tmp_path), _vit(32, 10), 4, 0)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar_batch_with_code_is_refused_not_run(tmp_path):
    base = _cifar10_folder(tmp_path)
    marker = tmp_path / "pwned"
    _write_pickle(base / "data_batch_2", {"data": _Payload(marker), "labels": [0]})
    with pytest.raises(ValueError, match=r"data_batch_2: global .*mkdir is not allowed"):
        build_loaders(DataConfig(kind="cifar10", root=tmp_path), _vit(32, 10), 4, 0)
    assert not marker.exists()
