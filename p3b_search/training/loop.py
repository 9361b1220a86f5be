"""The training loop of one stage and top-1/top-5 evaluation.

One stage = AdamW (no weight decay on biases, norms, position embeddings and class/dist
tokens, as timm groups them) + the method's extra parameter groups, LR scaled by the effective
batch (see :mod:`p3b_search.training.schedule`, stepped per optimizer update), label smoothing
or timm mixup/cutmix, gradient accumulation, bf16 autocast on CUDA, and the method's hooks in
the order documented in :mod:`p3b_search.methods.hooks`. After each epoch:
``hooks.on_epoch_end`` -> evaluation -> full-state checkpoint -> ``on_epoch_end`` callback.

Reproducibility: call :func:`~p3b_search.training.rng.seed_everything` before building the
model and loaders. A run resumed from the checkpoint of epoch ``e`` continues with the same
model, optimizer, schedule, method state, RNG state and batch order, so it ends bit-identical
to an uninterrupted run on the same device with the same number of CPU threads (float sums
depend on it) — on CUDA up to the nondeterminism of some kernels.

Data parallel: under ``torch.distributed`` (see :mod:`p3b_search.distributed`) every rank runs
this loop on its shard of the data; the ranks start each stage from rank 0's state, average
gradients before every optimizer update and sum the validation counts, so they stay one model.
Only rank 0 writes the checkpoint.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from p3b_search.config import StageConfig, TrainingConfig
from p3b_search.distributed import (
    average_across_ranks,
    average_gradients,
    broadcast_state,
    rank_and_world,
    sum_across_ranks,
)
from p3b_search.methods.hooks import StepInfo, TrainingHooks
from p3b_search.training.checkpoint import load_checkpoint, save_checkpoint
from p3b_search.training.rng import rng_state, set_rng_state
from p3b_search.training.schedule import build_scheduler, scaled_lr

EpochCallback = Callable[[int, dict[str, float], "Path | None"], None]


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; a CUDA request without CUDA fails in one line."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device={spec!r} but CUDA is not available here: use 'auto' or 'cpu'")
    return device


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, extra_groups: Iterable[dict[str, Any]] = ()
) -> torch.optim.Optimizer:
    """AdamW over ``model`` (timm's weight-decay grouping) plus ``extra_groups``.

    An extra group without ``"lr"`` gets ``lr * group.get("lr_scale", 1)``; its parameters are
    taken out of the model's groups if the model also holds them.
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    extra = []
    for group in extra_groups:
        group = dict(group, params=list(group["params"]))
        group.setdefault("lr", lr * group.get("lr_scale", 1.0))
        extra.append(group)
    taken = {id(p) for group in extra for p in group["params"]}
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay):
        params = [p for p in group["params"] if id(p) not in taken]
        if params:
            groups.append(dict(group, params=params))
    return create_optimizer_v2(groups + extra, opt="adamw", lr=lr, weight_decay=weight_decay)


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def _logits(outputs: Any) -> torch.Tensor:
    """Class logits from a model output (the first element of a tuple, e.g. distilled heads)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device | None = None, amp: bool = True) -> dict[str, float]:
    """``{"top1", "top5"}`` in percent and ``"loss"`` (mean cross-entropy) over ``loader``.
    top-5 is top-min(5, classes). ``device`` defaults to the model's. Under ``torch.distributed``
    the counts are summed over the ranks (each evaluates its shard of the set)."""
    device = device or next(model.parameters()).device
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with _autocast(device, amp):
            logits = _logits(model(inputs)).float()
        ks = (1, min(5, logits.shape[1]))
        hits = _topk_correct(logits, targets, ks)
        sums += torch.stack([nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                             *(h.double() for h in hits), torch.tensor(targets.shape[0], dtype=sums.dtype, device=device)])
    loss, top1, top5, count = sum_across_ranks(sums).tolist()  # each rank evaluated its shard
    if count == 0:
        raise ValueError("evaluate: the validation loader yielded no samples")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count}


@dataclass
class _Stage:
    """What one epoch of training needs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hooks: TrainingHooks
    criterion: nn.Module
    mixup: Any
    device: torch.device
    amp: bool
    grad_accum: int
    progress: bool
    epoch_offset: int


def _train_epoch(run: _Stage, loader: DataLoader, epoch: int) -> dict[str, float]:
    """One epoch of micro-batches; returns the mean task loss and the LR of the last update.
    Fails if the total loss (task + method) is not finite."""
    run.model.train()
    steps = len(loader)
    loss_sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # task loss, task + method loss
    last_lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.zero_grad(set_to_none=True)
    batches = tqdm(loader, desc=f"epoch {run.epoch_offset + epoch}", leave=False, disable=not run.progress)
    for i, (inputs, targets) in enumerate(batches):
        inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if run.mixup is not None:
            inputs, targets = run.mixup(inputs, targets)
        window_start = i - i % run.grad_accum
        window = min(run.grad_accum, steps - window_start)  # the last window of an epoch may be shorter
        info = StepInfo(step=epoch * steps + i, epoch=epoch, steps_per_epoch=steps,
                        optimizer_step=i - window_start + 1 == window)
        with _autocast(run.device, run.amp):
            outputs = run.model(inputs)
            task_loss = run.criterion(_logits(outputs), targets)
            extra = run.hooks.extra_loss(info, inputs, targets, outputs)
        loss = task_loss if extra is None else task_loss + extra
        (loss / window).backward()
        run.hooks.after_backward(info)
        if info.optimizer_step:
            last_lr = run.optimizer.param_groups[0]["lr"]
            average_gradients(_optimized(run.optimizer))
            run.optimizer.step()
            run.scheduler.step()
            run.hooks.after_optimizer_step(info)
            run.optimizer.zero_grad(set_to_none=True)
        loss_sums += torch.stack((task_loss.detach(), loss.detach())).double()
    train_loss, total_loss = (average_across_ranks(loss_sums) / steps).tolist()  # all ranks fail alike
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"training loss became {total_loss} in epoch {epoch}: lower the stage lr")
    return {"train_loss": train_loss, "lr": last_lr}


def _optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` updates, in its group order (the same on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"{type(model).__name__} has no num_classes attribute: mixup/cutmix needs it")
    return classes


def _criterion_and_mixup(model: nn.Module, training: TrainingConfig) -> tuple[nn.Module, Any]:
    if training.mixup > 0 or training.cutmix > 0:
        if training.batch_size % 2:
            raise ValueError(f"training.mixup/cutmix need an even training.batch_size, got {training.batch_size}")
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=training.mixup, cutmix_alpha=training.cutmix,
                      label_smoothing=training.label_smoothing, num_classes=_num_classes(model))
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=training.label_smoothing), None


def _restore(run: _Stage, state: dict[str, Any], stage: StageConfig, loader: DataLoader, source: Path) -> None:
    expected = {"epochs": stage.epochs, "steps_per_epoch": len(loader), "grad_accum": run.grad_accum}
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"checkpoint {source} was written with {key}={state.get(key)}, this stage has {value}: "
                "resume with the configuration that wrote it"
            )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.hooks.load_state_dict(state["hooks"])
    if state.get("sampler_seed") is not None and hasattr(loader.sampler, "seed"):
        loader.sampler.seed = state["sampler_seed"]


def train_stage(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    stage: StageConfig,
    training: TrainingConfig,
    hooks: TrainingHooks | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    epoch_offset: int = 0,
    progress: bool | None = None,
    report_resumed: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``stage.epochs`` epochs; returns one metrics dict per epoch.

    Metrics: ``epoch`` (``epoch_offset`` + stage epoch, 0-based), ``train_loss``, ``lr`` (of the
    epoch's last update, first parameter group), validation ``top1``/``top5`` (percent) and
    ``loss``, the hooks' ``on_epoch_end`` metrics, and ``epoch_seconds``. With ``checkpoint_dir``
    a full-state checkpoint is written there after every epoch, before ``on_epoch_end(epoch,
    metrics, checkpoint_dir)`` is called. ``resume_from`` (such a folder) continues after the
    epoch it holds; the returned list then includes the earlier epochs' metrics, and with
    ``report_resumed`` they are passed to ``on_epoch_end`` first (with no folder: they are not
    this run's checkpoints), e.g. for a prefix another trial trained.
    ``progress``: tqdm bars (default: only when stderr is a terminal).
    """
    hooks = hooks or TrainingHooks()
    device = resolve_device(training.device)
    model.to(device)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError("the training loader yields no batches: lower training.batch_size or add data")
    updates_per_epoch = math.ceil(steps / training.grad_accum)
    optimizer = build_optimizer(model, scaled_lr(stage.lr, training), training.weight_decay, hooks.param_groups())
    criterion, mixup = _criterion_and_mixup(model, training)
    run = _Stage(
        model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, stage, updates_per_epoch),
        hooks=hooks, criterion=criterion, mixup=mixup, device=device, amp=training.amp,
        grad_accum=training.grad_accum, progress=sys.stderr.isatty() if progress is None else progress,
        epoch_offset=epoch_offset,
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    rng_to_restore = None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _restore(run, state, stage, train_loader, Path(resume_from))
        history, start_epoch, rng_to_restore = list(state["history"]), state["epoch"] + 1, state["rng"]
    hooks.on_train_start(model, optimizer)
    broadcast_state([model], _optimized(optimizer))  # data-parallel ranks start as rank 0
    if report_resumed and on_epoch_end is not None:
        for metrics in history:
            on_epoch_end(int(metrics["epoch"]), metrics, None)
    if rng_to_restore is not None:  # last, so nothing above shifts the random streams
        set_rng_state(rng_to_restore)

    for epoch in range(start_epoch, stage.epochs):
        started = time.perf_counter()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        metrics: dict[str, float] = {"epoch": float(epoch_offset + epoch), **_train_epoch(run, train_loader, epoch)}
        metrics.update(hooks.on_epoch_end(epoch))
        broadcast_state([model])  # buffers that each rank updated alone, e.g. BatchNorm statistics
        metrics.update(evaluate(model, val_loader, device=device, amp=training.amp))
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append(metrics)
        if checkpoint_dir is not None and rank_and_world()[0] == 0:
            save_checkpoint(
                {
                    "epoch": epoch, "epochs": stage.epochs, "steps_per_epoch": steps,
                    "grad_accum": training.grad_accum,
                    "sampler_seed": getattr(train_loader.sampler, "seed", None),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "hooks": hooks.state_dict(),
                    "rng": rng_state(), "history": history,
                },
                checkpoint_dir,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch_offset + epoch, metrics, checkpoint_dir)
    return history
