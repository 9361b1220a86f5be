"""S²ViTE: the head and neuron scores against autograd, prune-and-grow of whole units, arming
over accumulation windows, and the final shrink."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from p3b_search.cost import model_cost
from p3b_search.method_specs.s2vite import S2ViTEConfig
from p3b_search.methods import get_method
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.s2vite import S2ViTE, count_masks, kept_units, solve_densities
from p3b_search.surgery import get_adapter
from p3b_search.training.loop import build_optimizer
from tests.conftest import make_model
from tests.method_support import batch, drive, make, regrown_update_sizes, small_swin, small_vit


def _armed_backward(method: S2ViTE, model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    method._stats.armed = True
    inputs, targets = batch(model, seed=seed)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    return inputs, targets


def test_head_scores_are_taylor_of_the_head_output_and_gradient_at_proj_input():
    model = small_vit()
    method = make(S2ViTE, head_density=0.5, mlp_density=1.0, update_interval=1)
    method.prepare(model)
    sb = method.adapter.sub_blocks[0]
    proj = model.blocks[0].attn.proj
    seen = {}

    def capture(module, args, out):
        seen["x"] = args[0]
        out.register_hook(lambda g: seen.update(g=g))

    handle = proj.register_forward_hook(capture)
    _armed_backward(method, model)
    handle.remove()
    prune, grow = method._scores(sb)
    H, d = sb.num_heads, sb.head_dim
    x = seen["x"].detach().unflatten(-1, (H, d))  # gated head outputs A_h (zero for the dead head)
    grad_x = (seen["g"] @ proj.weight).detach().unflatten(-1, (H, d))  # dL/dA_h at the proj input
    alive = method.masks[0]["heads"]
    assert alive.sum() == 1
    expected_prune = (x * grad_x).sum((1, 3)).abs().mean(0)  # |per-image Taylor sum|, mean over images
    assert torch.allclose(prune[alive], expected_prune[alive], rtol=1e-4, atol=1e-7)
    expected_grow = grad_x.abs().flatten(0, -3).sum((0, 2))
    assert torch.allclose(grow, expected_grow, rtol=1e-4)
    assert grow[~alive].item() > 0  # a switched-off head still sees a gradient to grow by


def _head_scores(model: nn.Module, images: torch.Tensor, signs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """After one backward of ``sum_b signs[b] x logits[b]``: the prune score of the first
    attention's heads, and its batch-summed Taylor term ``sum A_h * dL/dA_h`` (from autograd)."""
    method = make(S2ViTE, head_density=1.0, mlp_density=1.0, update_interval=1)
    method.prepare(model)
    sb = method.adapter.sub_blocks[0]
    proj = method.adapter.linears(sb)[1]
    seen = {}

    def capture(module, args, out):
        seen["x"] = args[0]
        out.register_hook(lambda g: seen.update(g=g))

    handle = proj.register_forward_hook(capture)
    method._stats.armed = True
    logits = model.eval()(images)  # no drop path: both calls see the same network
    (logits.sum(1) * torch.tensor(signs)).sum().backward()
    handle.remove()
    prune, _ = method._scores(sb)
    method.finalize(model)
    taylor = (seen["x"] * (seen["g"] @ proj.weight)).detach().reshape(-1, sb.num_heads, sb.head_dim).sum((0, 2))
    return prune, taylor


@pytest.mark.parametrize("build", [small_vit, small_swin])
def test_head_prune_score_takes_the_absolute_value_per_image_then_the_mean(build):
    model = build()
    image, _ = batch(model, size=1)
    alone, taylor = _head_scores(model, image, [1.0])
    assert torch.allclose(alone, taylor.abs(), rtol=1e-4, atol=1e-9)  # one image: all its tokens (and windows)
    assert alone.min() > 0
    # the same image with opposite loss signs: the batch sum cancels, the per-image values do not
    opposite, batch_sum = _head_scores(model, image.expand(2, -1, -1, -1), [1.0, -1.0])
    assert batch_sum.abs().max() < 1e-3 * alone.min()
    assert torch.allclose(opposite, alone, rtol=1e-4, atol=1e-9)


def test_neuron_grow_score_is_the_gradient_the_neuron_would_get_if_on():
    model = small_vit()
    method = make(S2ViTE, head_density=1.0, mlp_density=0.5, update_interval=1)
    method.prepare(model)
    sb = method.adapter.sub_blocks[1]
    mlp = model.blocks[0].mlp
    alive = method.masks[1]["hidden"]
    dead = int((~alive).nonzero()[0])
    # autograd reference for the dead neuron: ghost weights that add exactly zero to the forward
    ghost_in = torch.zeros(mlp.fc1.in_features, requires_grad=True)  # would-be fc1 row
    ghost_out = torch.zeros(mlp.fc2.out_features, requires_grad=True)  # would-be fc2 column
    saved = {}

    def on_fc1(module, args, z):
        saved["x"], saved["z"] = args[0], z[..., dead]

    def on_fc2(module, args, y):
        shifted = mlp.act(saved["z"] + saved["x"] @ ghost_in)  # = act(z) in value
        fc1_path = (shifted - shifted.detach())[..., None] * mlp.fc2.weight[:, dead].detach()
        return y + shifted[..., None] * ghost_out + fc1_path  # + 0 in value

    handles = [mlp.fc1.register_forward_hook(on_fc1), mlp.fc2.register_forward_hook(on_fc2, prepend=True)]
    _armed_backward(method, model)
    for handle in handles:
        handle.remove()
    fc1_stat, fc2_stat = method._stats.fc1[1], method._stats.fc2[1]
    assert torch.allclose(fc2_stat[:, dead], ghost_out.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(fc1_stat[dead], ghost_in.grad, rtol=1e-4, atol=1e-7)
    # for neurons that are on, the statistics are the real weight gradients
    assert torch.allclose(fc1_stat[alive], mlp.fc1.weight.grad[alive], rtol=1e-4, atol=1e-7)
    assert torch.allclose(fc2_stat[:, alive], mlp.fc2.weight.grad[:, alive], rtol=1e-4, atol=1e-7)
    _, grow = method._scores(sb)
    assert torch.allclose(grow, fc1_stat.abs().sum(1) + fc2_stat.abs().sum(0))


def test_swaps_keep_unit_counts_clear_state_and_end_in_a_matching_shrunk_model():
    model = small_vit()
    method = make(S2ViTE, head_density=0.5, mlp_density=0.25, update_interval=2)
    method.prepare(model)
    assert get_method("s2vite") is S2ViTE
    history = []

    def check(step, optimizer):
        heads = [int(method.masks[j]["heads"].sum()) for j in (0, 2)]
        hidden = [int(method.masks[j]["hidden"].sum()) for j in (1, 3)]
        assert heads == [1, 1] and hidden == [32, 32]
        gates = method._gates.values
        assert torch.equal(gates[1]["hidden"].bool(), method.masks[1]["hidden"])
        dead = ~method.masks[1]["hidden"]
        fc1 = model.blocks[0].mlp.fc1.weight
        assert torch.all(optimizer.state[fc1]["exp_avg"][dead] == 0)
        history.append({j: g[k].clone() for j, g in method.masks.items() for k in g})

    drive(method, model, steps=8, after_step=check)
    changed = [s for s in range(1, 8) if any(not torch.equal(history[s][j], history[s - 1][j]) for j in history[s])]
    assert set(changed) <= {1, 3, 5} and changed  # updates every 2 micro-batches until t_end = 6
    rows = method.pop_allocation_rows()
    assert [r["step"] for r in rows[::4]] == [0, 1, 3, 5]
    x, _ = batch(model, size=2, seed=9)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    metrics = method.on_epoch_end(1)
    pruned = method.finalize(model)
    assert pruned.structured is True
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    shrunk = pruned.model.eval()
    with torch.no_grad():
        assert (shrunk(x) - masked).abs().max().item() <= 1e-4
    assert [b.attn.num_heads for b in shrunk.blocks] == [1, 1]
    assert [b.mlp.fc1.out_features for b in shrunk.blocks] == [32, 32]
    assert metrics["kept_params"] == sum(p.numel() for p in shrunk.parameters())


def test_swin_final_model_shrinks_and_matches():
    model = small_swin()
    method = make(S2ViTE, prune_ratio=0.5, update_interval=1, init="random", seed=3)
    method.prepare(model)
    drive(method, model, steps=3)
    x, _ = batch(model, size=1, seed=5)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    pruned = method.finalize(model).model.eval()
    with torch.no_grad():
        assert (pruned(x) - masked).abs().max().item() <= 1e-4
    heads = [blk.attn.num_heads for stage in pruned.layers for blk in stage.blocks]
    assert heads == [1, 1, 2, 2]
    assert pruned.layers[0].blocks[0].attn.relative_position_bias_table.shape == (169, 1)


def test_updates_wait_for_a_whole_armed_window_under_gradient_accumulation():
    model = small_vit()
    method = make(S2ViTE, prune_ratio=0.5, update_interval=3, epochs=4, steps_per_epoch=4)
    method.prepare(model)
    optimizer = build_optimizer(model, 1e-3, 0.05)
    method.on_train_start(model, optimizer)
    fired, armed = [], []
    for step in range(12):  # windows of two micro-batches: [0,1], [2,3], ...
        armed.append(method._stats.armed)
        inputs, targets = batch(model, seed=step)
        (nn.functional.cross_entropy(model(inputs), targets) / 2).backward()
        info = StepInfo(step=step, epoch=step // 4, steps_per_epoch=4, optimizer_step=step % 2 == 1)
        method.after_backward(info)
        if info.optimizer_step:
            before = method.clock.next_update
            if method._window_armed:
                assert 0 in method._stats.heads and 1 in method._stats.fc1  # whole window collected
            optimizer.step()
            method.after_optimizer_step(info)
            optimizer.zero_grad()
            if method.clock.next_update != before:
                fired.append(step)
            assert not method._stats.heads and not method._stats.fc1  # reset for the next window
    # due at 2 (window [2,3] armed from its start): fires at 3; due at 5 (window [4,5] armed
    # only from 5): waits for [6,7] and fires at 7; due at 8: fires at 9; t_end = 12.8
    assert fired == [3, 7, 9]
    assert armed[:8] == [False, False, True, True, False, True, True, True]


def test_state_round_trip_and_config_errors():
    model, other_model = small_vit(), small_vit(seed=1)
    method, other = make(S2ViTE, update_interval=1), make(S2ViTE, update_interval=1, init="random")
    method.prepare(model)
    other.prepare(other_model)
    drive(method, model, steps=2)
    other.load_state_dict(method.state_dict())
    for j, groups in method.masks.items():
        for g, mask in groups.items():
            assert torch.equal(other.masks[j][g], mask)
            assert torch.equal(other._gates.values[j][g].bool(), mask)
    assert other.clock.next_update == method.clock.next_update == 3
    with pytest.raises(ValueError, match="head_density"):
        S2ViTEConfig(head_density=1.5)
    with pytest.raises(ValueError, match="s2vite.update_interval=100"):
        make(S2ViTE)


def test_unset_densities_are_solved_for_the_whole_model_budget():
    model = make_model("deit_small")
    dense = model_cost(model).params
    densities = solve_densities(model, S2ViTEConfig(prune_ratio=0.75))
    assert densities["attn"] == 0.25  # round(0.25 x 6) = 2 heads: the neurons make up the rest
    kept = model_cost(model, count_masks(get_adapter(model), densities)).params
    assert kept / dense == pytest.approx(0.25, abs=0.01)
    heads_solved = solve_densities(model, S2ViTEConfig(prune_ratio=0.5, mlp_density=0.5))
    assert heads_solved["mlp"] == 0.5 and kept_units(6, heads_solved["attn"]) == 3
    kept = model_cost(model, count_masks(get_adapter(model), heads_solved)).params
    assert kept / dense == pytest.approx(0.5, abs=0.01)
    both = S2ViTEConfig(prune_ratio=0.5, head_density=0.9, mlp_density=0.9)
    assert solve_densities(model, both) == {"attn": 0.9, "mlp": 0.9}  # as set: prune_ratio is not used
    with pytest.raises(ValueError, match=r"s2vite: prune_ratio=0.5 .* with mlp_density=1 no head_density reaches it: "
                                         r"leave mlp_density unset"):
        solve_densities(model, S2ViTEConfig(prune_ratio=0.5, mlp_density=1.0))


def test_gates_follow_the_model_to_its_device():
    model = small_vit()
    method = make(S2ViTE, update_interval=1)
    method.prepare(model)
    method._gates.to("meta")
    for groups in method._gates.values.values():
        for group, gate in groups.items():
            assert gate.device.type == "meta"
            assert not gate.requires_grad  # the head scores come from the proj input, not the gates


def test_regrown_units_move_no_faster_than_fresh_parameters_under_adamw():
    model = small_vit()
    method = make(S2ViTE, epochs=100, steps_per_epoch=4, update_interval=300, head_density=0.5, mlp_density=0.5)
    method.prepare(model)
    sizes = regrown_update_sizes(method, model, steps=310)  # regrowth after optimizer step 300
    assert len(sizes) == 10 and max(sizes) <= 1.05  # a fresh parameter's first updates: about lr
