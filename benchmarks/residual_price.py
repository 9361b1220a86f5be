"""What a shared residual width costs: per method, top-1 and MACs of ``residual: shared`` against
``per-block``, paired by seed, from a study whose trials differ only in method, residual mode
and seed (``studies/residual_price.yaml``).

    python benchmarks/residual_price.py export runs/residual_price --out benchmarks/results/residual_price.parquet
    python benchmarks/residual_price.py table benchmarks/results/residual_price.parquet \\
        --out benchmarks/results/residual_price.md

``export`` keeps one row per COMPLETE trial (``method``, ``residual``, ``seed``, ``top1`` in %,
``macs`` per image, ``kept_fraction``, ``duration_s``); ``table`` computes everything from it: per
method and mode the mean top-1 and MACs with 95 % t intervals, and per method the paired
difference shared - per-block with its 95 % interval, the paired t test's p-value
Holm-adjusted over the methods, and the minimum detectable difference at 80 % power.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from p3b_search.stats import holm, minimum_detectable_difference, paired_t_test, t_interval
from p3b_search.study.layout import StudyLayout
from p3b_search.study.results import read_trials

MODES = ("per-block", "shared")
COLUMNS = ["method", "residual", "seed", "top1", "macs", "kept_fraction", "duration_s"]


def study_rows(folder: Path) -> pd.DataFrame:
    """The study's COMPLETE trials as :data:`COLUMNS` rows."""
    trials = read_trials(StudyLayout(folder), must_exist=True)
    trials = trials[trials["state"] == "COMPLETE"].rename(
        columns={"param.method_config.residual": "residual", "param.training.seed": "seed"})
    return trials[COLUMNS].sort_values(["method", "residual", "seed"]).reset_index(drop=True)


def _interval(interval, digits: int) -> str:
    return f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"


def markdown(rows: pd.DataFrame) -> str:
    """The two tables (per method and mode; shared - per-block per method) as Markdown."""
    lines = ["| method | residual | seeds | top-1 % [95 % CI] | MACs / image (M) [95 % CI] | kept params |",
             "|---|---|---|---|---|---|"]
    for (method, mode), group in rows.groupby(["method", "residual"]):
        top1, macs = t_interval(group["top1"]), t_interval(group["macs"] / 1e6)
        lines.append(f"| {method} | {mode} | {top1.n} | {top1.mean:.2f} [{top1.low:.2f}, {top1.high:.2f}] | "
                     f"{macs.mean:.3f} [{macs.low:.3f}, {macs.high:.3f}] | {group['kept_fraction'].mean():.3f} |")
    tests = {}
    for method, group in rows.groupby("method"):
        by_mode = {mode: group[group["residual"] == mode].set_index("seed") for mode in MODES}
        tests[method] = {column: paired_t_test(by_mode["shared"][column].to_dict(), by_mode["per-block"][column].to_dict())
                         for column in ("top1", "macs")}
    adjusted = dict(zip(tests, holm([tests[m]["top1"].p for m in tests]).adjusted))
    lines += ["", "Shared - per-block, paired by seed (p: paired t test of top-1, Holm-adjusted over the methods; "
              "MDD: the top-1 difference the test detects with 80 % power):", "",
              "| method | pairs | top-1 points [95 % CI] | p (Holm) | MDD (points) | MACs / image (M) [95 % CI] |",
              "|---|---|---|---|---|---|"]
    for method, test in tests.items():
        top1 = test["top1"]
        verdict = "separated" if adjusted[method] < 0.05 else "not separated"
        macs = test["macs"].difference
        lines.append(f"| {method} | {top1.difference.n} | {_interval(top1.difference, 2)} | {adjusted[method]:.3f} "
                     f"({verdict}) | {minimum_detectable_difference(top1.sd, top1.difference.n):.2f} | "
                     f"{macs.mean / 1e6:+.3f} [{macs.low / 1e6:+.3f}, {macs.high / 1e6:+.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="keep a study's COMPLETE trials")
    export.add_argument("folder", type=Path, help="the study folder")
    export.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    table = commands.add_parser("table", help="the tables from an exported file")
    table.add_argument("rows", type=Path, help="a file written by export")
    table.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args()
    if args.command == "export":
        rows = study_rows(args.folder)
        rows.to_parquet(args.out, index=False)
        print(f"{len(rows)} trials -> {args.out}")
        return
    text = markdown(pd.read_parquet(args.rows))
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
