"""P3B's training overhead: time per training step with its auxiliary heads, gates and mask
updates vs plain fine-tuning (method ``dense``) of the same model on the same data.

    python -m benchmarks.p3b_overhead                                   # DIGITS_VIT, P3B defaults vs dense
    python -m benchmarks.p3b_overhead --model deit_tiny --threads 2     # deit_tiny at 224 px, batch 16
    python -m benchmarks.p3b_overhead --variant default: --variant full:aux_batch_fraction=1,aux_every=1
    python -m benchmarks.p3b_overhead --profile default:                # torch.profiler table of P3B steps

Models: ``digits`` is the source-pretrained :data:`p3b_search.models.DIGITS_VIT` on the digits
target domain (batch 64, 11 steps per epoch); ``deit_tiny`` / ``deit_small`` are
``deit_{tiny,small}_patch16_224`` at 224 px (random init, batch 16 / 64) on synthetic images,
``--steps`` steps per epoch. ``--device cuda`` trains under bf16 autocast, as trials do there.

Each ``--variant NAME:KEY=VALUE,...`` is P3B with those knobs over the quickstart's (mask update
every 3 steps, prune ratio 0.5, pruning from step 0, so every timed step carries the whole
method); the default is one variant, ``default:`` (P3B's defaults). Each repeat builds the model,
prepares the method as ``objectives.prune_finetune.run_trial`` does and runs its prune stage
(``p3b_search.training.loop.train_stage``) for ``--epochs`` epochs; the validation set is one
image, so the time is training (forward, task + method losses, backward, optimizer step, the
method's hooks and mask updates). Within a repeat the runs alternate (dense first on even
repeats, last on odd ones), so load drifts hit every side alike; the figure per side is the
median seconds per step over repeats, and its ratio to dense.
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.methods import get_method
from p3b_search.models import DIGITS_VIT, create_timm_model
from p3b_search.training.build import build_model
from p3b_search.training.loop import train_stage
from p3b_search.training.rng import seed_everything

QUICKSTART_P3B = {"prune_steps_update_mask": 3, "prune_ratio": 0.5, "prune_start_epoch": 0.0}
DEIT_TINY = ModelConfig(name="deit_tiny_patch16_224")
DEIT_SMALL = ModelConfig(name="deit_small_patch16_224")
SYNTHETIC_CLASSES = 10


@dataclass(frozen=True)
class Workload:
    """A model and its data: ``model`` (ModelConfig), ``batch_size``, and how to build loaders."""

    name: str
    model: ModelConfig
    batch_size: int

    def loaders(self, seed: int, steps: int) -> tuple[DataLoader, DataLoader, int]:
        """Train loader, a one-image validation loader, and the number of classes."""
        if self.name == "digits":
            with torch.device("meta"):
                probe = create_timm_model(self.model, 2)
            train, val, classes = build_loaders(DataConfig(kind="digits"), probe, self.batch_size, seed)
            return train, DataLoader(Subset(val.dataset, [0]), batch_size=1), classes
        gen = torch.Generator().manual_seed(seed)
        size = self.model.overrides.get("img_size", 224)
        images = torch.randn(steps * self.batch_size, 3, size, size, generator=gen)
        labels = torch.randint(SYNTHETIC_CLASSES, (len(images),), generator=gen)
        data = TensorDataset(images, labels)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True), DataLoader(Subset(data, [0])), SYNTHETIC_CLASSES

    def build(self, classes: int) -> torch.nn.Module:
        return build_model(self.model, classes) if self.name == "digits" else create_timm_model(self.model, classes)


WORKLOADS = {"digits": Workload("digits", DIGITS_VIT, 64), "deit_tiny": Workload("deit_tiny", DEIT_TINY, 16),
             "deit_small": Workload("deit_small", DEIT_SMALL, 64)}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, P3B knobs over the quickstart's)."""
    name, _, knobs = text.partition(":")
    options: dict[str, Any] = dict(QUICKSTART_P3B)
    for item in filter(None, knobs.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    return name, options


def seconds_per_step(workload: Workload, knobs: dict[str, Any] | None, epochs: int, steps: int, seed: int = 0,
                     device: str = "cpu") -> float:
    """Median over epochs of the prune stage's seconds per step: P3B with ``knobs``, or dense (None)."""
    seed_everything(seed)
    train, val, classes = workload.loaders(seed, steps)
    name = "dense" if knobs is None else "p3b"
    method_cls = get_method(name)
    method = method_cls(method_cls.spec.config_cls(**(knobs or {})), num_classes=classes, epochs=epochs,
                        steps_per_epoch=len(train))
    model = workload.build(classes)
    method.prepare(model)
    training = TrainingConfig(prune=StageConfig(epochs=epochs, lr=1e-3, schedule="constant"),
                              finetune=StageConfig(epochs=1), batch_size=workload.batch_size, device=device, amp=True)
    history = train_stage(model, train, val, training.prune, training, method, progress=False)
    return statistics.median(h["epoch_seconds"] for h in history) / len(train)


def profile(workload: Workload, knobs: dict[str, Any], epochs: int, steps: int, device: str) -> None:
    """torch.profiler's top operators (self CPU time) over P3B's prune stage."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    seconds_per_step(workload, knobs, 1, steps, device=device)  # warm-up (caches, first-call costs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, with_stack=False) as prof:
        seconds_per_step(workload, knobs, epochs, steps, device=device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...",
                        help="a P3B variant to time against dense (repeatable; default 'default:')")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per side (default 5)")
    parser.add_argument("--epochs", type=int, default=2, help="prune-stage epochs per run (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="steps per epoch on synthetic data (deit_tiny)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray trial)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: bf16 autocast, as trials run)")
    parser.add_argument("--profile", metavar="NAME:KEY=VALUE,...", help="print a torch.profiler table instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.model]
    if args.profile:
        profile(workload, parse_variant(args.profile)[1], args.epochs, args.steps, args.device)
        return
    sides: dict[str, dict[str, Any] | None] = dict(parse_variant(v) for v in args.variant or ["default:"])
    sides["dense"] = None
    for knobs in sides.values():
        seconds_per_step(workload, knobs, 1, args.steps, device=args.device)  # warm-up: caches, allocator, first calls
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 else list(sides)[::-1]
        for name in order:
            times[name].append(seconds_per_step(workload, sides[name], args.epochs, args.steps, seed=repeat,
                                                device=args.device))
        one, five, _ = os.getloadavg()
        line = ", ".join(f"{name} {times[name][-1] * 1e3:.1f}" for name in sides)
        print(f"repeat {repeat}: ms/step {line} (load {one:.2f}/{five:.2f})", flush=True)
    dense = statistics.median(times["dense"])
    print(f"{args.model}, batch {workload.batch_size}, {args.device}, {args.threads} CPU thread(s), "
          f"median of {args.repeats} repeats:")
    print("| side | knobs | ms/step | ratio to dense (median; range per repeat) |\n|---|---|---|---|")
    for name, knobs in sides.items():
        ratios = [t / d for t, d in zip(times[name], times["dense"])]
        shown = "" if knobs is None else ", ".join(f"{k}={v}" for k, v in knobs.items() if k not in QUICKSTART_P3B)
        print(f"| {name} | {shown} | {statistics.median(times[name]) * 1e3:.1f} | "
              f"{statistics.median(times[name]) / dense:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
