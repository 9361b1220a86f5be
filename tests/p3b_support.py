"""Tiny real timm models and synthetic data shared by the P3B and baseline tests."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from p3b_search.config import StageConfig, TrainingConfig

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads
    spin against each other (10x slower measured). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(seed: int = 0, depth: int = 3, embed_dim: int = 64, **kwargs) -> torch.nn.Module:
    """A random-init timm ViT on 16x16 images (4x4 patches, 16 tokens + class token)."""
    torch.manual_seed(seed)
    options = dict(img_size=16, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=4,
                   num_classes=NUM_CLASSES, **kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options)


def tiny_swin(seed: int = 0) -> torch.nn.Module:
    """A random-init timm Swin with two stages on 32x32 images (8x8 then 4x4 maps)."""
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=NUM_CLASSES)


def class_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic images: a class-specific pattern plus noise, (n, 3, 16, 16) and labels."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, 16, 16, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES
    return patterns[labels] + 0.5 * torch.randn(n, 3, 16, 16, generator=gen), labels


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*class_images(n, seed)), batch_size=batch_size, shuffle=False)


def training(batch_size: int = 16) -> TrainingConfig:
    return TrainingConfig(batch_size=batch_size, device="cpu", label_smoothing=0.0)


def stage(epochs: int, lr: float = 5e-3) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, schedule="constant")
