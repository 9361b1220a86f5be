"""Does a cheaper block-benefit estimate make the same decisions as the full one?

    python benchmarks/benefit_fidelity.py studies/benefit_fidelity.yaml --settings 1,1 0.25,4

Runs the study (P3B, a grid over seeds) once per setting ``aux_batch_fraction,aux_every``, in
folders ``<output_dir>/<name>-f<fraction>-k<every>`` (a finished one is read, not run again), then
compares. The *full* computation is ``1,1`` (every image of every micro-batch, as the reference
code). For every other setting, paired with the full run of the same seed, it reports:

* **window benefit rank agreement**: at each mask update both runs made (same step), Spearman's rho
  between the two runs' window benefit D_j = alpha x cls + (1 - alpha) x patch Delta Psi over the
  2L sub-blocks; the median over updates (and its lowest decile), then the median over seeds.
  Goal >= 0.9;
* **final keep ratios**: mean absolute difference of the per-sub-block keep ratios at the last
  update, averaged over seeds. Goal <= 0.05;
* **final top-1**: the setting's mean over seeds and whether it lies inside the full
  computation's 95 % t interval; the paired difference with its interval.

Writes ``<out>/<name>_fidelity.md`` and prints it.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

FULL = (1.0, 1)
GOAL_RHO, GOAL_KEEP = 0.9, 0.05


def setting_study(study, fraction: float, every: int):
    """``study`` with P3B's auxiliary heads at ``fraction`` of every ``every``-th micro-batch."""
    from p3b_search.study.loading import with_overrides

    config = {**study.method.config, "aux_batch_fraction": fraction, "aux_every": every}
    return with_overrides(study, name=f"{study.name}-f{fraction:g}-k{every}",
                          method={**study.method.model_dump(), "config": config})


def settings(study, fraction: float, every: int) -> pd.DataFrame:
    """One row per COMPLETE trial of a setting's study: ``trial`` (study:number), ``fraction``,
    ``every``, ``seed``, ``top1``, ``alpha``."""
    from p3b_search.method_specs.p3b import P3BConfig
    from p3b_search.study.compare import complete_trials
    from p3b_search.study.results import read_trials

    rows = []
    for row, config in complete_trials(study, read_trials(study.layout)):
        knobs = P3BConfig(**config.method_config)
        rows.append({"trial": f"{study.name}:{int(row['number'])}", "fraction": fraction, "every": every,
                     "seed": config.training.seed, "top1": float(row["top1"]), "alpha": knobs.alpha})
    return pd.DataFrame(rows)


def allocations_of(study) -> pd.DataFrame:
    """The study's allocation rows with ``trial`` as ``study:number``."""
    from p3b_search.study.results import read_allocations

    rows = read_allocations(study.layout)
    return rows.assign(trial=study.name + ":" + rows["trial"].astype(int).astype(str))


def window_benefit(allocations: pd.DataFrame, trial: str, alpha: float) -> pd.DataFrame:
    """Updates x sub-blocks table of D_j for one trial (updates that measured a benefit)."""
    rows = allocations[(allocations["trial"] == trial) & allocations["benefit_cls"].notna()]
    rows = rows.assign(benefit=alpha * rows["benefit_cls"] + (1 - alpha) * rows["benefit_patch"])
    return rows.pivot_table(index="step", columns="sub_block", values="benefit")


def final_keep_ratios(allocations: pd.DataFrame, trial: str) -> pd.Series:
    rows = allocations[allocations["trial"] == trial]
    last = rows[rows["step"] == rows["step"].max()]
    return last.set_index("sub_block")["keep_ratio"].sort_index()


def pair_figures(allocations: pd.DataFrame, full: str, cheap: str, alpha: float) -> dict[str, float]:
    """Rank agreement per update and final keep-ratio distance of one (full, cheap) pair."""
    a, b = window_benefit(allocations, full, alpha), window_benefit(allocations, cheap, alpha)
    steps = a.index.intersection(b.index)
    rhos = [stats.spearmanr(a.loc[s], b.loc[s]).statistic for s in steps]
    rhos = [r for r in rhos if not math.isnan(r)]
    keep = (final_keep_ratios(allocations, full) - final_keep_ratios(allocations, cheap)).abs().mean()
    return {"updates": len(rhos), "rho_median": float(np.median(rhos)), "rho_p10": float(np.percentile(rhos, 10)),
            "keep_mad": float(keep)}


def fidelity(runs: pd.DataFrame, allocations: pd.DataFrame) -> pd.DataFrame:
    """Per cheaper setting: the figures of the module docstring, over the seeds it shares with full."""
    from p3b_search.stats import paired_difference, t_interval

    full = runs[(runs["fraction"] == FULL[0]) & (runs["every"] == FULL[1])].set_index("seed")
    full_ci = t_interval(full["top1"])
    out = []
    for (fraction, every), group in runs.groupby(["fraction", "every"]):
        group = group.set_index("seed")
        pairs = [pair_figures(allocations, str(full.loc[s, "trial"]), str(group.loc[s, "trial"]),
                              float(group.loc[s, "alpha"])) for s in group.index if s in full.index]
        diff = paired_difference(group["top1"].to_dict(), full["top1"].to_dict())
        top1 = t_interval(group["top1"])
        out.append({
            "aux_batch_fraction": fraction, "aux_every": every, "head_cost": fraction / every, "seeds": len(group),
            "rho_median": float(np.median([p["rho_median"] for p in pairs])),
            "rho_p10": float(np.median([p["rho_p10"] for p in pairs])),
            "keep_mad": float(np.mean([p["keep_mad"] for p in pairs])),
            "top1": top1.mean, "top1_low": top1.low, "top1_high": top1.high,
            "inside_full_ci": full_ci.low <= top1.mean <= full_ci.high,
            "diff": diff.mean, "diff_low": diff.low, "diff_high": diff.high,
        })
    return pd.DataFrame(out).sort_values("head_cost", ascending=False)


def markdown(name: str, table: pd.DataFrame, runs: pd.DataFrame, command: str) -> str:
    seeds = ", ".join(map(str, sorted(runs["seed"].unique())))
    lines = [f"# Block-benefit fidelity: study `{name}`", "",
             f"Seeds {seeds}; full computation = aux_batch_fraction 1, aux_every 1. head cost = the share of the",
             "full auxiliary-head compute (fraction / every). rho: Spearman of the window benefit D_j over the",
             "sub-blocks at each mask update (median over updates; p10: its lowest decile), median over seeds.",
             "keep MAD: mean |keep ratio difference| at the last update, mean over seeds. diff: top-1 minus the",
             "full run's, paired by seed, 95 % t interval.", "",
             "    " + command, "",
             "| aux_batch_fraction | aux_every | head cost | seeds | rho (median) | rho (p10) | keep MAD | "
             "top-1 % [95 % CI] | inside full CI | diff [95 % CI] | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        met = r.rho_median >= GOAL_RHO and r.keep_mad <= GOAL_KEEP and r.inside_full_ci
        full = (r.aux_batch_fraction, r.aux_every) == FULL
        lines.append(
            f"| {r.aux_batch_fraction:g} | {r.aux_every} | {r.head_cost:.3f} | {r.seeds} | {r.rho_median:.3f} | "
            f"{r.rho_p10:.3f} | {r.keep_mad:.4f} | {r.top1:.2f} [{r.top1_low:.2f}, {r.top1_high:.2f}] | "
            f"{'-' if full else ('yes' if r.inside_full_ci else 'no')} | "
            f"{'-' if full else f'{r.diff:+.2f} [{r.diff_low:+.2f}, {r.diff_high:+.2f}]'} | "
            f"{'(reference)' if full else ('yes' if met else 'no')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study file (P3B, a grid over training.seed)")
    parser.add_argument("--settings", nargs="+", default=["1,1", "0.25,4"], metavar="FRACTION,EVERY",
                        help="aux_batch_fraction,aux_every pairs; 1,1 (the full computation) is always run")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs local Ray may use (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from p3b_search.launch import run_study
    from p3b_search.study.loading import load_study
    from p3b_search.study.summary import study_finished

    base = load_study(args.study)
    pairs = [(float(f), int(k)) for f, k in (s.split(",") for s in args.settings)]
    pairs = [FULL] + [p for p in dict.fromkeys(pairs) if p != FULL]
    runs, allocations = [], []
    for fraction, every in pairs:
        study = setting_study(base, fraction, every)
        if not study_finished(study):
            print(f"running {study.name} ...", flush=True)
            if run_study(study, resume=study.layout.root.exists(), num_cpus=args.cpus).interrupted:
                sys.exit(f"{study.name} was interrupted: run the command again to continue")
        runs.append(settings(study, fraction, every))
        allocations.append(allocations_of(study))
    runs_table = pd.concat(runs, ignore_index=True)
    command = "python benchmarks/benefit_fidelity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = markdown(base.name, fidelity(runs_table, pd.concat(allocations, ignore_index=True)), runs_table, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{base.name}_fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
