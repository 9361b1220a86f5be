"""The method comparison as a report (``search.py compare``): Markdown for the terminal and for
``PREFIX.md``, Parquet tables beside it.

Sections: the title and recipe, how the tests read, the methods (top-1 over seeds, kept
parameters, MACs, top-1 at the primary method's MACs), the declared primary comparison, and
every pair per prune ratio with Friedman's omnibus line.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow as pa

from p3b_search.stats import ALPHA, CONFIDENCE, POWER
from p3b_search.study.compare import Comparison, benefit_by_depth
from p3b_search.study.pairwise import PairPlan, family_size
from p3b_search.study.results import write_parquet_atomic
from p3b_search.study.sections import StudyConfig

CI = f"{CONFIDENCE:.0%} CI"


def _number(value: float, fmt: str) -> str:
    return "—" if math.isnan(value) else format(value, fmt)


def _interval(low: float, high: float, fmt: str) -> str:
    return "—" if math.isnan(low) else f"[{low:{fmt}}, {high:{fmt}}]"


def _p(value: float) -> str:
    if math.isnan(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _table(frame: pd.DataFrame) -> list[str]:
    shown = frame.astype(str)
    return (["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
            + ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)])


def title(study: StudyConfig, comparison: Comparison) -> str:
    """One line saying what the report compares and over which family it adjusts."""
    return (f"Method comparison of study {study.name} ({study.model.name}, data {study.data.kind}): top-1 over "
            f"seeds with {CONFIDENCE:.0%} Student t intervals; every pair of methods at each prune ratio by a paired "
            f"t test over the seeds both ran, Holm-adjusted over the family of all {family_size(comparison.pairs)} "
            "paired tests of this report (every pair at every prune ratio).")


def recipe(study: StudyConfig) -> str:
    """One line with what every trial shares: stages, LR, batch."""
    prune, finetune = study.training.prune, study.training.finetune
    return (f"Recipe: {prune.epochs} prune ({prune.schedule}) + {finetune.epochs} fine-tune ({finetune.schedule}) "
            f"epochs, base LR {prune.lr:g} / {finetune.lr:g} per 512 images, batch {study.training.batch_size}; "
            "kept params = measured fraction of the dense model's parameters.")


def reading(comparison: Comparison) -> str:
    """How the tests read: interval, verdicts, MDD, omnibus and equivalence."""
    plan = comparison.plan
    text = (f"Tests: Δ = A − B in top-1 points, paired by seed, with its {CI} (unadjusted). \"A better\": Holm's "
            f"adjustment rejects \"no difference\" at {ALPHA:g} over the family; otherwise \"not separated\" with the "
            f"MDD, the smallest true Δ the pair's test detects with {POWER:.0%} power at the level Holm held it to, "
            "given its seeds' paired sd. Friedman's omnibus per prune ratio (unadjusted) asks whether the methods "
            "there differ at all.")
    tests = family_size(comparison.pairs, "p_tost")
    if tests:
        text += (f" Equivalence: two one-sided paired t tests (TOST) of |Δ| < {plan.margin:g} top-1 "
                 f"point{'' if plan.margin == 1 else 's'}, "
                 f"Holm-adjusted over the {tests} equivalence test(s) of this report.")
    return text


def _methods(comparison: Comparison) -> list[str]:
    table, primary = comparison.summary, comparison.plan.primary
    shown = pd.DataFrame({
        "method": table["method"],
        "structured": ["yes" if s else "no (marked row)" for s in table["structured"]],
        "prune ratio": [f"{r:g}" for r in table["prune_ratio"]],
        "n (seeds)": table["n"],
        "top-1 %": [_number(v, ".2f") for v in table["top1"]],
        f"top-1 {CI}": [_interval(lo, hi, ".2f") for lo, hi in zip(table["top1_low"], table["top1_high"])],
        "kept params": [_number(v, ".3f") for v in table["kept_fraction"]],
        "MACs/image (M)": [_number(v / 1e6, ".4g") for v in table["macs"]],
    })
    lines = ["## Methods", ""]
    if primary is None:
        return lines + _table(shown)
    shown[f"top-1 % at {primary[0]}'s MACs"] = [_number(v, ".2f") for v in table["top1_at_matched_macs"]]
    return lines + _table(shown) + [
        "", f"Top-1 at {primary[0]}'s MACs: each method's mean top-1 at {primary[0]}'s mean MACs at that prune "
        "ratio, linear in MACs between the two rungs of the method's own prune-ratio ladder around it; — outside "
        "the ladder's MACs (never extrapolated) and where a method's MACs do not change with the prune ratio."]


def _pair_columns(rows: pd.DataFrame, plan: PairPlan) -> dict[str, list]:
    """The displayed columns of :func:`~p3b_search.study.pairwise.pairs_table` rows (the
    equivalence verdict only when some pair is declared)."""
    columns = {
        "pairs": rows["pairs"].tolist(),
        "Δ top-1 (A − B)": [_number(v, "+.2f") for v in rows["diff"]],
        f"Δ {CI}": [_interval(lo, hi, "+.2f") for lo, hi in zip(rows["diff_low"], rows["diff_high"])],
        "p": [_p(v) for v in rows["p"]],
        "p Holm": [_p(v) for v in rows["p_holm"]],
        "verdict": rows["verdict"].tolist(),
    }
    if plan.declared():
        columns[f"equivalence (TOST ±{plan.margin:g})"] = rows["equivalence"].tolist()
    return columns


def _primary(comparison: Comparison) -> list[str]:
    plan, pairs, summary = comparison.plan, comparison.pairs, comparison.summary
    if plan.primary is None:
        return ["## Primary comparison", "", "None declared (`--primary A:B`, or `compare: {primary: A:B}` in the "
                "study file): no pair is the headline, and there is no top-1 at matched MACs."]
    a, b = plan.primary
    rows = pairs[pairs["role"] == "primary"]
    at = summary.set_index(["method", "prune_ratio"])
    own = [at["top1"].get((a, r), math.nan) for r in rows["prune_ratio"]]
    matched = [at["top1_at_matched_macs"].get((b, r), math.nan) for r in rows["prune_ratio"]]
    shown = pd.DataFrame({"prune ratio": [f"{r:g}" for r in rows["prune_ratio"]], **_pair_columns(rows, plan),
                          f"{b} top-1 % at {a}'s MACs": [_number(v, ".2f") for v in matched],
                          f"Δ at {a}'s MACs": [_number(x - y, "+.2f") for x, y in zip(own, matched)]})
    return [f"## Primary comparison: A = {a}, B = {b} (declared)", ""] + _table(shown) + [
        "", f"Δ at {a}'s MACs: {a}'s mean top-1 minus {b}'s read at {a}'s MACs (see Methods; means, no interval)."]


def _omnibus_line(row: pd.Series) -> str:
    if row["note"]:
        return f"Friedman omnibus: n/a ({row['note']})."
    return (f"Friedman omnibus over {row['methods']} methods x {row['seeds']} seeds every method ran: "
            f"χ²({row['methods'] - 1}) = {row['statistic']:.2f}, p = {_p(row['p'])} (unadjusted).")


def _all_pairs(comparison: Comparison) -> list[str]:
    pairs, plan = comparison.pairs, comparison.plan
    lines = [f"## All pairs (family: the {family_size(pairs)} paired t tests of this report, every pair at every "
             "prune ratio, Holm-adjusted together)", ""]
    for ratio, omnibus in comparison.omnibus.set_index("prune_ratio").iterrows():
        rows = pairs[pairs["prune_ratio"] == ratio]
        shown = pd.DataFrame({"A": rows["a"], "B": rows["b"], "role": rows["role"], **_pair_columns(rows, plan)})
        lines += [f"### Prune ratio {ratio:g}", "", _omnibus_line(omnibus), ""] + _table(shown) + [""]
    return lines


def markdown(study: StudyConfig, comparison: Comparison, command: str | None = None) -> str:
    """The comparison as a Markdown document: :func:`title`, :func:`recipe`, the command that
    wrote it (when given), :func:`reading`, then the methods, the primary comparison and all pairs."""
    lines = [title(study, comparison), "", recipe(study), ""] + ([f"Command: `{command}`", ""] if command else [])
    lines += [reading(comparison), ""] + _methods(comparison) + [""] + _primary(comparison) + [""]
    lines += _all_pairs(comparison)
    return "\n".join(lines).rstrip("\n") + "\n"


def command_line(study: StudyConfig, plan: PairPlan, prefix: Path) -> str:
    """The ``search.py compare`` command that writes this report, with the plan spelled out."""
    options = [f"--primary {':'.join(plan.primary)}"] if plan.primary else []
    options += [f"--equivalence {a}:{b}" for a, b in plan.equivalence]
    if plan.primary or plan.equivalence:
        options.append(f"--margin {plan.margin:g}")
    return " ".join([f"python search.py compare {study.name}", *options, f"--out {prefix}"])


def write_comparison(study: StudyConfig, comparison: Comparison, benefits: pd.DataFrame, prefix: Path) -> list[Path]:
    """Write ``PREFIX.md`` (:func:`markdown`, then :func:`benefit_by_depth` when the core method
    recorded block benefits), ``PREFIX.parquet`` (the methods), ``PREFIX_pairs.parquet`` and
    ``PREFIX_omnibus.parquet``; returns the paths. ``benefits``:
    :func:`~p3b_search.study.compare.core_benefits` (the figures are drawn by the tracking layer)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(study, comparison, command_line(study, comparison.plan, prefix))
    if not benefits.empty:
        text += "\n" + benefit_by_depth(benefits)
    paths = [prefix.with_name(f"{prefix.name}{suffix}") for suffix in
             (".md", ".parquet", "_pairs.parquet", "_omnibus.parquet")]
    paths[0].write_text(text)
    for path, table in zip(paths[1:], (comparison.summary, comparison.pairs, comparison.omnibus)):
        write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), path)
    return paths
