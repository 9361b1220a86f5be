"""Gates: multiplicative masks on unit groups, with readable gradients and no optimizer."""
from __future__ import annotations

import pytest
import torch

from p3b_search.surgery import attach_gates, canonical_masks, get_adapter
from p3b_search.surgery.adapters import GROUPS
from tests.conftest import make_model


def test_adapter_lists_two_sub_blocks_per_layer_with_their_groups():
    for key, layers in (("deit_tiny", 12), ("swin_tiny", 12)):
        adapter = get_adapter(make_model(key))
        assert len(adapter.sub_blocks) == 2 * layers
        for j, sb in enumerate(adapter.sub_blocks):
            assert sb.index == j and sb.layer == j // 2 and sb.kind == ("attn", "mlp")[j % 2]
            assert tuple(sb.groups) == GROUPS[sb.kind]
    swin = get_adapter(make_model("swin_tiny")).sub_blocks
    assert [sb.dim for sb in swin[::2]] == [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    assert swin[0].window == 49 and swin[0].tokens == 56 * 56


def test_unsupported_model_gets_a_clear_error():
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        get_adapter(torch.nn.Linear(2, 2))


def test_all_ones_gates_do_not_change_the_output_and_are_not_parameters():
    model = make_model("deit_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    params_before = sum(1 for _ in model.parameters())
    with attach_gates(model) as gates:
        with torch.no_grad():
            gated = model(x)
        assert sum(1 for _ in model.parameters()) == params_before
        assert all(not t.is_leaf or t.requires_grad for _, _, t in gates.items())
    torch.testing.assert_close(gated, before)


def test_gate_gradient_is_the_taylor_term_of_its_units():
    """dL/dm for the MLP hidden gate equals sum over tokens of activation * dL/d(activation)."""
    model = make_model("deit_tiny").train()
    adapter = get_adapter(model)
    captured = {}
    fc2 = model.blocks[2].mlp.fc2
    fc2.register_forward_pre_hook(lambda m, a: captured.__setitem__("act", a[0]))
    with attach_gates(model, adapter) as gates:
        out = model(torch.randn(2, 3, 64, 64))
        captured["act"].retain_grad()
        out.square().sum().backward()
        grad = gates.values[5]["hidden"].grad
        act = captured["act"]
        expected = (act * act.grad).sum(dim=(0, 1))  # gate = 1: d(act * m)/dm = act
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
        assert all(g is not None for _, _, g in gates.grads())
        gates.zero_grad()
        assert all(g is None for _, _, g in gates.grads())


def test_zero_out_gate_removes_the_branch_contribution():
    model = make_model("deit_tiny")
    adapter = get_adapter(model)
    with attach_gates(model, adapter) as gates:
        gates.set(0, "out", 0.0)
        block = model.blocks[0]
        with torch.no_grad():
            branch = block.attn(block.norm1(torch.randn(1, 17, 192)))
            assert branch.abs().max() == 0
            gates.set(0, "out", 1.0)
            assert block.attn(block.norm1(torch.randn(1, 17, 192))).abs().max() > 0


def test_canonical_masks_switch_off_dead_sub_blocks_and_fill_missing_groups():
    adapter = get_adapter(make_model("deit_tiny"))
    masks = canonical_masks(adapter, {0: {"head_dim": torch.zeros(64, dtype=torch.bool)}})
    assert not any(m.any() for m in masks[0].values())
    assert all(m.all() for m in masks[1].values())
    hard = attach_gates(adapter.model, adapter).hard_masks()
    assert all(m.all() for groups in hard.values() for m in groups.values())
