"""Do deeper sub-blocks gain their block benefit later? Per P3B trial (one trial = one seed), the
Spearman rank correlation of depth with *when* each sub-block's benefit arrives, attention and MLP
apart, then its mean over seeds with a 95 % interval, per recipe.

    python benchmarks/depth_benefit.py export runs/method_comparison_10seeds runs/depth_long_prune \\
        --out benchmarks/results/depth_benefit_rows.parquet
    python benchmarks/depth_benefit.py table benchmarks/results/depth_benefit_rows.parquet \\
        --out benchmarks/results/depth_benefit

``export`` keeps, of each study's P3B trials, the block benefits of every mask update (one row per
trial, update and sub-block: ``recipe`` = the study's name, ``seed``, ``step``, ``layer``,
``kind``, ``benefit_cls``, ``benefit_patch``); ``table`` computes everything from that file.

When a sub-block's benefit arrives, per trial, from its ΔΨ over the trial's mask updates
(time t = the update's rank / the trial's number of updates, in (0, 1]):

* ``arrival``: the centre of the benefit over time, sum(t * max(ΔΨ_t, 0)) / sum(max(ΔΨ_t, 0)):
  0.5 when the benefit is constant, later when it grows (a sub-block with no positive ΔΨ: NaN);
* ``gain``: the mean ΔΨ over the last third of the updates minus that over the first third.

ρ(depth, arrival) > 0 means deeper sub-blocks gain their benefit later, the pattern P3B's paper
reports. Each recipe's four primary tests (ρ of the arrival, attention / MLP x ΔΨ_cls / ΔΨ_patch,
mean over seeds against 0, one-sample t) are Holm-adjusted together.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from p3b_search.stats import holm, t_interval  # noqa: E402
from p3b_search.study.layout import StudyLayout  # noqa: E402
from p3b_search.study.loading import study_from_folder  # noqa: E402
from p3b_search.study.results import read_allocations, read_trials  # noqa: E402

CORE_METHOD = "p3b"
SIGNALS = ("benefit_cls", "benefit_patch")
KINDS = ("attn", "mlp")
COLUMNS = ["recipe", "seed", "step", "layer", "kind", "benefit_cls", "benefit_patch"]


def study_benefits(folder: Path) -> pd.DataFrame:
    """The block benefits of every mask update of the COMPLETE P3B trials of the study in
    ``folder`` (:data:`COLUMNS`; ``recipe`` = the study's name)."""
    layout = StudyLayout(folder)
    trials = read_trials(layout, must_exist=True)
    trials = trials[(trials["state"] == "COMPLETE") & (trials["method"] == CORE_METHOD)]
    allocations = read_allocations(layout).dropna(subset=list(SIGNALS))
    rows = allocations.merge(trials[["number", "param.training.seed"]], left_on="trial", right_on="number")
    rows = rows.rename(columns={"param.training.seed": "seed"}).assign(recipe=study_from_folder(folder).name)
    return rows[COLUMNS].sort_values(["seed", "step", "layer", "kind"]).reset_index(drop=True)


def arrival_times(benefits: pd.DataFrame) -> pd.DataFrame:
    """Per recipe, seed and sub-block (``layer``, ``kind``): ``<signal>_arrival`` and
    ``<signal>_gain`` for each signal of :data:`SIGNALS` (see the module docstring)."""
    keys = ["recipe", "seed"]
    t = benefits.groupby(keys)["step"].rank(method="dense") / benefits.groupby(keys)["step"].transform("nunique")
    frame = benefits.assign(t=t)
    columns: dict[str, pd.Series] = {}
    by_block = keys + ["layer", "kind"]
    for signal in SIGNALS:
        positive = frame[signal].clip(lower=0)
        weight = positive.groupby([frame[k] for k in by_block]).sum()
        columns[f"{signal}_arrival"] = (positive * frame["t"]).groupby([frame[k] for k in by_block]).sum() / weight
        first = frame[frame["t"] <= 1 / 3].groupby(by_block)[signal].mean()
        last = frame[frame["t"] > 2 / 3].groupby(by_block)[signal].mean()
        columns[f"{signal}_gain"] = last - first
    return pd.DataFrame(columns).reset_index()


def depth_correlations(timing: pd.DataFrame) -> pd.DataFrame:
    """Per recipe, seed, kind and signal: Spearman ρ of the layer index with the arrival and with
    the gain (NaN when a column is constant or has fewer than 3 values)."""
    rows = []
    for (recipe, seed, kind), group in timing.groupby(["recipe", "seed", "kind"]):
        for signal in SIGNALS:
            row = {"recipe": recipe, "seed": seed, "kind": kind, "signal": signal}
            for measure in ("arrival", "gain"):
                values = group[["layer", f"{signal}_{measure}"]].dropna()
                row[f"rho_{measure}"] = (scipy_stats.spearmanr(values["layer"], values.iloc[:, 1]).statistic
                                         if len(values) >= 3 else np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def summary(correlations: pd.DataFrame) -> pd.DataFrame:
    """Per recipe, kind and signal: the mean ρ over seeds with its 95 % t interval, the one-sample
    t test's p-value of the arrival's ρ against 0 and its Holm adjustment within the recipe."""
    rows = []
    for (recipe, kind, signal), group in correlations.groupby(["recipe", "kind", "signal"], sort=False):
        row = {"recipe": recipe, "kind": kind, "signal": signal}
        for measure in ("arrival", "gain"):
            values = group[f"rho_{measure}"].dropna()
            interval = t_interval(values)
            row |= {f"rho_{measure}": interval.mean, f"rho_{measure}_low": interval.low,
                    f"rho_{measure}_high": interval.high, "seeds": interval.n}
        arrival = group["rho_arrival"].dropna()
        row["p_arrival"] = float(scipy_stats.ttest_1samp(arrival, 0.0).pvalue) if len(arrival) >= 2 else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table["p_arrival_holm"] = np.nan
    for recipe, group in table.groupby("recipe", sort=False):
        adjusted = holm(group["p_arrival"].tolist())
        table.loc[group.index, "p_arrival_holm"] = adjusted.adjusted
    return table


def _interval_text(row: pd.Series, measure: str) -> str:
    return f"{row[f'rho_{measure}']:+.2f} [{row[f'rho_{measure}_low']:+.2f}, {row[f'rho_{measure}_high']:+.2f}]"


def markdown(table: pd.DataFrame, benefits: pd.DataFrame) -> str:
    """The summary as Markdown: one table per recipe, with its trial and update counts."""
    lines = ["# Block benefit by depth: when each sub-block's benefit arrives", "",
             "ρ: Spearman rank correlation of the layer index with the arrival (centre of the positive ΔΨ "
             "over the prune stage's mask updates; > 0: deeper sub-blocks gain their benefit later) and with "
             "the gain (mean ΔΨ over the last third of the updates minus the first third), one ρ per seed, "
             "then the mean over seeds with its 95 % t interval. p: one-sample t test of the arrival's ρ "
             "against 0, Holm-adjusted over the recipe's four tests.", ""]
    for recipe, group in table.groupby("recipe", sort=False):
        rows = benefits[benefits["recipe"] == recipe]
        updates = rows.groupby("seed")["step"].nunique()
        lines += [f"## {recipe}: {rows['seed'].nunique()} seeds, {int(updates.median())} mask updates per trial "
                  "(median)", "",
                  "| sub-blocks | signal | ρ(depth, arrival) [95 % CI] | p (Holm) | ρ(depth, gain) [95 % CI] | seeds |",
                  "|---|---|---|---|---|---|"]
        for row in group.itertuples(index=False):
            series = pd.Series(row._asdict())
            verdict = "separated" if series["p_arrival_holm"] < 0.05 else "not separated"
            lines.append(f"| {row.kind} | {row.signal.removeprefix('benefit_')} | {_interval_text(series, 'arrival')} | "
                         f"{row.p_arrival_holm:.3f} ({verdict}) | {_interval_text(series, 'gain')} | {row.seeds} |")
        lines.append("")
    return "\n".join(lines)


def figure(benefits: pd.DataFrame, path: Path) -> None:
    """ΔΨ_cls over the prune stage (mean over seeds, in tenths of the updates), one line per layer:
    a row of panels per recipe, attention left, MLP right."""
    recipes = list(dict.fromkeys(benefits["recipe"]))
    fig, axes = plt.subplots(len(recipes), 2, figsize=(10, 3.2 * len(recipes)), squeeze=False, sharex=True)
    for r, recipe in enumerate(recipes):
        rows = benefits[benefits["recipe"] == recipe]
        keys = ["seed"]
        t = rows.groupby(keys)["step"].rank(method="dense") / rows.groupby(keys)["step"].transform("nunique")
        rows = rows.assign(tenth=np.ceil(t * 10) / 10)
        layers = sorted(rows["layer"].unique())
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(layers)))
        for c, kind in enumerate(KINDS):
            axis = axes[r][c]
            for colour, layer in zip(colours, layers):
                curve = rows[(rows["kind"] == kind) & (rows["layer"] == layer)].groupby("tenth")["benefit_cls"].mean()
                axis.plot(curve.index, curve.values, color=colour, marker="o", markersize=3, label=f"layer {layer}")
            axis.set_title(f"{recipe}: {kind}")
            axis.set_ylabel("ΔΨ_cls (mean over seeds)")
            axis.grid(alpha=0.3)
        axes[r][1].legend(fontsize=7, ncol=2)
    for axis in axes[-1]:
        axis.set_xlabel("fraction of the prune stage's mask updates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="keep the P3B trials' block benefits of study folders")
    export.add_argument("folders", type=Path, nargs="+", help="study folders")
    export.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    table = commands.add_parser("table", help="the depth table and figure from an exported file")
    table.add_argument("benefits", type=Path, help="a file written by export")
    table.add_argument("--out", type=Path, default=None, help="also write PREFIX.md, PREFIX.parquet and PREFIX.png")
    args = parser.parse_args()
    if args.command == "export":
        if args.out.suffix != ".parquet":
            raise SystemExit(f"--out {args.out}: give a .parquet file (e.g. benchmarks/results/depth_benefit_rows.parquet)")
        benefits = pd.concat([study_benefits(folder) for folder in args.folders], ignore_index=True)
        benefits.to_parquet(args.out, index=False)
        print(f"{len(benefits)} rows, {benefits.groupby('recipe')['seed'].nunique().to_dict()} seeds -> {args.out}")
        return
    if args.out is not None and args.out.with_suffix(".parquet").resolve() == args.benefits.resolve():
        raise SystemExit(f"--out {args.out}: would overwrite the exported rows {args.benefits}; choose another prefix")
    benefits = pd.read_parquet(args.benefits)
    result = summary(depth_correlations(arrival_times(benefits)))
    text = markdown(result, benefits)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(text + "\n")
        result.to_parquet(args.out.with_suffix(".parquet"), index=False)
        figure(benefits, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
