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
from torch.utils.data import TensorDataset

from p3b_search.data.tensors import normalised_images

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
        pixels = torch.as_tensor(images[idx]).unsqueeze(1)
        return TensorDataset(normalised_images(pixels, _PIXEL_MAX, image_size, mean, std),
                             torch.as_tensor(labels[idx], dtype=torch.long))

    return subset(train_idx), subset(val_idx), len(DOMAIN_CLASSES[domain])
