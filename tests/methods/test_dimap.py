"""DIMAP: the metric by hand, one threshold per module, masks held at zero, the structured variant."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from p3b_search.cost import model_cost
from p3b_search.method_specs.dimap import MODULES, DIMAPConfig, DIMAPStructuredConfig
from p3b_search.methods import get_method
from p3b_search.methods.dimap import (
    DIMAP,
    DIMAPStructured,
    dimap_scores,
    dimap_unit_masks,
    module_layers,
    removal_orders,
)
from p3b_search.methods.sparsity import MaskKeeper
from p3b_search.methods.target import kept_params
from p3b_search.surgery import get_adapter
from tests.conftest import make_model
from tests.method_support import NUM_CLASSES, batch, drive, make, small_swin, small_vit


def test_score_of_a_four_element_layer_by_hand():
    # sorted by magnitude: 3, 2, -1, 0.5 -> squares 9, 4, 1, 0.25
    scores = dimap_scores(torch.tensor([[-1.0, 3.0], [0.5, 2.0]]))
    expected = torch.tensor([[1 / 14, 9 / 9], [0.25 / 14.25, 4 / 13]], dtype=torch.float64)
    assert torch.allclose(scores, expected, rtol=0, atol=1e-15)


def test_tied_weights_share_the_denominator_of_all_weights_at_least_as_large():
    scores = dimap_scores(torch.tensor([2.0, -2.0, 1.0, 0.0]))
    assert scores.tolist() == pytest.approx([4 / 8, 4 / 8, 1 / 9, 0.0])
    assert dimap_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_module_ratios_default_spread_evenly_and_unset_modules_share_the_rest():
    sizes = {"qkv": 300, "prj": 100, "mlp": 800}
    assert DIMAPConfig(prune_ratio=0.4).module_ratios(sizes, 1200) == pytest.approx(
        {"qkv": 0.4, "prj": 0.4, "mlp": 0.4})
    ratios = DIMAPConfig(prune_ratio=0.5, mlp_prune_ratio=0.6).module_ratios(sizes, 1200)
    assert ratios["mlp"] == 0.6 and ratios["qkv"] == ratios["prj"] == pytest.approx(0.3)
    assert sum(ratios[m] * sizes[m] for m in MODULES) == pytest.approx(0.5 * 1200)
    every = DIMAPConfig(prune_ratio=0.1, qkv_prune_ratio=0.2, prj_prune_ratio=0.0, mlp_prune_ratio=0.7)
    assert every.module_ratios(sizes, 1200) == {"qkv": 0.2, "prj": 0.0, "mlp": 0.7}
    with pytest.raises(ValueError, match="needs 1.600 of the qkv/prj weights removed: set every module ratio"):
        DIMAPConfig(prune_ratio=0.8, mlp_prune_ratio=0.4).module_ratios(sizes, 1200)


def test_never_pruned_parameters_stay_in_the_denominator_of_prune_ratio():
    sizes = {"qkv": 300, "prj": 100, "mlp": 800}  # plus 300 parameters no module holds
    ratios = DIMAPConfig(prune_ratio=0.4).module_ratios(sizes, 1500)
    assert sum(ratios[m] * sizes[m] for m in MODULES) == pytest.approx(0.4 * 1500)
    assert ratios == pytest.approx(dict.fromkeys(MODULES, 0.5))
    with pytest.raises(ValueError, match=r"prune_ratio=0.9 of all 1500 parameters needs 1.125 .*: lower prune_ratio"):
        DIMAPConfig(prune_ratio=0.9).module_ratios(sizes, 1500)


def test_config_errors_are_one_line_and_name_the_field():
    for bad in ({"qkv_prune_ratio": 1.0}, {"mlp_prune_ratio": -0.1}, {"mlp_ratio": 0.5}):
        with pytest.raises(ValidationError) as error:
            DIMAPConfig(**bad)
        assert next(iter(bad)) in str(error.value)
    with pytest.raises(ValidationError, match="unit_groups is empty"):
        DIMAPStructuredConfig(unit_groups=())
    with pytest.raises(ValidationError, match="unit_groups"):
        DIMAPStructuredConfig(unit_groups=("heads", "channels"))
    assert get_method("dimap") is DIMAP and get_method("dimap-structured") is DIMAPStructured


def test_per_module_thresholds_hit_the_per_module_ratios_on_swin():
    model = small_swin()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {"qkv_prune_ratio": 0.3, "prj_prune_ratio": 0.6, "mlp_prune_ratio": 0.5}
    method = make(DIMAP, **config)
    method.prepare(model)
    layers = module_layers(model, get_adapter(model))
    masks = method.state_dict()["weight_masks"]
    for module, weights in layers.items():
        total = sum(w.numel() for w in weights.values())
        removed = sum(int((~masks[n]).sum()) for n in weights)
        assert removed == round(config[f"{module}_prune_ratio"] * total)
        # one global threshold within the module: every pruned score <= every kept score
        scores = {n: dimap_scores(before[n]) for n in weights}
        pruned_max = max(scores[n][~masks[n]].max() for n in weights)
        kept_min = min(scores[n][masks[n]].min() for n in weights)
        assert pruned_max <= kept_min
        for name, weight in weights.items():
            assert torch.equal(weight.detach(), before[name] * masks[name])
    assert len(masks) == sum(len(w) for w in layers.values())  # AUX and biases are not masked
    for name, param in model.named_parameters():
        if name not in masks:  # patch embed, patch merging, norms, position bias, head, biases
            assert torch.equal(param.detach(), before[name]), name


def test_pruned_weights_stay_zero_through_both_stages_and_costs_are_reported():
    model = small_vit()
    method = make(DIMAP, prune_ratio=0.6)
    method.prepare(model)
    rows = method.pop_allocation_rows()
    assert len(rows) == 4 and {r["step"] for r in rows} == {0}
    assert all(set(r) == {"step", "epoch", "layer", "kind", "sub_block", "keep_ratio", "kept_params", "kept_macs"}
               for r in rows)
    masks = method.state_dict()["weight_masks"]
    params = dict(model.named_parameters())

    def zeros_hold(step, optimizer):
        for name, mask in masks.items():
            assert torch.all(params[name].detach()[~mask] == 0)

    drive(method, model, steps=4, after_step=zeros_hold)
    metrics = method.on_epoch_end(0)
    dense = model_cost(model)
    assert metrics["keep_ratio"] == pytest.approx(0.4, abs=1e-3)  # of all parameters
    assert metrics["density"] < 0.4  # the masked weights pay for the never-pruned parameters
    assert metrics["macs"] == dense.macs > metrics["nonzero_macs"]
    assert metrics["kept_params"] < dense.params and metrics["structured"] == 0.0
    pruned = method.finalize(model)
    assert pruned.structured is False and set(pruned.weight_masks) == set(masks)
    keeper = method.finetune_hooks(pruned)
    assert isinstance(keeper, MaskKeeper)
    drive(keeper, pruned.model, steps=3, after_step=zeros_hold)


def test_state_round_trip_restores_the_masks():
    model, other = small_vit(), small_vit()
    method, resumed = make(DIMAP, prune_ratio=0.5), make(DIMAP, prune_ratio=0.2)
    method.prepare(model)
    resumed.prepare(other)
    resumed.load_state_dict(method.state_dict())
    for name, mask in method.state_dict()["weight_masks"].items():
        assert torch.equal(resumed.state_dict()["weight_masks"][name], mask)
        assert torch.all(dict(other.named_parameters())[name].detach()[~mask] == 0)


def test_structured_variant_removes_the_asked_weights_and_keeps_every_group():
    model = small_swin()
    adapter = get_adapter(model)
    groups = ("heads", "head_dim", "hidden", "in", "out")
    masks = dimap_unit_masks(adapter, {"qkv": 0.5, "prj": 0.5, "mlp": 0.4}, removal_orders(adapter, groups))
    layers = module_layers(model, adapter)
    attn_weights = sum(w.numel() for m in ("qkv", "prj") for w in layers[m].values())
    mlp_weights = sum(w.numel() for w in layers["mlp"].values())
    kept = {"attn": 0, "mlp": 0}
    for sb in adapter.sub_blocks:
        groups = masks[sb.index]
        assert all(bool(groups[g].any()) for g in groups)  # no sub-block disappears
        n = {g: int(m.sum()) for g, m in groups.items()}
        if sb.kind == "attn":
            width = n["heads"] * n["head_dim"]
            kept["attn"] += 3 * width * n["in"] + width * n["out"]
        else:
            kept["mlp"] += n["hidden"] * (n["in"] + n["out"])
    # the walk stops at the first unit that reaches the target: it overshoots by less than one unit
    largest_unit = {"attn": max(sb.head_dim * 4 * sb.dim for sb in adapter.sub_blocks if sb.kind == "attn"),
                    "mlp": max(sb.hidden for sb in adapter.sub_blocks if sb.kind == "mlp")}
    assert 0 <= attn_weights - kept["attn"] - 0.5 * attn_weights < largest_unit["attn"]
    assert 0 <= mlp_weights - kept["mlp"] - 0.4 * mlp_weights < largest_unit["mlp"]
    with pytest.raises(ValueError, match="can remove only"):
        dimap_unit_masks(adapter, {"qkv": 0.9, "prj": 0.9, "mlp": 0.0}, removal_orders(adapter, ("heads",)))


def test_structured_dimap_on_swin_tiny_shrinks_to_the_masked_logits():
    model = make_model("swin_tiny")
    adapter = get_adapter(model)
    x = torch.randn(1, *adapter.input_size())
    method = make(DIMAPStructured, prune_ratio=0.5, unit_groups=("heads", "head_dim", "hidden"))
    method.prepare(model)
    with torch.no_grad():
        masked = model(x)
    rows = method.pop_allocation_rows()
    metrics = method.on_epoch_end(0)
    pruned = method.finalize(model)
    assert pruned.structured is True
    with torch.no_grad():
        assert (pruned.model(x) - masked).abs().max().item() <= 1e-4
    shrunk = model_cost(pruned.model)
    assert shrunk.params == metrics["kept_params"] == sum(p.numel() for p in pruned.model.parameters())
    assert shrunk.macs == metrics["macs"] < model_cost(model).macs
    assert sum(r["kept_params"] for r in rows) == shrunk.block_params
    # relative position bias tables shrink only with their heads; patch merging is untouched
    assert torch.equal(pruned.model.layers[1].downsample.reduction.weight, model.layers[1].downsample.reduction.weight)


def test_structured_state_round_trip_and_gates_follow_the_masks():
    model = small_vit()
    method = make(DIMAPStructured, prune_ratio=0.5)
    method.prepare(model)
    other_model = small_vit(seed=1)
    other = make(DIMAPStructured, prune_ratio=0.1)
    other.prepare(other_model)
    other.load_state_dict(method.state_dict())
    x, _ = batch(model)
    pruned, pruned_other = method.finalize(model), other.finalize(other_model)
    assert [p.shape for p in pruned.model.parameters()] == [p.shape for p in pruned_other.model.parameters()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # gates are off
    with torch.no_grad():
        assert pruned.model(x).shape == (4, NUM_CLASSES)


def test_structured_variant_solves_the_unset_ratios_for_the_whole_model_budget():
    model = make_model("deit_tiny")
    dense = model_cost(model).params
    method = make(DIMAPStructured, prune_ratio=0.6, mlp_prune_ratio=0.5)
    method.prepare(model)
    assert method.ratios["mlp"] == 0.5 and method.ratios["qkv"] == method.ratios["prj"] > 0.6
    assert method.on_epoch_end(0)["keep_ratio"] == pytest.approx(0.4, abs=0.01)
    assert kept_params(method.finalize(model)) / dense == pytest.approx(0.4, abs=0.01)
    unreachable = r"dimap-structured: prune_ratio=0.9 .*: add unit groups to unit_groups=\['in'\]"
    with pytest.raises(ValueError, match=unreachable):
        make(DIMAPStructured, prune_ratio=0.9, unit_groups=("in",)).prepare(make_model("deit_tiny"))
