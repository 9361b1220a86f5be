"""Gates: multiplicative masks on unit groups, with readable gradients and no optimizer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p3b_search.surgery import attach_gates, canonical_masks, get_adapter
from p3b_search.surgery.adapters import GROUPS
from tests.conftest import make_model

MODEL_INPUT = {"deit_tiny": (64, 64), "swin_tiny": (224, 224)}


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


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["deit_tiny", "swin_tiny"]), seed=st.integers(0, 2**16), hard=st.booleans())
def test_gates_folded_into_weights_act_as_gates_on_activations(key, seed, hard):
    """The default (gates folded into the linears' weights) and gates on the activations give
    the same logits and the same gate gradients, for random soft or 0/1 gate values."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *MODEL_INPUT[key], generator=gen)
    results = []
    for on in ("weights", "activations"):
        model = make_model(key).train()
        with attach_gates(model, on=on) as gates:
            gen.manual_seed(seed)
            for _, _, tensor in gates.items():
                values = torch.rand(tensor.shape, generator=gen)
                with torch.no_grad():
                    tensor.copy_((values > 0.3).float() if hard else values)
            logits = model(images)
            logits.square().sum().backward()
            results.append((logits.detach(), [t.grad.clone() for _, _, t in gates.items()]))
        assert not any(hasattr(m, "forward") and "forward" in vars(m) for m in model.modules()), "gates left behind"
    (logits_w, grads_w), (logits_a, grads_a) = results
    torch.testing.assert_close(logits_w, logits_a, rtol=1e-4, atol=1e-5)
    for grad_w, grad_a in zip(grads_w, grads_a):
        torch.testing.assert_close(grad_w, grad_a, rtol=1e-3, atol=1e-4)
