"""SViTE: death-rate schedule, update clock, magnitude death + gradient growth, ERK start,
masks held at zero through AdamW, exact resume through the training loop."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from p3b_search.config import StageConfig, TrainingConfig
from p3b_search.method_specs.svite import SViTEConfig
from p3b_search.methods import get_method
from p3b_search.methods.sparsity import erk_densities
from p3b_search.methods.svite import (
    PruneGrowClock,
    SViTE,
    cosine_death_rate,
    masked_weights,
    prune_and_grow,
)
from p3b_search.training.loop import train_stage
from p3b_search.training.rng import seed_everything
from tests.method_support import NUM_CLASSES, drive, make, regrown_update_sizes, small_swin, small_vit


@pytest.mark.parametrize("t, expected", [(0, 0.5), (25, 0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2),
                                         (50, 0.2525), (100, 0.005)])
def test_death_rate_values(t, expected):
    assert cosine_death_rate(t, 100, 0.5, 0.005) == pytest.approx(expected)


def test_clock_fires_every_interval_until_t_end():
    clock = PruneGrowClock(SViTEConfig(update_interval=3), method="svite", epochs=5, steps_per_epoch=4)
    assert (clock.total, clock.end) == (20, 16)
    fired = []
    for step in range(20):
        if clock.is_due(step):
            fired.append(step)
            clock.advance(step)
    assert fired == [2, 5, 8, 11, 14]
    assert clock.death_rate(0) == 0.5 and clock.death_rate(20) == pytest.approx(0.005)


def test_an_interval_past_t_end_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"svite.update_interval=40 micro-batches leaves no prune-and-grow update"):
        make(SViTE, epochs=2, steps_per_epoch=20, update_interval=40)
    with pytest.raises(ValidationError, match="final_death_rate=0.6 exceeds death_rate=0.5"):
        SViTEConfig(final_death_rate=0.6)
    with pytest.raises(ValidationError, match="density"):
        SViTEConfig(density=0.0)
    assert get_method("svite") is SViTE


def test_default_density_keeps_one_minus_prune_ratio_of_all_parameters():
    config = SViTEConfig(prune_ratio=0.6, scope="blocks")
    assert config.masked_density(masked=800, total=1000) == pytest.approx(0.25)  # 200 + 0.25 x 800 = 400
    assert SViTEConfig(prune_ratio=0.6, density=0.7).masked_density(800, 1000) == 0.7
    with pytest.raises(ValueError, match=r"svite: prune_ratio=0.9 .* scope='blocks' never masks 0.200 of them: "
                                         r"lower prune_ratio or set scope='all'"):
        SViTEConfig(prune_ratio=0.9, scope="blocks").masked_density(800, 1000)


def test_magnitude_death_and_gradient_growth_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[0.5, -0.1, 0.0], [0.0, 2.0, -0.3]]))
    mask = torch.tensor([[True, True, False], [False, True, True]])
    grad = torch.tensor([[9.0, 0.0, 0.2], [0.7, 9.0, 0.1]])
    # k = ceil(0.5 * 4) = 2: drop -0.1 and -0.3; grow the 2 largest |grad| of the 4 inactive: 0.7, 0.2
    grown = prune_and_grow(weight, mask, grad, death_rate=0.5)
    assert grown.tolist() == [[False, False, True], [True, False, False]]
    assert mask.tolist() == [[True, False, True], [True, True, False]]
    assert weight[grown].tolist() == [0.0, 0.0]  # grown weights start at zero
    assert weight[0, 0].item() == 0.5 and weight[1, 1].item() == 2.0


def test_initial_masks_follow_erk_and_meet_the_density():
    model = small_vit()
    method = make(SViTE, density=0.3, update_interval=2)
    method.prepare(model)
    weights = masked_weights(model, "all")
    masks = method.state_dict()["weight_masks"]
    assert set(masks) == set(weights) and "head.weight" in masks and "patch_embed.proj.weight" in masks
    assert not any(name.endswith("bias") for name in masks)
    densities = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, 0.3)
    for name, mask in masks.items():
        assert int(mask.sum()) == round(densities[name] * mask.numel())
        # magnitude init keeps the largest weights of each layer
        w = weights[name].detach().abs()
        if not bool(mask.all()):
            assert w[mask].min() >= w[~mask].max()  # pruned ones were zeroed, not the others
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept / sum(m.numel() for m in masks.values()) == pytest.approx(0.3, abs=2e-3)
    blocks_only = masked_weights(small_swin(), "blocks")
    assert len(blocks_only) == 16 and all(n.split(".")[-2] in ("qkv", "proj", "fc1", "fc2") for n in blocks_only)


def test_prune_and_grow_through_adamw_keeps_masks_zero_and_grows_by_gradient():
    model = small_vit()
    method = make(SViTE, prune_ratio=0.6, update_interval=2, scope="blocks")
    method.prepare(model)
    params = dict(model.named_parameters())
    previous = {n: m.clone() for n, m in method.state_dict()["weight_masks"].items()}
    updates = []

    def check(step, optimizer):
        masks = method.state_dict()["weight_masks"]
        state = optimizer.state
        for name, mask in masks.items():
            param = params[name]
            assert torch.all(param.detach()[~mask] == 0)
            assert torch.all(state[param]["exp_avg"][~mask] == 0) and torch.all(state[param]["exp_avg_sq"][~mask] == 0)
            assert int(mask.sum()) == int(previous[name].sum())  # swaps keep the count
            grown = mask & ~previous[name]
            if grown.any():
                updates.append(step)
                assert torch.all(param.detach()[grown] == 0)  # grown weights start at zero
                assert torch.all(state[param]["exp_avg"][grown] == 0)
                g = param.grad.abs()
                assert param.grad[~mask].abs().sum() > 0  # pruned weights do get gradients
                assert g[grown].min() >= g[~mask].max()  # growth took the largest gradients
            previous[name] = mask.clone()

    drive(method, model, steps=8, after_step=check)
    assert sorted(set(updates)) == [1, 3, 5]  # every 2 micro-batches until t_end = 0.8 x 8
    rows = method.pop_allocation_rows()
    assert [r["step"] for r in rows[::4]] == [0, 1, 3, 5] and len(rows) == 16
    pruned = method.finalize(model)
    assert pruned.structured is False and set(pruned.weight_masks) == set(previous)


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=gen)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=4), DataLoader(data, batch_size=8)


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    stage = StageConfig(epochs=2, lr=0.05, schedule="constant")
    training = TrainingConfig(prune=stage, batch_size=4, device="cpu", amp=False, weight_decay=0.05)
    config = {"prune_ratio": 0.5, "update_interval": 2}  # updates at micro-batches 1, 3 (epoch 0) and 5 (epoch 1)

    def run(resume_from=None, keep=None):
        seed_everything(0)
        model = small_vit(seed=0 if resume_from is None else 7)
        method = make(SViTE, **config)
        method.prepare(model)
        train, val = _loaders()

        def copy_first(epoch, metrics, folder):
            if keep is not None and epoch == 0:
                shutil.copytree(folder, keep)

        train_stage(model, train, val, stage, training, method, progress=False, checkpoint_dir=tmp_path / "run",
                    resume_from=resume_from, on_epoch_end=copy_first)
        return model, method

    straight, straight_method = run(keep=tmp_path / "epoch0")
    resumed, resumed_method = run(resume_from=tmp_path / "epoch0")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for name, mask in straight_method.state_dict()["weight_masks"].items():
        assert torch.equal(mask, resumed_method.state_dict()["weight_masks"][name])
    assert straight_method.clock.next_update == resumed_method.clock.next_update == 8


def test_swin_is_supported():
    model = small_swin()
    method = make(SViTE, prune_ratio=0.7, update_interval=1)
    method.prepare(model)
    drive(method, model, steps=2)
    metrics = method.on_epoch_end(0)
    assert metrics["keep_ratio"] == pytest.approx(0.3, abs=2e-3)  # of all parameters
    assert metrics["density"] < 0.3  # the masked weights pay for the unmasked parameters
    assert "layers.1.downsample.reduction.weight" in method.state_dict()["weight_masks"]
    assert not any("relative_position" in n for n in method.state_dict()["weight_masks"])
    masks = method.state_dict()["weight_masks"]
    qkv = dict(model.named_parameters())["layers.1.blocks.1.attn.qkv.weight"]
    assert torch.all(qkv.detach()[~masks["layers.1.blocks.1.attn.qkv.weight"]] == 0)


def test_regrown_weights_move_no_faster_than_fresh_ones_under_adamw():
    model = small_vit()
    method = make(SViTE, epochs=100, steps_per_epoch=4, update_interval=300)
    method.prepare(model)
    sizes = regrown_update_sizes(method, model, steps=310)  # regrowth after optimizer step 300
    assert len(sizes) == 10 and max(sizes) <= 1.05  # a fresh parameter's first updates: about lr
