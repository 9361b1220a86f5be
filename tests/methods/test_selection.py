"""Within-block selection (docs/methods.md, sections 1.3, 1.4 and 1.6): Taylor terms, ranks, unit costs, walk,
soft masks, tau; the shared residual's units."""
from __future__ import annotations

import pytest
import torch

from p3b_search.cost import model_cost
from p3b_search.methods.gated import per_gate_ranks
from p3b_search.methods.selection import (
    P3B_GROUPS,
    RESIDUAL,
    TauSchedule,
    UnitLayout,
    normalised_ranks,
    soft_mask,
    taylor_terms,
    walk_threshold,
)
from p3b_search.surgery import attach_gates, get_adapter
from tests.method_support import single_thread, tiny_swin, tiny_vit  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def vit_adapter():
    return get_adapter(tiny_vit())


def test_layout_lays_out_the_p3b_gates_without_whole_heads(vit_adapter):
    layout = UnitLayout(vit_adapter, vit_adapter.sub_blocks)
    assert [(s.sub_block.index, s.group) for s in layout][:6] == [
        (0, "in"), (0, "head_dim"), (0, "out"), (1, "in"), (1, "hidden"), (1, "out")]
    assert layout.size == 3 * (64 + 16 + 64) + 3 * (64 + 256 + 64)
    assert layout.block_span(1) == slice(144, 144 + 384)
    flat = torch.arange(layout.size, dtype=torch.float64)
    torch.testing.assert_close(layout.gather(layout.split(flat)), flat)
    assert all("heads" not in groups for groups in P3B_GROUPS.values())


def test_taylor_terms_are_squared_gate_times_gradient():
    model = tiny_vit().train()
    adapter = get_adapter(model)
    layout = UnitLayout(adapter, adapter.sub_blocks)
    with attach_gates(model, adapter) as gates:
        gates.set(1, "hidden", torch.linspace(0.2, 1.0, 256))
        model(torch.randn(4, 3, 16, 16)).logsumexp(dim=1).sum().backward()
        terms = taylor_terms(gates, layout)
        gate = gates.values[1]["hidden"]
        expected = (gate.detach() * gate.grad).square().double()
        torch.testing.assert_close(layout.split(terms)[1]["hidden"], expected)
        assert terms.shape == (layout.size,) and bool((terms >= 0).all())


def test_ranks_are_normalised_within_each_gate_and_scaled():
    scores = torch.tensor([3.0, 1.0, 2.0, 10.0, 20.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    scales = torch.tensor([1.0, 1.0, 1.0, 1.5, 1.5])
    ranks = normalised_ranks(scores, ids, scales)
    torch.testing.assert_close(ranks, torch.tensor([1.0, 1 / 3, 2 / 3, 0.75, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin])
def test_unit_costs_are_the_parameters_shrink_removes(model_fn):
    """Removing one more unit changes model_cost by exactly the unit's cost (x3H for head dims)."""
    model = model_fn()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    for sb in adapter.sub_blocks:
        layout = UnitLayout(adapter, [sb])
        kept = torch.rand(layout.size, generator=gen) < 0.7
        params, costs = layout.kept_params_and_costs(kept)
        masks = layout.split(kept)
        assert params[0] == model_cost(model, masks).sub_blocks[sb.index].params
        for s in layout:
            unit = s.start + int(kept[s.span].nonzero()[0])
            fewer = kept.clone()
            fewer[unit] = False
            after = model_cost(model, layout.split(fewer)).sub_blocks[sb.index].params
            assert params[0] - after == costs[unit], (sb.name, s.group)
        if sb.kind == "attn":
            head_dim_cost = costs[layout.segments[1].start]
            c_in, c_out = int(kept[layout.segments[0].span].sum()), int(kept[layout.segments[2].span].sum())
            assert head_dim_cost == 3 * sb.num_heads * (c_in + 1) + sb.num_heads * c_out


def test_walk_comes_within_one_unit_of_the_target(vit_adapter):
    gen = torch.Generator().manual_seed(1)
    for sb in vit_adapter.sub_blocks:
        layout = UnitLayout(vit_adapter, [sb])
        dense, _ = layout.kept_params_and_costs(torch.ones(layout.size, dtype=torch.bool))
        ranks = torch.rand(layout.size, generator=gen, dtype=torch.float64)
        for keep in (0.2, 0.5, 0.8):
            target = keep * float(dense[0])
            sel = walk_threshold(layout, ranks, target)
            _, costs = layout.kept_params_and_costs(sel.kept)
            assert abs(float(sel.kept_params[0]) - target) <= float(costs.max()), (sb.name, keep)
            assert int((~sel.kept).sum()) == sel.removed
            assert bool((ranks[~sel.kept].max() <= ranks[sel.kept].min()))  # the lowest ranks go


def test_walk_keeps_everything_for_a_dense_target_and_nothing_for_zero(vit_adapter):
    layout = UnitLayout(vit_adapter, vit_adapter.sub_blocks[:1])
    dense, _ = layout.kept_params_and_costs(torch.ones(layout.size, dtype=torch.bool))
    ranks = torch.rand(layout.size, dtype=torch.float64)
    assert walk_threshold(layout, ranks, float(dense[0])).removed == 0
    empty = walk_threshold(layout, ranks, 0.0)
    assert empty.removed == layout.size and float(empty.kept_params[0]) == 0.0


def test_soft_mask_puts_exactly_the_removed_units_below_one_half():
    layout_size, removed = 40, 12
    order = torch.randperm(layout_size)
    kept = torch.ones(layout_size, dtype=torch.bool)
    kept[order[:removed]] = False
    from p3b_search.methods.selection import Selection

    sel = Selection(order, removed, kept, torch.zeros(1))
    values = soft_mask(sel, tau=0.1)
    assert torch.equal(values >= 0.5, kept)
    # m = sigmoid(ln 9 (pos - 12.5) / (N tau)), N tau = 4: position 16 (order index 15) is 3.5 above
    assert float(values[order[15]]) == pytest.approx(1 / (1 + 9 ** (-3.5 / 4)), rel=1e-5)
    sorted_values = values[order]
    assert bool((sorted_values[1:] > sorted_values[:-1]).all())
    assert torch.equal(soft_mask(sel, tau=0.0), kept.float())


def test_tau_schedule_values_at_chosen_steps():
    tau = TauSchedule(sparse_step=10, final_step=20, tau_max=0.1, tau_min=0.0)
    assert tau(0) == 0.1 and tau(10) == 0.1
    assert tau(15) == pytest.approx(0.05)
    assert tau(20) == 0.0 and tau(40) == 0.0
    assert TauSchedule(10, 10, 0.1, 0.02)(10) == pytest.approx(0.02)


# -- shared residual (docs/methods.md, section 1.6) -----------------------------------------------

def test_shared_layout_lays_out_the_residual_then_the_inner_gates(vit_adapter):
    layout = UnitLayout(vit_adapter, vit_adapter.sub_blocks, residual="shared")
    assert [(s.gate_key, s.size) for s in layout][:4] == [
        ((RESIDUAL, 0), 64), ((0, "head_dim"), 16), ((1, "hidden"), 256), ((2, "head_dim"), 16)]
    assert layout.size == 64 + 3 * (16 + 256) and layout.block_span(1) == slice(80, 336)
    flat = torch.arange(layout.size, dtype=torch.float64)
    torch.testing.assert_close(layout.gather(layout.split(flat), layout.split_residual(flat)), flat)
    inner = UnitLayout(vit_adapter, vit_adapter.sub_blocks[1:2], residual="shared", residual_units=False)
    with pytest.raises(ValueError, match="call fix_widths first"):
        inner.kept_params_and_costs(torch.ones(inner.size, dtype=torch.bool))


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin])
def test_shared_unit_costs_are_the_parameters_shrink_removes(model_fn):
    """With a shared residual, the layout's parameters plus the never-pruned rest are the model's
    count, and one unit less (a residual channel: in every sub-block and outside them) changes
    it by exactly the unit's cost."""
    model = model_fn()
    adapter = get_adapter(model)
    layout = UnitLayout(adapter, adapter.sub_blocks, residual="shared")
    never_pruned = model_cost(model).other_params - adapter.outside_params()
    gen = torch.Generator().manual_seed(3)
    kept = torch.rand(layout.size, generator=gen) < 0.7
    params, costs = layout.kept_params_and_costs(kept)

    def counted(mask: torch.Tensor) -> int:
        return model_cost(model, layout.split(mask), layout.split_residual(mask)).params

    assert float(params.sum()) + never_pruned == counted(kept)
    widths = layout.kept_widths(kept)
    fixed = [UnitLayout(adapter, [sb], residual="shared", residual_units=False).fix_widths(widths)
             for sb in adapter.sub_blocks]
    assert [float(f.kept_params_and_costs(kept[layout.block_span(sb.index)])[0][0]) for f, sb in
            zip(fixed, adapter.sub_blocks)] == params[:-1].tolist()
    for s in layout:
        if int(kept[s.span].sum()) < 2:
            continue
        unit = s.start + int(kept[s.span].nonzero()[0])
        fewer = kept.clone()
        fewer[unit] = False
        assert counted(kept) - counted(fewer) == costs[unit], s.gate_key


def test_shared_ranks_keep_a_channel_of_every_stream():
    """Whatever the target, the walk leaves each stage's best residual channel."""
    adapter = get_adapter(tiny_swin())
    layout = UnitLayout(adapter, adapter.sub_blocks, residual="shared")
    scores = torch.rand(layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ranks = per_gate_ranks(layout, scores, torch.ones(layout.size, dtype=torch.float64), by_gate_type=True)
    empty = walk_threshold(layout, ranks, 0.0)
    kept = layout.split_residual(empty.kept)
    assert {stage: int(mask.sum()) for stage, mask in kept.items()} == {0: 1, 1: 1}
    for stage, mask in kept.items():
        segment = next(s for s in layout.residual_segments if s.stage == stage)
        assert int(mask.nonzero()) == int(scores[segment.span].argmax())
