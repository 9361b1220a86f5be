"""How much MLflow tracking slows a trial: the same trial run with and without it, side by side.

Each measurement is one trial of ``objectives.prune_finetune.run_trial`` in a fresh Python
process, as a Ray worker runs it: *plain* reports to the in-memory ``TrialReporter``; *tracked*
reports to an ``MlflowTrialReporter`` (a nested child run of a real parent run). The tracked
time counts everything tracking adds inside the worker: importing MLflow, starting the run, the
per-epoch/per-mask-update logging, and ``finish`` (allocation table, heatmap, final flush).
Plain and tracked runs alternate, so machine load drifts affect both alike.

    python -m benchmarks.tracking_overhead                       # embedded SQLite store
    python -m benchmarks.tracking_overhead --tracking-uri http://127.0.0.1:5000 --repeats 5
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

REPO = Path(__file__).resolve().parents[1]


def trial_config(args: argparse.Namespace):
    from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig, TrialConfig

    model = ModelConfig(name="vit_tiny_patch16_224", overrides=dict(
        img_size=args.img_size, patch_size=4, embed_dim=args.embed_dim, depth=args.depth, num_heads=2))
    training = TrainingConfig(prune=StageConfig(epochs=args.prune_epochs, schedule="constant"),
                              finetune=StageConfig(epochs=args.finetune_epochs), batch_size=32)
    return TrialConfig(model=model, data=DataConfig(kind="digits", max_train_samples=args.samples),
                       method=args.method, training=training)


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """One trial in this process; returns its wall time (s) and, when tracked, the split."""
    import torch

    from objectives.prune_finetune import run_trial
    from p3b_search.reporting import TrialReporter

    torch.set_num_threads(1)
    config = trial_config(args)
    workdir = Path(tempfile.mkdtemp(prefix="p3b-bench-"))
    began, cpu_began = time.perf_counter(), time.process_time()
    if args.one == "plain":
        run_trial(config, TrialReporter(), workdir)
        return {"wall_s": time.perf_counter() - began, "cpu_s": time.process_time() - cpu_began}
    from p3b_search.tracking.trial_run import MlflowTrialReporter

    imported = time.perf_counter()
    reporter = MlflowTrialReporter(**json.loads(args.child_args))
    run_trial(config, reporter, workdir)
    trained = time.perf_counter()
    if not reporter.finish("finished"):
        raise SystemExit("tracking could not send every logging call: the measurement is not valid")
    done = time.perf_counter()
    return {"wall_s": done - began, "cpu_s": time.process_time() - cpu_began, "import_s": imported - began,
            "finish_s": done - trained}


def measure(args: argparse.Namespace, mode: str, child_args: dict) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.tracking_overhead", "--one", mode, "--child-args",
               json.dumps(child_args), *sys.argv[1:]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} trial failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="trials per mode (default 3)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: a new SQLite store in a temp folder)")
    parser.add_argument("--method", default="p3b")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=512, help="training images of the digits task")
    parser.add_argument("--prune-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--one", choices=("plain", "tracked"), help=argparse.SUPPRESS)
    parser.add_argument("--child-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    from p3b_search.tracking.study_run import StudyTracker

    folder = Path(tempfile.mkdtemp(prefix="p3b-bench-study-"))
    uri = args.tracking_uri or f"sqlite:///{folder}/mlflow.db"
    tracker = StudyTracker(uri, "tracking-overhead", f"bench-{int(time.time())}", str(folder / "mlartifacts"))
    study_file = folder / "bench.json"
    study_file.write_text(json.dumps(vars(args)))
    tracker.start(study_file, {}, "none", {"top1": "maximize", "macs": "minimize"})
    plain, tracked = [], []
    with tracker:
        for repeat in range(args.repeats):
            plain.append(measure(args, "plain", {}))
            tracked.append(measure(args, "tracked", tracker.child_run_args(repeat, {"repeat": repeat})))
            print(f"repeat {repeat}: plain {plain[-1]['wall_s']:.2f} s wall / {plain[-1]['cpu_s']:.2f} s CPU, "
                  f"tracked {tracked[-1]['wall_s']:.2f} s wall / {tracked[-1]['cpu_s']:.2f} s CPU "
                  f"(of which MLflow import {tracked[-1]['import_s']:.2f} s, finish {tracked[-1]['finish_s']:.2f} s)")
    print(f"method {args.method}, store {uri}, {args.repeats} trials per mode")
    for key, label in (("wall_s", "wall time"), ("cpu_s", "CPU time (all threads)")):
        plain_s = statistics.median(r[key] for r in plain)
        tracked_s = statistics.median(r[key] for r in tracked)
        print(f"median trial {label}: plain {plain_s:.2f} s, tracked {tracked_s:.2f} s, "
              f"ratio tracked/plain = {tracked_s / plain_s:.3f}")


if __name__ == "__main__":
    main()
