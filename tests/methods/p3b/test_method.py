"""P3B as training hooks: validation, the schedule in the real loop, finalize, reactivation, resume."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from p3b_search.cost import model_cost
from p3b_search.method_specs.allocation import ALLOCATION_KEYS
from p3b_search.method_specs.p3b import P3BConfig
from p3b_search.methods import get_method
from p3b_search.methods.hooks import StepInfo
from p3b_search.methods.p3b import P3B
from p3b_search.methods.p3b.benefit import BlockBenefit
from p3b_search.training.loop import build_optimizer, train_stage
from p3b_search.training.rng import seed_everything
from tests.method_support import NUM_CLASSES, loader, single_thread, stage, tiny_swin, tiny_vit, training  # noqa: F401

EPOCHS = 4
STEPS = 4  # 64 samples / batch 16
CONFIG = dict(prune_ratio=0.5, prune_start_epoch=1, prune_sparse_epoch=2, prune_steps_update_mask=2)


def make_p3b(**overrides) -> P3B:
    return P3B(P3BConfig(**{**CONFIG, **overrides}), num_classes=NUM_CLASSES, epochs=EPOCHS, steps_per_epoch=STEPS)


def hard_masked_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT pruned by P3B through the real training loop (4 epochs x 4 micro-batches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_vit()
    method = make_p3b()
    method.prepare(model)
    try:
        history = train_stage(model, loader(), loader(), stage(EPOCHS), training(), method)
    finally:
        torch.set_num_threads(threads)
    rows = method.pop_allocation_rows()
    x = loader().dataset.tensors[0][:8]
    logits = hard_masked_logits(model, x)
    pruned = method.finalize(model)
    return dict(model=model, method=method, history=history, rows=rows, x=x, logits=logits, pruned=pruned)


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="prune_start_epoch=5 is not before prune_finalize_epoch=3"):
        P3BConfig(prune_start_epoch=5, prune_finalize_epoch=3)
    with pytest.raises(ValidationError, match="prune_sparse_epoch=1 is before prune_start_epoch=2"):
        P3BConfig(prune_start_epoch=2, prune_sparse_epoch=1)
    with pytest.raises(ValidationError, match="tau_min=0.2 exceeds tau_max=0.1"):
        P3BConfig(tau_min=0.2)
    with pytest.raises(ValidationError, match="keep_ratios"):
        P3BConfig(keep_ratios=(0.5, 1.5))
    with pytest.raises(ValidationError, match="alpha"):
        P3BConfig(alpha=1.5)
    with pytest.raises(ValidationError, match="extra"):
        P3BConfig(prune_rato=0.5)


def test_schedule_is_checked_against_the_prune_stage_epochs():
    with pytest.raises(ValueError, match="prune_finalize_epoch=8 is beyond the prune stage's 4 epochs"):
        make_p3b(prune_finalize_epoch=8)
    with pytest.raises(ValueError, match="prune_start_epoch=6 is not before prune_finalize_epoch=4"):
        make_p3b(prune_start_epoch=6, prune_sparse_epoch=None)
    default = P3B(P3BConfig(), num_classes=2, epochs=50, steps_per_epoch=10).schedule
    assert (default.start_step, default.sparse_step, default.final_step) == (100, 250, 500)


def test_unreachable_ratio_and_wrong_keep_ratios_fail_at_prepare():
    with pytest.raises(ValueError, match="prune_ratio=0.99 asks to remove more than the sub-blocks hold"):
        make_p3b(prune_ratio=0.99).prepare(tiny_vit())
    with pytest.raises(ValueError, match="keep_ratios has 2 values but the model has 6 sub-blocks"):
        make_p3b(keep_ratios=(0.5, 0.5)).prepare(tiny_vit())


def test_registered_and_heads_get_their_own_learning_rate():
    assert get_method("p3b") is P3B
    model = tiny_vit()
    method = make_p3b(aux_head_lr=1e-3)
    method.prepare(model)
    groups = method.param_groups()
    assert {g["lr"] for g in groups} == {1e-3}
    head_params = {id(p) for p in model.p3b_aux_heads.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == head_params
    assert len(model.p3b_aux_heads.cls_heads) == 6
    assert all(g["fused"] for g in groups)  # CPU has the fused AdamW kernel: one call per group
    optimizer = build_optimizer(model, 1e-3, 0.05, groups)
    model.train()(torch.randn(2, 3, 16, 16))
    model.p3b_aux_heads.step(torch.tensor([0, 1])).loss.backward()
    before = [p.detach().clone() for p in model.p3b_aux_heads.parameters()]
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.p3b_aux_heads.parameters()))


def test_rows_are_recorded_at_every_update_with_the_contract_keys(trained):
    rows = trained["rows"]
    # prune start step 4, N = 2: updates after steps 5, 7, 9, 11, 13; final after step 15
    assert sorted({r["step"] for r in rows}) == [5, 7, 9, 11, 13, 15]
    assert len(rows) == 6 * 6
    assert all(tuple(r) == ALLOCATION_KEYS for r in rows)
    first = [r for r in rows if r["step"] == 5]
    ramp = (5 + 1 - 4) / (8 - 4)  # half way from dense to the target
    assert all(r["keep_ratio_target"] >= 1 - ramp - 1e-9 for r in first)
    final = [r for r in rows if r["step"] == 15]
    dense_w = trained["method"].dense_params
    for r in final:
        assert r["keep_ratio"] == pytest.approx(r["kept_params"] / float(dense_w[r["sub_block"]]))
        assert abs(r["keep_ratio"] - r["keep_ratio_target"]) < 0.1
    assert all(r["benefit_cls"] == r["benefit_cls"] for r in rows)  # measured (not NaN)


def test_last_epoch_metrics_report_the_kept_ratio_of_the_shrunk_model(trained):
    """(That the shrunk model meets the budget and computes the masked logits is the method
    contract, tests/methods/test_method_contract.py.)"""
    method, pruned = trained["method"], trained["pruned"]
    assert pruned.structured
    params = model_cost(pruned.model).params
    assert trained["history"][-1]["keep_ratio"] == pytest.approx(params / method.dense_total_params)
    assert sum(p.numel() for p in pruned.model.parameters()) == params


def test_finalize_leaves_no_gates_heads_or_hooks_behind(trained):
    model = trained["model"]
    assert not hasattr(model, "p3b_aux_heads")
    for block in model.blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks
        assert not block.norm2._forward_pre_hooks
        assert not block.attn.qkv._forward_hooks and not block.mlp.fc2._forward_pre_hooks
    assert not any("p3b_aux_heads" in name for name in trained["pruned"].model.state_dict())


def test_gates_are_hard_and_frozen_after_the_finalize_step(trained):
    for _, _, gate in trained["method"].gates.items():
        assert not gate.requires_grad
        assert bool(((gate == 0) | (gate == 1)).all())


def _inject_window(method: P3B, benefit: torch.Tensor, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    method.taylor.add(torch.rand(method.layout.size, generator=gen, dtype=torch.float64))
    method.benefit_window.add(torch.stack([benefit, benefit]))


def test_pruned_units_come_back_when_their_block_keep_ratio_rises():
    model = tiny_vit()
    method = make_p3b(gamma=1.0, prune_ratio=0.6)
    method.prepare(model)
    after_sparse = StepInfo(step=9, epoch=2, steps_per_epoch=STEPS, optimizer_step=True)
    _inject_window(method, torch.tensor([0.01, 0.01, 0.5, 0.5, 1.0, 1.0]))
    method.update_masks(after_sparse)
    first = method.hard_masks()[0]
    first_ratio = float(method.kept_params()[0] / method.dense_params[0])
    _inject_window(method, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.01, 0.01]))
    method.update_masks(StepInfo(step=11, epoch=2, steps_per_epoch=STEPS, optimizer_step=True))
    second = method.hard_masks()[0]
    second_ratio = float(method.kept_params()[0] / method.dense_params[0])
    assert second_ratio > first_ratio + 0.2
    back = sum(int((~first[g] & second[g]).sum()) for g in ("in", "head_dim", "out"))
    assert back > 0
    rows = method.pop_allocation_rows()
    assert rows[0]["keep_ratio_target"] < rows[6]["keep_ratio_target"]


def test_hand_set_keep_ratios_replace_the_budget():
    model = tiny_vit()
    ratios = (1.0, 0.2, 0.8, 0.5, 0.6, 0.0)
    method = make_p3b(keep_ratios=ratios)
    method.prepare(model)
    assert not hasattr(model, "p3b_aux_heads") and method.param_groups() == []
    assert method.extra_loss(StepInfo(0, 0, STEPS, True), None, None, None) is None
    method.taylor.add(torch.rand(method.layout.size, dtype=torch.float64))
    pruned = method.finalize(model)
    kept = [r["keep_ratio"] for r in method.pop_allocation_rows()]
    assert kept[0] == 1.0 and kept[5] == 0.0
    for got, want in zip(kept, ratios):
        assert got == pytest.approx(want, abs=0.06)
    assert pruned.model.blocks[2].mlp is None  # kappa = 0: the sub-block is skipped


def _run_until(model, method, resume_from=None, keep_epoch=None, copy_to=None):
    def copy_checkpoint(epoch, metrics, checkpoint_dir):
        if epoch == keep_epoch:
            shutil.copytree(checkpoint_dir, copy_to)
    return train_stage(model, loader(), loader(), stage(EPOCHS), training(), method,
                       checkpoint_dir=copy_to.parent / "ckpt" if copy_to else None,
                       on_epoch_end=copy_checkpoint, resume_from=resume_from)


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    model_a, method_a = tiny_vit(seed=3), make_p3b()
    method_a.prepare(model_a)
    _run_until(model_a, method_a, keep_epoch=1, copy_to=tmp_path / "epoch1")
    rows_a = [r for r in method_a.pop_allocation_rows() if r["epoch"] >= 2]

    model_b, method_b = tiny_vit(seed=4), make_p3b()  # different init: everything must come from the checkpoint
    method_b.prepare(model_b)
    _run_until(model_b, method_b, resume_from=tmp_path / "epoch1")
    rows_b = method_b.pop_allocation_rows()

    assert rows_a == rows_b and rows_b
    for (_, _, gate_a), (_, _, gate_b) in zip(method_a.gates.items(), method_b.gates.items()):
        assert torch.equal(gate_a, gate_b)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert method_a.state_dict().keys() == method_b.state_dict().keys()
    torch.testing.assert_close(method_a.taylor.previous_sum, method_b.taylor.previous_sum, rtol=0, atol=0)


def test_distributed_all_reduce_path_decides_like_a_single_process(tmp_path):
    import torch.distributed as dist

    def decide(method: P3B) -> list[torch.Tensor]:
        model = tiny_vit()
        method.prepare(model)
        _inject_window(method, torch.tensor([0.2, 0.1, 0.5, 0.3, 1.0, 0.4]))
        method.update_masks(StepInfo(step=9, epoch=2, steps_per_epoch=STEPS, optimizer_step=True))
        return [g.clone() for _, _, g in method.gates.items()]

    alone = decide(make_p3b())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        together = decide(make_p3b())
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


@pytest.mark.parametrize("residual", ["per-block", "shared"])
def test_p3b_prunes_a_swin_model_end_to_end(residual):
    """Shared: one residual width per stage (patch merging maps one stage's into the next)."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    y = torch.arange(32) % NUM_CLASSES
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    model = tiny_swin()
    method = P3B(P3BConfig(**CONFIG, residual=residual), num_classes=NUM_CLASSES, epochs=EPOCHS,
                 steps_per_epoch=len(data))
    method.prepare(model)
    history = train_stage(model, data, data, stage(EPOCHS), training(batch_size=8), method)
    logits = hard_masked_logits(model, x[:4])
    pruned = method.finalize(model)
    torch.testing.assert_close(hard_masked_logits(pruned.model, x[:4]), logits, rtol=1e-4, atol=1e-5)
    assert model_cost(pruned.model).params == pytest.approx(0.5 * method.dense_total_params, rel=0.02)
    if residual == "shared":
        widths = [layer.blocks[0].norm1.normalized_shape[0] for layer in pruned.model.layers]
        assert widths == [int(m.sum()) for m in method.hard_residual().values()] and widths != [16, 32]
        assert pruned.model.layers[1].downsample.reduction.in_features == 4 * widths[0]
        assert 0 < history[-1]["residual_keep"] < 1


FULL_ROWS = Path(__file__).parent / "data" / "p3b_allocation_rows_full.json"  # recorded on an Intel CPU

# What of the recording holds on other machines, measured by rerunning the computation on an AMD
# EPYC under 1 and 2 torch threads, OPENBLAS_CORETYPE unset and Haswell, MKL_CBWR=COMPATIBLE and
# ATEN_CPU_CAPABILITY avx2 and default (unvectorized) kernels, against the recording and each other:
# - the kept units of the decisions at steps 5 and 7 were the same in every run; at step 9 the
#   unvectorized kernels kept 119 parameters more in one MLP sub-block, and from there on the runs
#   train other models (with torch.backends.mkldnn disabled, step 5 already kept one unit less);
# - up to step 9 the floats moved by at most 1.8e-7 (benefits: fp32 loss differences, absolute)
#   and 1.0e-3 (importance, keep_ratio_target: relative);
# - the kept parameters summed over the sub-blocks of each decision moved by at most 0.16%.
SCHEDULE_KEYS = ("step", "epoch", "layer", "kind", "sub_block")
DECISION_KEYS = ("kept_params", "kept_macs", "keep_ratio")
DECISION_STEPS = (5, 7)  # kept units pinned exactly
FLOAT_STEPS = (5, 7, 9)  # computed before any decision that differed between the runs
BENEFIT_ABS = 1e-6  # 5x the measured 1.8e-7
IMPORTANCE_REL = 1e-2  # 10x the measured 1.0e-3
KEPT_TOTAL_REL = 1e-2  # 6x the measured 0.16%


def kept_per_decision(rows: list[dict]) -> dict[int, int]:
    """Kept parameters summed over the sub-blocks, per decision step."""
    totals: dict[int, int] = {}
    for row in rows:
        totals[row["step"]] = totals.get(row["step"], 0) + row["kept_params"]
    return totals


def assert_reproduces_recording(rows: list[dict], recorded: list[dict]) -> None:
    """``rows`` agree with ``recorded`` in what holds across CPUs, thread counts and kernels:
    every row's schedule, the kept units of :data:`DECISION_STEPS`, the floats of
    :data:`FLOAT_STEPS` to the measured tolerances, and each decision's kept total."""
    assert len(rows) == len(recorded)
    for row, expected in zip(rows, recorded):
        assert row.keys() == expected.keys()
        where = {key: expected[key] for key in SCHEDULE_KEYS}
        assert {key: row[key] for key in SCHEDULE_KEYS} == where
        if expected["step"] in DECISION_STEPS:
            assert {key: row[key] for key in DECISION_KEYS} == {key: expected[key] for key in DECISION_KEYS}, where
        if expected["step"] in FLOAT_STEPS:
            for key in ("benefit_cls", "benefit_patch"):
                assert row[key] == pytest.approx(expected[key], rel=0, abs=BENEFIT_ABS), (key, where)
            for key in ("importance", "keep_ratio_target"):
                assert row[key] == pytest.approx(expected[key], rel=IMPORTANCE_REL), (key, where)
    assert kept_per_decision(rows) == pytest.approx(kept_per_decision(recorded), rel=KEPT_TOTAL_REL)


def test_full_benefit_computation_reproduces_the_recorded_allocation_rows():
    """aux_batch_fraction 1 and aux_every 1 (all images, every micro-batch) is the reference
    computation: on a fixed seed it reproduces the allocation rows recorded in
    ``tests/data/p3b_allocation_rows_full.json`` in what held across the CPUs, thread counts and kernels
    measured (see above)."""
    seed_everything(0)
    model = tiny_vit()
    method = make_p3b(aux_batch_fraction=1.0, aux_every=1)
    method.prepare(model)
    train_stage(model, loader(), loader(), stage(EPOCHS), training(), method, progress=False)
    recorded = json.loads(FULL_ROWS.read_text())
    assert len(recorded) == 36 and {row["step"] for row in recorded} >= set(FLOAT_STEPS)
    assert_reproduces_recording(method.pop_allocation_rows(), recorded)


def test_aux_every_must_leave_every_window_a_measurement():
    with pytest.raises(ValidationError, match="aux_every=4 exceeds prune_steps_update_mask=2"):
        P3BConfig(prune_steps_update_mask=2, aux_every=4)
    assert (P3BConfig().aux_batch_fraction, P3BConfig().aux_period) == (0.5, 2)  # measured defaults
    assert P3BConfig(prune_steps_update_mask=1).aux_period == 1  # capped to N
    with pytest.raises(ValidationError, match="aux_batch_fraction"):
        P3BConfig(aux_batch_fraction=0.0)


@pytest.mark.parametrize("fraction, every", [(0.25, 2), (0.5, 1), (1.0, 2)])
def test_heads_see_a_share_of_every_kth_micro_batch(monkeypatch, fraction, every):
    """The heads run on micro-batches start + i*k only, on ceil(fraction * B) images, and the
    benefit window counts exactly those measurements."""
    seen: list[tuple[int, int]] = []
    original = BlockBenefit.step

    def spy(self, targets, images=None):
        seen.append((len(targets), images))
        return original(self, targets, images)

    monkeypatch.setattr(BlockBenefit, "step", spy)
    model, method = tiny_vit(), make_p3b(aux_batch_fraction=fraction, aux_every=every)
    method.prepare(model)
    counts = []
    original_roll = method.benefit_window.roll

    def roll():
        counts.append(int(method.benefit_window.count))
        original_roll()

    method.benefit_window.roll = roll
    train_stage(model, loader(), loader(), stage(EPOCHS), training(), method, progress=False)
    assert len(seen) == EPOCHS * STEPS // every  # start step 4 is a multiple of k: steps 0, k, 2k, ...
    assert all(images == math.ceil(fraction * 16) for _, images in seen)
    # windows of N = 2 micro-batches from the start step: 2 // k measurements each
    assert counts and all(c == 2 // every for c in counts)
