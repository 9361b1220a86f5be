"""Gates: multiplicative masks on unit groups, with readable gradients and no optimizer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p3b_search.surgery import attach_gates, canonical_masks, get_adapter
from p3b_search.surgery.adapters import GROUPS
from p3b_search.surgery.gates import masked_layer_norm
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


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["deit_tiny", "swin_tiny"]), seed=st.integers(0, 2**16), hard=st.booleans(),
       residual=st.sampled_from(["per-block", "shared"]))
def test_gates_folded_into_weights_act_as_gates_on_activations(key, seed, hard, residual):
    """The default (gates folded into the linears' weights) and gates on the activations give
    the same logits and the same gate gradients, for random soft or 0/1 gate values, per block
    or with a shared residual (whose gates act in the norms either way)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *MODEL_INPUT[key], generator=gen)
    results = []
    for on in ("weights", "activations"):
        model = make_model(key).train()
        with attach_gates(model, on=on, residual=residual) as gates:
            gen.manual_seed(seed)
            for tensor in gates.tensors():
                values = torch.rand(tensor.shape, generator=gen)
                with torch.no_grad():
                    tensor.copy_((values > 0.3).float() if hard else values)
            logits = model(images)
            logits.square().sum().backward()
            results.append((logits.detach(), [t.grad.clone() for t in gates.tensors()]))
        assert not any(hasattr(m, "forward") and "forward" in vars(m) for m in model.modules()), "gates left behind"
    (logits_w, grads_w), (logits_a, grads_a) = results
    torch.testing.assert_close(logits_w, logits_a, rtol=1e-4, atol=1e-5)
    for grad_w, grad_a in zip(grads_w, grads_a):
        torch.testing.assert_close(grad_w, grad_a, rtol=1e-3, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.integers(2, 40), keep=st.floats(0.05, 1.0))
def test_masked_layer_norm_with_hard_gates_is_layer_norm_over_the_kept_channels(seed, width, keep):
    """0/1 gates: LayerNorm(kept) on the kept channels, 0 elsewhere, whatever the pruned channels hold."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.rand(width, generator=gen) < keep
    gate[torch.randint(width, (), generator=gen)] = True
    x = torch.randn(3, 5, width, generator=gen) * 4 + 2
    weight, bias = torch.randn(width, generator=gen), torch.randn(width, generator=gen)
    out = masked_layer_norm(x, gate.float(), weight, bias, 1e-6)
    expected = torch.nn.functional.layer_norm(x[..., gate], (int(gate.sum()),), weight[gate], bias[gate], 1e-6)
    torch.testing.assert_close(out[..., gate], expected, rtol=1e-5, atol=1e-5)
    assert not out[..., ~gate].any()
    noisy = x.clone()
    noisy[..., ~gate] = torch.randn_like(noisy[..., ~gate]) * 100
    assert torch.equal(masked_layer_norm(noisy, gate.float(), weight, bias, 1e-6), out)


def test_shared_residual_gates_replace_in_and_out_and_start_as_the_dense_model():
    model = make_model("deit_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    with attach_gates(model, residual="shared") as gates:
        assert set(gates.values[0]) == {"head_dim", "heads"} and set(gates.values[1]) == {"hidden"}
        assert {stage: tuple(t.shape) for stage, t in gates.residual.items()} == {0: (192,)}
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
        model(x).square().sum().backward()
        assert gates.residual[0].grad is not None and gates.residual[0].grad.abs().sum() > 0
        masks = gates.hard_masks()
        assert masks[0]["in"].all() and masks[3]["out"].all() and gates.hard_residual()[0].all()
        with pytest.raises(ValueError, match="residual mask of stage 0 keeps no channel"):
            gates.hard_masks(threshold=2.0)
    assert not any("forward" in vars(m) for m in model.modules())


def test_shared_residual_refuses_models_it_cannot_narrow_exactly():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, global_pool="map")
    with pytest.raises(NotImplementedError, match="VisionTransformer: a shared residual cannot narrow the "
                                                  "attention-pooling head"):
        attach_gates(model, residual="shared")
    with pytest.raises(ValueError, match="gates residual='narrow': use 'per-block' or 'shared'"):
        attach_gates(make_model("deit_tiny"), residual="narrow")
