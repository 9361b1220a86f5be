"""round_widths: kept widths rounded up to multiples with zero units, same logits, MACs as
torch counts them."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from p3b_search.cost import model_cost, torch_macs
from p3b_search.surgery import ArchSpec, canonical_masks, get_adapter, random_masks, shrink_model
from p3b_search.surgery.gates import random_residual
from p3b_search.surgery.rounding import ROUNDED_GROUPS, round_widths, rounded_masks
from tests.conftest import MODEL_CONFIGS, make_model

EXAMPLES = {"deit_tiny": 5, "swin_tiny": 1, "deit3_small": 2}


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_rounded_model_keeps_the_logits_and_its_analytic_macs_equal_torchs(key):
    dense = make_model(key)
    name, kwargs = MODEL_CONFIGS[key]
    adapter = get_adapter(dense)
    x = torch.randn(2, *adapter.input_size())

    # no shrinking phase: a Swin example takes seconds, shrinking a failure would take minutes
    @settings(max_examples=EXAMPLES[key], deadline=None, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate))
    @given(seed=st.integers(0, 2**31 - 1), keep=st.floats(0.1, 0.95), dead=st.sampled_from([0.0, 0.15]),
           multiple=st.sampled_from([2, 8, 16]))
    def check(seed, keep, dead, multiple):
        masks = canonical_masks(adapter, random_masks(adapter, keep=keep, seed=seed, dead_prob=dead))
        shrunk = shrink_model(dense, masks)
        spec = ArchSpec.from_model(shrunk, name, {**kwargs, "num_classes": 10})
        rounded, rounded_spec = round_widths(shrunk, spec, multiple)
        with torch.no_grad():
            assert (rounded(x) - shrunk(x)).abs().max().item() <= 1e-4
        cost = model_cost(rounded)
        assert cost.macs == pytest.approx(torch_macs(rounded), rel=0, abs=0.5)
        assert cost.macs >= model_cost(shrunk).macs
        for before, after in zip(model_cost(shrunk).sub_blocks, cost.sub_blocks):
            for group in ("c_in", "c_out", "head_dim", "hidden"):
                was, kept = getattr(before.sizes, group), getattr(after.sizes, group)
                assert was <= kept
                if was > 0 and not before.sizes.skipped:
                    assert kept % multiple == 0 or kept == dense_width(adapter, after.index, group), (group, kept)
        rebuilt = rounded_spec.build(rounded.state_dict()).eval()  # the export's arch.json rebuilds it
        with torch.no_grad():
            assert torch.equal(rebuilt(x), rounded(x))

    check()


@pytest.mark.parametrize("key", ["deit3_small", "swin_tiny"])
def test_rounding_a_shared_residual_model_rounds_inner_widths_only(key):
    """The shared residual width stays (its norms normalise over the kept channels); head dims and
    hidden units round up; logits, torch's MAC count and the arch spec's rebuild agree."""
    dense = make_model(key)
    name, kwargs = MODEL_CONFIGS[key]
    adapter = get_adapter(dense)
    x = torch.randn(2, *adapter.input_size())
    residual = random_residual(adapter, keep=0.45, seed=8)
    shrunk = shrink_model(dense, random_masks(adapter, keep=0.55, seed=9, dead_prob=0.1, shared=True), residual)
    spec = ArchSpec.from_model(shrunk, name, {**kwargs, "num_classes": 10})
    rounded, rounded_spec = round_widths(shrunk, spec, 8)
    with torch.no_grad():
        assert (rounded(x) - shrunk(x)).abs().max().item() <= 1e-4
    assert rounded_spec.residual == spec.residual
    cost = model_cost(rounded)
    assert cost.macs == torch_macs(rounded) > model_cost(shrunk).macs
    for before, after in zip(model_cost(shrunk).sub_blocks, cost.sub_blocks):
        assert (after.sizes.c_in, after.sizes.c_out) == (before.sizes.c_in, before.sizes.c_out)
        inner = ("head_dim",) if after.kind == "attn" else ("hidden",)
        for group in inner:
            kept = getattr(after.sizes, group)
            assert after.sizes.skipped or kept % 8 == 0 or kept == dense_width(adapter, after.index, group)
    with torch.no_grad():
        assert torch.equal(rounded_spec.build(rounded.state_dict()).eval()(x), rounded(x))


def dense_width(adapter, index: int, group: str) -> int:
    sizes = adapter.sub_blocks[index].dense_sizes()
    return getattr(sizes, group)


def test_rounded_masks_only_grow_partly_kept_groups():
    masks = {0: {"in": torch.tensor([True, False, False, True, False]), "heads": torch.tensor([True, False]),
                 "out": torch.zeros(5, dtype=torch.bool), "hidden": torch.ones(5, dtype=torch.bool)}}
    grown = rounded_masks(masks, 4)[0]
    assert grown["in"].tolist() == [True, True, True, True, False]  # 2 -> 4, lowest pruned indices
    assert grown["heads"].tolist() == [True, False]  # whole heads are never added
    assert not grown["out"].any() and grown["hidden"].all()
    assert set(ROUNDED_GROUPS) == {"in", "out", "head_dim", "hidden"}
    with pytest.raises(ValueError, match="round_to must be >= 1"):
        rounded_masks(masks, 0)
