"""Does a study earn its compute? Its default setup against the same study with none of the
savings, and against P3B's reference recipe, on real studies (issue 22, item 5).

    python -m benchmarks.search_evidence studies/search_evidence.yaml --seeds 0 1 2
    python -m benchmarks.search_evidence studies/search_evidence.yaml --seeds 0 1 2 \\
        --from-parquet benchmarks/results/search_evidence_runs.parquet          # the table only

Three arms per seed s, each a study in its own folder (``<output_dir>/<name>-<arm>-s<s>``; a
finished one is read, not run again, so an interrupted run continues where it stopped):

* ``default``: the study file as written (its sampler, early stopping or scheduler, and shared
  prefixes), sampler seed and training seed s;
* ``full``: the same without early stopping, scheduler and shared prefixes: every trial trains
  every epoch;
* ``reference``: P3B's paper settings (:data:`p3b_search.search.replay.PAPER_RECIPE`) at the
  prune ratios of :data:`~p3b_search.search.replay.LADDER`, a grid over those ratios and
  ``--reference-trials / 4`` training seeds (100 s, 100 s + 1, ...): what a user runs without
  the tool. Nothing is searched, stopped or shared. By default it runs as many trials as the
  study (rounded down to the ladder), so that it spends at least the default's trial-epochs.

Per run: the trial-epochs each trial trained itself (restored prefixes not counted), and the
normalised hypervolume of the COMPLETE trials' (top-1, MACs) front (1.0 = the dense reference's
top-1 at no cost) after each ended trial. Over seeds, paired by seed:

* default - full: the final hypervolume difference with its 95 % interval and two one-sided
  tests of equivalence within ``--margin`` (default 0.01), and default / full trial-epochs.
  **Goal: equivalent within 0.01 with at most 50 % of the trial-epochs.**
* default - reference at equal trial-epochs: the default's final hypervolume against the
  reference's after the trial-epochs the default spent (the reference's history read there).

Writes ``<out>/<name>_runs.parquet`` (one row per run), ``_history.parquet`` (one row per
ended trial of every run) and ``<name>.md``; ``--from-parquet`` reads the first two instead of
running, and writes the same ``.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from benchmarks.early_stopping_savings import HV_MARGIN, run_command
from p3b_search.search.replay import LADDER, PAPER_RECIPE
from p3b_search.stats import equivalence_p, paired_t_test, t_interval
from p3b_search.study.history import hypervolume_history, trial_epochs_spent
from p3b_search.study.loading import load_study, with_overrides
from p3b_search.study.sections import StudyConfig
from p3b_search.study.summary import study_finished, study_summary
from p3b_search.study.trials_table import PRUNED, STATE

ARMS = ("default", "full", "reference")
REFERENCE_SEED_BASE = 100


def arm_study(base: StudyConfig, arm: str, seed: int, reference_trials: int) -> StudyConfig:
    """The study of one arm and seed, in its own folder (see the module docstring)."""
    name = f"{base.name}-{arm}-s{seed}"
    sampler = {**base.sampler.model_dump(), "seed": seed}
    training = {**base.training.model_dump(mode="python"), "seed": seed}
    stopping = base.early_stopping.model_dump()
    if arm == "default":
        return with_overrides(base, name=name, sampler=sampler, training=training)
    if arm == "full":
        return with_overrides(base, name=name, sampler=sampler, training=training, scheduler=None,
                              shared_prefixes=False, early_stopping={**stopping, "enabled": False})
    if reference_trials % len(LADDER):
        raise SystemExit(f"--reference-trials {reference_trials}: must be a multiple of {len(LADDER)} (the ladder)")
    seeds = [REFERENCE_SEED_BASE * (seed + 1) + i for i in range(reference_trials // len(LADDER))]
    config = {**base.method.config, **{key.removeprefix("method_config."): value
                                       for key, value in PAPER_RECIPE.items() if key != "method"}}
    config.pop("prune_ratio", None)
    return with_overrides(
        base, name=name, sampler={"name": "grid", "seed": seed}, n_trials=reference_trials, scheduler=None,
        shared_prefixes=False, early_stopping={**stopping, "enabled": False}, enqueue_reference=False, method={"name": PAPER_RECIPE["method"], "config": config},
        search_space={"method_config.prune_ratio": {"type": "categorical", "choices": list(LADDER)},
                      "training.seed": {"type": "categorical", "choices": seeds}})


def history_of(study: StudyConfig) -> pd.DataFrame:
    """The finished study's hypervolume history: one row per ended trial, in end order, with the
    cumulative ``trial_epochs`` and ``hypervolume_normalized``."""
    outcome = study_summary(study)
    ideal = outcome.dense.ideal(study.metric_names) if outcome.dense is not None else [math.nan]
    if not all(math.isfinite(value) for value in ideal):
        raise SystemExit(f"{study.name}: the dense top-1 is unknown: set dense_reference.top1 in the study file")
    return hypervolume_history(outcome.trials, study.metric_names, study.directions, outcome.reference, ideal)


def run_arms(base: StudyConfig, seeds: list[int], reference_trials: int,
             cpus: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs (or reads, when finished) every arm of every seed; returns one row per run
    (``seed``, ``arm``, ``trials``, ``stopped``, ``trial_epochs``, ``trial_epochs_shared``,
    ``hypervolume_normalized``) and the runs' histories (``seed``, ``arm`` and the history's
    columns)."""
    from p3b_search.launch import run_study

    runs, histories = [], []
    for seed in seeds:
        for arm in ARMS:
            study = arm_study(base, arm, seed, reference_trials)
            if not study_finished(study):
                print(f"running {study.name} ...", flush=True)
                outcome = run_study(study, resume=study.layout.root.exists(), num_cpus=cpus)
                if outcome.interrupted:
                    sys.exit(f"{study.name} was interrupted: run the command again to continue")
            outcome = study_summary(study)
            trials = outcome.trials
            history = history_of(study).assign(seed=seed, arm=arm)
            runs.append({"seed": seed, "arm": arm, "trials": len(trials),
                         "stopped": int((trials[STATE] == PRUNED).sum()),
                         "trial_epochs": int(trial_epochs_spent(trials).sum()),
                         "trial_epochs_shared": int(outcome.trial_epochs_shared),
                         "hypervolume_normalized": float(history["hypervolume_normalized"].iloc[-1])})
            histories.append(history)
    return pd.DataFrame(runs), pd.concat(histories, ignore_index=True)


def hypervolume_at(history: pd.DataFrame, trial_epochs: float) -> float:
    """A run's normalised hypervolume once it had spent ``trial_epochs`` (``history``: one run's,
    ``trial_epochs`` cumulative; its last ended trial within that budget, 0 before any ended)."""
    within = history[history["trial_epochs"] <= trial_epochs]
    return float(within["hypervolume_normalized"].iloc[-1]) if len(within) else 0.0


def _interval(interval, digits: int = 4) -> str:
    return f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"


def markdown(name: str, runs: pd.DataFrame, histories: pd.DataFrame, margin: float, command: str) -> str:
    """The per-run table and the two paired comparisons as Markdown."""
    by_arm = {arm: runs[runs["arm"] == arm].set_index("seed") for arm in ARMS}
    hv = {arm: frame["hypervolume_normalized"].to_dict() for arm, frame in by_arm.items()}
    lines = [f"# Does the study earn its compute: `{name}`", "", "    " + command, "",
             "| seed | arm | trials | stopped | trial-epochs trained | restored from prefixes | "
             "normalised hypervolume |", "|---|---|---|---|---|---|---|"]
    for row in runs.sort_values(["seed", "arm"]).itertuples():
        lines.append(f"| {row.seed} | {row.arm} | {row.trials} | {row.stopped} | {row.trial_epochs} | "
                     f"{row.trial_epochs_shared} | {row.hypervolume_normalized:.4f} |")
    full_test = paired_t_test(hv["default"], hv["full"])
    ratio = t_interval((by_arm["default"]["trial_epochs"] / by_arm["full"]["trial_epochs"]).dropna())
    tost = equivalence_p(hv["default"], hv["full"], margin)
    equivalent = tost < 0.05
    met = equivalent and ratio.high <= 0.5
    lines += ["", f"**Default - full** (paired by seed, n = {full_test.difference.n}): normalised hypervolume "
              f"{_interval(full_test.difference)}; equivalence within ±{margin:g} (two one-sided tests): "
              f"p = {tost:.3f}, {'equivalent' if equivalent else 'not shown equivalent'}. Trial-epochs, default / "
              f"full: {ratio.mean:.1%} [{ratio.low:.1%}, {ratio.high:.1%}]. Goal (equivalent with at most 50 % "
              f"of the trial-epochs): **{'met' if met else 'not met'}**."]
    at_equal, short = {}, []
    for seed, row in by_arm["default"].iterrows():
        reference = histories[(histories["seed"] == seed) & (histories["arm"] == "reference")]
        at_equal[seed] = hypervolume_at(reference, row["trial_epochs"])
        spent = reference["trial_epochs"].max()
        if spent < row["trial_epochs"]:
            short.append(f"{seed} ({spent} of {row['trial_epochs']})")
    vs_reference = paired_t_test(hv["default"], at_equal)
    lines += ["", "**Default - reference at the default's trial-epochs** (the reference's hypervolume once it had "
              "spent as many trial-epochs as the default did; per seed: "
              + ", ".join(f"{seed}: {value:.4f}" for seed, value in at_equal.items())
              + f"): {_interval(vs_reference.difference)}, p = {vs_reference.p:.3f} "
              f"({'separated' if vs_reference.difference.excludes_zero else 'not separated'})."]
    if short:
        lines.append(f"Not at equal compute for seed {', '.join(short)}: the reference spent fewer trial-epochs "
                     "than the default and is read at its end (raise --reference-trials).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study file: its setup is the default arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference-trials", type=int, default=None,
                        help="trials of the reference arm, a multiple of 4 (default: the study's n_trials)")
    parser.add_argument("--margin", type=float, default=HV_MARGIN, help="equivalence margin, normalised hypervolume")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs local Ray may use (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--from-parquet", type=Path, default=None, metavar="RUNS",
                        help="run nothing: the table from an earlier run's _runs.parquet (and its _history.parquet)")
    args = parser.parse_args()
    base = load_study(args.study)
    reference_trials = args.reference_trials or base.n_trials // len(LADDER) * len(LADDER)
    if args.from_parquet is not None:
        runs = pd.read_parquet(args.from_parquet)
        histories = pd.read_parquet(args.from_parquet.with_name(
            args.from_parquet.name.replace("_runs.parquet", "_history.parquet")))
    else:
        runs, histories = run_arms(base, args.seeds, reference_trials, args.cpus)
        args.out.mkdir(parents=True, exist_ok=True)
        runs.to_parquet(args.out / f"{base.name}_runs.parquet", index=False)
        histories.to_parquet(args.out / f"{base.name}_history.parquet", index=False)
    text = markdown(base.name, runs, histories, args.margin, run_command(sys.argv[1:], "python -m benchmarks.search_evidence"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{base.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
