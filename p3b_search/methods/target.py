"""One parameter budget for every method.

``prune_ratio`` p is the fraction of *all* the model's parameters removed: the never-pruned
ones (embeddings, norms, classifier heads, biases no method removes) stay in the denominator,
so every method keeps ``(1 - p) x`` the dense parameter count, within :data:`TOLERANCE` of
it (as a fraction of the dense count). Unstructured results count their unmasked weights.
Methods whose own knobs (DIMAP's module ratios, SViTE's density, S²ViTE's head and neuron
densities) decide the count solve the knobs left unset for this target
(:meth:`~p3b_search.method_specs.MethodConfig.kept_target`).
"""
from __future__ import annotations

from functools import cache
from typing import Callable

import torch

from p3b_search.cost import masked_params
from p3b_search.methods.base import PrunedModel

#: largest allowed distance between the kept fraction and 1 - prune_ratio (fraction of all parameters)
TOLERANCE = 0.01


def kept_params(pruned: PrunedModel) -> int:
    """Parameters a prune stage's result keeps: every parameter of its model less the zeros
    that its ``weight_masks`` pin (an unstructured result counts its unmasked weights)."""
    return masked_params(pruned.model, pruned.weight_masks)


def solve_monotone(kept: Callable[[float], int], target: float, lo: float, hi: float,
                   iterations: int = 40) -> float:
    """The ``x`` in ``[lo, hi]`` whose ``kept(x)`` (parameters, monotone in ``x``, a step
    function) is nearest ``target``, by bisection on the step that crosses it; an end of the
    interval when ``target`` lies beyond ``kept``'s range."""
    kept = cache(kept)
    increasing = kept(hi) >= kept(lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if (kept(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda x: abs(kept(x) - target))


def check_kept(method: str, kept: int, dense: int, prune_ratio: float, fix: str) -> None:
    """One-line ``ValueError`` (ending in ``fix``) when ``kept / dense`` parameters is more
    than :data:`TOLERANCE` from ``1 - prune_ratio``."""
    fraction = kept / dense
    if abs(fraction - (1.0 - prune_ratio)) > TOLERANCE:
        raise ValueError(
            f"{method}: prune_ratio={prune_ratio:g} asks to keep {1.0 - prune_ratio:.3f} of the parameters, "
            f"the closest this configuration reaches is {fraction:.3f}: {fix}"
        )


def block_params_target(dense_params: torch.Tensor, never_pruned_params: float, prune_ratio: float) -> float:
    """Parameters the sub-blocks may keep in total: ``(1-p)(sum(W) + W_nb) - W_nb``.

    ``never_pruned_params`` = 0 gives the "block parameters only" variant (p of the blocks)."""
    total = float(dense_params.sum()) + never_pruned_params
    return (1.0 - prune_ratio) * total - never_pruned_params
