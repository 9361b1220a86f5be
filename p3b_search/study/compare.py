"""Method comparison of a study (``search.py compare NAME``): per method and prune ratio, top-1
over seeds with its 95 % Student t interval, the kept fraction of parameters, MACs, and the
difference to the best baseline at that ratio, paired by seed, with its 95 % interval.

Roles: ``dense`` is the reference (first row, prune ratio 0); ``p3b`` is the project's core
method; every other method is a baseline. The best baseline at a ratio is the *structured*
baseline with the highest mean top-1 there: unstructured methods (``dimap``, ``svite``) keep
dense shapes and need sparse kernels to be faster, so they are marked rows (``structured`` =
False) compared with that baseline, never the baseline themselves. A difference is
*separated* only when its interval excludes zero and at least :data:`MIN_SEEDS` seeds pair up.

A trial's method, prune ratio and seed are those of its trial configuration (searched or
fixed in the study; dense's prune ratio is always 0), so any study whose trials differ only in
method, prune ratio and seed compares, as ``studies/method_comparison.yaml`` (a grid) does.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from p3b_search.config import TrialConfig
from p3b_search.methods import get_method
from p3b_search.stats import CONFIDENCE, Interval, paired_difference, t_interval
from p3b_search.study.messages import StudyError
from p3b_search.study.results import PARAM_PREFIX, read_allocations, write_parquet_atomic
from p3b_search.study.sections import StudyConfig
from p3b_search.study.trials import trial_config

CORE_METHOD = "p3b"
REFERENCE_METHOD = "dense"
MIN_SEEDS = 5
RESULT_COLUMNS = ["number", "method", "prune_ratio", "seed", "top1", "kept_fraction", "macs", "params"]
TABLE_COLUMNS = ["method", "structured", "prune_ratio", "n", "top1", "top1_low", "top1_high", "kept_fraction", "macs",
                 "baseline", "diff", "diff_low", "diff_high", "pairs", "verdict"]


def _param_value(value: object) -> object:
    """A trials-table cell as the Python value it was sampled as (numpy scalars unwrapped)."""
    return value.item() if hasattr(value, "item") else value


def complete_trials(study: StudyConfig, trials: pd.DataFrame) -> Iterator[tuple[pd.Series, TrialConfig]]:
    """Each COMPLETE trial of ``trials`` (the trials table): its row and its trial configuration."""
    for _, row in trials[trials["state"] == "COMPLETE"].iterrows():
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
        rows.append({"number": int(row["number"]), "method": config.method,
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


def _order(results: pd.DataFrame, methods: list[str]) -> list[tuple[str, float]]:
    """(method, ratio) groups: the reference first, then by ratio: the core method, then the
    baselines in ``methods`` order (others by name)."""
    rank = {m: i for i, m in enumerate(methods)}
    groups = results[["method", "prune_ratio"]].drop_duplicates().itertuples(index=False)
    return sorted(((str(m), float(r)) for m, r in groups),
                  key=lambda g: (g[0] != REFERENCE_METHOD, g[1], g[0] != CORE_METHOD, rank.get(g[0], len(rank)), g[0]))


def _verdict(difference: Interval) -> str:
    if difference.n < MIN_SEEDS:
        return f"not separated (n = {difference.n} < {MIN_SEEDS})"
    return "separated" if difference.excludes_zero else "not separated"


def comparison_table(results: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """The comparison of :func:`trial_results`, one row per method and prune ratio (columns
    :data:`TABLE_COLUMNS`; ``top1_low``/``top1_high`` and ``diff_low``/``diff_high`` bound the
    95 % intervals; ``diff`` = this row's top-1 minus ``baseline``'s, paired by seed; ``pairs``:
    the seeds both have). ``methods``: the order of the baselines (default: by name)."""
    top1 = {group: dict(zip(rows["seed"], rows["top1"]))
            for group, rows in results.groupby(["method", "prune_ratio"])}
    means = {group: sum(seeds.values()) / len(seeds) for group, seeds in top1.items()}
    best: dict[float, str] = {}
    for (method, ratio), mean in sorted(means.items(), key=lambda item: -item[1]):
        if method not in (CORE_METHOD, REFERENCE_METHOD) and get_method(method).structured:
            best.setdefault(ratio, method)
    rows = []
    for method, ratio in _order(results, methods or []):
        group = results[(results["method"] == method) & (results["prune_ratio"] == ratio)]
        accuracy = t_interval(group["top1"])
        baseline = best.get(ratio) if method != REFERENCE_METHOD else None
        difference = Interval(math.nan, math.nan, math.nan, 0)
        if method == REFERENCE_METHOD:
            verdict = "reference"
        elif baseline is None:
            verdict = "no baseline"
        elif baseline == method:
            verdict = "best baseline"
        else:
            difference = paired_difference(top1[(method, ratio)], top1[(baseline, ratio)])
            verdict = _verdict(difference)
        rows.append({"method": method, "structured": get_method(method).structured, "prune_ratio": ratio,
                     "n": accuracy.n, "top1": accuracy.mean,
                     "top1_low": accuracy.low, "top1_high": accuracy.high,
                     "kept_fraction": group["kept_fraction"].mean(), "macs": group["macs"].mean(),
                     "baseline": baseline or "", "diff": difference.mean, "diff_low": difference.low,
                     "diff_high": difference.high, "pairs": difference.n, "verdict": verdict})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _number(value: float, fmt: str) -> str:
    return "—" if math.isnan(value) else format(value, fmt)


def _interval(low: float, high: float, fmt: str) -> str:
    return "—" if math.isnan(low) else f"[{low:{fmt}}, {high:{fmt}}]"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`comparison_table` as text columns for people (top-1 in %, MACs in millions)."""
    ci = f"{CONFIDENCE:.0%} CI"
    return pd.DataFrame({
        "method": table["method"],
        "structured": ["yes" if s else "no (marked row)" for s in table["structured"]],
        "prune ratio": [f"{r:g}" for r in table["prune_ratio"]],
        "n (seeds)": table["n"],
        "top-1 %": [_number(v, ".2f") for v in table["top1"]],
        f"top-1 {ci}": [_interval(lo, hi, ".2f") for lo, hi in zip(table["top1_low"], table["top1_high"])],
        "kept params": [_number(v, ".3f") for v in table["kept_fraction"]],
        "MACs/image (M)": [_number(v / 1e6, ".4g") for v in table["macs"]],
        "best baseline": table["baseline"],
        "Δ top-1 (paired)": [_number(v, "+.2f") for v in table["diff"]],
        f"Δ {ci}": [_interval(lo, hi, "+.2f") for lo, hi in zip(table["diff_low"], table["diff_high"])],
        "verdict": table["verdict"],
    })


def title(study: StudyConfig) -> str:
    """One line saying what the table compares."""
    return (f"Method comparison of study {study.name} ({study.model.name}, data {study.data.kind}): "
            f"top-1 over seeds with {CONFIDENCE:.0%} Student t intervals; Δ = top-1 minus the best baseline "
            f"at that prune ratio, paired by seed; separated = the Δ interval excludes 0 with >= {MIN_SEEDS} seeds.")


def recipe(study: StudyConfig) -> str:
    """One line with what every trial shares: stages, LR, batch."""
    prune, finetune = study.training.prune, study.training.finetune
    return (f"Recipe: {prune.epochs} prune ({prune.schedule}) + {finetune.epochs} fine-tune ({finetune.schedule}) "
            f"epochs, base LR {prune.lr:g} / {finetune.lr:g} per 512 images, batch {study.training.batch_size}; "
            "kept params = measured fraction of the dense model's parameters.")


def markdown(study: StudyConfig, table: pd.DataFrame, command: str | None = None) -> str:
    """The comparison as a Markdown document: :func:`title`, :func:`recipe`, the command that
    wrote it (when given), then the :func:`display_table`."""
    shown = display_table(table).astype(str)
    lines = [title(study), "", recipe(study), ""] + ([f"Command: `{command}`", ""] if command else [])
    lines += ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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


def write_comparison(study: StudyConfig, table: pd.DataFrame, benefits: pd.DataFrame, prefix: Path) -> list[Path]:
    """Write ``PREFIX.md`` (:func:`markdown`, then :func:`benefit_by_depth` when the core method
    recorded block benefits) and ``PREFIX.parquet`` (:func:`comparison_table`); returns the paths.
    ``benefits``: :func:`core_benefits` (the figures are drawn by the tracking layer)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(f"{prefix.name}.md"), prefix.with_name(f"{prefix.name}.parquet")]
    text = markdown(study, table, f"python search.py compare {study.name} --out {prefix}")
    if not benefits.empty:
        text += "\n" + benefit_by_depth(benefits)
    paths[0].write_text(text)
    write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), paths[1])
    return paths
