"""Demo of the embedded transfer task: ``python -m p3b_search.demo``.

1. Pretrains the tiny digits ViT on the source domain (digits 0-4), or takes it from the cache,
   and prints its source validation accuracy.
2. Transfers it to the unseen target domain (digits 5-9): dense fine-tuning with a fresh head,
   next to the same recipe from random initialisation, and prints both target accuracies.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.files import CACHE_ENV
from p3b_search.models import DIGITS_VIT
from p3b_search.training.build import build_model
from p3b_search.training.loop import train_stage
from p3b_search.training.pretrain import source_metrics, source_pretrained_weights
from p3b_search.training.rng import seed_everything

#: Dense fine-tuning on the target domain (digits 5-9).
TARGET_STAGE = StageConfig(epochs=15, lr=2e-2, min_lr=1e-5, schedule="cosine", warmup_epochs=1)
TARGET_TRAINING = TrainingConfig(batch_size=64, weight_decay=0.05, label_smoothing=0.1, seed=0)


def transfer(model_cfg: ModelConfig, stage: StageConfig = TARGET_STAGE, training: TrainingConfig = TARGET_TRAINING,
             progress: bool | None = None) -> dict[str, float]:
    """Fine-tune ``model_cfg`` (weights as it says) densely on the target domain; last epoch's metrics."""
    seed_everything(training.seed)
    model = build_model(model_cfg, num_classes=5)
    train_loader, val_loader, _ = build_loaders(DataConfig(kind="digits"), model, training.batch_size, training.seed)
    return train_stage(model, train_loader, val_loader, stage, training, progress=progress)[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p3b_search.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=TARGET_STAGE.epochs, help="target fine-tuning epochs")
    parser.add_argument("--cache-dir", default=None, help="pretrained-weights cache (default $P3B_CACHE_DIR or ~/.cache/p3b_search)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the tiny ViT's matrices are too small to gain from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("p3b_search").setLevel(logging.INFO)
    progress = False if args.no_progress else None
    stage = TARGET_STAGE.model_copy(update={"epochs": args.epochs})

    if args.cache_dir:
        os.environ[CACHE_ENV] = args.cache_dir  # build_model's "source-pretrained" reads it too
    started = time.perf_counter()
    weights = source_pretrained_weights(DIGITS_VIT)
    source = source_metrics(weights)
    print(f"source domain (digits 0-4) val top-1: {source['top1']:.2f}%  [{weights}]")
    pretrained = transfer(DIGITS_VIT, stage, progress=progress)
    print(f"target domain (digits 5-9) val top-1, dense fine-tune of the source-pretrained ViT: {pretrained['top1']:.2f}%")
    scratch = transfer(DIGITS_VIT.model_copy(update={"weights": None}), stage, progress=progress)
    print(f"target domain (digits 5-9) val top-1, same recipe from random init:                {scratch['top1']:.2f}%")
    print(f"({stage.epochs} epochs each, {time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    main()
