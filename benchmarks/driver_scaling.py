"""The driver's cost per trial over a long study: does it stay flat as trials accumulate?

    python benchmarks/driver_scaling.py --trials 2000 --out benchmarks/results/driver_scaling.json
    python benchmarks/driver_scaling.py --trials 500 --code /path/to/other/checkout --name before
    python benchmarks/driver_scaling.py --trials 500 --profile 100:130 470:500   # + where the time goes
    python -m benchmarks.driver_scaling --trials 500 --servers   # Optuna on PostgreSQL, MLflow server

The study is the quickstart (``studies/quickstart.yaml``: its search space, TPE or ``--sampler``
(``random``: a sampler whose ask costs the same in every trial, which TPE's does not), MLflow on the
embedded store; with ``--servers``, Optuna on a throw-away PostgreSQL and MLflow on a tracking
server on its own database, started as the cluster tests start theirs) with ``--trials`` trials, ``--concurrency`` at a time, run by ``search.py run``
of the checkout ``--code`` (default: this one) with the small test objective
(``tests.search_objective:run_trial``: an MLP on digits whose own work is the same in every
trial), so any growth of the time per trial is the driver's.

Per window of ``--window`` trials, in the order they ended: the wall time per trial (time
between the window's first and last trial end / trials), the mean ask-to-tell time of its
trials (``duration_s``), and the driver process's CPU seconds per trial (its user + system
time, sampled every second, interpolated at the window's ends). Also the driver's peak RSS
(``VmHWM``), and the ratio of the last window's wall time per trial to that of trials
100-200 (the second window). ``--profile A:B ...`` samples the driver with py-spy (``pip
install py-spy``) from the A-th to the B-th trial end and prints, per trial, the CPU time of
each part of the driver named in :data:`PARTS`.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from p3b_search.study.trials_table import RUNNING, STATE

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.yaml"
OBJECTIVE = "tests.search_objective:run_trial"

#: (part, [(file path suffix, function name), ...]) in the order shown. A sample of the driver's
#: stacks counts for the part of its deepest frame that names one of these functions ("*": any
#: function of that file); "  of which" parts count the samples that pass through theirs.
PARTS = [
    ("trials table (rows, trials.parquet)", [("p3b_search/search/progress.py", "refresh"),
                                             ("p3b_search/study/live_table.py", "rewrite")]),
    ("  of which Optuna get_trials", [("optuna/study/study.py", "get_trials")]),
    ("allocations merge (allocations.parquet)", [("p3b_search/study/results.py", "merge_allocations"),
                                                 ("p3b_search/study/results.py", "PartsMerger.merge")]),
    ("front summary (front, knee, hypervolume, history)", [("p3b_search/study/front.py", "study_pareto"),
                                                           ("p3b_search/study/front.py", "pareto_summary")]),
    ("  of which hypervolume history", [("p3b_search/study/history.py", "hypervolume_history")]),
    ("front files and figures (pareto/)", [("p3b_search/study/front_report.py", "front_files"),
                                           ("p3b_search/study/front_figures.py", "save_files")]),
    ("MLflow: child run ids", [("p3b_search/tracking/study_run.py", "_run_ids")]),
    ("MLflow: pareto tags", [("p3b_search/tracking/study_run.py", "_move_pareto_tags")]),
    ("MLflow: front upload and metrics", [("p3b_search/tracking/study_run.py", "_publish_front")]),
    ("sampler ask and sampling (Optuna)", [("optuna/study/study.py", "ask"),
                                           ("p3b_search/search/space.py", "suggest_params")]),
    ("searcher: lost-trial scan and checks", [("p3b_search/search/searcher.py", "_lost_trial"),
                                              ("p3b_search/search/searcher.py", "_rejection"),
                                              ("p3b_search/search/searcher.py", "_handed_out")]),
    ("searcher: tell", [("p3b_search/search/searcher.py", "on_trial_complete")]),
    ("Ray experiment state", [("ray/tune/execution/experiment_state.py", "sync_up_experiment_state"),
                              ("ray/train/_internal/syncer.py", "*"),
                              ("ray/train/_internal/storage.py", "_upload_to_fs_path")]),
    ("progress line", [("p3b_search/search/progress.py", "progress_line")]),
    ("running-trial count", [("p3b_search/search/progress.py", "_running")]),
]


def _frame_matches(frame: str, functions: list[tuple[str, str]]) -> bool:
    """Whether a py-spy frame ``function (path/to/file.py:line)`` is one of ``functions``."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    return any(file.endswith(suffix) and (function in ("*", name) or name.endswith(f".{function}"))
               for suffix, function in functions)


def part_costs(path: Path, cpu_per_trial: float) -> dict[str, float]:
    """CPU seconds per trial of each part of :data:`PARTS`: its share of the samples in py-spy's
    raw output at ``path`` times the driver's CPU seconds per trial over the same trials
    (py-spy counts a thread that waits for a core as busy, so on a loaded machine its samples
    overstate the time; their shares do not), with ``total`` and what no part holds (``rest``:
    Ray Tune's loop and everything else)."""
    costs = dict.fromkeys([part for part, _ in PARTS], 0.0)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames, samples = stack.split(";"), int(count)
        total += samples
        deepest = None
        for frame in frames:
            for part, functions in PARTS:
                if _frame_matches(frame, functions):
                    if part.startswith(" "):
                        continue
                    deepest = part
        if deepest is not None:
            costs[deepest] += samples
        for part, functions in PARTS:
            if part.startswith(" ") and any(_frame_matches(frame, functions) for frame in frames):
                costs[part] += samples
    costs["rest"] = total - sum(v for k, v in costs.items() if not k.startswith(" "))
    costs["total"] = total
    return {part: cpu_per_trial * samples / max(total, 1) for part, samples in costs.items()}


class WindowProfiler:
    """py-spy on the driver from the A-th to the B-th trial end of each window (A, B), trial ends
    counted in the test objective's ``attempts.log``."""

    def __init__(self, pid: int, windows: list[tuple[int, int]], folder: Path, attempts: Path, rate: int):
        self.pid, self.windows, self.folder, self.attempts, self.rate = pid, windows, folder, attempts, rate
        self.running: tuple[subprocess.Popen, tuple[int, int], int, datetime] | None = None
        #: window -> (raw output, trials ended in it, when it began and ended)
        self.done: dict[tuple[int, int], tuple[Path, int, datetime, datetime]] = {}

    def ended(self) -> int:
        try:
            return sum(1 for line in self.attempts.read_text().splitlines() if line.split()[2:3] == ["end"])
        except OSError:
            return 0

    def poll(self) -> None:
        ended = self.ended()
        if self.running is not None:
            spy, window, first, began = self.running
            if ended >= window[1]:
                spy.send_signal(signal.SIGINT)
                spy.wait()
                self.done[window] = (self.folder / f"window-{window[0]}-{window[1]}.txt", ended - first, began,
                                     datetime.now())
                self.running = None
            return
        for window in self.windows:
            if window not in self.done and window[0] <= ended < window[1]:
                output = self.folder / f"window-{window[0]}-{window[1]}.txt"
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(self.pid), "--rate", str(self.rate),
                                        "--format", "raw", "--nonblocking", "--output", str(output)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.running = (spy, window, ended, datetime.now())
                return

    def stop(self) -> None:
        if self.running is not None:
            self.running[0].send_signal(signal.SIGINT)
            self.running[0].wait()
            self.running = None


# ----------------------------------------------------------------------------- the study, measured

class DriverSampler:
    """Samples the driver process's CPU seconds, RSS and peak RSS every ``every_s`` seconds."""

    def __init__(self, pid: int, log: Path, every_s: float = 1.0, profiler: "WindowProfiler | None" = None):
        import psutil

        self.process = psutil.Process(pid)
        self.log = log  # the samples as CSV too, as they come
        self.every_s = every_s
        self.profiler = profiler
        self.samples: list[tuple[datetime, float, int]] = []  # (local time, user + system CPU s, RSS bytes)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            try:
                times, rss = self.process.cpu_times(), self.process.memory_info().rss
                status = Path(f"/proc/{self.process.pid}/status").read_text()
            except (psutil.Error, OSError):
                return
            self.samples.append((datetime.now(), times.user + times.system, rss))
            with open(self.log, "a") as log:
                log.write(f"{self.samples[-1][0].isoformat()},{self.samples[-1][1]:.3f},{rss}\n")
            peak = [line for line in status.splitlines() if line.startswith("VmHWM:")]
            if peak:
                self.peak_rss = max(self.peak_rss, int(peak[0].split()[1]) * 1024)
            if self.profiler is not None:
                self.profiler.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.profiler is not None:
            self.profiler.stop()

    def rss_at(self, moment: datetime) -> int:
        """The driver's RSS (bytes) at the last sample before ``moment``."""
        i = bisect.bisect_right([t for t, _, _ in self.samples], moment)
        return self.samples[max(i - 1, 0)][2]

    def cpu_at(self, moment: datetime) -> float:
        """The driver's CPU seconds at ``moment``, interpolated between samples."""
        times = [t for t, _, _ in self.samples]
        i = bisect.bisect_left(times, moment)
        if i == 0:
            return self.samples[0][1]
        if i == len(times):
            return self.samples[-1][1]
        (t0, c0, _), (t1, c1, _) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (moment - t0).total_seconds() / max((t1 - t0).total_seconds(), 1e-9)


def study_file(args: argparse.Namespace, folder: Path, stores: dict[str, Any] | None = None) -> Path:
    """The quickstart study as the benchmark runs it; ``stores``: its ``storage`` and ``tracking``
    sections (default: the embedded ones in the study folder)."""
    import yaml

    data = yaml.safe_load(QUICKSTART.read_text())
    data.update(name=args.name, output_dir=str(folder), n_trials=args.trials, concurrency=args.concurrency,
                sampler={"name": args.sampler, "seed": args.seed}, **(stores or {}))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def windows_of(trials, sampler: DriverSampler, size: int) -> list[dict[str, float]]:
    """Per window of ``size`` trials (in the order they ended): wall s per trial, mean
    ask-to-tell s, driver CPU s per trial."""
    ended = trials.dropna(subset=["end"]).sort_values("end", ignore_index=True)
    rows = []
    for first in range(0, len(ended) - size + 1, size):
        window = ended.iloc[first:first + size]
        began = ended["start"].min() if first == 0 else ended["end"].iloc[first - 1]
        last = window["end"].iloc[-1]
        rows.append({"trials": f"{first}-{first + size}", "wall_s_per_trial": (last - began).total_seconds() / size,
                     "ask_to_tell_s": float(window["duration_s"].mean()),
                     "driver_cpu_s_per_trial": (sampler.cpu_at(last.to_pydatetime())
                                                - sampler.cpu_at(began.to_pydatetime())) / size,
                     "driver_rss_mib": sampler.rss_at(last.to_pydatetime()) / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs local Ray may use (default 2)")
    parser.add_argument("--sampler", default="tpe",
                        help="the study's sampler (default tpe; random: a sampler whose ask does not grow)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--window", type=int, default=100, help="trials per reported window (default 100)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="A:B",
                        help="profile the driver with py-spy from the A-th to the B-th trial end")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose search.py runs the study")
    parser.add_argument("--name", default="driver-scaling")
    parser.add_argument("--folder", type=Path, help="where the study folder goes (default: a new temp folder)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--servers", action="store_true",
                        help="Optuna on a throw-away PostgreSQL, MLflow on a tracking server (as the cluster tests)")
    args = parser.parse_args()
    windows = [tuple(int(x) for x in spec.split(":")) for spec in args.profile]
    if windows and shutil.which("py-spy") is None:
        raise SystemExit("--profile: py-spy is not installed: pip install py-spy")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="p3b-driver-scaling-"))
    with contextlib.ExitStack() as servers:
        stores = servers.enter_context(study_servers(folder)) if args.servers else None
        run(args, folder, windows, study_file(args, folder, stores))


@contextlib.contextmanager
def study_servers(folder: Path) -> Iterator[dict[str, Any]]:
    """A throw-away PostgreSQL and an MLflow tracking server on its own database, as the cluster
    tests start them (Debian's PostgreSQL); yields the study's ``storage`` and ``tracking``."""
    from tests.cluster.conftest import MlflowServer, Postgres, _postgres_bin, _service_account

    bin_dir = _postgres_bin()
    if bin_dir is None:
        raise SystemExit("--servers: PostgreSQL is not installed (apt-get install postgresql)")
    scratch = Path(tempfile.mkdtemp(prefix="p3b-pg", dir="/tmp"))  # short: the socket path has a length limit
    postgres = Postgres(bin_dir, scratch, _service_account())
    tracking = None
    try:
        postgres.start()
        (folder / "mlflow-server").mkdir(parents=True, exist_ok=True)
        tracking = MlflowServer(postgres.create_database("mlflow"), folder / "mlflow-server")
        tracking.start()
        yield {"storage": postgres.create_database("optuna"), "tracking": {"uri": tracking.uri}}
    finally:
        if tracking is not None:
            tracking.stop()
        postgres.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, folder: Path, windows: list[tuple[int, ...]], path: Path) -> None:
    """Run the study at ``path`` under the samplers and print (and write) the figures."""
    import pandas as pd

    code = args.code.resolve()
    command = [sys.executable, str(code / "search.py"), "run", str(path), "--objective", OBJECTIVE,
               "--cpus", str(args.cpus)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    began = time.perf_counter()
    with open(folder / f"{args.name}.log", "w") as log:
        driver = subprocess.Popen(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
        profiler = (WindowProfiler(driver.pid, windows, folder, folder / args.name / "attempts.log", args.rate)
                    if windows else None)
        sampler = DriverSampler(driver.pid, folder / f"{args.name}-driver.csv", profiler=profiler)
        code_rc = driver.wait()
    sampler.stop()
    elapsed = time.perf_counter() - began
    trials = pd.read_parquet(folder / args.name / "trials.parquet")
    if code_rc != 0 or len(trials) != args.trials or (trials[STATE] == RUNNING).any():
        print(f"warning: search.py run ended with rc {code_rc} (see {folder / f'{args.name}.log'}) and "
              f"trials.parquet has {len(trials)} rows ({trials['state'].value_counts().to_dict()}): the figures "
              "below cover the trials that ended")
    rows = windows_of(trials, sampler, args.window)
    one, five, _ = os.getloadavg()
    result = {"code": str(code), "sampler": args.sampler, "servers": args.servers, "trials": args.trials,
              "concurrency": args.concurrency, "command_s": elapsed,
              "driver_peak_rss_mib": sampler.peak_rss / 2**20, "driver_cpu_s": sampler.samples[-1][1],
              "windows": rows, "load_average_1_5": [one, five], "profiles": {}}
    print(f"{args.trials} trials, concurrency {args.concurrency}, code {code}: {elapsed:.0f} s, "
          f"driver peak RSS {result['driver_peak_rss_mib']:.0f} MiB, driver CPU {result['driver_cpu_s']:.0f} s")
    print(f"{'trials':>10} {'wall s/trial':>12} {'ask-to-tell s':>13} {'driver CPU s/trial':>18} "
          f"{'driver RSS MiB':>14}")
    for row in rows:
        print(f"{row['trials']:>10} {row['wall_s_per_trial']:>12.3f} {row['ask_to_tell_s']:>13.3f} "
              f"{row['driver_cpu_s_per_trial']:>18.3f} {row['driver_rss_mib']:>14.0f}")
    if len(rows) >= 3:
        result["wall_ratio_last_to_100_200"] = rows[-1]["wall_s_per_trial"] / rows[1]["wall_s_per_trial"]
        print(f"wall time per trial, trials {rows[-1]['trials']} / trials {rows[1]['trials']}: "
              f"{result['wall_ratio_last_to_100_200']:.2f}")
    for (start, stop), (raw, ended, began, finished) in (profiler.done.items() if profiler is not None else []):
        cpu = (sampler.cpu_at(finished) - sampler.cpu_at(began)) / max(ended, 1)
        result["profiles"][f"{start}-{stop}"] = part_costs(raw, cpu)
    if result["profiles"]:
        labels = list(result["profiles"])
        print(f"\ndriver CPU ms per trial by part (shares of py-spy's samples at {args.rate} Hz), "
              f"trials {' / '.join(labels)}:")
        for part in [*dict(PARTS), "rest", "total"]:
            print(f"  {part:<52}" + "".join(f"{1000 * result['profiles'][k][part]:>10.1f}" for k in labels))
    print(f"{load_line()}; study folder {folder}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    if code_rc != 0:
        raise SystemExit(code_rc)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
