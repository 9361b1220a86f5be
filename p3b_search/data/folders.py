"""Local image data sets read through timm's data pipeline; nothing is ever downloaded.

* ImageFolder trees: ``root/train/<class>/*.{png,jpg,jpeg}`` and ``root/val/<class>/*``
  (``validation/`` also accepted), read by ``timm.data.create_dataset``.
* CIFAR-10/100 in torchvision's python-pickle layout: ``root/cifar-10-batches-py/`` (or that
  folder itself) with ``data_batch_1..5`` + ``test_batch``; ``root/cifar-100-python/`` with
  ``train`` + ``test``. The batches are read with an unpickler that only accepts the numpy
  array types the format uses, so a crafted file cannot run code. (torchvision's reader is not
  used because it insists on the official files' MD5 sums.)

Images pass through ``timm.data.create_transform`` built from the model's resolved data config.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_FOLDER_LAYOUT = "expected root/train/<class>/*.png|jpg and root/val/<class>/*.png|jpg"
_VAL_NAMES = ("val", "validation")


def _split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else _VAL_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"data.root={root} has no {names[0]}/ folder: {IMAGE_FOLDER_LAYOUT}")


def image_folder_datasets(root: Path, train_transform: Callable, val_transform: Callable) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` from an ImageFolder tree; val uses train's class indices."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} does not exist or is not a folder: {IMAGE_FOLDER_LAYOUT}")
    train_root, val_root = _split_dir(root, "train"), _split_dir(root, "val")
    train = _folder_dataset(train_root, train_transform)
    class_to_idx = dict(train.reader.class_to_idx)
    extra = sorted(p.name for p in val_root.iterdir() if p.is_dir() and p.name not in class_to_idx)
    if extra:
        raise ValueError(f"data.root: {val_root} has classes missing from train/: {', '.join(extra[:5])}")
    val = _folder_dataset(val_root, val_transform, class_to_idx)
    return train, val, len(class_to_idx)


def _folder_dataset(split_root: Path, transform: Callable, class_to_idx: dict[str, int] | None = None) -> Dataset:
    from timm.data import create_dataset

    try:
        ds = create_dataset("", root=str(split_root), search_split=False, class_map=class_to_idx or "")
    except RuntimeError:  # timm: "Found 0 images in subfolders of ..."
        raise FileNotFoundError(f"data.root: no images in {split_root}: {IMAGE_FOLDER_LAYOUT}") from None
    ds.transform = transform
    return ds


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: allows only the globals numpy needs to rebuild arrays."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read CIFAR batch {path}: {error}") from None


_CIFAR_LAYOUT = {
    # kind: (folder name, train files, val files, label key, meta file, class-names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


class CifarPickleDataset(Dataset):
    """CIFAR-10/100 from torchvision's python-pickle folder; items are ``(transform(PIL image), label)``."""

    def __init__(self, root: Path, kind: str, split: str, transform: Callable | None = None):
        folder, train_files, val_files, label_key, meta_file, names_key = _CIFAR_LAYOUT[kind]
        root = Path(root).expanduser()
        base = root if root.name == folder else root / folder
        files = [base / name for name in (train_files if split == "train" else val_files)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"data.root={root}: {kind} file {missing[0]} not found "
                f"(expected torchvision's python version: {folder}/{' '.join(train_files[:1] + val_files)})"
            )
        batches = [_read_batch(f) for f in files]
        self.data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(t) for b in batches for t in b[label_key]]
        if len(self.data) == 0 or len(self.data) != len(self.targets):
            raise ValueError(f"data.root={root}: {kind} {split} batches hold {len(self.data)} images and {len(self.targets)} labels")
        meta = base / meta_file
        self.classes = list(_read_batch(meta)[names_key]) if meta.is_file() else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def cifar_datasets(root: Path, kind: str, train_transform: Callable, val_transform: Callable) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` of a CIFAR-10/100 folder (val = the official test batch)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} does not exist or is not a folder (data.kind={kind})")
    train = CifarPickleDataset(root, kind, "train", train_transform)
    val = CifarPickleDataset(root, kind, "val", val_transform)
    return train, val, 10 if kind == "cifar10" else 100
