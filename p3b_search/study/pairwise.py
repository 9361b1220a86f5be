"""Pairs of methods at each prune ratio (``search.py compare``): paired t tests over the seeds
both ran, Holm-adjusted over one family, the minimum detectable difference of every pair
that is not separated, two one-sided tests of equivalence for the pairs asked about, and a
Friedman omnibus test per prune ratio.

**The family** is every paired t test one comparison reports: every pair of methods at every
prune ratio, the declared primary comparison included. Holm's adjustment over it holds the
chance of calling any pair separated when none differs to 5 %, whichever pair a reader looks
at; a declared primary comparison is reported first, not given a smaller family. The
equivalence tests (the primary and the pairs asked about, at every ratio) are a second family,
Holm-adjusted the same way.

Inputs are ``top1[(method, ratio)] = {seed: top-1 %}``; every difference is A - B in top-1
points, paired by seed.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from p3b_search.stats import (
    ALPHA,
    POWER,
    Holm,
    PairedTest,
    equivalence_p,
    friedman,
    holm,
    minimum_detectable_difference,
    paired_t_test,
)

Top1 = Mapping[tuple[str, float], Mapping[int, float]]
PAIR_COLUMNS = ["prune_ratio", "a", "b", "role", "pairs", "diff", "diff_low", "diff_high", "sd", "p", "p_holm",
                "holm_level", "separated", "mdd", "verdict", "margin", "p_tost", "p_tost_holm", "equivalence"]
OMNIBUS_COLUMNS = ["prune_ratio", "methods", "seeds", "statistic", "p", "note"]


@dataclass(frozen=True)
class PairPlan:
    """Which pairs are declared: the ``primary`` (A, B) or None, further ``equivalence`` pairs,
    and the equivalence ``margin`` in top-1 points."""

    primary: tuple[str, str] | None
    equivalence: tuple[tuple[str, str], ...]
    margin: float

    def declared(self) -> list[tuple[tuple[str, str], str]]:
        """The declared pairs with their role (``primary``, ``equivalence``), each unordered pair once."""
        pairs = ([(self.primary, "primary")] if self.primary else []) + [(p, "equivalence") for p in self.equivalence]
        seen: set[frozenset[str]] = set()
        unique = []
        for pair, role in pairs:
            if frozenset(pair) not in seen:
                seen.add(frozenset(pair))
                unique.append((pair, role))
        return unique


def _pairs_at(methods: Sequence[str], plan: PairPlan) -> list[tuple[str, str, str]]:
    """(A, B, role) of every pair of ``methods`` (in their order): the declared pairs first, as
    declared; then the others, A before B in ``methods``' order."""
    present = set(methods)
    pairs = [(a, b, role) for (a, b), role in plan.declared() if a in present and b in present]
    taken = {frozenset((a, b)) for a, b, _ in pairs}
    pairs += [(a, b, "pair") for a, b in itertools.combinations(methods, 2) if frozenset((a, b)) not in taken]
    return pairs


def _verdict(a: str, b: str, test: PairedTest, separated: bool, mdd: float) -> str:
    n = test.difference.n
    if n < 2:
        return f"not tested ({n} common seed{'' if n == 1 else 's'})"
    if not test.tested:
        return f"not tested (Δ {test.difference.mean:+.2f} on every seed)"
    if separated:
        return f"{a if test.difference.mean > 0 else b} better"
    return f"not separated (MDD {mdd:.1f} points at {POWER:.0%} power)"


def _equivalence(declared: bool, p_holm: float, margin: float) -> str:
    if not declared:
        return ""
    if math.isnan(p_holm):
        return "not tested"
    return f"equivalent within ±{margin:g}" if p_holm < ALPHA else f"not shown equivalent (±{margin:g})"


def _holm_over_tested(pvalues: list[float]) -> Holm:
    """:func:`~p3b_search.stats.holm` over the p-values that are not NaN (the others are not in
    the family), spread back to ``pvalues``' positions with NaN where there was none."""
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    result = holm([pvalues[i] for i in tested])
    adjusted, level = [math.nan] * len(pvalues), [math.nan] * len(pvalues)
    rejected = [False] * len(pvalues)
    for j, i in enumerate(tested):
        adjusted[i], level[i], rejected[i] = result.adjusted[j], result.level[j], result.rejected[j]
    return Holm(adjusted, rejected, level)


def pairs_table(top1: Top1, plan: PairPlan, ratio_methods: Mapping[float, Sequence[str]]) -> pd.DataFrame:
    """One row per pair of methods at each prune ratio (columns :data:`PAIR_COLUMNS`), the
    ratios in ``ratio_methods``' order and each ratio's pairs as :func:`_pairs_at` orders them.

    ``diff`` [``diff_low``, ``diff_high``]: mean A - B with its 95 % interval (unadjusted) over
    the ``pairs`` seeds both ran; ``sd``: the sd of those differences; ``p``: the paired t
    test's; ``p_holm``: Holm-adjusted over the family (module docstring), ``holm_level`` the
    level Holm held ``p`` to; ``separated``: Holm rejects "no difference" at 0.05; ``mdd``: the smallest true
    difference the test would detect with 80 % power at ``holm_level``. Declared pairs
    (``role`` primary / equivalence) also get ``p_tost`` (two one-sided tests, ±``margin``),
    ``p_tost_holm`` over the equivalence family, and the ``equivalence`` verdict."""
    keys = [(ratio, a, b, role) for ratio, methods in ratio_methods.items() for a, b, role in _pairs_at(methods, plan)]
    tests = [paired_t_test(top1[(a, ratio)], top1[(b, ratio)]) for ratio, a, b, _ in keys]
    tost = [equivalence_p(top1[(a, ratio)], top1[(b, ratio)], plan.margin) if role != "pair" else math.nan
            for ratio, a, b, role in keys]
    family, equivalence_family = _holm_over_tested([t.p for t in tests]), _holm_over_tested(tost)
    rows = []
    for i, ((ratio, a, b, role), test) in enumerate(zip(keys, tests)):
        declared, level = role != "pair", family.level[i]
        mdd = minimum_detectable_difference(test.sd, test.difference.n, level) if test.tested else math.nan
        rows.append({"prune_ratio": ratio, "a": a, "b": b, "role": role, "pairs": test.difference.n,
                     "diff": test.difference.mean, "diff_low": test.difference.low, "diff_high": test.difference.high,
                     "sd": test.sd, "p": test.p, "p_holm": family.adjusted[i], "holm_level": level,
                     "separated": family.rejected[i], "mdd": mdd,
                     "verdict": _verdict(a, b, test, family.rejected[i], mdd),
                     "margin": plan.margin if declared else math.nan, "p_tost": tost[i],
                     "p_tost_holm": equivalence_family.adjusted[i],
                     "equivalence": _equivalence(declared, equivalence_family.adjusted[i], plan.margin)})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def family_size(table: pd.DataFrame, column: str = "p") -> int:
    """How many tests the Holm family of ``column`` holds (:func:`pairs_table`'s rows with a p-value)."""
    return int(table[column].notna().sum())


def omnibus_table(top1: Top1, ratio_methods: Mapping[float, Sequence[str]]) -> pd.DataFrame:
    """Per prune ratio, Friedman's test that the methods there rank alike over the seeds every
    one of them ran (columns :data:`OMNIBUS_COLUMNS`; ``statistic`` chi-square with
    ``methods - 1`` degrees of freedom, ``p`` unadjusted; ``note`` says why there is none)."""
    rows = []
    for ratio, methods in ratio_methods.items():
        common = sorted(set.intersection(*(set(top1[(m, ratio)]) for m in methods)))
        row = {"prune_ratio": ratio, "methods": len(methods), "seeds": len(common),
               "statistic": math.nan, "p": math.nan, "note": _omnibus_gap(len(methods), len(common))}
        if not row["note"]:
            result = friedman([[top1[(m, ratio)][seed] for seed in common] for m in methods])
            row.update(statistic=result.statistic, p=result.p,
                       note="every seed ties all methods" if math.isnan(result.p) else "")
        rows.append(row)
    return pd.DataFrame(rows, columns=OMNIBUS_COLUMNS)


def _omnibus_gap(methods: int, seeds: int) -> str:
    if methods < 3:
        return f"needs >= 3 methods; got {methods}"
    if seeds < 2:
        return f"needs >= 2 seeds every method ran; got {seeds}"
    return ""


def ratio_methods(groups: Sequence[tuple[str, float]], rank: Callable[[str], object]) -> dict[float, list[str]]:
    """The methods at each prune ratio of ``groups`` ((method, ratio) pairs), ordered by ``rank``;
    ratios ascending."""
    by_ratio: dict[float, list[str]] = {}
    for method, ratio in sorted(groups, key=lambda g: (g[1], rank(g[0]))):
        by_ratio.setdefault(ratio, []).append(method)
    return by_ratio
