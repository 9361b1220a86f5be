"""The first front a new user sees: does pruning pay in the quickstart?

    python benchmarks/quickstart_first_front.py run --seeds 0 1 2 --folder /tmp/qs    # runs the studies
    python benchmarks/quickstart_first_front.py table                                  # from the raw data

``run`` runs ``studies/quickstart.yaml`` once per sampler seed (only the seed changed; a finished
study is read, not run again), with its wall time, and writes every COMPLETE trial to
``benchmarks/results/quickstart_first_front.parquet``. ``table`` reads that file and prints, per
sampler seed, the most accurate trial at <= ``--max-macs`` of the dense model's MACs and its
distance to the dense reference of the study file (``dense_reference.top1``, measured with the
quickstart's own recipe), against the goal: within ``--points`` of it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmarks.study_variants import QUICKSTART, REPO, load_line, run_search, write_variant
from p3b_search.study.trials_table import COMPLETE, STATE

RAW = REPO / "benchmarks" / "results" / "quickstart_first_front.parquet"
COLUMNS = ["number", "method", "param.method_config.prune_ratio", "param.method_config.prune_start_epoch",
           "param.method_config.prune_steps_update_mask", "param.method_config.alpha", "param.method_config.gamma",
           "top1", "macs", "kept_fraction", "duration_s"]


def run(seeds: list[int], folder: Path) -> None:
    from p3b_search.study.dense import dense_cost
    from p3b_search.study.loading import load_study
    from p3b_search.study.results import read_trials

    frames = []
    for seed in seeds:
        study_file = write_variant(QUICKSTART, folder, f"quickstart-s{seed}", sampler={"name": "tpe", "seed": seed})
        study = load_study(study_file)
        before = load_line()
        wall = float("nan") if study.layout.trials_table.is_file() else run_search(study_file)
        print(f"sampler seed {seed}: {wall:.0f} s wall ({before} before, {load_line()} after)")
        trials = read_trials(study.layout)
        done = trials[trials[STATE] == COMPLETE][COLUMNS].copy()
        done["macs_fraction"] = done["macs"] / dense_cost(study)["macs"]
        frames.append(done.assign(sampler_seed=seed, dense_top1=study.dense_reference.top1, study_wall_s=wall))
    pd.concat(frames, ignore_index=True).to_parquet(RAW, index=False)


def table(max_macs: float, points: float) -> str:
    trials = pd.read_parquet(RAW)
    lines = [f"| sampler seed | trials | at <= {max_macs:g} of the dense MACs | best there: top-1 % (MACs fraction, "
             f"prune ratio) | dense top-1 % | difference | within {points:g} points |", "|---|---|---|---|---|---|---|"]
    for seed, group in trials.groupby("sampler_seed"):
        cheap = group[group["macs_fraction"] <= max_macs]
        dense = float(group["dense_top1"].iloc[0])
        if cheap.empty:
            lines.append(f"| {seed} | {len(group)} | 0 | - | {dense:.1f} | - | no |")
            continue
        best = cheap.loc[cheap["top1"].idxmax()]
        difference = best["top1"] - dense
        lines.append(f"| {seed} | {len(group)} | {len(cheap)} | {best['top1']:.2f} ({best['macs_fraction']:.3f}, "
                     f"{best['param.method_config.prune_ratio']:.3f}) | {dense:.1f} | {difference:+.2f} | "
                     f"{'yes' if difference >= -points else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run the quickstart once per sampler seed")
    runner.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runner.add_argument("--folder", type=Path, required=True, help="where the study folders go")
    tabler = commands.add_parser("table", help="the table from the committed raw data")
    tabler.add_argument("--max-macs", type=float, default=0.5, help="fraction of the dense model's MACs")
    tabler.add_argument("--points", type=float, default=2.0, help="allowed top-1 loss against dense, in points")
    args = parser.parse_args()
    if args.command == "run":
        run(args.seeds, args.folder)
    print(table(getattr(args, "max_macs", 0.5), getattr(args, "points", 2.0)))


if __name__ == "__main__":
    main()
