"""P3B's training overhead: time per training step with its auxiliary heads, gates and mask
updates vs plain fine-tuning (method ``dense``) of the same model on the same data.

    python -m benchmarks.p3b_overhead                          # DIGITS_VIT, quickstart's P3B knobs
    python -m benchmarks.p3b_overhead --repeats 9 --epochs 3 --threads 2
    python -m benchmarks.p3b_overhead --profile p3b            # torch.profiler table of P3B steps

Each repeat builds the source-pretrained digits ViT (:data:`p3b_search.models.DIGITS_VIT`),
prepares the method as ``objectives.prune_finetune.run_trial`` does and runs its prune stage
(``p3b_search.training.loop.train_stage``) for ``--epochs`` epochs; the validation set is cut
to one image so the time is training (forward, task + method losses, backward, optimizer step,
the method's hooks and mask updates). P3B prunes from step 0 (``prune_start_epoch 0``), so
every timed step carries the whole method. Methods alternate within each repeat (load drifts
hit both alike); the figure is the median seconds per step and the ratio p3b / dense.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch.utils.data import DataLoader, Subset

from p3b_search.config import DataConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.methods import get_method
from p3b_search.models import DIGITS_VIT, build_model, create_timm_model
from p3b_search.training.loop import train_stage
from p3b_search.training.rng import seed_everything

QUICKSTART_P3B = {"prune_steps_update_mask": 3, "prune_ratio": 0.5, "prune_start_epoch": 0.0}


def loaders(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader, int]:
    """The digits target-domain train loader, and a one-image validation loader."""
    with torch.device("meta"):
        probe = create_timm_model(DIGITS_VIT, 2)
    train, val, classes = build_loaders(DataConfig(kind="digits"), probe, batch_size, seed)
    return train, DataLoader(Subset(val.dataset, [0]), batch_size=1), classes


def method_and_model(name: str, classes: int, epochs: int, steps: int):
    config_cls = get_method(name).config_cls
    options = QUICKSTART_P3B if name == "p3b" else {}
    method = get_method(name)(config_cls(**options), num_classes=classes, epochs=epochs, steps_per_epoch=steps)
    model = build_model(DIGITS_VIT, classes)
    method.prepare(model)
    return method, model


def seconds_per_step(name: str, epochs: int, batch_size: int, seed: int = 0) -> float:
    """Median over epochs of the prune stage's seconds per training step for method ``name``."""
    seed_everything(seed)
    train, val, classes = loaders(batch_size, seed)
    method, model = method_and_model(name, classes, epochs, len(train))
    training = TrainingConfig(prune=StageConfig(epochs=epochs, lr=1e-2, schedule="constant"),
                              finetune=StageConfig(epochs=1), batch_size=batch_size, device="cpu")
    history = train_stage(model, train, val, training.prune, training, method, progress=False)
    return statistics.median(h["epoch_seconds"] for h in history) / len(train)


def profile(name: str, epochs: int, batch_size: int) -> None:
    """torch.profiler's top operators (self CPU time) over the prune stage of ``name``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    seconds_per_step(name, 1, batch_size)  # warm-up (the source-pretraining cache, first-call costs)
    with torch_profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
        seconds_per_step(name, epochs, batch_size)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per method (default 5)")
    parser.add_argument("--epochs", type=int, default=2, help="prune-stage epochs per run (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray trial)")
    parser.add_argument("--methods", nargs=2, default=["p3b", "dense"], metavar=("METHOD", "BASELINE"))
    parser.add_argument("--profile", metavar="METHOD", help="print a torch.profiler table for METHOD instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile, args.epochs, args.batch_size)
        return
    method, baseline = args.methods
    seconds_per_step(method, 1, args.batch_size)  # warm-up: caches, allocator, first-call costs
    times: dict[str, list[float]] = {method: [], baseline: []}
    for repeat in range(args.repeats):
        for name in (method, baseline) if repeat % 2 == 0 else (baseline, method):
            times[name].append(seconds_per_step(name, args.epochs, args.batch_size, seed=repeat))
        one, five, _ = os.getloadavg()
        print(f"repeat {repeat}: {method} {times[method][-1] * 1e3:.1f} ms/step, {baseline} "
              f"{times[baseline][-1] * 1e3:.1f} ms/step (load {one:.2f}/{five:.2f})", flush=True)
    m, b = statistics.median(times[method]), statistics.median(times[baseline])
    print(f"DIGITS_VIT, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats}: "
          f"{method} {m * 1e3:.1f} ms/step, {baseline} {b * 1e3:.1f} ms/step, ratio {method}/{baseline} = {m / b:.3f}")


if __name__ == "__main__":
    main()
