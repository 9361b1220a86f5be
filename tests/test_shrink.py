"""shrink_model: the physically smaller model gives the masked model's logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p3b_search.surgery import (
    attach_gates,
    canonical_masks,
    get_adapter,
    random_masks,
    shrink_model,
)
from p3b_search.surgery.shrink import SlicedLinear
from tests.conftest import make_model

EXAMPLES = {"deit_tiny": 6, "deit_small": 4, "deit_tiny_distilled": 4, "swin_tiny": 3, "deit3_small": 3}


def masked_and_shrunk_logits(model, masks, x):
    adapter = get_adapter(model)
    masks = canonical_masks(adapter, masks)
    with attach_gates(model, adapter, requires_grad=False) as gates:
        gates.set_masks(masks)
        with torch.no_grad():
            masked = model(x)
    shrunk = shrink_model(model, masks)
    with torch.no_grad():
        return masked, shrunk(x), shrunk


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_shrunk_logits_equal_masked_logits(key):
    model = make_model(key)
    adapter = get_adapter(model)
    x = torch.randn(2, *adapter.input_size())

    @settings(max_examples=EXAMPLES[key], deadline=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**31 - 1), keep=st.floats(0.05, 1.0), dead=st.sampled_from([0.0, 0.15]))
    def check(seed, keep, dead):
        masks = random_masks(adapter, keep=keep, seed=seed, dead_prob=dead)
        masked, shrunk_logits, _ = masked_and_shrunk_logits(model, masks, x)
        assert (masked - shrunk_logits).abs().max().item() <= 1e-4

    check()


def test_shrink_removes_parameters_and_skips_dead_branches():
    model = make_model("deit_tiny")
    adapter = get_adapter(model)
    masks = random_masks(adapter, seed=3, keep=0.5, dead_prob=0.0)
    masks[1]["out"][:] = False  # MLP of layer 0 gone
    masks[2]["heads"][:] = False  # attention of layer 1 can only emit a constant: gone too
    _, _, shrunk = masked_and_shrunk_logits(model, masks, torch.randn(1, *adapter.input_size()))
    assert shrunk.blocks[0].mlp is None and shrunk.blocks[0].norm2 is None
    assert shrunk.blocks[1].attn is None
    assert isinstance(shrunk.blocks[0].attn.qkv, SlicedLinear)
    assert sum(p.numel() for p in shrunk.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    # the dense model is untouched
    assert model.blocks[0].mlp is not None and type(model.blocks[0].mlp.fc1) is torch.nn.Linear


def test_shrink_keeps_attention_scale_of_dense_head_dim():
    """With half the head dims kept, the shrunk model still matches under fused attention."""
    model = make_model("deit_tiny")
    adapter = get_adapter(model)
    masks = {sb.index: {"head_dim": torch.arange(sb.head_dim) % 2 == 0} for sb in adapter.sub_blocks
             if sb.kind == "attn"}
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    masked, shrunk_logits, shrunk = masked_and_shrunk_logits(model, masks, torch.randn(2, *adapter.input_size()))
    assert shrunk.blocks[0].attn.head_dim == 32
    assert (masked - shrunk_logits).abs().max().item() <= 1e-4


def test_shrink_rejects_an_already_shrunk_model():
    model = make_model("deit_tiny")
    shrunk = shrink_model(model, {})
    with pytest.raises(ValueError, match="already shrunk"):
        shrink_model(shrunk, {})


def test_masks_of_wrong_shape_are_rejected():
    model = make_model("deit_tiny")
    with pytest.raises(ValueError, match=r"mask L00.attn.in: shape \(5,\), expected \(192,\)"):
        shrink_model(model, {0: {"in": torch.ones(5, dtype=torch.bool)}})
