"""Analytic params/MACs equal the real parameter count and torch's FLOP counter."""
from __future__ import annotations

import pytest
import torch

from p3b_search.cost import dense_sub_block_params, model_cost, torch_macs
from p3b_search.surgery import get_adapter, random_masks, shrink_model
from p3b_search.surgery.gates import random_residual
from tests.conftest import MODEL_CONFIGS, make_model


@pytest.mark.parametrize("key", list(MODEL_CONFIGS))
def test_dense_cost_matches_numel_and_flop_counter(key):
    model = make_model(key)
    report = model_cost(model)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.macs == pytest.approx(torch_macs(model), rel=0.01)


@pytest.mark.parametrize("key", list(MODEL_CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_cost_predicts_shrunk_model(key, seed):
    model = make_model(key)
    masks = random_masks(get_adapter(model), seed=seed, keep=0.5, dead_prob=0.1)
    predicted = model_cost(model, masks)
    shrunk = shrink_model(model, masks)
    measured = model_cost(shrunk)
    assert predicted.params == measured.params == sum(p.numel() for p in shrunk.parameters())
    assert predicted.macs == measured.macs
    assert measured.macs == pytest.approx(torch_macs(shrunk), rel=0.01)
    assert [c.params for c in predicted.sub_blocks] == [c.params for c in measured.sub_blocks]


@pytest.mark.parametrize("key", list(MODEL_CONFIGS))
def test_shared_residual_cost_predicts_shrunk_model_and_torchs_count(key):
    """With a shared residual the analytic count of the masked model (norms, embeddings, tokens,
    merging and heads cut to the kept width) is the narrow model's, and torch's counter agrees."""
    model = make_model(key)
    adapter = get_adapter(model)
    masks = random_masks(adapter, seed=2, keep=0.6, dead_prob=0.1, shared=True)
    residual = random_residual(adapter, keep=0.4, seed=3)
    predicted = model_cost(model, masks, residual)
    shrunk = shrink_model(model, masks, residual)
    measured = model_cost(shrunk)
    assert predicted.params == measured.params == sum(p.numel() for p in shrunk.parameters())
    assert predicted.macs == measured.macs == torch_macs(shrunk)
    assert [c.params for c in predicted.sub_blocks] == [c.params for c in measured.sub_blocks]
    assert predicted.other_params < model_cost(model).other_params


def test_hand_computed_shared_residual_costs():
    """deit_tiny at 64 px with c of C = 192 channels kept: every width-C factor becomes c."""
    model = make_model("deit_tiny")
    c, C, T, K = 100, 192, 17, 10
    residual = {0: torch.arange(C) < c}
    report = model_cost(model, {}, residual)
    attn, mlp = report.sub_blocks[0], report.sub_blocks[1]
    assert attn.params == 2 * c + (c * 3 * C + 3 * C) + (C * c + c)
    assert attn.macs == T * c * 3 * C + 2 * 3 * T * T * 64 + T * C * c
    assert mlp.params == 2 * c + (c * 4 * C + 4 * C) + (4 * C * c + c)
    assert report.other_macs == 16 * c * 3 * 16 * 16 + c * K
    # patch embedding (weight + bias), class token, position embedding, final norm, head weight; head bias
    assert report.other_params == c * 3 * 16 * 16 + c + c + T * c + 2 * c + K * c + K


def test_hand_computed_vit_sub_block_costs():
    """deit_tiny at 64 px: C=192, 3 heads x 64, 16 patches + cls = 17 tokens."""
    model = make_model("deit_tiny")
    report = model_cost(model)
    attn, mlp = report.sub_blocks[0], report.sub_blocks[1]
    C, T = 192, 17
    assert attn.params == 2 * C + (C * 3 * C + 3 * C) + (C * C + C)
    assert attn.macs == T * C * 3 * C + 2 * 3 * T * T * 64 + T * C * C
    assert mlp.params == 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert mlp.macs == 2 * T * C * 4 * C
    assert report.other_macs == 16 * C * 3 * 16 * 16 + C * 10
    assert dense_sub_block_params(get_adapter(model))[0] == attn.params


def test_skipped_sub_block_costs_nothing():
    model = make_model("deit_tiny")
    masks = {1: {"out": torch.zeros(192, dtype=torch.bool)}}
    report = model_cost(model, masks)
    assert report.sub_blocks[1].params == 0 and report.sub_blocks[1].macs == 0
    assert report.sub_blocks[1].sizes.skipped
