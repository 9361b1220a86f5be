"""Where the driver's memory grows with the trials: a study of the test objective run in this
process under ``tracemalloc``, its Python allocations compared between two trial counts.

    python -m benchmarks.driver_memory --trials 140 --marks 30 130

The study is :mod:`benchmarks.driver_scaling`'s (the quickstart with the small test objective,
concurrency 4). A thread takes a ``tracemalloc`` snapshot when ``marks[0]`` and ``marks[1]``
trials have ended (as the trials table and its update parts say); the difference
is printed by allocation site (the ``--top`` largest, with their stacks) and by file. It counts
Python's allocations only: memory that Ray's core, Arrow or the allocator hold does not appear,
so the sum can be less than the growth of the process's RSS. ``tracemalloc`` slows the driver
severalfold: a run of 140 trials takes about 15 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from benchmarks.driver_scaling import OBJECTIVE, QUICKSTART
from p3b_search.study.results import read_trials
from p3b_search.study.trials_table import STATE, ended_count


def main() -> None:
    from p3b_search.launch import run_study
    from p3b_search.study.loading import load_study, with_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=140)
    parser.add_argument("--marks", type=int, nargs=2, default=[30, 130], metavar=("FIRST", "SECOND"))
    parser.add_argument("--top", type=int, default=6, help="allocation sites shown with their stacks")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="p3b-driver-memory-"))
    study = with_overrides(load_study(QUICKSTART), n_trials=args.trials, concurrency=4, output_dir=str(folder),
                           name="driver-memory")
    snapshots: dict[int, tracemalloc.Snapshot] = {}

    def watch() -> None:
        for mark in args.marks:
            while ended_count(read_trials(study.layout).get(STATE, [])) < mark:
                time.sleep(2)
            snapshots[mark] = tracemalloc.take_snapshot()
            print(f"snapshot after {mark} trials ended", flush=True)

    tracemalloc.start(12)
    threading.Thread(target=watch, daemon=True).start()
    run_study(study, objective=OBJECTIVE, num_cpus=2, printer=lambda line: None)
    if len(snapshots) < 2:
        raise SystemExit(f"the study ended before {args.marks[1]} trials: raise --trials")
    first, second = (snapshots[mark] for mark in args.marks)
    per = args.marks[1] - args.marks[0]
    print(f"\nPython allocations grown from trial {args.marks[0]} to {args.marks[1]} ({per} trials), by site:")
    for stat in second.compare_to(first, "traceback")[:args.top]:
        print(f"{stat.size_diff / 2**20:8.2f} MiB ({stat.size_diff / per / 1024:.1f} KiB per trial), "
              f"{stat.count_diff} blocks")
        for line in stat.traceback.format()[-6:]:
            print("    " + line)
    print("\nby file:")
    for stat in second.compare_to(first, "filename")[:15]:
        print(f"{stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:8d} blocks  {stat.traceback[0].filename}")


if __name__ == "__main__":
    main()
