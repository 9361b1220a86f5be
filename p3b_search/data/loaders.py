"""One entry point from a :class:`~p3b_search.config.DataConfig` to train/val data loaders."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from p3b_search.config import EMBEDDED_TASKS, DataConfig
from p3b_search.data.digits import DOMAIN_CLASSES, digits_datasets
from p3b_search.data.folders import cifar_datasets, image_folder_datasets
from p3b_search.data.glyphs import GLYPHS, glyphs_datasets
from p3b_search.distributed import rank_and_world


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(num_samples)`` fixed by ``(seed, epoch)``; with
    ``world_size`` ranks, rank ``r`` takes every ``world_size``-th index from position ``r``
    (the permutation's tail that does not fill a round is dropped, so all ranks take the same
    number of steps).

    The training loop calls :meth:`set_epoch` before each epoch (as with torch's
    ``DistributedSampler``), so the order of any epoch is reproducible without saving
    generator state: a run resumed at epoch ``e`` sees exactly the batches it would have seen.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return iter(order[self.rank: len(self) * self.world_size: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """``(height, width)`` the model was built for (timm's pretrained config ignores ``img_size`` overrides)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    from timm.data import resolve_model_data_config

    _, height, width = resolve_model_data_config(model)["input_size"]
    return height, width


def resolve_input_config(data: DataConfig, model: nn.Module) -> dict[str, Any]:
    """timm's data config (mean, std, interpolation, crop) with the input size the model takes."""
    from timm.data import resolve_model_data_config

    height, width = model_input_size(model)
    if data.image_size is not None and (data.image_size, data.image_size) != (height, width):
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError(
                f"data.image_size={data.image_size} but the model takes {height}x{width} inputs: "
                "remove data.image_size or set model.overrides.img_size to the same value"
            )
        height = width = data.image_size
    return resolve_model_data_config(model, args={"input_size": (3, height, width)})


#: Each embedded task: ``(datasets(domain, image_size, mean, std), class_count(domain))``.
_EMBEDDED: dict[str, tuple[Callable[..., tuple[Dataset, Dataset, int]], Callable[[str], int]]] = {
    "digits": (digits_datasets, lambda domain: len(DOMAIN_CLASSES[domain])),
    "glyphs": (glyphs_datasets, lambda domain: len(GLYPHS.classes(domain))),
}


def embedded_datasets(kind: str, domain: str, image_size: int, mean, std) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` of one domain of an embedded task (``digits`` or ``glyphs``)."""
    return _EMBEDDED[kind][0](domain, image_size, mean, std)


def embedded_class_count(kind: str, domain: str = "target") -> int:
    """Classes of one domain of an embedded task, without generating its images."""
    return _EMBEDDED[kind][1](domain)


def _datasets(data: DataConfig, model: nn.Module, domain: str) -> tuple[Dataset, Dataset, int]:
    config = resolve_input_config(data, model)
    if data.kind in EMBEDDED_TASKS:
        _, height, width = config["input_size"]
        if height != width:
            raise ValueError(f"the {data.kind} task needs a square model input, the model takes {height}x{width}")
        return embedded_datasets(data.kind, domain, height, config["mean"], config["std"])
    if domain != "target":
        raise ValueError(f"domain={domain!r} exists only for the embedded tasks {', '.join(EMBEDDED_TASKS)} "
                         f"(got data.kind={data.kind!r})")
    from timm.data import create_transform

    train_tf = create_transform(**config, is_training=True)
    val_tf = create_transform(**config, is_training=False)
    if data.kind == "imagefolder":
        return image_folder_datasets(data.root, train_tf, val_tf)
    return cifar_datasets(data.root, data.kind, train_tf, val_tf)


def build_loaders(
    data: DataConfig, model: nn.Module, batch_size: int, seed: int, domain: str = "target"
) -> tuple[DataLoader, DataLoader, int]:
    """``(train_loader, val_loader, num_classes)`` for ``data`` at ``model``'s input size.

    The train loader shuffles with an :class:`EpochShuffleSampler` seeded by ``seed`` and drops
    the last incomplete batch; ``data.max_train_samples`` keeps a seeded random subset.
    ``domain`` picks an embedded task's ``"source"`` or ``"target"`` domain. Under
    ``torch.distributed`` each rank gets its shard of both sets (``batch_size`` is per rank);
    :func:`~p3b_search.training.loop.evaluate` sums the validation counts over the ranks.
    """
    train, val, num_classes = _datasets(data, model, domain)
    if data.max_train_samples is not None and data.max_train_samples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: data.max_train_samples]
        train = Subset(train, sorted(keep.tolist()))
    rank, world = rank_and_world()
    sampler = EpochShuffleSampler(len(train), seed, rank, world)
    if batch_size > len(sampler):
        shard = f" (this rank's share of {len(train)}, over {world} ranks)" if world > 1 else ""
        raise ValueError(
            f"training.batch_size={batch_size} exceeds the {len(sampler)} training samples{shard}: "
            "lower training.batch_size"
        )
    if world > 1:
        val = Subset(val, range(rank, len(val), world))
    # Workers are restarted each epoch (not persistent): their seeds then come from the global
    # torch RNG, which checkpoints restore, so augmentations replay exactly after a resume.
    workers = dict(num_workers=data.num_workers, pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(
        train, batch_size=batch_size, sampler=sampler, drop_last=True, **workers
    )
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, drop_last=False, **workers)
    return train_loader, val_loader, num_classes
