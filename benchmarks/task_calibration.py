"""Is an embedded transfer task hard enough to rank pruning methods? (the evidence the task needs)

    python -m benchmarks.task_calibration --task glyphs --seeds 5            # full check
    python -m benchmarks.task_calibration --task glyphs --seeds 2 --prune-epochs 3 --finetune-epochs 2
    python -m benchmarks.task_calibration --from-parquet benchmarks/results/glyphs_calibration_pilot.parquet

Runs, with the task's model and one recipe, through ``objectives.prune_finetune.run_trial``:

* dense transfer from the source pretraining, ``--seeds`` seeds: top-1 mean and seed std;
* dense training from random init, same recipe and seeds: the transfer gain (points, 95 % CI);
* the structured methods at ``--ratio`` (default 0.75): their spread (max - min of the method
  means) against the pooled seed std of those methods.

Trials run in ``--workers`` processes with one thread each. Writes ``<out>/<name>.parquet``
(one row per trial) and ``<out>/<name>.md`` (the figures and the command).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

STRUCTURED = ("p3b", "uniform-magnitude", "global-taylor", "dimap-structured", "s2vite")


def task_model(task: str):
    from p3b_search.models import DIGITS_VIT, GLYPHS_VIT

    return GLYPHS_VIT if task == "glyphs" else DIGITS_VIT


def trial_config(args: argparse.Namespace, method: str, seed: int, weights: str | None):
    from p3b_search.config import DataConfig, StageConfig, TrainingConfig, TrialConfig

    knobs: dict[str, Any] = {} if method == "dense" else {"prune_ratio": args.ratio}
    if method in ("p3b", "global-taylor"):
        knobs["prune_steps_update_mask"] = args.update_every
    if method in ("svite", "s2vite"):
        knobs["update_interval"] = args.update_every
    training = TrainingConfig(
        prune=StageConfig(epochs=args.prune_epochs, lr=args.lr, schedule="constant"),
        finetune=StageConfig(epochs=args.finetune_epochs, lr=args.lr, schedule="cosine"),
        batch_size=args.batch_size, seed=seed, device="cpu", amp=False,
    )
    model = task_model(args.task).model_copy(update={"weights": weights})
    return TrialConfig(model=model, data=DataConfig(kind=args.task), training=training, method=method,
                       method_config=knobs)


def run_one(job: tuple[argparse.Namespace, str, int, str | None]) -> dict[str, Any]:
    import torch

    from objectives.prune_finetune import run_trial
    from p3b_search.reporting import TrialReporter

    torch.set_num_threads(1)
    args, method, seed, weights = job
    reporter = TrialReporter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        result = run_trial(trial_config(args, method, seed, weights), reporter, Path(workdir))
    return {"method": method, "init": "source" if weights else "random", "seed": seed, "top1": result["top1"],
            "params": result["params"], "seconds": time.perf_counter() - started}


def figures(rows: pd.DataFrame, ratio: float) -> str:
    """The calibration figures and the per-method table of the trial ``rows`` (one per trial, as
    in ``<name>.parquet``), the structured methods at prune ratio ``ratio``."""
    from benchmarks.method_separation import separation
    from p3b_search.stats import paired_difference

    dense = rows[(rows.method == "dense") & (rows.init == "source")].sort_values("seed")
    scratch = rows[(rows.method == "dense") & (rows.init == "random")].sort_values("seed")
    gain = paired_difference(dict(zip(dense.seed, dense.top1)), dict(zip(scratch.seed, scratch.top1)))
    pruned = rows[rows.method.isin(STRUCTURED)]
    lines = [
        f"* dense transfer top-1: {dense.top1.mean():.2f} % (seed std {dense.top1.std(ddof=1):.2f})",
        f"* dense from random init: {scratch.top1.mean():.2f} % (seed std {scratch.top1.std(ddof=1):.2f})",
        f"* transfer gain: {gain.mean:.2f} points (95 % CI [{gain.low:.2f}, {gain.high:.2f}], paired by seed)",
    ]
    if pruned.method.nunique() > 1:
        _, found = separation(pruned.assign(prune_ratio=ratio), ratio)
        spread, pooled = found["spread"], found["pooled_std"]
        lines.append(f"* structured methods at p = {ratio:g}: spread of the means {spread:.2f} points, pooled "
                     f"seed std {pooled:.2f}: spread / std = {spread / pooled:.1f}")
    lines += [
        "",
        "| method | init | top-1 % mean | seed std | n | seconds / trial |",
        "|---|---|---|---|---|---|",
    ]
    for (method, init), group in rows.groupby(["method", "init"], sort=False):
        lines.append(f"| {method} | {init} | {group.top1.mean():.2f} | {group.top1.std(ddof=1):.2f} | {len(group)} "
                     f"| {group.seconds.mean():.0f} |")
    return "\n".join(lines) + "\n"


def report(rows: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    """``<name>.md``: the command, its wall time (``seconds``), the recipe, then :func:`figures`."""
    seeds = sorted(rows[(rows.method == "dense") & (rows.init == "source")].seed.tolist())
    lines = [
        f"# {args.task} task calibration\n",
        f"Command: `python {' '.join(sys.argv)}` ({seconds / 60:.1f} min wall, {args.workers} workers x 1 thread)\n",
        (f"Recipe: {args.prune_epochs} prune + {args.finetune_epochs} fine-tune epochs, base LR {args.lr:g} per "
         f"512 images, batch {args.batch_size}, mask update every {args.update_every} steps; seeds {seeds}.\n"),
    ]
    return "\n".join(lines) + "\n" + figures(rows, args.ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("glyphs", "digits"), default="glyphs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--methods", nargs="*", default=list(STRUCTURED), help="pruned methods at --ratio "
                        "(none: only dense transfer vs dense from random init)")
    parser.add_argument("--prune-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2, help="base LR per 512 images, both stages")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--update-every", type=int, default=8, help="mask update period (steps)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--from-parquet", type=Path, default=None, metavar="PATH",
                        help="train nothing: print the figures and the table of the trials an earlier run wrote "
                             "(its command and wall time are in its .md only)")
    args = parser.parse_args()
    if args.from_parquet is not None:
        print(figures(pd.read_parquet(args.from_parquet), args.ratio), end="")
        return
    from p3b_search.models import SOURCE_PRETRAINED

    jobs = [(args, "dense", s, SOURCE_PRETRAINED) for s in range(args.seeds)]
    jobs += [(args, "dense", s, None) for s in range(args.seeds)]
    jobs += [(args, m, s, SOURCE_PRETRAINED) for m in args.methods for s in range(args.seeds)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = []
        for done, row in enumerate(pool.imap_unordered(run_one, jobs), 1):
            rows.append(row)
            print(f"[{done}/{len(jobs)}] {row['method']} ({row['init']}) seed {row['seed']}: "
                  f"{row['top1']:.2f} % in {row['seconds']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    name = args.name or f"{args.task}_calibration"
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out / f"{name}.parquet", index=False)
    text = report(table, args, time.perf_counter() - started)
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
