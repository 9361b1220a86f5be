"""Does a task separate the structured pruning methods? Spread of their means vs their seed noise.

    python benchmarks/method_separation.py method_comparison --ratio 0.75

Reads a finished method-comparison study (``studies/method_comparison.yaml``) and, at one prune
ratio, over the structured methods (dense and unstructured marked rows left out), prints and
writes ``<out>/<study>_separation_p<ratio>.md``:

* each method's mean top-1 and seed standard deviation;
* the spread (best mean - worst mean) against the pooled seed std (root of the mean of the
  per-method variances): the task separates the methods when the spread is >= 3x that std;
* the same against the residual std of an additive method + seed model (what is left once
  the seed's shared effect, e.g. data order, is removed; the noise of paired comparisons).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def separation(results: pd.DataFrame, ratio: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-method ``mean``/``std``/``n`` and the figures of the module docstring for the
    structured, pruned rows of ``results`` (``compare.trial_results``) at ``ratio``."""
    from p3b_search.method_specs import method_spec

    rows = results[(results["prune_ratio"] == ratio) & (results["method"] != "dense")]
    rows = rows[[method_spec(m).structured for m in rows["method"]]]
    per_method = rows.groupby("method")["top1"].agg(["mean", "std", "count"]).sort_values("mean", ascending=False)
    grid = rows.pivot_table(index="seed", columns="method", values="top1").dropna()  # seeds every method has
    residual = grid - grid.mean(axis=0) - grid.mean(axis=1).to_numpy()[:, None] + grid.to_numpy().mean()
    dof = (grid.shape[0] - 1) * (grid.shape[1] - 1)
    figures = {
        "spread": float(per_method["mean"].max() - per_method["mean"].min()),
        "pooled_std": float(np.sqrt((per_method["std"] ** 2).mean())),
        "residual_std": float(np.sqrt((residual.to_numpy() ** 2).sum() / dof)) if dof > 0 else float("nan"),
        "seeds": float(len(grid)),
    }
    return per_method, figures


def markdown(study: str, ratio: float, per_method: pd.DataFrame, figures: dict[str, float]) -> str:
    spread, pooled, residual = figures["spread"], figures["pooled_std"], figures["residual_std"]
    lines = [
        f"# Separation of the structured methods at prune ratio {ratio:g} (study {study})", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"* spread of the method means: {spread:.2f} points",
        f"* pooled seed std: {pooled:.2f} points: spread = {spread / pooled:.1f}x (needs >= 3x)",
        f"* residual std of method + seed ({int(figures['seeds'])} seeds every method has): {residual:.2f} points: "
        f"spread = {spread / residual:.1f}x", "",
        "| method | top-1 % mean | seed std | n |", "|---|---|---|---|",
    ]
    lines += [f"| {m} | {r['mean']:.2f} | {r['std']:.2f} | {int(r['count'])} |" for m, r in per_method.iterrows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", help="study name (folder under --output-dir)")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from p3b_search.study.compare import trial_results
    from p3b_search.study.loading import study_from_folder
    from p3b_search.study.results import read_trials

    study = study_from_folder(args.output_dir / args.study)
    per_method, figures = separation(trial_results(study, read_trials(study.layout)), args.ratio)
    text = markdown(args.study, args.ratio, per_method, figures)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.study}_separation_p{args.ratio:g}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
