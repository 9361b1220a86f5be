"""Framework overhead: one trial's wall time under Ray Tune + MLflow vs the same objective
called directly, side by side.

    python -m benchmarks.framework_overhead                       # ~60 s trial, 2 repeats
    python -m benchmarks.framework_overhead --prune-epochs 3 --finetune-epochs 3 --repeats 3

The study is the quickstart (``studies/quickstart.yaml``) with its search space removed (the
P3B knobs fixed at ``--fixed``), one trial, concurrency 1, MLflow tracking on (embedded SQLite
store), and ``--prune-epochs``/``--finetune-epochs`` sizing the trial. Per repeat, in
alternating order:

* *framework*: ``python search.py run STUDY`` in a fresh process. The trial's time is its
  Optuna start -> end (``duration_s`` in ``trials.parquet``: from the searcher's ask, through
  the Ray worker's start, the objective, MLflow logging, to the tell); the command's time adds
  Ray's start-up and shutdown, the Optuna and MLflow stores' creation and the final tables.
* *direct*: a fresh ``python`` process that builds the same ``TrialConfig``
  (``p3b_search.search.schema.trial_config``) and calls ``objectives.prune_finetune.run_trial``
  with the in-memory ``TrialReporter``, with the torch threads a Ray trial gets; the trial's
  time is that call, the command's time the whole process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.study_variants import (
    QUICKSTART,
    REPO,
    load_line,
    run_search,
    write_variant,
)


def study_file(args: argparse.Namespace, folder: Path, name: str) -> Path:
    import yaml

    base = yaml.safe_load(Path(args.study).read_text())
    training = base["training"]
    training["prune"]["epochs"], training["finetune"]["epochs"] = args.prune_epochs, args.finetune_epochs
    method = {**base["method"], "config": {**base["method"].get("config", {}), **json.loads(args.fixed)}}
    return write_variant(args.study, folder, name, training=training, method=method, search_space={},
                         n_trials=1, concurrency=1, tracking={"enabled": True})


def direct(path: Path) -> float:
    """This process: the study file's single trial through ``run_trial``; returns its seconds."""
    import torch

    from objectives.prune_finetune import run_trial
    from p3b_search.reporting import TrialReporter
    from p3b_search.search.schema import load_study, trial_config

    study = load_study(path)
    torch.set_num_threads(max(1, int(study.resources_per_trial.cpu)))
    config = trial_config(study, {})
    workdir = Path(tempfile.mkdtemp(prefix="p3b-direct-"))
    began = time.perf_counter()
    run_trial(config, TrialReporter(), workdir)
    return time.perf_counter() - began


def run_direct(path: Path) -> tuple[float, float]:
    """(trial s, command s) of :func:`direct` in a fresh process."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "benchmarks.framework_overhead", "--direct", str(path)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    command = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"direct trial failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1]), command


def run_framework(path: Path) -> tuple[float, float]:
    """(trial s from trials.parquet, command s) of ``search.py run`` on ``path``."""
    from p3b_search.search.results import read_trials
    from p3b_search.search.schema import load_study

    command = run_search(path)
    trials = read_trials(load_study(path).layout)
    if list(trials["state"]) != ["COMPLETE"]:
        raise SystemExit(f"{path}: expected one COMPLETE trial, got {list(trials['state'])}")
    return float(trials["duration_s"].iloc[0]), command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=QUICKSTART, help="base study file (default: quickstart)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prune-epochs", type=int, default=9)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--fixed", default='{"prune_ratio": 0.5, "prune_start_epoch": 0.5, "alpha": 0.5, "gamma": 0.2}',
                        help="JSON of the method knobs fixed in place of the search space")
    parser.add_argument("--folder", type=Path, help="where study files and folders go (default: a temp folder)")
    parser.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        print(direct(args.direct))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="p3b-framework-overhead-"))
    times: dict[str, list[tuple[float, float]]] = {"framework": [], "direct": []}
    for repeat in range(args.repeats):
        path = study_file(args, folder, f"overhead-{repeat}")
        for mode in ("framework", "direct") if repeat % 2 == 0 else ("direct", "framework"):
            times[mode].append(run_framework(path) if mode == "framework" else run_direct(path))
            trial_s, command_s = times[mode][-1]
            print(f"repeat {repeat} {mode}: trial {trial_s:.1f} s, command {command_s:.1f} s ({load_line()})", flush=True)
    for index, label in ((0, "trial"), (1, "whole command")):
        f = statistics.median(t[index] for t in times["framework"])
        d = statistics.median(t[index] for t in times["direct"])
        print(f"median {label} wall time over {args.repeats}: framework {f:.1f} s, direct {d:.1f} s, "
              f"ratio framework/direct = {f / d:.3f}")


if __name__ == "__main__":
    main()
