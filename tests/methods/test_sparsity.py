"""Unstructured mask machinery: ERK densities, masks held at zero through AdamW, non-zero counts."""
from __future__ import annotations

import math

import pytest
import torch

from p3b_search.cost import model_cost, nonzero_macs, torch_macs, weight_uses_per_image
from p3b_search.methods.sparsity import (
    FreshAdamSteps,
    MaskedWeights,
    MaskKeeper,
    NonzeroCounter,
    drop_and_grow,
    erk_densities,
    keep_largest,
    zero_optimizer_state,
)
from p3b_search.surgery import get_adapter
from p3b_search.training.loop import build_optimizer
from tests.method_support import batch, drive, small_vit

SHAPES = {"wide": (512, 64), "square": (128, 128), "small": (10, 64), "conv": (32, 3, 4, 4)}


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_erk_densities_meet_the_target_parameter_weighted(density):
    densities = erk_densities(SHAPES, density)
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    kept = sum(densities[n] * sizes[n] for n in SHAPES)
    assert kept == pytest.approx(density * sum(sizes.values()), rel=1e-12)
    assert all(0 < d <= 1 for d in densities.values())
    # sparse layers keep the Erdos-Renyi-kernel proportions sum(shape) / prod(shape)
    sparse = [n for n in SHAPES if densities[n] < 1]
    raw = {n: sum(SHAPES[n]) / sizes[n] for n in SHAPES}
    for a in sparse:
        for b in sparse:
            assert densities[a] / densities[b] == pytest.approx(raw[a] / raw[b])


def test_erk_keeps_layers_dense_that_would_exceed_one_and_resolves_eps():
    densities = erk_densities(SHAPES, 0.5)
    assert densities["small"] == 1.0  # the highest sum/prod saturates and is kept dense
    assert densities["square"] < densities["wide"] < densities["conv"] < 1.0
    assert erk_densities(SHAPES, 1.0) == dict.fromkeys(SHAPES, 1.0)
    with pytest.raises(ValueError, match="density=0"):
        erk_densities(SHAPES, 0.0)


def test_keep_largest_keeps_exactly_the_largest():
    scores = torch.tensor([[0.3, -5.0], [2.0, 1.0]])
    assert keep_largest(scores, 2).tolist() == [[False, False], [True, True]]
    assert keep_largest(scores, 0).sum() == 0


def test_drop_and_grow_by_hand():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    prune = torch.tensor([0.4, 0.1, 0.3, 0.2, 9.0, 9.0, 9.0, 9.0])  # inactive scores are ignored
    grow = torch.tensor([5.0, 0.0, 5.0, 0.0, 0.5, 3.0, 0.1, 2.0])  # still-active scores are ignored
    grown = drop_and_grow(mask, prune, grow, death_rate=0.5)  # k = ceil(0.5 * 4) = 2: drop 1 and 3
    assert grown.tolist() == [False, False, False, False, False, True, False, True]
    assert mask.tolist() == [True, False, True, False, False, True, False, True]
    # a just-dropped entry competes for regrowth like any inactive one
    mask = torch.tensor([True, True, False])
    grown = drop_and_grow(mask, torch.tensor([1.0, 2.0, 0.0]), torch.tensor([9.0, 0.0, 1.0]), death_rate=0.1)
    assert grown.tolist() == [True, False, False] and mask.tolist() == [True, True, False]


def test_masks_stay_zero_through_adamw_steps_with_nonzero_gradients():
    model = small_vit()
    weight = model.blocks[0].mlp.fc1.weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    keeper = MaskKeeper({"blocks.0.mlp.fc1.weight": mask})
    seen = []

    def check(step, optimizer):
        assert weight.grad[~mask].abs().sum() > 0  # pruned weights do get gradients
        state = optimizer.state[weight]
        seen.append(step)
        assert torch.all(weight[~mask] == 0)
        assert torch.all(state["exp_avg"][~mask] == 0) and torch.all(state["exp_avg_sq"][~mask] == 0)
        assert torch.all(weight[mask] != 0)

    drive(keeper, model, steps=4, after_step=check)
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize("clear_state", [False, True])
def test_cleared_optimizer_state_is_what_keeps_pruned_weights_dead(clear_state):
    """Re-applying masks alone leaves AdamW moments that move pruned weights off zero again."""
    model = small_vit()
    weight = model.blocks[0].mlp.fc1.weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    bound = MaskedWeights(model, {"blocks.0.mlp.fc1.weight": mask})
    optimizer = build_optimizer(model, 1e-2, 0.0)
    bound.apply()
    inputs, targets = batch(model)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        bound.apply()
        if clear_state:
            bound.clear_optimizer_state(optimizer)
        optimizer.zero_grad(set_to_none=False)
    optimizer.step()  # zero gradients: only the moments can move a weight now
    moved = weight.detach()[~mask].abs().sum().item()
    assert (moved == 0) if clear_state else (moved > 0)


LR = 1e-2


def _adamw_twins(**options) -> tuple[list[torch.nn.Linear], list[torch.optim.Optimizer]]:
    """Two identical layers with their own AdamW (``options``), stepped 300 times on the same gradients."""
    layers = [torch.nn.Linear(16, 16, bias=False) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=LR, weight_decay=0.05, **options) for layer in layers]
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        grad = torch.randn(16, 16, generator=gen)
        for layer, optimizer in zip(layers, optimizers):
            layer.weight.grad = grad.clone()
            optimizer.step()
    return layers, optimizers


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"fused": True}])
def test_regrown_entries_step_under_adamw_exactly_as_a_fresh_parameter(options):
    (corrected, plain), (optimizer, plain_optimizer) = _adamw_twins(**options)
    fresh_steps = FreshAdamSteps(corrected)
    fresh_steps.attach(optimizer)
    regrown = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        corrected.weight[regrown] = 0.0
        plain.weight[regrown] = 0.0
    fresh_steps.regrow(optimizer, corrected.weight, regrown)
    zero_optimizer_state(plain_optimizer, plain.weight, regrown)  # moments cleared, step count kept
    reference = torch.nn.Parameter(torch.zeros(16, 16))  # a fresh parameter from the same start
    reference_optimizer = torch.optim.AdamW([reference], lr=LR, weight_decay=0.05, **options)
    gen = torch.Generator().manual_seed(2)
    plain_first = None
    for _ in range(20):
        grad = torch.randn(16, 16, generator=gen)
        previous = corrected.weight.detach().clone(), plain.weight.detach().clone()
        for param, optimizer_ in ((corrected.weight, optimizer), (plain.weight, plain_optimizer),
                                  (reference, reference_optimizer)):
            param.grad = grad.clone()
            optimizer_.step()
        torch.testing.assert_close(corrected.weight[regrown], reference[regrown], rtol=0, atol=1e-5 * LR)
        torch.testing.assert_close(corrected.weight[~regrown], plain.weight[~regrown], rtol=0, atol=0)
        assert (corrected.weight - previous[0]).detach()[regrown].abs().max() <= 1.05 * LR
        if plain_first is None:
            plain_first = (plain.weight - previous[1]).detach()[regrown].abs().max()
    assert plain_first > 1.5 * LR  # cleared moments under the optimizer's step count of 301


def test_fresh_adam_steps_leave_sgd_alone_and_round_trip():
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    fresh_steps = FreshAdamSteps(layer)
    fresh_steps.attach(optimizer)
    layer.weight.grad = torch.ones(4, 4)
    optimizer.step()
    fresh_steps.regrow(optimizer, layer.weight, torch.eye(4, dtype=torch.bool))
    assert fresh_steps.births == {}  # SGD keeps no step count: nothing to correct
    adam = torch.optim.Adam(layer.parameters())
    layer.weight.grad = torch.ones(4, 4)
    adam.step()
    fresh_steps.regrow(adam, layer.weight, torch.eye(4, dtype=torch.bool))
    restored = FreshAdamSteps(layer)
    restored.load_state_dict(fresh_steps.state_dict())
    assert torch.equal(restored.births["weight"], torch.eye(4))
    fresh_steps.detach()


def test_fresh_adam_steps_skip_parameters_without_gradient():
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    fresh_steps = FreshAdamSteps(layer)
    fresh_steps.attach(optimizer)
    layer.weight.grad, layer.bias.grad = torch.ones(4, 4), torch.ones(4)
    optimizer.step()
    fresh_steps.regrow(optimizer, layer.weight, torch.eye(4, dtype=torch.bool))
    before = layer.weight.detach().clone()
    layer.weight.grad = None  # this step updates the bias only: the weight must not move
    optimizer.step()
    assert torch.equal(layer.weight, before)
    layer.weight.grad = torch.ones(4, 4)
    optimizer.step()
    assert (layer.weight - before).detach().abs().diagonal().max() <= 0.1 * 1.05  # a fresh first step: about lr


def test_fresh_adam_steps_leave_other_adam_variants_as_they_step():
    twins = [torch.nn.Linear(4, 4) for _ in range(2)]
    twins[1].load_state_dict(twins[0].state_dict())
    optimizers = [torch.optim.NAdam(t.parameters(), lr=0.1) for t in twins]
    fresh_steps = FreshAdamSteps(twins[0])
    fresh_steps.attach(optimizers[0])
    regrown = torch.eye(4, dtype=torch.bool)
    for step in range(4):
        for twin, optimizer in zip(twins, optimizers):
            twin.weight.grad, twin.bias.grad = torch.full((4, 4), step + 1.0), torch.ones(4)
            optimizer.step()
        if step == 1:
            fresh_steps.regrow(optimizers[0], twins[0].weight, regrown)
            zero_optimizer_state(optimizers[1], twins[1].weight, regrown)
    assert fresh_steps.births and torch.equal(twins[0].weight, twins[1].weight)


def test_mask_keeper_state_round_trip_and_bad_names():
    mask = torch.ones(64, 32, dtype=torch.bool)
    keeper = MaskKeeper({"blocks.0.mlp.fc1.weight": mask})
    other = MaskKeeper({})
    other.load_state_dict(keeper.state_dict())
    assert torch.equal(other.state_dict()["weight_masks"]["blocks.0.mlp.fc1.weight"], mask)
    with pytest.raises(ValueError, match="names no parameter"):
        MaskedWeights(small_vit(), {"blocks.9.mlp.fc1.weight": mask})
    with pytest.raises(ValueError, match="shape"):
        MaskedWeights(small_vit(), {"blocks.0.mlp.fc1.weight": mask.T})


def test_nonzero_counter_counts_macs_and_params():
    model = small_vit()
    adapter = get_adapter(model)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    uses = weight_uses_per_image(model, names)
    tokens = adapter.sub_blocks[0].tokens
    assert uses["blocks.0.attn.qkv.weight"] == tokens and uses["head.weight"] == 1
    assert uses["patch_embed.proj.weight"] == 16  # 4x4 patch grid
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in names}
    masks["blocks.1.mlp.fc2.weight"][:, :10] = False  # 320 zeros in sub-block 3
    masks["head.weight"][0] = False  # 32 zeros outside the sub-blocks
    counter = NonzeroCounter(model, names)
    cost = counter(MaskedWeights(model, masks))
    dense = model_cost(model)
    assert cost.dense_macs == dense.macs == torch_macs(model)
    assert cost.dense_params == dense.params == sum(p.numel() for p in model.parameters())
    assert cost.nonzero_params == dense.params - 320 - 32
    assert cost.nonzero_macs == dense.macs - 320 * tokens - 32 == nonzero_macs(model, masks)
    assert cost.sub_blocks[3] == (dense.sub_blocks[3].params - 320, dense.sub_blocks[3].macs - 320 * tokens)
    assert cost.sub_blocks[2] == (dense.sub_blocks[2].params, dense.sub_blocks[2].macs)
    metrics = cost.metrics()
    assert metrics["macs"] == dense.macs and metrics["nonzero_macs"] < dense.macs and metrics["structured"] == 0.0
