"""The tabular benchmark: export a grid study's trials with their learning curves, replay samplers
and schedulers over them, and measure how well an early epoch ranks the trials.

    python benchmarks/tabular_benchmark.py export RUNS/tabular_glyphs --dense-top1 90.44
    python benchmarks/tabular_benchmark.py simulate --seeds 30 --trials 40
    python benchmarks/tabular_benchmark.py rungs

``export`` writes the table (:mod:`p3b_search.study.tabular`: one row per COMPLETE trial per
epoch, the dense reference and the study in its metadata). ``simulate`` runs every arm (each
sampler x each scheduler, and the reference recipe) for each replay seed with
:func:`p3b_search.search.replay.replay` and writes ``PREFIX.parquet`` (the trajectories: one row
per trial end), ``PREFIX.md`` (per arm: the final normalised hypervolume, the hypervolume at the
trial-epochs every run spent, the trial-epochs to reach 95 % of the table's best hypervolume)
and ``PREFIX.png`` (hypervolume against trial-epochs, mean and 95 % band per arm). ``rungs``
measures, at every epoch before the last, how well a trial's non-dominated rank there predicts
its final rank, and how many final-front trials successive halving would keep there.

Intervals are Student t intervals over replay seeds (95 %) unless said otherwise.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from p3b_search.stats import CONFIDENCE, t_interval
from p3b_search.study.trials_table import PRUNED, STATE

RESULTS = Path(__file__).parent / "results"
TABLE = RESULTS / "tabular_glyphs.parquet"
SAMPLERS = ("random", "tpe", "nsga2", "gp")
TARGET = 0.95  # of the table's best hypervolume
RUNG_ETA = 3
BOOTSTRAP_RESAMPLES = 2000


def _command() -> str:
    return "python benchmarks/tabular_benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (what a report should print)."""
    resolved = Path(path).resolve()
    root = RESULTS.parent.parent.resolve()
    return resolved.relative_to(root) if resolved.is_relative_to(root) else Path(path)


def _interval(values: Sequence[float], digits: int = 3) -> str:
    ci = t_interval(values)
    if ci.n == 0:
        return "n/a"
    if ci.n < 2:
        return f"{ci.mean:.{digits}f}"
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


# ----------------------------------------------------------------------------- export

def export(args: argparse.Namespace) -> None:
    from p3b_search.study.layout import StudyLayout
    from p3b_search.study.results import read_trials
    from p3b_search.study.tabular import read_table, table_from_folder, write_table

    table, metadata = table_from_folder(args.folder, args.dense_top1)
    write_table(table, metadata, args.out)
    bench = read_table(args.out)
    states = read_trials(StudyLayout(Path(args.folder).expanduser().resolve()))["state"].value_counts()
    trials = table.drop_duplicates("trial")
    seeds = pd.Series([len(bench.curves(config)) for config in bench.configs])
    epoch_seconds = table.groupby("trial")["epoch_seconds"].sum()
    outside = (trials.set_index("trial")["duration_s"] - epoch_seconds).clip(lower=0)
    dense = metadata["dense"]
    print(f"{args.out}: {len(trials)} COMPLETE trials ({len(table)} epoch rows) of "
          f"{int(states.sum())} in trials.parquet ({', '.join(f'{n} {s}' for s, n in states.items())})")
    print(f"configurations: {len(bench.configs)} (" + ", ".join(
        f"{count} with {n} seed{'s' if n > 1 else ''}" for n, count in seeds.value_counts().sort_index(
            ascending=False).items()) + ")")
    print(f"dense reference: {dense['macs'] / 1e6:.3f}M MACs per image, top-1 {dense['top1']:.2f} % "
          f"({metadata['dense_source']})")
    print(f"seconds outside the epochs (start-up, shrink, measurement; not replayed): median "
          f"{outside.median():.1f} s per trial, 90th percentile {outside.quantile(0.9):.1f} s (a trial that "
          f"spanned an interruption of the study counts the pause: {int((outside > 60).sum())} over 60 s)")
    print(f"best normalised hypervolume (every trial of the table): {bench.best_hypervolume():.4f}")


# ----------------------------------------------------------------------------- simulate

def hypervolume_at(runs: pd.DataFrame, budgets: np.ndarray) -> np.ndarray:
    """``(runs, budgets)``: each run's hypervolume once it has spent each budget of trial-epochs
    (its value after the last trial end at or before the budget; 0 before the first). ``runs``:
    the trajectories of one arm, grouped by ``seed``."""
    out = []
    for _, run in runs.groupby("seed", sort=True):
        spent = run["trial_epochs"].to_numpy()
        hv = np.concatenate([[0.0], run["hypervolume"].to_numpy()])
        out.append(hv[np.searchsorted(spent, budgets, side="right")])
    return np.array(out)


def epochs_to_reach(run: pd.DataFrame, target: float) -> float:
    """Trial-epochs spent when the run's hypervolume first reached ``target`` (NaN: never)."""
    reached = run.loc[run["hypervolume"] >= target, "trial_epochs"]
    return float(reached.iloc[0]) if len(reached) else float("nan")


def arm_summary(trajectories: pd.DataFrame, best: float, timings: dict[str, float]) -> pd.DataFrame:
    """One row per arm: final hypervolume, hypervolume at the common budget, epochs to reach
    ``TARGET`` x ``best``, spend, and the replay's own seconds per run."""
    ends = trajectories.groupby(["sampler", "scheduler", "seed"], sort=False).tail(1)
    common = int(ends["trial_epochs"].min())
    rows = []
    for (sampler, scheduler), runs in trajectories.groupby(["sampler", "scheduler"], sort=False):
        last = runs.groupby("seed").tail(1)
        reach = [epochs_to_reach(run, TARGET * best) for _, run in runs.groupby("seed")]
        reached = [r for r in reach if np.isfinite(r)]
        rows.append({"sampler": sampler, "scheduler": scheduler, "seeds": len(last),
                     "final_hv": _interval(last["hypervolume"].to_numpy()),
                     "hv_at_common": _interval(hypervolume_at(runs, np.array([common]))[:, 0]),
                     "epochs_to_target": _interval(reached, 1), "reached": f"{len(reached)}/{len(reach)}",
                     "trial_epochs": float(last["trial_epochs"].mean()),
                     "stopped": float((runs[STATE] == PRUNED).sum() / len(last)),
                     "wall_h": float(last["wall_s"].mean() / 3600), "missing": float(last["missing"].mean()),
                     "seconds_per_run": timings[f"{sampler}/{scheduler}"]})
    frame = pd.DataFrame(rows)
    frame.attrs["common"] = common
    return frame


def simulate_markdown(summary: pd.DataFrame, bench, settings, seeds: int, command: str, table: Path) -> str:
    best = bench.best_hypervolume()
    trials = len(bench.all_curves())
    lines = [
        "# Tabular benchmark: samplers and schedulers replayed", "", "    " + command, "",
        f"Table `{_shown(table)}`: {trials} trials, {len(bench.configs)} configurations; dense reference "
        f"{bench.dense.get('macs') / 1e6:.3f}M MACs, top-1 {bench.dense.get('top1'):.2f} % "
        f"({bench.dense.source}). Best normalised hypervolume (the whole table's front, both seeds): "
        f"**{best:.4f}**; target {TARGET:.0%} of it: {TARGET * best:.4f}.",
        f"Each arm: {seeds} replay seeds x {settings.trials} trials, concurrency {settings.concurrency} on the "
        f"recorded epoch times; early stopping: prune stage, margin {settings.margin:g} top-1 points, grace "
        f"{settings.grace_epochs} epoch(s); successive halving: rungs {list(settings.rungs)} (epochs done), "
        f"eta {settings.eta}. Sampler options: "
        f"{json.dumps(dict(settings.sampler_options)) if settings.sampler_options else 'the registry defaults'}.",
        f"Hypervolume at {summary.attrs['common']} trial-epochs: the least any run of any arm spent, so every "
        "run is compared at the same compute.",
        "", "| arm | seeds | final normalised HV, mean [95 % CI] | HV at "
        f"{summary.attrs['common']} trial-epochs | trial-epochs to {TARGET:.0%} of best, mean [95 % CI] "
        "(seeds that reach it) | reached | trial-epochs spent | stopped trials | emulated hours | "
        "replay CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        name = r.sampler if r.sampler == "reference" else f"{r.sampler} / {r.scheduler}"
        lines.append(f"| {name} | {r.seeds} | {r.final_hv} | {r.hv_at_common} | {r.epochs_to_target} | {r.reached} | "
                     f"{r.trial_epochs:.1f} | {r.stopped:.1f} | {r.wall_h:.2f} | {r.seconds_per_run:.2f} |")
    if summary["missing"].max() > 0:
        lines += ["", f"**Table incomplete**: samples missing from the table were skipped "
                      f"(mean per run up to {summary['missing'].max():.1f}); not a result."]
    return "\n".join(lines) + "\n"


def mean_band(runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trial-epoch budgets up to the least any run of ``runs`` (one arm) spent, and the mean
    hypervolume over its seeds there with the half-width of its 95 % t interval (0 for one seed)."""
    budgets = np.arange(0, int(runs.groupby("seed")["trial_epochs"].max().min()) + 1)
    values = hypervolume_at(runs, budgets)
    n = len(values)
    half = (stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1
            else np.zeros(len(budgets)))
    return budgets, values.mean(axis=0), half


def simulate_figure(trajectories: pd.DataFrame, best: float, path: Path) -> None:
    """Normalised hypervolume vs trial-epochs: a panel per scheduler, a line and 95 % band per
    sampler (the reference recipe in every panel); each arm's curve ends at the least any of its
    runs spent. The y axis starts below the lowest mean after four whole trials' epochs (the
    first trials' jumps from 0 are cut off)."""
    from matplotlib.figure import Figure

    from p3b_search.search.replay import NO_SCHEDULER, REFERENCE, SCHEDULERS

    searched = trajectories[trajectories["sampler"] != REFERENCE]
    schedulers = [s for s in SCHEDULERS if (searched["scheduler"] == s).any()] or [NO_SCHEDULER]
    reference = trajectories[trajectories["sampler"] == REFERENCE]
    styles = {"random": ("tab:blue", ":"), "tpe": ("tab:orange", "-"), "nsga2": ("tab:green", "-."),
              "gp": ("tab:red", "--"), REFERENCE: ("black", "-")}
    after_four_trials = 4 * int(trajectories["epochs"].max())
    fig = Figure(figsize=(5.2 * len(schedulers), 4.8), layout="constrained")
    axes = fig.subplots(1, len(schedulers), sharey=True, squeeze=False)[0]
    lowest = best
    for ax, scheduler in zip(axes, schedulers):
        arms = [(s, searched[(searched["sampler"] == s) & (searched["scheduler"] == scheduler)])
                for s in searched["sampler"].unique()] + [(REFERENCE, reference)]
        for order, (sampler, runs) in enumerate(arms):
            if runs.empty:
                continue
            budgets, mean, half = mean_band(runs)
            lowest = min(lowest, float(mean[min(after_four_trials, len(mean) - 1)]))
            colour, line = styles.get(sampler, ("tab:purple", "-"))
            ax.plot(budgets, mean, label=f"{sampler} ({runs['seed'].nunique()} seeds)", color=colour, linestyle=line,
                    linewidth=1.0 if sampler == REFERENCE else 1.8, zorder=3 + len(arms) - order)  # equal curves
            # (e.g. random and NSGA-II before its first generation) stay visible: the first drawn on top
            ax.fill_between(budgets, mean - half, mean + half, alpha=0.12, color=colour, linewidth=0)
        ax.axhline(best, color="black", linewidth=0.8, linestyle=":")
        ax.axhline(TARGET * best, color="black", linewidth=0.8, linestyle="-.")
        ax.set_title(f"scheduler: {scheduler}")
        ax.set_xlabel("cumulative trial-epochs")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("normalised hypervolume of the COMPLETE trials")
    axes[0].annotate(f"table's best {best:.3f}", (0, best), xytext=(2, 3), textcoords="offset points", fontsize=8)
    axes[0].annotate(f"{TARGET:.0%} of it", (0, TARGET * best), xytext=(2, -10), textcoords="offset points",
                     fontsize=8)
    axes[0].set_ylim(max(0.0, lowest - 0.05 * best), best * 1.02)
    fig.suptitle("Replay over the tabular benchmark: mean and 95 % t band over replay seeds")
    fig.savefig(path, dpi=130)


_WORKER: dict = {}  # a simulate worker's table and settings, read once per process


def _start_worker(table: Path, settings) -> None:
    import optuna
    import torch

    from p3b_search.study.tabular import read_table

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # e.g. GP's fallback on the conditional space, every trial
    torch.set_num_threads(1)  # GP's small tensors: one thread is fastest (each replay runs on one core)
    _WORKER.update(bench=read_table(table), settings=settings)


def _replay_run(arm, seed: int) -> tuple[pd.DataFrame, float]:
    """One replay in a worker: its trajectory and the CPU seconds it took."""
    from p3b_search.search.replay import replay

    started = time.process_time()
    trajectory = replay(_WORKER["bench"], arm, seed, _WORKER["settings"])
    return trajectory, time.process_time() - started


def simulate(args: argparse.Namespace) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from p3b_search.search.replay import REFERENCE, Arm, ReplaySettings, check_arms

    settings = ReplaySettings(trials=args.trials, concurrency=args.concurrency, grace_epochs=args.grace_epochs,
                              margin=args.margin, rungs=tuple(args.rungs), eta=args.eta,
                              allow_missing=args.allow_missing, sampler_options=args.sampler_options)
    _start_worker(args.table, settings)
    bench = _WORKER["bench"]
    arms = [Arm(s, scheduler) for s in args.samplers for scheduler in args.schedulers]
    if not args.no_reference:
        arms.append(Arm(REFERENCE))
    check_arms(bench, arms, settings)
    runs = [(arm, seed) for arm in arms for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, initializer=_start_worker, initargs=(args.table, settings)) as pool:
        results = list(pool.map(_replay_run, *zip(*runs)))
    trajectories = [trajectory for trajectory, _ in results]
    timings = {}
    for arm in arms:
        cpu = [seconds for (run_arm, _), (_, seconds) in zip(runs, results) if run_arm == arm]
        timings[f"{arm.sampler}/{arm.scheduler}"] = sum(cpu) / len(cpu)
        print(f"{arm.name}: {len(cpu)} seeds in {sum(cpu):.1f} CPU s", flush=True)
    frame = pd.concat(trajectories, ignore_index=True)
    best = bench.best_hypervolume()
    summary = arm_summary(frame, best, timings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.out.with_suffix(".parquet"), index=False)
    text = simulate_markdown(summary, bench, settings, args.seeds, _command(), args.table)
    args.out.with_suffix(".md").write_text(text)
    simulate_figure(frame, best, args.out.with_suffix(".png"))
    print(text)


# ----------------------------------------------------------------------------- rungs

def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.spearmanr(x, y).statistic)


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.kendalltau(x, y).statistic)


def _bootstrap(statistic, x: np.ndarray, y: np.ndarray, seed: int, resamples: int) -> tuple[float, float]:
    """95 % percentile interval of ``statistic(x, y)`` over paired bootstrap resamples; resamples
    where it is undefined (all ranks tied) are left out (NaN when none is left)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(x), size=(resamples, len(x)))
    values = np.array([statistic(x[i], y[i]) for i in picks])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return float(low), float(high)


def rung_fidelity(bench, eta: int = RUNG_ETA, resamples: int = BOOTSTRAP_RESAMPLES) -> pd.DataFrame:
    """Per training seed and rung (epochs done 1 .. last - 1): over the table's trials of that
    seed, Spearman's and Kendall's rank correlation between the non-dominated rank on (top-1,
    MACs) at the rung and on the final objectives (95 % paired-bootstrap percentile intervals),
    and the fraction of the final front that synchronous successive halving with ``eta`` would
    keep at the rung (95 % Clopper-Pearson interval). ``resamples``: of the bootstrap."""
    from p3b_search.study.rungs import nondominated_ranks, promotion_quota, rung_order

    rows = []
    curves = bench.all_curves()
    for seed in sorted({c.seed for c in curves}):
        group = [c for c in curves if c.seed == seed]
        final = nondominated_ranks(np.array([c.final for c in group]), bench.directions)
        front = np.flatnonzero(final == 0)
        for rung in range(1, group[0].epochs):
            at_rung = np.array([(c.top1[rung - 1], c.macs[rung - 1]) for c in group])
            ranks = nondominated_ranks(at_rung, bench.directions)
            kept = set(rung_order(at_rung, bench.directions)[:promotion_quota(len(group), eta)].tolist())
            survivors = sum(int(i in kept) for i in front)
            proportion = stats.binomtest(survivors, len(front)).proportion_ci(method="exact")
            rows.append({"seed": seed, "rung": rung, "trials": len(group), "stage": int(group[0].stage[rung - 1]),
                         "spearman": _spearman(ranks, final),
                         "spearman_ci": _bootstrap(_spearman, ranks, final, rung, resamples),
                         "kendall": _kendall(ranks, final),
                         "kendall_ci": _bootstrap(_kendall, ranks, final, rung, resamples),
                         "front": len(front), "front_kept": survivors,
                         "front_kept_ci": (proportion.low, proportion.high)})
    return pd.DataFrame(rows)


def rungs_markdown(fidelity: pd.DataFrame, eta: int, command: str, table: Path) -> str:
    lines = ["# Tabular benchmark: what each candidate rung predicts", "", "    " + command, "",
             f"Table `{_shown(table)}`. Per training seed, over its trials: the non-dominated rank on (top-1, MACs) after "
             "the rung's epoch against the rank on the final objectives (0 = the front), Spearman's rho and "
             f"Kendall's tau-b with 95 % paired-bootstrap percentile intervals ({BOOTSTRAP_RESAMPLES} resamples, "
             "those with every rank tied left out); "
             f"and of the final front's trials, how many successive halving with eta = {eta} would keep at the "
             f"rung (the top 1/{eta} by rank then crowding distance, as `SuccessiveHalvingRule` orders them; "
             f"95 % Clopper-Pearson interval). A rung keeping trials at random would keep about 1/{eta}.",
             "", "| seed | rung (epochs done) | stage | trials | Spearman rho [95 % CI] | Kendall tau [95 % CI] | "
             "final-front trials kept [95 % CI] |", "|---|---|---|---|---|---|---|"]
    for r in fidelity.itertuples():
        stage = "prune" if r.stage == 0 else "fine-tune"
        lines.append(f"| {r.seed} | {r.rung} | {stage} | {r.trials} | {r.spearman:.3f} [{r.spearman_ci[0]:.3f}, "
                     f"{r.spearman_ci[1]:.3f}] | {r.kendall:.3f} [{r.kendall_ci[0]:.3f}, {r.kendall_ci[1]:.3f}] | "
                     f"{r.front_kept}/{r.front} = {r.front_kept / r.front:.2f} [{r.front_kept_ci[0]:.2f}, "
                     f"{r.front_kept_ci[1]:.2f}] |")
    means = fidelity.groupby("rung")[["spearman", "kendall"]].mean()
    lines += ["", "Mean over the seeds where it is defined: " + "; ".join(
        f"rung {rung}: rho {m.spearman:.3f}, tau {m.kendall:.3f}" for rung, m in means.iterrows()) + "."]
    return "\n".join(lines) + "\n"


def rungs(args: argparse.Namespace) -> None:
    from p3b_search.study.tabular import read_table

    bench = read_table(args.table)
    text = rungs_markdown(rung_fidelity(bench, args.eta), args.eta, _command(), args.table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


# ----------------------------------------------------------------------------- verdicts

HV_MARGIN = 0.01  # normalised hypervolume: issue 22's equivalence margin


def _run_values(runs: pd.DataFrame, budgets: dict[int, float] | float | None = None) -> dict[int, float]:
    """Per replay seed: the run's final hypervolume (``budgets`` None), or its hypervolume at a
    budget of trial-epochs (one for all, or one per seed)."""
    values = {}
    for seed, run in runs.groupby("seed", sort=True):
        if budgets is None:
            values[int(seed)] = float(run["hypervolume"].iloc[-1])
        else:
            budget = budgets[int(seed)] if isinstance(budgets, dict) else budgets
            values[int(seed)] = float(hypervolume_at(run, np.array([budget]))[0, 0])
    return values


def _paired_row(a: dict[int, float], b: dict[int, float], margin: float) -> dict[str, float]:
    from p3b_search.stats import equivalence_p, paired_t_test

    test = paired_t_test(a, b)
    return {"diff": test.difference.mean, "low": test.difference.low, "high": test.difference.high,
            "n": test.difference.n, "p": test.p, "tost_p": equivalence_p(a, b, margin)}


def verdict_tables(trajectories: pd.DataFrame, margin: float = HV_MARGIN) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired by replay seed. ``savings``: per sampler and scheduler, trial-epochs against the
    same sampler without a scheduler and the final hypervolume difference (with two one-sided
    tests of equivalence within ``margin``); the no-scheduler arm also against itself at half
    its trial-epochs. ``reference``: each arm's final hypervolume minus the reference recipe's
    at the trial-epochs that run spent. p-values of each table Holm-adjusted over its rows."""
    from p3b_search.search.replay import NO_SCHEDULER, REFERENCE
    from p3b_search.stats import holm

    arms = {key: runs for key, runs in trajectories.groupby(["sampler", "scheduler"], sort=False)}
    spent = {key: runs.groupby("seed")["trial_epochs"].last() for key, runs in arms.items()}
    savings, against = [], []
    reference = arms.get((REFERENCE, NO_SCHEDULER))
    for (sampler, scheduler), runs in arms.items():
        if sampler == REFERENCE:
            continue
        final = _run_values(runs)
        if scheduler == NO_SCHEDULER:
            half = _run_values(runs, (spent[(sampler, scheduler)] / 2).to_dict())
            savings.append({"sampler": sampler, "arm": "none at half its trial-epochs", "epochs_ratio": 0.5,
                            **_paired_row(half, final, margin)})
        else:
            base = (sampler, NO_SCHEDULER)
            ratio = (spent[(sampler, scheduler)] / spent[base]).mean()
            savings.append({"sampler": sampler, "arm": scheduler, "epochs_ratio": float(ratio),
                            **_paired_row(final, _run_values(arms[base]), margin)})
        if reference is not None:
            at_spent = _run_values(reference, spent[(sampler, scheduler)].to_dict())
            against.append({"sampler": sampler, "arm": scheduler, "trial_epochs": float(spent[(sampler, scheduler)].mean()),
                            **_paired_row(final, at_spent, margin)})
    tables = []
    for rows in (savings, against):
        frame = pd.DataFrame(rows)
        if len(frame):
            frame["p_holm"] = holm(frame["p"].fillna(1.0).tolist()).adjusted
        tables.append(frame)
    return tables[0], tables[1]


def _difference(row) -> str:
    return f"{row.diff:+.4f} [{row.low:+.4f}, {row.high:+.4f}]"


def verdicts_markdown(savings: pd.DataFrame, reference: pd.DataFrame, margin: float, command: str, replay: Path) -> str:
    lines = ["# Tabular benchmark: what each arm saves, and what it costs", "", "    " + command, "",
             f"From `{_shown(replay)}` (the trajectories of `simulate`). Differences of normalised hypervolume are paired by "
             f"replay seed (95 % t interval); p: paired t test, Holm-adjusted over the rows of each table; "
             f"equivalence: two one-sided paired tests within ±{margin:g}.", "",
             "## Against the same sampler without a scheduler", "",
             "| sampler | arm | trial-epochs / none | final HV - none's final HV [95 % CI] | p (Holm) | equivalent "
             f"within ±{margin:g} (TOST p) | goal: equivalent with <= 50 % |", "|---|---|---|---|---|---|---|"]
    for row in savings.itertuples(index=False):
        equivalent = row.tost_p < 0.05
        goal = "met" if equivalent and row.epochs_ratio <= 0.5 else "not met"
        lines.append(f"| {row.sampler} | {row.arm} | {row.epochs_ratio:.1%} | {_difference(row)} | {row.p_holm:.3f} | "
                     f"{'yes' if equivalent else 'no'} ({row.tost_p:.3f}) | {goal} |")
    lines += ["", "## Against the reference recipe at equal trial-epochs", "",
              "Each run's final hypervolume minus that of the reference recipe's run of the same replay seed once it "
              "had spent as many trial-epochs.", "",
              "| sampler | scheduler | trial-epochs (mean) | HV - reference's [95 % CI] | p (Holm) | verdict |",
              "|---|---|---|---|---|---|"]
    for row in reference.itertuples(index=False):
        verdict = ("better" if row.low > 0 else "worse") if row.p_holm < 0.05 else "not separated"
        lines.append(f"| {row.sampler} | {row.arm} | {row.trial_epochs:.0f} | {_difference(row)} | {row.p_holm:.3f} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def verdicts(args: argparse.Namespace) -> None:
    savings, reference = verdict_tables(pd.read_parquet(args.replay), args.margin)
    text = verdicts_markdown(savings, reference, args.margin, _command(), args.replay)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


# ----------------------------------------------------------------------------- command line

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def _options(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('give {"sampler": {"option": value}}')
    return value


def parser() -> argparse.ArgumentParser:
    from p3b_search.search.replay import SCHEDULERS, ReplaySettings
    from p3b_search.search.samplers import available_samplers

    defaults = ReplaySettings()
    main = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write the table of a finished grid study")
    ex.add_argument("folder", type=Path, help="the study folder (<output_dir>/<name>)")
    ex.add_argument("--dense-top1", type=float, default=None,
                    help="the dense model's top-1 %% (default: the study's dense reference)")
    ex.add_argument("--out", type=Path, default=TABLE)
    sim = commands.add_parser("simulate", help="replay samplers x schedulers over the table")
    sim.add_argument("--table", type=Path, default=TABLE)
    sim.add_argument("--samplers", nargs="+", default=list(SAMPLERS),
                     choices=[s for s in available_samplers() if s != "grid"])
    sim.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    sim.add_argument("--no-reference", action="store_true", help="leave out the reference recipe arm")
    sim.add_argument("--seeds", type=_positive, default=30, help="replay seeds per arm: 0 .. N-1")
    sim.add_argument("--trials", type=int, default=defaults.trials, help="trials per replay")
    sim.add_argument("--concurrency", type=int, default=defaults.concurrency)
    sim.add_argument("--margin", type=float, default=defaults.margin, help="early stopping: top-1 points")
    sim.add_argument("--grace-epochs", type=int, default=defaults.grace_epochs)
    sim.add_argument("--rungs", type=int, nargs="+", default=list(defaults.rungs),
                     help="successive halving: epochs done (1-based, both stages)")
    sim.add_argument("--eta", type=int, default=defaults.eta)
    sim.add_argument("--sampler-options", type=_options, default={},
                     help='JSON keyword arguments by sampler, e.g. \'{"nsga2": {"population_size": 10}}\' '
                          "(default: the registry's, as a live study)")
    sim.add_argument("--jobs", type=_positive, default=1, help="replays run in parallel (processes)")
    sim.add_argument("--allow-missing", action="store_true",
                     help="skip sampled configurations the table lacks (a table still being built; not a result)")
    sim.add_argument("--out", type=Path, default=RESULTS / "tabular_glyphs_replay",
                     help="PREFIX of PREFIX.parquet, .md and .png")
    ru = commands.add_parser("rungs", help="how well each epoch ranks the trials")
    ru.add_argument("--table", type=Path, default=TABLE)
    ru.add_argument("--eta", type=int, default=RUNG_ETA)
    ru.add_argument("--out", type=Path, default=RESULTS / "tabular_glyphs_rungs.md")
    ve = commands.add_parser("verdicts", help="paired tests of the replay's arms: savings, equivalence, reference")
    ve.add_argument("--replay", type=Path, default=RESULTS / "tabular_glyphs_replay.parquet",
                    help="the trajectories written by simulate")
    ve.add_argument("--margin", type=float, default=HV_MARGIN, help="equivalence margin, normalised hypervolume")
    ve.add_argument("--out", type=Path, default=RESULTS / "tabular_glyphs_verdicts.md")
    return main


def main() -> None:
    from p3b_search.study.messages import StudyError

    args = parser().parse_args()
    try:
        {"export": export, "simulate": simulate, "rungs": rungs, "verdicts": verdicts}[args.command](args)
    except (StudyError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
