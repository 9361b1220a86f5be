"""The residual-price table (``benchmarks/residual_price.py``) on hand-made trials whose paired
differences are known."""
from __future__ import annotations

import pandas as pd

from benchmarks.residual_price import markdown


def trials() -> pd.DataFrame:
    """p3b loses exactly 1.5 points +/- 0.1 in shared mode (5 seeds); global-taylor the same
    on average but +/- 3 points: only the first difference is separated."""
    rows = []
    for seed in range(5):
        jitter = (-1) ** seed * (seed + 1)
        for method, spread in (("p3b", 0.05), ("global-taylor", 1.5)):
            base = 80.0 + seed
            rows.append({"method": method, "residual": "per-block", "seed": seed, "top1": base, "macs": 2.0e6,
                         "kept_fraction": 0.25, "duration_s": 90.0})
            rows.append({"method": method, "residual": "shared", "seed": seed, "top1": base - 1.5 + spread * jitter,
                         "macs": 1.9e6, "kept_fraction": 0.25, "duration_s": 80.0})
    return pd.DataFrame(rows)


def test_paired_differences_and_verdicts() -> None:
    lines = markdown(trials()).splitlines()
    p3b = next(line for line in lines if line.startswith("| p3b | 5 |"))
    taylor = next(line for line in lines if line.startswith("| global-taylor | 5 |"))
    assert "(separated)" in p3b and "(not separated)" in taylor
    assert p3b.split(" | ")[2].startswith("-1.")
    assert p3b.endswith("| -0.100 [-0.100, -0.100] |")
    assert sum(line.startswith("| p3b | ") for line in lines) == 3  # two modes + one difference
