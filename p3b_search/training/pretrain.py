"""Deterministic source-domain pretraining for the embedded transfer tasks, cached on disk.

``source_pretrained_weights(model_cfg, task)`` trains the architecture ``model_cfg`` describes on
the *source* domain of an embedded task (``digits``: classes 0-4; ``glyphs``: capitals A-Z) with
a fixed recipe and seed, and caches the weights as safetensors under a key hashing the
architecture, the data, the recipe, the code version and the device type. The first caller
trains (a few seconds for :data:`~p3b_search.models.DIGITS_VIT`, a few minutes for
:data:`~p3b_search.models.GLYPHS_VIT`);
later callers, also concurrent Ray workers, get the cached file: a file lock serialises
training and the file is written atomically. The global random state is restored afterwards, so
a trial behaves the same whether the cache was hit or not.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.data.glyphs import GLYPHS
from p3b_search.data.loaders import embedded_class_count
from p3b_search.files import atomic_write, default_cache_dir, file_lock
from p3b_search.models import create_timm_model
from p3b_search.training.loop import evaluate, resolve_device, train_stage
from p3b_search.training.rng import rng_state, seed_everything, set_rng_state

_logger = logging.getLogger(__name__)

#: Bump when a change in the code below changes the trained weights (invalidates caches).
CODE_VERSION = 1
#: The source-domain training stage of each embedded task.
SOURCE_STAGES: dict[str, StageConfig] = {
    "digits": StageConfig(epochs=25, lr=2e-2, min_lr=1e-5, schedule="cosine", warmup_epochs=2),
    "glyphs": StageConfig(epochs=12, lr=2e-2, min_lr=1e-5, schedule="cosine", warmup_epochs=1),
}
SOURCE_TRAINING = TrainingConfig(
    batch_size=64, grad_accum=1, weight_decay=0.05, label_smoothing=0.1, seed=0, device="auto", amp=False,
)


#: CPU float sums depend on the thread count, so it is fixed (one thread is also the fastest for
#: the tiny digits ViT, and immune to oversubscription when several workers share a machine).
SOURCE_CPU_THREADS = 1


def _check_task(task: str) -> None:
    if task not in SOURCE_STAGES:
        raise ValueError(f"no source domain for task {task!r}: model.weights='source-pretrained' needs one of "
                         f"the embedded tasks {', '.join(SOURCE_STAGES)}")


def cache_key(model_cfg: ModelConfig, device_type: str, task: str = "digits") -> str:
    """sha256 over everything that determines the pretrained weights."""
    _check_task(task)
    recipe = {
        "model": {"name": model_cfg.name, "overrides": model_cfg.overrides},
        "data": DataConfig(kind=task).model_dump(mode="json"),
        "stage": SOURCE_STAGES[task].model_dump(mode="json"),
        "training": SOURCE_TRAINING.model_dump(mode="json"),
        "code_version": CODE_VERSION,
        "device": device_type,
        "cpu_threads": SOURCE_CPU_THREADS,
    }
    if task == "glyphs":  # the generated images are part of the recipe
        recipe["glyphs"] = GLYPHS.key("source")
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _torch_threads(count: int):
    """Run with ``count`` intra-op CPU threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain(model_cfg: ModelConfig, task: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train on the source domain; returns the CPU state dict and source validation metrics."""
    with _torch_threads(SOURCE_CPU_THREADS):
        return _train_on_source(model_cfg, task)


def _train_on_source(model_cfg: ModelConfig, task: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    seed_everything(SOURCE_TRAINING.seed)
    model = create_timm_model(model_cfg, num_classes=embedded_class_count(task, "source"))
    train_loader, val_loader, _ = build_loaders(
        DataConfig(kind=task), model, SOURCE_TRAINING.batch_size, SOURCE_TRAINING.seed, domain="source"
    )
    train_stage(model, train_loader, val_loader, SOURCE_STAGES[task], SOURCE_TRAINING)
    metrics = evaluate(model, val_loader, amp=False)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return state, metrics


def source_pretrained_weights(model_cfg: ModelConfig, cache_dir: str | Path | None = None,
                              task: str = "digits") -> Path:
    """Path of the safetensors file holding ``model_cfg``'s pretraining on the source domain of
    the embedded ``task`` (with the source classes' head), training it first on a cache miss."""
    device_type = resolve_device(SOURCE_TRAINING.device).type
    key = cache_key(model_cfg, device_type, task)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{model_cfg.name}-{task}-source-{key[:16]}.safetensors"
    if path.is_file():
        return path
    with file_lock(directory / f"{path.name}.lock"):
        if path.is_file():  # another process trained it while we waited
            return path
        _logger.info("pretraining %s on the %s source domain (cache miss, key %s)", model_cfg.name, task, key[:16])
        saved_rng = rng_state()
        try:
            state, metrics = _pretrain(model_cfg, task)
        finally:
            set_rng_state(saved_rng)
        metadata = {"key": key, "code_version": str(CODE_VERSION), "device": device_type,
                    **{f"source_val_{k}": repr(v) for k, v in metrics.items()}}
        with atomic_write(path) as tmp:
            save_file(state, tmp, metadata=metadata)
    return path


def source_metrics(path: str | Path) -> dict[str, float]:
    """Source-domain validation ``top1``/``top5`` (percent) and ``loss`` stored with the weights."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    prefix = "source_val_"
    return {k[len(prefix):]: float(v) for k, v in metadata.items() if k.startswith(prefix)}
