"""The MLP training behind :func:`tests.search_objective.run_trial` (see that module): it imports
torch, which the study driver, importing the objective module, then does not."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from p3b_search.config import TrialConfig
from p3b_search.method_specs import method_spec
from p3b_search.reporting import TrialReporter

HIDDEN = 32


def _digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:1400], order[1400:]
    return x[train], y[train], x[val], y[val]


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _shrink(model: nn.Sequential, keep: int) -> nn.Sequential:
    """Keep the ``keep`` hidden units of largest weight L1 norm."""
    fc1, fc2 = model[0], model[2]
    score = fc1.weight.detach().abs().sum(1) + fc2.weight.detach().abs().sum(0)
    kept = score.topk(keep).indices.sort().values
    small = _mlp(keep)
    with torch.no_grad():
        small[0].weight.copy_(fc1.weight[kept])
        small[0].bias.copy_(fc1.bias[kept])
        small[2].weight.copy_(fc2.weight[:, kept])
        small[2].bias.copy_(fc2.bias)
    return small


def _cost(hidden: int) -> dict[str, float]:
    """``macs``, ``kept_params`` and ``keep_ratio`` of the MLP with ``hidden`` hidden units."""
    params = 64 * hidden + hidden + hidden * 10 + 10
    return {"macs": float(64 * hidden + hidden * 10), "kept_params": float(params),
            "keep_ratio": params / (64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10)}


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


def log_attempt(study_root: Path, workdir: Path, event: str) -> None:
    with open(study_root / "attempts.log", "a") as log:
        log.write(f"{int(Path(workdir).name)} {os.getpid()} {event} {time.time():.3f}\n")


def train_trial(config: TrialConfig, reporter: TrialReporter, workdir: Path,
                resume_from: Path | None = None) -> dict[str, float]:
    """``run_trial`` of :mod:`tests.search_objective` (see its docstring)."""
    torch.manual_seed(config.training.seed)
    knobs = method_spec(config.method).config_cls(**config.method_config)
    alpha = getattr(knobs, "alpha", 0.5)
    keep = max(1, round((1 - knobs.prune_ratio) * HIDDEN))
    study_root = Path(workdir).parent.parent
    pause = float((study_root / "epoch-seconds").read_text()) if (study_root / "epoch-seconds").exists() else 0.0
    (Path(workdir) / "pid").write_text(str(os.getpid()))
    log_attempt(study_root, workdir, "start")
    x, y, xv, yv = _digits()
    prune_epochs, total = config.training.prune.epochs, config.training.prune.epochs + config.training.finetune.epochs
    model, start = _mlp(HIDDEN), 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / "state.pt")
        model = _mlp(state["hidden"])
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
    finetune_lr = config.training.finetune.lr * 2 * alpha
    optimizer = torch.optim.Adam(model.parameters(), lr=config.training.prune.lr if start < prune_epochs else finetune_lr)
    if resume_from is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    checkpoint = Path(workdir) / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    for epoch in range(start, total):
        if epoch == prune_epochs:
            reporter.report_allocations([{"step": epoch * 10, "layer": 0, "kind": "mlp",
                                          "keep_ratio": keep / HIDDEN, "final": True}])
            model = _shrink(model, keep)
            optimizer = torch.optim.Adam(model.parameters(), lr=finetune_lr)
        if epoch == 0 and (study_root / f"oom-{int(Path(workdir).name)}").exists():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        losses = []
        for batch in torch.randperm(len(y)).split(config.training.batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not math.isfinite(sum(losses)):
            raise FloatingPointError(f"training loss became {sum(losses) / len(losses)} in epoch {epoch}: "
                                     "lower the stage lr")
        time.sleep(pause)
        kept_units = model[0].out_features
        if epoch < prune_epochs:
            ramp = 1 - (1 - keep / HIDDEN) * (epoch + 1) / max(1, prune_epochs)
            reporter.report_allocations([{"step": epoch * 10 + 9, "layer": 0, "kind": "mlp", "keep_ratio": ramp}])
            kept_units = round(ramp * HIDDEN)  # what the epoch's keep ratio would keep
        torch.save({"model": model.state_dict(), "hidden": model[0].out_features, "epoch": epoch,
                    "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, checkpoint / "state.pt")
        with open(Path(workdir) / "epochs.log", "a") as log:
            log.write(f"{epoch}\n")
        log_attempt(study_root, workdir, "epoch")
        marker = study_root / f"fail-once-{int(Path(workdir).name)}"
        reporter.report_epoch({"epoch": float(epoch), "stage": float(epoch >= prune_epochs), "loss": 0.0,
                               "top1": _top1(model, xv, yv), **_cost(kept_units)}, checkpoint)
        if epoch == 1 and marker.exists():
            marker.unlink()
            raise RuntimeError("injected failure after epoch 1")
    params = float(sum(p.numel() for p in model.parameters()))
    objectives = {"top1": _top1(model, xv, yv), "top5": 100.0, "macs": float(64 * keep + keep * 10),
                  "params": params, "kept_fraction": params / sum(p.numel() for p in _mlp(HIDDEN).parameters())}
    reporter.report_final(objectives)
    log_attempt(study_root, workdir, "end")
    return objectives
