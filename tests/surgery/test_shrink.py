"""shrink_model: the physically smaller model gives the masked model's logits, per block and with a
shared residual."""
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
from p3b_search.surgery.gates import random_residual
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


# -- shared residual ------------------------------------------------------------------------
SHARED_EXAMPLES = {"deit_tiny": 5, "deit_tiny_distilled": 3, "deit3_small": 3, "swin_tiny": 2}
#: aten ops that pick or place channels of the residual stream (per block: gather, index_add; Swin: scatter)
CHANNEL_PICKING_OPS = {"aten::gather", "aten::index_add", "aten::index_add_", "aten::scatter_add",
                       "aten::index_select", "aten::index_copy"}


def masked_and_shrunk_shared_logits(model, masks, residual, x):
    adapter = get_adapter(model)
    with attach_gates(model, adapter, requires_grad=False, residual="shared") as gates:
        gates.set_masks(canonical_masks(adapter, masks, residual), residual)
        with torch.no_grad():
            masked = model(x)
    shrunk = shrink_model(model, masks, residual)
    with torch.no_grad():
        return masked, shrunk(x), shrunk


def aten_ops(model, x) -> set[str]:
    """Names of the aten ops one forward of ``model`` runs (torch's profiler)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("key", list(SHARED_EXAMPLES))
def test_shared_residual_shrunk_logits_equal_masked_logits(key):
    """The physically narrow model (embedding width = kept channels, LayerNorm(kept)) computes
    the logits of the dense model whose norms normalise over the kept channels only."""
    model = make_model(key)
    adapter = get_adapter(model)
    x = torch.randn(2, *adapter.input_size())

    @settings(max_examples=SHARED_EXAMPLES[key], deadline=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**31 - 1), keep=st.floats(0.05, 1.0), residual_keep=st.floats(0.02, 1.0),
           dead=st.sampled_from([0.0, 0.15]))
    def check(seed, keep, residual_keep, dead):
        masks = random_masks(adapter, keep=keep, seed=seed, dead_prob=dead, shared=True)
        residual = random_residual(adapter, keep=residual_keep, seed=seed + 1)
        masked, shrunk_logits, shrunk = masked_and_shrunk_shared_logits(model, masks, residual, x)
        assert (masked - shrunk_logits).abs().max().item() <= 1e-4
        widths = {stage: int(mask.sum()) for stage, mask in residual.items()}
        for norm in adapter.stream_norms():
            module = shrunk.get_submodule(norm.path) if _present(shrunk, norm.path) else None
            if module is not None:
                assert module.normalized_shape == (widths[norm.stage] * norm.repeats,), norm.path

    check()


def _present(model, path: str) -> bool:
    owner, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr) is not None


def test_shared_residual_export_picks_no_channels():
    """Per block, branches gather their inputs and index_add their outputs; with a shared
    residual the stream itself is narrow: plain linears, no channel-picking op in the forward."""
    model = make_model("deit_tiny")
    adapter = get_adapter(model)
    x = torch.randn(1, *adapter.input_size())
    per_block = shrink_model(model, random_masks(adapter, keep=0.5, seed=0))
    assert {"aten::gather", "aten::index_add"} <= aten_ops(per_block, x)
    residual = random_residual(adapter, keep=0.5, seed=1)
    shared = shrink_model(model, random_masks(adapter, keep=0.5, seed=0, shared=True), residual)
    assert not aten_ops(shared, x) & CHANNEL_PICKING_OPS
    assert not any(isinstance(m, SlicedLinear) for m in shared.modules())
    kept = int(residual[0].sum())
    assert shared.patch_embed.proj.out_channels == shared.embed_dim == shared.head.in_features == kept
    assert shared.pos_embed.shape[-1] == shared.cls_token.shape[-1] == kept
    assert shared.kept_residual == {0: residual[0].nonzero().flatten().tolist()}


def test_shared_residual_masks_are_checked():
    model = make_model("deit_tiny")
    adapter = get_adapter(model)
    residual = random_residual(adapter, keep=0.5, seed=0)
    with pytest.raises(ValueError, match=r"residual mask of stage 0: shape \(5,\), expected \(192,\)"):
        shrink_model(model, {}, {0: torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="residual mask of stage 0 keeps no channel"):
        shrink_model(model, {}, {0: torch.zeros(192, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask L00.attn.in: a shared residual sets every sub-block's input"):
        shrink_model(model, {0: {"in": ~residual[0]}}, residual)
    skipped = shrink_model(model, {1: {"out": torch.zeros(192, dtype=torch.bool)}}, residual)
    assert skipped.blocks[0].mlp is None and skipped.blocks[0].attn is not None
