"""Framework overhead: one trial's wall time under Ray Tune + MLflow vs the same objective
called directly, side by side.

    python -m benchmarks.framework_overhead                       # 2 trials per side, 2 repeats
    python -m benchmarks.framework_overhead --prune-epochs 20 --finetune-epochs 6 --trials 2 --repeats 2 \\
        --out benchmarks/results/framework_overhead.json
    python -m benchmarks.framework_overhead --from-json benchmarks/results/framework_overhead.json   # the table

The study is the quickstart (``studies/quickstart.yaml``) with its search space removed (the
P3B knobs fixed at ``--fixed``), ``--trials`` identical trials, concurrency 1, MLflow tracking
on (embedded SQLite store), and ``--prune-epochs``/``--finetune-epochs`` sizing each trial.
Per repeat, in alternating order:

* *framework*: ``python search.py run STUDY`` in a fresh process. A trial's time is its Optuna
  start -> end (``duration_s`` in ``trials.parquet``: from the searcher's ask, through the Ray
  worker's start, the objective, MLflow logging, to the tell). The first trial pays for starting
  the Ray worker process and importing torch/timm in it; later trials reuse that worker
  (``reuse_actors``). The command's time adds Ray's start-up and shutdown, the Optuna and MLflow
  stores' creation and the final tables.
* *direct*: a fresh ``python`` process that builds the same ``TrialConfig``
  (``p3b_search.study.trials.trial_config``) and calls ``objectives.prune_finetune.run_trial``
  ``--trials`` times with the in-memory ``TrialReporter`` and the torch threads a Ray trial gets;
  a trial's time is that call (imports happen before it), the command's time the whole process.

Where a framework trial's extra time goes is split with Ray's own per-trial clock
(``time_total_s`` of its last result: the trainable function's run): *outside* the trainable
(the ask, worker start or reuse, deserialising and importing the trainable, the tell) and the
trainable's time other than the epochs (``epoch_seconds``: training + validation), against the
direct call's time other than its epochs.
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
from p3b_search.study.trials_table import COMPLETE, NUMBER, STATE

Timing = dict[str, float]  # trial_s, epochs_s and, for framework trials, inside_s


def study_file(args: argparse.Namespace, folder: Path, name: str) -> Path:
    import yaml

    base = yaml.safe_load(Path(args.study).read_text())
    training = base["training"]
    training["prune"]["epochs"], training["finetune"]["epochs"] = args.prune_epochs, args.finetune_epochs
    method = {**base["method"], "config": {**base["method"].get("config", {}), **json.loads(args.fixed)}}
    return write_variant(args.study, folder, name, training=training, method=method, search_space={},
                         n_trials=args.trials, concurrency=1, enqueue_reference=False, tracking={"enabled": True})


def direct(path: Path, trials: int) -> list[Timing]:
    """This process: the study file's trial ``trials`` times through ``run_trial``."""
    import torch

    from objectives.prune_finetune import run_trial
    from p3b_search.reporting import TrialReporter
    from p3b_search.study.loading import load_study
    from p3b_search.study.trials import trial_config

    study = load_study(path)
    torch.set_num_threads(max(1, int(study.resources_per_trial.cpu)))
    config = trial_config(study, {})
    timings = []
    for _ in range(trials):
        reporter = TrialReporter()
        workdir = Path(tempfile.mkdtemp(prefix="p3b-direct-"))
        began = time.perf_counter()
        run_trial(config, reporter, workdir)
        timings.append({"trial_s": time.perf_counter() - began,
                        "epochs_s": sum(epoch["epoch_seconds"] for epoch in reporter.epochs)})
    return timings


def run_direct(path: Path, trials: int) -> tuple[list[Timing], float]:
    """(per-trial timings, command s) of :func:`direct` in a fresh process."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "benchmarks.framework_overhead", "--direct", str(path),
                             "--trials", str(trials)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    command = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"direct trial failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), command


def ray_results(layout, ray_trial_id: str) -> list[dict]:
    """The per-epoch results Ray Tune logged for one trial (its ``result.json``)."""
    found = sorted(layout.ray_experiment.glob(f"*_{ray_trial_id}_*/result.json"))
    if len(found) != 1:
        raise SystemExit(f"{layout.ray_experiment}: expected one result.json of Ray trial {ray_trial_id}, found {found}")
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def run_framework(path: Path, trials: int) -> tuple[list[Timing], float]:
    """(per-trial timings from trials.parquet and Ray's results, command s) of ``search.py run``."""
    from p3b_search.study.loading import load_study
    from p3b_search.study.results import read_trials

    command = run_search(path)
    layout = load_study(path).layout
    frame = read_trials(layout).sort_values(NUMBER)
    if list(frame[STATE]) != [COMPLETE] * trials:
        raise SystemExit(f"{path}: expected {trials} COMPLETE trials, got {list(frame['state'])}")
    timings = []
    for _, row in frame.iterrows():
        results = ray_results(layout, row["ray_trial_id"])
        timings.append({"trial_s": float(row["duration_s"]), "inside_s": float(results[-1]["time_total_s"]),
                        "epochs_s": sum(r["epoch_seconds"] for r in results if "epoch_seconds" in r)})
    return timings, command


def ratios(runs: list[dict], select: slice) -> list[float]:
    """Per repeat: framework / direct of the mean trial time over the trials ``select``."""
    out = []
    for run in runs:
        f, d = (statistics.mean(t["trial_s"] for t in run[mode]["trials"][select]) for mode in ("framework", "direct"))
        out.append(f / d)
    return out


def summary(runs: list[dict]) -> list[str]:
    lines = []
    labels = [("first trial (cold worker)", slice(0, 1))]
    if len(runs[0]["framework"]["trials"]) > 1:
        labels.append(("later trials (reused worker)", slice(1, None)))
    for label, select in labels:
        values = ratios(runs, select)
        lines.append(f"{label}: trial-time ratio framework/direct per repeat "
                     f"{', '.join(f'{v:.3f}' for v in values)}; median {statistics.median(values):.3f}")
    commands = [run["framework"]["command_s"] / run["direct"]["command_s"] for run in runs]
    lines.append(f"whole command ratio per repeat {', '.join(f'{v:.3f}' for v in commands)}; "
                 f"median {statistics.median(commands):.3f}")
    return lines


def _load(line: str) -> str:
    """The 1-minute figure of a ``load_line()`` ("load average 1.31 / 1.65 / 1.65 on 2 cores")."""
    return line.split()[2]


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def table(runs: list[dict]) -> list[str]:
    """Markdown: per repeat (in run order) and trial, framework s, direct s and their ratio, then the
    whole commands; the 1-minute load average at the start and end of each side."""
    lines = ["| repeat (order) | load avg (1 min) start -> end | trial | framework s | direct s | ratio |",
             "|---|---|---|---|---|---|"]
    for repeat, run in enumerate(runs):
        order = list(run)  # the sides in the order they ran
        loads = ", ".join(f"{'fw' if mode == 'framework' else mode} {_load(run[mode]['load_before'])} -> "
                          f"{_load(run[mode]['load_after'])}" for mode in order)
        rows = [(f"{_ordinal(k + 1)} ({'new' if k == 0 else 'reused'} worker)", f["trial_s"], d["trial_s"])
                for k, (f, d) in enumerate(zip(run["framework"]["trials"], run["direct"]["trials"]))]
        rows.append((f"whole command ({len(rows)} trials)", run["framework"]["command_s"], run["direct"]["command_s"]))
        for k, (label, f, d) in enumerate(rows):
            first = f"| {repeat} ({order[0]} first) | {loads} |" if k == 0 else "| | |"
            lines.append(f"{first} {label} | {f:.1f} | {d:.1f} | {f / d:.3f} |")
    return lines


def breakdown(run: dict) -> list[str]:
    """Per trial: where the framework trial's extra seconds go."""
    lines = []
    for k, (f, d) in enumerate(zip(run["framework"]["trials"], run["direct"]["trials"])):
        lines.append(f"  trial {k}: framework {f['trial_s']:.1f} s = outside the trainable "
                     f"{f['trial_s'] - f['inside_s']:.1f} + trainable {f['inside_s']:.1f} (epochs {f['epochs_s']:.1f}, "
                     f"rest {f['inside_s'] - f['epochs_s']:.1f}); direct {d['trial_s']:.1f} s "
                     f"(epochs {d['epochs_s']:.1f}, rest {d['trial_s'] - d['epochs_s']:.1f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=QUICKSTART, help="base study file (default: quickstart)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2, help="identical trials per side and repeat")
    parser.add_argument("--prune-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--fixed", default='{"prune_ratio": 0.5, "prune_start_epoch": 0.5, "alpha": 0.5, "gamma": 0.2}',
                        help="JSON of the method knobs fixed in place of the search space")
    parser.add_argument("--folder", type=Path, help="where study files and folders go (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write every timing (JSON) here")
    parser.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="run nothing: print the table and the medians of the timings an earlier --out wrote")
    args = parser.parse_args()
    if args.from_json:
        runs = json.loads(args.from_json.read_text())["runs"]
        print("\n".join(table(runs) + [""] + summary(runs)))
        return
    if args.direct:
        print(json.dumps(direct(args.direct, args.trials)))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="p3b-framework-overhead-"))
    runs = []
    for repeat in range(args.repeats):
        path = study_file(args, folder, f"overhead-{repeat}")
        run = {}
        for mode in ("framework", "direct") if repeat % 2 == 0 else ("direct", "framework"):
            before = load_line()
            trials, command_s = run_framework(path, args.trials) if mode == "framework" else run_direct(path, args.trials)
            run[mode] = {"trials": trials, "command_s": command_s, "load_before": before, "load_after": load_line()}
            shown = ", ".join(f"{t['trial_s']:.1f}" for t in trials)
            print(f"repeat {repeat} {mode}: trials {shown} s, command {command_s:.1f} s "
                  f"({before} -> {run[mode]['load_after']})", flush=True)
        runs.append(run)
        print("\n".join(breakdown(run)), flush=True)
    print("\n".join(summary(runs)))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
