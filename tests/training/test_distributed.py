"""Data parallelism without Ray: two gloo ranks (spawned processes) run the real training loop.

* Sharding: the ranks' training shards are disjoint, equal in size and together one epoch.
* P3B on two ranks that start from different random models: after the prune stage both ranks
  hold the same model, and ``finalize`` makes the same mask decisions (the shrunk models'
  state dicts, kept-unit indices included, are equal), with the same allocation rows.
* Dense fine-tuning on two ranks of batch B equals one process with batch 2B on the same
  samples (same effective batch, same LR), up to float summation order.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from p3b_search.config import DataConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.data.loaders import EpochShuffleSampler
from p3b_search.methods import get_method
from p3b_search.training.loop import train_stage

BATCH = 32  # per rank
P3B_KNOBS = dict(prune_ratio=0.5, prune_start_epoch=0, prune_sparse_epoch=1, prune_finalize_epoch=2,
                 prune_steps_update_mask=3)


@given(n=st.integers(1, 300), world=st.integers(1, 5), seed=st.integers(0, 10), epoch=st.integers(0, 3))
def test_rank_shards_are_disjoint_equal_and_cover_whole_rounds(n, world, seed, epoch):
    samplers = [EpochShuffleSampler(n, seed, rank, world) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    shards = [list(s) for s in samplers]
    assert {len(shard) for shard in shards} == {n // world}
    taken = [i for shard in shards for i in shard]
    assert len(set(taken)) == len(taken) == n // world * world
    single = EpochShuffleSampler(n, seed)
    single.set_epoch(epoch)
    assert set(taken) == set(list(single)[: n // world * world])  # one epoch's order, dealt out


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5)


def _training(batch_size: int) -> TrainingConfig:
    return TrainingConfig(batch_size=batch_size, device="cpu", label_smoothing=0.0)


def _train(method_name: str, batch_size: int, model_seed: int) -> dict:
    """One prune stage (P3B) or fine-tuning stage (dense) on the digits target task."""
    model = _model(model_seed)
    train, val, classes = build_loaders(DataConfig(kind="digits", max_train_samples=384), model, batch_size, seed=0)
    stage = StageConfig(epochs=2, lr=5e-2, schedule="constant")
    method_cls = get_method(method_name)
    knobs = P3B_KNOBS if method_name == "p3b" else {}
    method = method_cls(method_cls.spec.config_cls(**knobs), num_classes=classes, epochs=stage.epochs,
                        steps_per_epoch=len(train))
    method.prepare(model)
    history = train_stage(model, train, val, stage, _training(batch_size), method, progress=False)
    pruned = method.finalize(model)
    buffers = {f"buffer:{k}": v for k, v in pruned.model.named_buffers()}  # kept-unit indices among them
    return {"state": {k: v.clone() for k, v in {**pruned.model.state_dict(), **buffers}.items()},
            "rows": method.pop_allocation_rows(), "top1": [h["top1"] for h in history], "steps": len(train)}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {name: _train(name, BATCH, model_seed=100 + rank) for name in ("p3b", "dense")}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(folder / "store"), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def _assert_same_state(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].shape == right[key].shape, key
        assert torch.allclose(left[key].double(), right[key].double(), rtol=0, atol=atol), \
            f"{key}: max difference {(left[key].double() - right[key].double()).abs().max():.3g}"


@pytest.mark.slow
def test_two_ranks_take_one_p3b_mask_decision(two_ranks):
    rank0, rank1 = (r["p3b"] for r in two_ranks)
    assert rank0["steps"] == rank1["steps"] == 384 // 2 // BATCH
    _assert_same_state(rank0["state"], rank1["state"])  # same weights and same kept units
    assert any(key.endswith("out_index") for key in rank0["state"])  # the model was shrunk
    assert rank0["rows"] and rank0["rows"] == rank1["rows"]  # the same budget allocations, update by update
    assert rank0["top1"] == rank1["top1"]


@pytest.mark.slow
def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(two_ranks):
    rank0, rank1 = (r["dense"] for r in two_ranks)
    _assert_same_state(rank0["state"], rank1["state"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train("dense", 2 * BATCH, model_seed=100)  # rank 0's initial model
    finally:
        torch.set_num_threads(threads)
    assert single["steps"] == rank0["steps"]
    _assert_same_state(rank0["state"], single["state"], atol=1e-4)
    assert single["top1"] == pytest.approx(rank0["top1"], abs=0.5)
