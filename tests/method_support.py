"""Tiny real timm models, synthetic data and a minimal driver of a method's hooks, shared by
the method tests (random init, nothing downloaded)."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from p3b_search.config import StageConfig, TrainingConfig
from p3b_search.methods.base import PruningMethod
from p3b_search.methods.hooks import StepInfo, TrainingHooks
from p3b_search.training.loop import build_optimizer

NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads
    spin against each other (10x slower measured). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- models ------------------------------------------------------------------------------------

def tiny_vit(seed: int = 0, depth: int = 3, embed_dim: int = 64, num_heads: int = 4, **kwargs) -> nn.Module:
    """A timm ViT on 16x16 images (4x4 patches, 16 tokens + class token), ``NUM_CLASSES`` outputs."""
    torch.manual_seed(seed)
    options = dict(img_size=16, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                   num_classes=NUM_CLASSES, **kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options)


def small_vit(seed: int = 0) -> nn.Module:
    """The smallest :func:`tiny_vit`: 2 layers, width 32, 2 heads."""
    return tiny_vit(seed, depth=2, embed_dim=32, num_heads=2)


def tiny_swin(seed: int = 0, img_size: int = 32, window_size: int = 4, embed_dim: int = 16,
              depths: tuple[int, ...] = (1, 1), num_heads: tuple[int, ...] = (2, 4)) -> nn.Module:
    """A timm Swin with two stages (default: 32x32 images, 8x8 then 4x4 maps), ``NUM_CLASSES`` outputs."""
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                             window_size=window_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                             num_classes=NUM_CLASSES)


def small_swin(seed: int = 0) -> nn.Module:
    """A :func:`tiny_swin` on 56x56 images: width 32, 2+2 blocks, window 7."""
    return tiny_swin(seed, img_size=56, window_size=7, embed_dim=32, depths=(2, 2))


# -- data and the real training loop -----------------------------------------------------------

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


# -- a minimal driver of the hooks -------------------------------------------------------------

def batch(model: nn.Module, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the model's input size and random labels."""
    gen = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(size, 3, h, w, generator=gen), torch.randint(0, NUM_CLASSES, (size,), generator=gen)


def make(method_cls: type[PruningMethod], epochs: int = 2, steps_per_epoch: int = 4, **config) -> PruningMethod:
    return method_cls(method_cls.spec.config_cls(**config), num_classes=NUM_CLASSES, epochs=epochs,
                      steps_per_epoch=steps_per_epoch)


def drive(hooks: TrainingHooks, model: nn.Module, steps: int, *, steps_per_epoch: int = 4, lr: float = 1e-2,
          weight_decay: float = 0.05, optimizer: torch.optim.Optimizer | None = None,
          after_step=None) -> torch.optim.Optimizer:
    """Train ``model`` for ``steps`` micro-batches with AdamW, calling ``hooks`` in the loop's
    order (one micro-batch per optimizer step); ``after_step(step, optimizer)`` runs after each
    step's hooks, before the gradients are cleared."""
    if optimizer is None:
        optimizer = build_optimizer(model, lr, weight_decay, hooks.param_groups())
        hooks.on_train_start(model, optimizer)
    model.train()
    for step in range(steps):
        inputs, targets = batch(model, seed=step)
        info = StepInfo(step=step, epoch=step // steps_per_epoch, steps_per_epoch=steps_per_epoch, optimizer_step=True)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        hooks.after_backward(info)
        optimizer.step()
        hooks.after_optimizer_step(info)
        if after_step is not None:
            after_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if step % steps_per_epoch == steps_per_epoch - 1:
            hooks.on_epoch_end(info.epoch)
    return optimizer


def regrown_update_sizes(method: PruningMethod, model: nn.Module, steps: int, lr: float = 1e-2,
                         first: int = 10) -> list[float]:
    """Drive a prune-and-grow ``method`` for ``steps`` micro-batches under AdamW without weight
    decay; per optimizer step, the largest update (in units of ``lr``) of an entry regrown at
    most ``first`` steps before (its first ``first`` updates), for steps that have such entries."""
    params = dict(model.named_parameters())
    previous = {name: p.detach().clone() for name, p in params.items()}
    sizes = []

    def record(step: int, optimizer: torch.optim.Optimizer) -> None:
        largest = None
        for name, birth in method._fresh.births.items():
            age = float(optimizer.state[params[name]]["step"]) - birth
            young = (birth > 0) & (age >= 1) & (age <= first)
            if young.any():
                size = (params[name].detach() - previous[name])[young].abs().max().item() / lr
                largest = size if largest is None else max(largest, size)
        if largest is not None:
            sizes.append(largest)
        previous.update({name: p.detach().clone() for name, p in params.items()})

    drive(method, model, steps, lr=lr, weight_decay=0.0, after_step=record)
    return sizes
