"""Scaling: trials per hour with concurrency 1 vs 2 (or any list) on this machine.

    python -m benchmarks.scaling                               # quickstart, 4 fixed trials, concurrency 1 and 2
    python -m benchmarks.scaling --concurrency 1 2 4 --gpu 0.5   # on a GPU machine: fractional GPUs per trial

The study is the quickstart (``studies/quickstart.yaml``) with its search space removed (the
P3B knobs fixed at ``--fixed``: every trial does the same work), ``--trials`` trials, MLflow
tracking off, run by ``search.py run`` in a fresh process at each concurrency, in turn.
Trials per hour = trials / (last trial end - first trial start) from ``trials.parquet``;
the whole command's time (Ray start-up included) is shown beside it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.study_variants import QUICKSTART, load_line, run_search, write_variant
from p3b_search.study.trials_table import COMPLETE, STATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=QUICKSTART)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", type=float, default=0.0, help="GPUs per trial (default 0: CPU)")
    parser.add_argument("--fixed", default='{"prune_ratio": 0.5, "prune_start_epoch": 0.5, "alpha": 0.5, "gamma": 0.2}')
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    import yaml

    from p3b_search.study.loading import load_study
    from p3b_search.study.results import read_trials

    folder = args.folder or Path(tempfile.mkdtemp(prefix="p3b-scaling-"))
    base = yaml.safe_load(args.study.read_text())
    method = {**base["method"], "config": {**base["method"].get("config", {}), **json.loads(args.fixed)}}
    training = {**base["training"], "device": "cuda" if args.gpu > 0 else "cpu"}
    rates = {}
    for concurrency in args.concurrency:
        path = write_variant(args.study, folder, f"scaling-c{concurrency}", search_space={}, method=method,
                             training=training, n_trials=args.trials, concurrency=concurrency,
                             enqueue_reference=False, tracking={"enabled": False},
                             resources_per_trial={"cpu": 1, "gpu": args.gpu})
        command_s = run_search(path)
        trials = read_trials(load_study(path).layout)
        span = (trials["end"].max() - trials["start"].min()).total_seconds()
        rates[concurrency] = 3600 * (trials[STATE] == COMPLETE).sum() / span
        print(f"concurrency {concurrency}: {rates[concurrency]:.0f} trials/h over {span:.0f} s "
              f"(command {command_s:.0f} s; {load_line()})", flush=True)
    first = args.concurrency[0]
    for concurrency, rate in rates.items():
        print(f"concurrency {concurrency}: {rate:.0f} trials/h, x{rate / rates[first]:.2f} vs concurrency {first}")


if __name__ == "__main__":
    main()
