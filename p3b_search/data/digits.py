"""The embedded transfer task: scikit-learn's 8x8 handwritten digits (1,797 real images).

The *source* domain holds digits 0-4, the *target* domain digits 5-9 (relabelled 0-4), so a
model pretrained on the source meets classes it has never seen. Each domain is split 80/20
into train/val, stratified by class with a fixed seed, so every run sees the same split.
Images are scaled to [0, 1], upsampled (bilinear) to the model's input size, repeated to
3 channels and normalised with the model's mean/std; they are held in memory as tensors.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

Domain = Literal["source", "target"]

DOMAIN_CLASSES: dict[str, tuple[int, ...]] = {"source": (0, 1, 2, 3, 4), "target": (5, 6, 7, 8, 9)}
VAL_FRACTION = 0.2
SPLIT_SEED = 0
_PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


def _domain_arrays(domain: str):
    from sklearn.datasets import load_digits

    if domain not in DOMAIN_CLASSES:
        raise ValueError(f"digits domain {domain!r} is unknown: use 'source' or 'target'")
    digits = load_digits()
    classes = DOMAIN_CLASSES[domain]
    keep = [i for i, label in enumerate(digits.target) if label in classes]
    images = digits.images[keep]  # (n, 8, 8)
    labels = digits.target[keep] - classes[0]
    return images, labels


def _to_tensor(images, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(n, 8, 8)`` pixels 0..16 -> normalised ``(n, 3, image_size, image_size)`` float32."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def digits_datasets(
    domain: Domain, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[TensorDataset, TensorDataset, int]:
    """``(train, val, num_classes)`` of one digits domain; items are ``(image (3,H,W), label)``."""
    from sklearn.model_selection import train_test_split

    images, labels = _domain_arrays(domain)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=VAL_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )

    def subset(idx) -> TensorDataset:
        return TensorDataset(
            _to_tensor(images[idx], image_size, mean, std), torch.as_tensor(labels[idx], dtype=torch.long)
        )

    return subset(train_idx), subset(val_idx), len(DOMAIN_CLASSES[domain])
