"""The baselines in P3B's framework: uniform-magnitude and global-taylor."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from p3b_search.method_specs.allocation import ALLOCATION_KEYS
from p3b_search.method_specs.baselines import GlobalTaylorConfig, UniformMagnitudeConfig
from p3b_search.methods import get_method
from p3b_search.methods.baselines import GlobalTaylor, UniformMagnitude
from p3b_search.methods.unit_weights import residual_weight_norms, unit_weight_norms
from p3b_search.surgery import get_adapter, shrink_model
from p3b_search.training.loop import train_stage
from tests.method_support import NUM_CLASSES, loader, single_thread, stage, tiny_swin, tiny_vit, training  # noqa: F401

EPOCHS, STEPS = 4, 4


def run(method_cls, config_cls, **config):
    """Prune a tiny ViT through the real loop; returns what the tests look at."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_vit(seed=1)
        method = method_cls(config_cls(prune_ratio=0.5, **config), num_classes=NUM_CLASSES, epochs=EPOCHS,
                            steps_per_epoch=STEPS)
        method.prepare(model)
        history = train_stage(model, loader(), loader(), stage(EPOCHS), training(), method)
        rows = method.pop_allocation_rows()
        method.finalize(model)
    finally:
        torch.set_num_threads(threads)
    return dict(method=method, history=history, rows=rows)


@pytest.fixture(scope="module")
def uniform_at_start():
    return run(UniformMagnitude, UniformMagnitudeConfig, prune_start_epoch=1)


@pytest.fixture(scope="module")
def global_taylor():
    return run(GlobalTaylor, GlobalTaylorConfig, prune_start_epoch=1, prune_sparse_epoch=2, prune_steps_update_mask=2)


def test_registered_under_their_names():
    assert get_method("uniform-magnitude") is UniformMagnitude
    assert get_method("global-taylor") is GlobalTaylor


@pytest.mark.parametrize("fixture", ["uniform_at_start", "global_taylor"])
def test_rows_carry_every_allocation_key(fixture, request):
    """(Budget and shrunk == masked logits: the method contract, tests/methods/test_method_contract.py.)"""
    result = request.getfixturevalue(fixture)
    assert result["rows"] and all(tuple(r) == ALLOCATION_KEYS for r in result["rows"])


def test_uniform_magnitude_prunes_once_at_the_start_with_one_ratio_everywhere(uniform_at_start):
    rows, history = uniform_at_start["rows"], uniform_at_start["history"]
    assert {r["step"] for r in rows} == {STEPS - 1}  # after the last micro-batch before epoch 1
    kappa = uniform_at_start["method"].keep_ratio
    assert all(r["keep_ratio_target"] == pytest.approx(kappa) for r in rows)
    for r in rows:
        assert r["keep_ratio"] == pytest.approx(kappa, abs=0.06)
    assert history[0]["keep_ratio"] < 0.51 and len({h["keep_ratio"] for h in history}) == 1
    assert all(math.isnan(r["benefit_cls"]) and math.isnan(r["importance"]) for r in rows)


def test_uniform_magnitude_removes_the_smallest_norm_units_of_each_gate():
    model = tiny_vit(seed=2)
    method = UniformMagnitude(UniformMagnitudeConfig(prune_ratio=0.6, prune_at="finalize", norm="l1"),
                              num_classes=NUM_CLASSES, epochs=EPOCHS, steps_per_epoch=STEPS)
    method.prepare(model)
    masks = method.hard_masks()
    assert all(bool(m.all()) for groups in masks.values() for m in groups.values())  # dense until pruned
    method.finalize(model)
    masks = method.hard_masks()
    for sb in method.adapter.sub_blocks:
        for group, norms in unit_weight_norms(method.adapter, sb, "l1").items():
            kept = masks[sb.index][group]
            if kept.all() or not kept.any():
                continue
            assert float(norms[~kept].max()) <= float(norms[kept].min()), (sb.name, group)


def test_unit_weight_norms_own_the_right_weights():
    model = tiny_vit(seed=0)
    method = UniformMagnitude(UniformMagnitudeConfig(), num_classes=NUM_CLASSES, epochs=EPOCHS, steps_per_epoch=STEPS)
    method.prepare(model)
    attn = method.adapter.sub_blocks[0]
    norms = unit_weight_norms(method.adapter, attn, "l2")
    qkv, proj = model.blocks[0].attn.qkv.weight.detach(), model.blocks[0].attn.proj.weight.detach()
    rows = [t * 64 + h * 16 + 5 for t in range(3) for h in range(4)]
    expected = torch.cat([qkv[rows].flatten(), proj[:, [h * 16 + 5 for h in range(4)]].flatten()]).norm()
    torch.testing.assert_close(norms["head_dim"][5], expected)
    torch.testing.assert_close(norms["in"][7], qkv[:, 7].norm())
    torch.testing.assert_close(norms["out"][3], proj[3].norm())


def test_uniform_magnitude_at_finalize_keeps_the_model_dense_until_then():
    result = run(UniformMagnitude, UniformMagnitudeConfig, prune_at="finalize")
    assert [h["keep_ratio"] for h in result["history"][:-1]] == [1.0] * (EPOCHS - 1)
    assert result["history"][-1]["keep_ratio"] == pytest.approx(0.5, abs=0.01)
    assert {r["step"] for r in result["rows"]} == {EPOCHS * STEPS - 1}


def test_uniform_magnitude_with_start_epoch_zero_prunes_before_training():
    model = tiny_vit()
    method = UniformMagnitude(UniformMagnitudeConfig(prune_start_epoch=0), num_classes=NUM_CLASSES,
                              epochs=EPOCHS, steps_per_epoch=STEPS)
    method.prepare(model)
    method.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1))
    rows = method.pop_allocation_rows()
    assert {r["step"] for r in rows} == {0} and method.pruned


def test_global_taylor_lets_blocks_differ_and_has_no_per_block_target(global_taylor):
    final = [r for r in global_taylor["rows"] if r["step"] == EPOCHS * STEPS - 1]
    assert len(final) == 6
    assert max(r["keep_ratio"] for r in final) - min(r["keep_ratio"] for r in final) > 0.05
    assert all(math.isnan(r["keep_ratio_target"]) for r in global_taylor["rows"])
    steps = sorted({r["step"] for r in global_taylor["rows"]})
    assert steps == [5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin])
def test_residual_channel_norms_cover_every_weight_the_channel_owns(model_fn):
    """A shared residual channel's L1 norm is what cutting it removes from the matrix products'
    weights (sub-block linears, patch embedding, merging, head)."""
    model = model_fn()
    adapter = get_adapter(model)
    norms = residual_weight_norms(adapter, "l1")

    def matmul_weight_l1(net) -> float:
        return sum(float(m.weight.detach().double().abs().sum()) for m in net.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)))

    dense = matmul_weight_l1(model)
    for index, width in adapter.stream_widths().items():
        for channel in (0, width - 1):
            residual = {s: torch.ones(w, dtype=torch.bool) for s, w in adapter.stream_widths().items()}
            residual[index][channel] = False
            removed = dense - matmul_weight_l1(shrink_model(model, {}, residual))
            assert float(norms[index][channel]) == pytest.approx(removed, rel=1e-4), (index, channel)


def test_uniform_magnitude_with_a_shared_residual_cuts_the_smallest_norm_channels_and_one_ratio():
    model = tiny_vit(seed=2)
    method = UniformMagnitude(UniformMagnitudeConfig(prune_ratio=0.5, prune_at="finalize", residual="shared"),
                              num_classes=NUM_CLASSES, epochs=EPOCHS, steps_per_epoch=STEPS)
    method.prepare(model)
    norms = residual_weight_norms(method.adapter, "l2")[0]
    pruned = method.finalize(model)
    kept = method.hard_residual()[0]
    assert 0 < int(kept.sum()) < 64 == pruned.model.blocks[0].dense_geometry["dim"]
    assert float(norms[~kept].max()) <= float(norms[kept].min())  # the smallest norms go
    rows = method.pop_allocation_rows()
    widths = {0: int(kept.sum())}
    at_width = method.layout.block_params(widths)
    targets = torch.tensor([r["keep_ratio_target"] for r in rows], dtype=torch.float64) * method.dense_params
    torch.testing.assert_close(targets / at_width, torch.full_like(at_width, method.keep_ratio))
    assert pruned.model.embed_dim == widths[0]
