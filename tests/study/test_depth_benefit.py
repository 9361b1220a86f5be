"""The depth analysis of block benefits (``benchmarks/depth_benefit.py``) on hand-made histories
whose answer is known: deeper sub-blocks whose benefit arrives later give ρ(depth, arrival) = +1."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.depth_benefit import arrival_times, depth_correlations, summary


def history(seeds: int, late_deep: bool, updates: int = 12, layers: int = 4) -> pd.DataFrame:
    """ΔΨ of ``layers`` attention and MLP sub-blocks over ``updates`` mask updates: layer l's
    benefit is 0 until update ``l * updates / (layers + 1)`` (``late_deep``; else the reverse
    order) and 1 after; a little seed noise that never reorders the layers."""
    rows = []
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        for step in range(updates):
            for layer in range(layers):
                onset = (layer if late_deep else layers - 1 - layer) * updates / (layers + 1)
                for kind in ("attn", "mlp"):
                    value = (1.0 if step >= onset else 0.0) + 0.01 * rng.random()
                    rows.append({"recipe": "r", "seed": seed, "step": 10 * step + 7, "layer": layer, "kind": kind,
                                 "benefit_cls": value, "benefit_patch": 2 * value})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("late_deep", [True, False])
def test_arrival_rank_follows_the_onset_of_the_benefit(late_deep: bool) -> None:
    table = summary(depth_correlations(arrival_times(history(seeds=5, late_deep=late_deep))))
    assert len(table) == 4  # attn / mlp x cls / patch
    sign = 1.0 if late_deep else -1.0
    assert np.allclose(table["rho_arrival"], sign)
    assert (sign * table["rho_gain"] > 0.8).all()  # the gain cannot tell apart two layers that both rise mid-stage
    assert (table["seeds"] == 5).all()


def test_constant_benefit_arrives_mid_stage() -> None:
    benefits = history(seeds=1, late_deep=True).assign(benefit_cls=1.0, benefit_patch=0.5)
    timing = arrival_times(benefits)
    updates = 12
    assert np.allclose(timing["benefit_cls_arrival"], (updates + 1) / (2 * updates))
    assert np.allclose(timing["benefit_cls_gain"], 0.0)


def test_the_four_tests_of_a_recipe_are_holm_adjusted_together() -> None:
    noisy = history(seeds=6, late_deep=True)
    noisy["benefit_cls"] = np.random.default_rng(1).random(len(noisy))
    table = summary(depth_correlations(arrival_times(noisy)))
    raw = table["p_arrival"].to_numpy()
    order = np.argsort(raw)
    expected = np.maximum.accumulate(np.minimum(1.0, raw[order] * np.arange(4, 0, -1)))
    assert np.allclose(table["p_arrival_holm"].to_numpy()[order], expected)
