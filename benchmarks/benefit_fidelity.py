"""Does a cheaper block-benefit estimate make the same decisions as the full one?

    python search.py run studies/benefit_fidelity.yaml
    python benchmarks/benefit_fidelity.py benefit_fidelity

Reads a finished study whose P3B trials differ only in ``aux_batch_fraction``, ``aux_every`` and
the seed (``studies/benefit_fidelity.yaml``). The *full* computation is ``aux_batch_fraction 1,
aux_every 1`` (every image of every micro-batch, as the reference code). For every other setting,
paired with the full run of the same seed, it reports:

* **window benefit rank agreement**: at each mask update both runs made (same step), Spearman's rho
  between the two runs' window benefit D_j = alpha x cls + (1 - alpha) x patch Delta Psi over the
  2L sub-blocks; the median over updates (and its lowest decile), then the median over seeds.
  Goal >= 0.9;
* **final keep ratios**: mean absolute difference of the per-sub-block keep ratios at the last
  update, averaged over seeds. Goal <= 0.05;
* **final top-1**: the setting's mean over seeds and whether it lies inside the full
  computation's 95 % t interval; the paired difference with its interval.

Writes ``<out>/<study>_fidelity.md`` and prints it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

FULL = (1.0, 1)
GOAL_RHO, GOAL_KEEP = 0.9, 0.05


def settings(study, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per COMPLETE trial: ``trial``, ``fraction``, ``every`` (resolved), ``seed``, ``top1``, ``alpha``."""
    from p3b_search.methods.p3b import P3BConfig
    from p3b_search.search.compare import complete_trials

    rows = []
    for row, config in complete_trials(study, trials):
        knobs = P3BConfig(**config.method_config)
        rows.append({"trial": int(row["number"]), "fraction": knobs.aux_batch_fraction, "every": knobs.aux_period,
                     "seed": config.training.seed, "top1": float(row["top1"]), "alpha": knobs.alpha})
    return pd.DataFrame(rows)


def window_benefit(allocations: pd.DataFrame, trial: int, alpha: float) -> pd.DataFrame:
    """Updates x sub-blocks table of D_j for one trial (updates that measured a benefit)."""
    rows = allocations[(allocations["trial"] == trial) & allocations["benefit_cls"].notna()]
    rows = rows.assign(benefit=alpha * rows["benefit_cls"] + (1 - alpha) * rows["benefit_patch"])
    return rows.pivot_table(index="step", columns="sub_block", values="benefit")


def final_keep_ratios(allocations: pd.DataFrame, trial: int) -> pd.Series:
    rows = allocations[allocations["trial"] == trial]
    last = rows[rows["step"] == rows["step"].max()]
    return last.set_index("sub_block")["keep_ratio"].sort_index()


def pair_figures(allocations: pd.DataFrame, full: int, cheap: int, alpha: float) -> dict[str, float]:
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
        pairs = [pair_figures(allocations, int(full.loc[s, "trial"]), int(group.loc[s, "trial"]),
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


def markdown(name: str, table: pd.DataFrame, runs: pd.DataFrame) -> str:
    seeds = ", ".join(map(str, sorted(runs["seed"].unique())))
    lines = [f"# Block-benefit fidelity: study `{name}`", "",
             f"Seeds {seeds}; full computation = aux_batch_fraction 1, aux_every 1. head cost = the share of the",
             "full auxiliary-head compute (fraction / every). rho: Spearman of the window benefit D_j over the",
             "sub-blocks at each mask update (median over updates; p10: its lowest decile), median over seeds.",
             "keep MAD: mean |keep ratio difference| at the last update, mean over seeds. diff: top-1 minus the",
             "full run's, paired by seed, 95 % t interval.", "",
             f"    python search.py run studies/{name}.yaml", f"    python benchmarks/benefit_fidelity.py {name}", "",
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
    parser.add_argument("study", help="study name (folder under --output-dir)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from p3b_search.search.results import read_allocations, read_trials
    from p3b_search.search.runner import study_from_folder

    study = study_from_folder(args.output_dir / args.study)
    runs = settings(study, read_trials(study.layout))
    if not ((runs["fraction"] == FULL[0]) & (runs["every"] == FULL[1])).any():
        sys.exit(f"{args.study}: no trial ran the full computation (aux_batch_fraction 1, aux_every 1)")
    text = markdown(args.study, fidelity(runs, read_allocations(study.layout)), runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.study}_fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
