"""One budget for every method: whatever a registered method solves internally (P3B's keep
ratios, DIMAP's module ratios, SViTE's ERK density, S²ViTE's head and neuron densities), the
result of its prune stage keeps ``1 - prune_ratio`` of *all* the model's parameters, within
0.01, on real timm configurations (random init, nothing downloaded).

Every method here reaches its final parameter count without training: one-shot methods decide
at ``prepare``, prune-and-grow swaps keep the counts of ``prepare``, and the gated methods'
``finalize`` makes the masks their budget asks for. Big models get a single drawn example
(the whole file runs in well under a minute on two cores)."""
from __future__ import annotations

import copy
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from p3b_search.methods import available_methods, get_method
from p3b_search.methods.target import TOLERANCE, kept_params
from p3b_search.models import DIGITS_VIT, create_timm_model
from tests.conftest import make_model

NUM_CLASSES = 10
#: drawn prune ratios per (model, method) case: few on the big models
EXAMPLES = {"digits_vit": 4, "deit_tiny": 2, "deit_small": 1, "swin_tiny": 1}


@cache
def dense_model(key: str) -> nn.Module:
    """The dense model ``key`` (built once per session; tests prune copies)."""
    if key == "digits_vit":
        return create_timm_model(DIGITS_VIT, NUM_CLASSES)
    return make_model(key, num_classes=NUM_CLASSES)


def kept_fraction(method_name: str, model_key: str, prune_ratio: float) -> float:
    """Kept fraction of all parameters after ``method_name``'s prepare and finalize."""
    model = copy.deepcopy(dense_model(model_key))
    dense = sum(p.numel() for p in model.parameters())
    method_cls = get_method(method_name)
    method = method_cls(method_cls.config_cls(prune_ratio=prune_ratio), num_classes=NUM_CLASSES,
                        epochs=1, steps_per_epoch=200)
    method.prepare(model)
    return kept_params(method.finalize(model)) / dense


@pytest.mark.parametrize("model_key", list(EXAMPLES))
@pytest.mark.parametrize("method_name", available_methods())
def test_every_method_keeps_one_minus_prune_ratio_of_all_parameters(method_name, model_key):
    ratios = st.just(0.0) if method_name == "dense" else st.floats(0.05, 0.8)  # dense prunes nothing

    @settings(max_examples=EXAMPLES[model_key], deadline=None, database=None, derandomize=True)
    @given(prune_ratio=ratios)
    def check(prune_ratio: float) -> None:
        kept = kept_fraction(method_name, model_key, prune_ratio)
        assert abs(kept - (1.0 - prune_ratio)) <= TOLERANCE, (method_name, model_key, prune_ratio, kept)

    check()
