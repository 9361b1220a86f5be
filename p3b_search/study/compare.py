"""Method comparison of a study (``search.py compare NAME``): per method and prune ratio, top-1
over seeds with its 95 % Student t interval, the kept fraction of parameters and MACs; every
pair of methods at each prune ratio tested by :mod:`p3b_search.study.pairwise` (paired by
seed, Holm-adjusted over one family, with Friedman's omnibus per ratio); and, for a declared
primary comparison A:B, each method's top-1 at A's MACs.

Roles: ``dense`` is the reference (first row, prune ratio 0, in no pair); ``p3b`` is the
project's core method (first in each pair it is in, unless a declared pair says otherwise).
The primary comparison is declared (``--primary A:B`` or the study file's ``compare.primary``),
never picked from the data. Unstructured methods (``structured`` = False: ``dimap``, ``svite``)
keep dense shapes and MACs; they are paired like the others and marked in the table.

**Matched MACs.** A method that keeps more MACs than A at a prune ratio cannot win on that
alone: each method's mean top-1 is read at A's mean MACs at that ratio, interpolated linearly
in MACs between the two rungs of the method's own prune-ratio ladder (mean MACs and mean top-1
per ratio) that bracket it. Outside the ladder's MACs it is n/a (never extrapolated), as it is
for a method whose MACs do not change with the prune ratio. Accuracy is concave in MACs, so a
chord slightly underrates the interpolated method: close rungs keep that small.

A trial's method, prune ratio and seed are those of its trial configuration (searched or
fixed in the study; dense's prune ratio is always 0), so any study whose trials differ only in
method, prune ratio and seed compares, as ``studies/method_comparison.yaml`` (a grid) does.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from p3b_search.config import TrialConfig
from p3b_search.method_specs import method_spec
from p3b_search.stats import t_interval
from p3b_search.study.checks import method_pair_problem
from p3b_search.study.messages import StudyError
from p3b_search.study.pairwise import PairPlan, omnibus_table, pairs_table, ratio_methods
from p3b_search.study.results import read_allocations
from p3b_search.study.sections import CompareSection, StudyConfig, method_pair
from p3b_search.study.trials import trial_config
from p3b_search.study.trials_table import DENSE_METHOD, METHOD, NUMBER, PARAM_PREFIX, complete_rows

CORE_METHOD = "p3b"
REFERENCE_METHOD = DENSE_METHOD
RESULT_COLUMNS = [NUMBER, METHOD, "prune_ratio", "seed", "top1", "kept_fraction", "macs", "params"]
SUMMARY_COLUMNS = ["method", "structured", "prune_ratio", "n", "top1", "top1_low", "top1_high", "kept_fraction",
                   "macs", "matched_macs", "top1_at_matched_macs"]


def _param_value(value: object) -> object:
    """A trials-table cell as the Python value it was sampled as (numpy scalars unwrapped)."""
    return value.item() if hasattr(value, "item") else value


def complete_trials(study: StudyConfig, trials: pd.DataFrame) -> Iterator[tuple[pd.Series, TrialConfig]]:
    """Each COMPLETE trial of ``trials`` (the trials table): its row and its trial configuration."""
    for _, row in complete_rows(trials).iterrows():
        params = {name.removeprefix(PARAM_PREFIX): _param_value(value) for name, value in row.items()
                  if name.startswith(PARAM_PREFIX) and not pd.isna(value)}
        yield row, trial_config(study, params)


def trial_results(study: StudyConfig, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per COMPLETE trial of ``trials`` (the trials table): ``number``, ``method``,
    ``prune_ratio``, ``seed`` (from the trial's configuration), ``top1`` (%), ``kept_fraction``,
    ``macs`` (per image) and ``params``. Raises :class:`StudyError` when two trials share method,
    prune ratio and seed (they differ in another knob: not a method comparison)."""
    rows = []
    for row, config in complete_trials(study, trials):
        rows.append({NUMBER: int(row[NUMBER]), METHOD: config.method,
                     "prune_ratio": float(config.method_config["prune_ratio"]), "seed": config.training.seed,
                     **{m: float(row[m]) if m in row else math.nan for m in RESULT_COLUMNS[4:]}})
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    numbers = results.groupby(["method", "prune_ratio", "seed"])["number"].apply(list)
    repeats = numbers[numbers.map(len) > 1]
    if len(repeats):
        (method, ratio, seed), repeated = next(iter(repeats.items()))
        raise StudyError(f"study {study.name!r}: trials {', '.join(map(str, repeated))} all ran {method} at prune "
                         f"ratio {ratio:g} with seed {seed}: compare needs one trial per method, prune ratio and "
                         "seed (search only method, method_config.prune_ratio and training.seed, e.g. on a grid)")
    return results


def compare_plan(study: StudyConfig, section: CompareSection | None = None, primary: str | None = None,
                 margin: float | None = None, equivalence: Sequence[str] | None = None) -> PairPlan:
    """What a comparison declares: the command line's ``primary`` (``"A:B"``), ``margin`` (top-1
    points) and ``equivalence`` pairs where given, else ``section``'s (default: the study's
    ``compare`` section, checked when the study was loaded). Raises :class:`StudyError` (one
    line naming the option) for a pair that is not two of the study's pruning methods."""
    section = section or study.compare
    methods = study.candidate_methods()

    def checked(option: str, text: str) -> tuple[str, str]:
        try:
            pair = method_pair(text)
        except ValueError as error:
            raise StudyError(f"{option} {text}: {error}") from None
        problem = method_pair_problem(pair, methods)
        if problem:
            raise StudyError(f"{option} {text}: {problem} (study {study.name!r})")
        return pair

    return PairPlan(
        primary=section.primary_pair if primary is None else checked("--primary", primary),
        equivalence=tuple(section.equivalence_pairs if equivalence is None
                          else (checked("--equivalence", text) for text in equivalence)),
        margin=section.margin if margin is None else margin)


def method_rank(methods: Sequence[str]) -> Callable[[str], tuple]:
    """Sort key of method names: the reference, the core method, then ``methods``' order, then by name."""
    rank = {m: i for i, m in enumerate(methods)}
    return lambda m: (m != REFERENCE_METHOD, m != CORE_METHOD, rank.get(m, len(rank)), m)


def matched_top1(macs: Sequence[float], top1: Sequence[float], target: float) -> float:
    """Top-1 at ``target`` MACs along a ladder of (``macs``, ``top1``) rungs: linear in MACs
    between the two rungs around ``target``; NaN outside the ladder's MACs (never
    extrapolated), when two rungs share MACs (top-1 is then no function of MACs) or when a
    value is NaN."""
    points = sorted(zip(macs, top1))
    xs = [x for x, _ in points]
    if math.isnan(target) or any(math.isnan(x) for x in xs) or len(set(xs)) < len(xs):
        return math.nan
    if not xs or not xs[0] <= target <= xs[-1]:
        return math.nan
    return float(np.interp(target, xs, [y for _, y in points]))


def summary_table(results: pd.DataFrame, methods: Sequence[str] = (), primary: str | None = None) -> pd.DataFrame:
    """One row per method and prune ratio of :func:`trial_results` (columns
    :data:`SUMMARY_COLUMNS`): the reference first, then by ratio in :func:`method_rank` order.
    ``top1_low``/``top1_high`` bound the 95 % interval; ``matched_macs``: ``primary``'s mean
    MACs at this ratio, ``top1_at_matched_macs``: this method's top-1 there (:func:`matched_top1`
    along its own ratios; NaN without a ``primary``)."""
    rank = method_rank(methods)
    groups = sorted(results.groupby(["method", "prune_ratio"]),
                    key=lambda item: (item[0][0] != REFERENCE_METHOD, item[0][1], rank(item[0][0])))
    rows = []
    for (method, ratio), group in groups:
        accuracy = t_interval(group["top1"])
        rows.append({"method": method, "structured": method_spec(method).structured, "prune_ratio": float(ratio),
                     "n": accuracy.n, "top1": accuracy.mean, "top1_low": accuracy.low, "top1_high": accuracy.high,
                     "kept_fraction": group["kept_fraction"].mean(), "macs": group["macs"].mean()})
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    own = table[table["method"] == primary]
    target = dict(zip(own["prune_ratio"], own["macs"]))
    table["matched_macs"] = [target.get(ratio, math.nan) for ratio in table["prune_ratio"]]
    ladders = dict(list(table.groupby("method")))
    table["top1_at_matched_macs"] = [matched_top1(ladders[m]["macs"].tolist(), ladders[m]["top1"].tolist(), t)
                                     for m, t in zip(table["method"], table["matched_macs"])]
    return table


@dataclass(frozen=True)
class Comparison:
    """A study's method comparison: the per-method ``summary`` (:func:`summary_table`), the
    ``pairs`` and ``omnibus`` tables (:mod:`p3b_search.study.pairwise`) and the ``plan`` they
    follow."""

    summary: pd.DataFrame
    pairs: pd.DataFrame
    omnibus: pd.DataFrame
    plan: PairPlan


def compare_methods(results: pd.DataFrame, plan: PairPlan, methods: Sequence[str] = ()) -> Comparison:
    """The :class:`Comparison` of :func:`trial_results` under ``plan``; ``methods``: the order
    of the methods after the core one (default: by name)."""
    top1 = {(str(m), float(r)): dict(zip(rows["seed"], rows["top1"]))
            for (m, r), rows in results.groupby(["method", "prune_ratio"])}
    paired = ratio_methods([g for g in top1 if g[0] != REFERENCE_METHOD], method_rank(methods))
    return Comparison(summary_table(results, methods, plan.primary[0] if plan.primary else None),
                      pairs_table(top1, plan, paired), omnibus_table(top1, paired), plan)


def trial_allocations(study: StudyConfig, results: pd.DataFrame) -> pd.DataFrame:
    """Every allocation row of the compared trials, with ``method`` and ``prune_ratio``
    (empty when the trials wrote none, e.g. dense only)."""
    allocations = read_allocations(study.layout)
    if allocations.empty or "step" not in allocations.columns:
        return pd.DataFrame()
    return allocations.merge(results[["number", "method", "prune_ratio"]], left_on="trial", right_on="number")


def core_benefits(allocations: pd.DataFrame) -> pd.DataFrame:
    """The core method's allocation rows that carry block benefits (empty when there are none)."""
    if not {"benefit_cls", "benefit_patch", "method"} <= set(allocations.columns):
        return pd.DataFrame()
    return allocations[(allocations["method"] == CORE_METHOD)].dropna(subset=["benefit_cls", "benefit_patch"])


def benefit_timing(allocations: pd.DataFrame) -> pd.DataFrame:
    """When each sub-block's block benefit arrives: per ``(kind, layer)``, ΔΨ_cls and ΔΨ_patch
    averaged over the first and the last third of each trial's mask updates, then over the
    trials, and ``*_gain`` = last - first (> 0: the sub-block's benefit grew during pruning).
    A trial with fewer than three mask updates has no first or last third: NaN there."""
    rank = allocations.groupby("trial")["step"].rank(method="dense", pct=True)
    third = np.where(rank <= 1 / 3, "first", np.where(rank > 2 / 3, "last", "middle"))
    columns = ["benefit_cls", "benefit_patch"]
    per_trial = allocations.assign(third=third).groupby(["kind", "layer", "third", "trial"])[columns].mean()
    table = per_trial.groupby(["kind", "layer", "third"]).mean().unstack("third")
    out = pd.DataFrame(index=table.index)
    for column in columns:
        first = table.get((column, "first"), pd.Series(np.nan, index=table.index))
        last = table.get((column, "last"), pd.Series(np.nan, index=table.index))
        out[f"{column}_first"], out[f"{column}_last"], out[f"{column}_gain"] = first, last, last - first
    return out.reset_index()


def benefit_by_depth(allocations: pd.DataFrame) -> str:
    """Markdown: for each prune ratio, when each sub-block's block benefit arrives
    (:func:`benefit_timing`) and the Spearman rank correlation of depth with the benefit's gain
    over the prune stage. ``allocations``: :func:`core_benefits` rows."""
    from scipy.stats import spearmanr

    lines = [f"## Block benefit of {CORE_METHOD} by depth", "",
             "ΔΨ over the first and the last third of each trial's mask updates (mean over seeds); gain = last - "
             "first; ρ = Spearman rank correlation of the layer index with the gain (> 0: deeper sub-blocks "
             "gain their benefit later).", ""]
    for ratio, rows in allocations.groupby("prune_ratio"):
        timing = benefit_timing(rows)
        rho = {c: spearmanr(timing["layer"], timing[f"{c}_gain"]).statistic for c in ("benefit_cls", "benefit_patch")}
        lines += [f"Prune ratio {ratio:g} ({rows['trial'].nunique()} trials): ρ(depth, cls gain) = "
                  f"{rho['benefit_cls']:+.2f}, ρ(depth, patch gain) = {rho['benefit_patch']:+.2f}", "",
                  "| sub-block | ΔΨ cls first | ΔΨ cls last | cls gain | ΔΨ patch first | ΔΨ patch last | "
                  "patch gain |", "|---|---|---|---|---|---|---|"]
        for row in timing.sort_values(["layer", "kind"]).itertuples(index=False):
            lines.append(f"| L{int(row.layer):02d}.{row.kind} | {row.benefit_cls_first:.4f} | "
                         f"{row.benefit_cls_last:.4f} | {row.benefit_cls_gain:+.4f} | {row.benefit_patch_first:.4f} | "
                         f"{row.benefit_patch_last:.4f} | {row.benefit_patch_gain:+.4f} |")
        lines.append("")
    return "\n".join(lines)

