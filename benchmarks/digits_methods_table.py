"""The digits-task method tables (``benchmarks/results/methods*.md``, ``dimap_*.md``,
``p3b_variants.md``) recomputed from their committed per-trial rows.

    python -m benchmarks.digits_methods_table benchmarks/results/methods.parquet
    python -m benchmarks.digits_methods_table benchmarks/results/p3b_variants.parquet \\
        --dense-from benchmarks/results/methods.parquet

Those tables were written by ``benchmarks/methods.py``, since replaced by the method-comparison
study (last version: ``git show dcb6c64:benchmarks/methods.py``); this is its table, kept so the
committed tables can be checked against their raw data. Prints the Markdown table: per method and
prune ratio (in the file's order), top-1 mean ± sample std over seeds, the best prune-stage top-1
mean, parameters (K, non-zeros for unstructured methods), their fraction of the dense model's,
MACs and non-zero MACs per image (M), and the trial count. The dense model's parameters are those
of the file's ``dense`` rows, or of ``--dense-from``'s (same model) when it has none. The recipe
line above each committed table and its wall time are not in the rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def dense_params(trials: pd.DataFrame) -> float:
    """Parameters of the dense model: the mean of the ``dense`` rows of ``trials``."""
    dense = trials[trials["method"] == "dense"]
    if dense.empty:
        raise SystemExit("no dense rows: give --dense-from a results file of the same model with dense rows")
    return float(dense["params"].mean())


def summary_table(trials: pd.DataFrame, dense: float) -> str:
    """Markdown: one row per (method, prune ratio) of ``trials`` (``methods.parquet`` columns);
    ``dense`` is the dense model's parameter count, the denominator of ``kept``."""
    lines = [
        ("| method | structured | prune ratio | top-1 % (mean ± std) | prune-stage top-1 % | params | kept "
         "| MACs / image | non-zero MACs / image | trials |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, ratio), group in trials.groupby(["method", "prune_ratio"], sort=False):
        structured = "—" if ratio == 0 else ("yes" if group.structured.all() else "no")
        lines.append(
            f"| {method} | {structured} | {ratio:g} | {group.top1.mean():.2f} ± {group.top1.std(ddof=1):.2f} | "
            f"{group.prune_stage_top1.mean():.2f} | {group.params.mean() / 1e3:.1f} K | "
            f"{group.params.mean() / dense:.3f} | {group.macs.mean() / 1e6:.3f} M | "
            f"{group.nonzero_macs.mean() / 1e6:.3f} M | {len(group)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trials", type=Path, help="a committed per-trial results file (methods.parquet columns)")
    parser.add_argument("--dense-from", type=Path, default=None,
                        help="a results file of the same model whose dense rows give the dense parameters")
    args = parser.parse_args()
    trials = pd.read_parquet(args.trials)
    print(summary_table(trials, dense_params(pd.read_parquet(args.dense_from or args.trials))), end="")


if __name__ == "__main__":
    main()
