"""The training loop: hooks order, LR schedule, accumulation, evaluation, exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from p3b_search.config import DataConfig, ModelConfig, StageConfig, TrainingConfig
from p3b_search.data import build_loaders
from p3b_search.methods.hooks import StepInfo, TrainingHooks
from p3b_search.models import create_timm_model
from p3b_search.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from p3b_search.training.loop import evaluate, resolve_device, train_stage
from p3b_search.training.rng import rng_state, seed_everything, set_rng_state
from p3b_search.training.schedule import build_scheduler, lr_multiplier, scaled_lr

TINY = ModelConfig(overrides=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2))
DATA = DataConfig(kind="digits", max_train_samples=96)


class RecordingHooks(TrainingHooks):
    """Records every call; owns an extra parameter trained through its own group and loss."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.updates = 0
        self.extra = nn.Parameter(torch.full((3,), 2.0))
        self.first_window_grads: dict[str, torch.Tensor] | None = None
        self.model: nn.Module | None = None

    def param_groups(self):
        self.calls.append(("param_groups",))
        return [{"params": [self.extra], "lr": 0.05, "weight_decay": 0.0}]

    def on_train_start(self, model, optimizer):
        self.calls.append(("on_train_start",))
        self.model = model

    def extra_loss(self, info, inputs, targets, outputs):
        self.calls.append(("extra_loss", info.step, info.epoch))
        return 1e-2 * (self.extra**2).sum()

    def after_backward(self, info: StepInfo):
        self.calls.append(("after_backward", info.step, info.optimizer_step))
        if info.optimizer_step and self.first_window_grads is None:
            self.first_window_grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def after_optimizer_step(self, info):
        self.calls.append(("after_optimizer_step", info.step))
        self.updates += 1

    def on_epoch_end(self, epoch):
        self.calls.append(("on_epoch_end", epoch))
        return {"hook_updates": float(self.updates)}

    def state_dict(self):
        return {"updates": self.updates, "extra": self.extra.detach().clone()}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        with torch.no_grad():
            self.extra.copy_(state["extra"])


def _setup(seed: int = 0, batch_size: int = 32, data: DataConfig = DATA, drop_path: float = 0.0):
    seed_everything(seed)
    model = create_timm_model(TINY, 5, drop_path_rate=drop_path)
    train, val, _ = build_loaders(data, model, batch_size=batch_size, seed=0)
    return model, train, val


def _training(**kw) -> TrainingConfig:
    return TrainingConfig(**{"batch_size": 32, "device": "cpu", "weight_decay": 0.05, **kw})


# ----------------------------------------------------------------------------- hooks

def test_hooks_are_called_in_the_documented_order():
    model, train, val = _setup()  # 96 samples / 32 = 3 micro-batches per epoch
    hooks = RecordingHooks()
    history = train_stage(model, train, val, StageConfig(epochs=2, lr=1e-3), _training(grad_accum=2), hooks, progress=False)
    expected = [("param_groups",), ("on_train_start",)]
    for epoch in range(2):
        s = 3 * epoch
        expected += [
            ("extra_loss", s, epoch), ("after_backward", s, False),
            ("extra_loss", s + 1, epoch), ("after_backward", s + 1, True), ("after_optimizer_step", s + 1),
            # the epoch's last window is shorter (3 = 2 + 1) and still closes with an update
            ("extra_loss", s + 2, epoch), ("after_backward", s + 2, True), ("after_optimizer_step", s + 2),
            ("on_epoch_end", epoch),
        ]
    assert hooks.calls == expected
    assert [h["hook_updates"] for h in history] == [2.0, 4.0]
    assert hooks.extra.detach().max() < 2.0  # its group and its loss trained it
    assert set(history[0]) >= {"epoch", "train_loss", "lr", "top1", "top5", "loss", "epoch_seconds"}


def test_non_finite_loss_stops_with_a_clear_error():
    class Exploding(TrainingHooks):
        def extra_loss(self, info, inputs, targets, outputs):
            return torch.tensor(float("inf"))

    model, train, val = _setup()
    with pytest.raises(FloatingPointError, match="training loss became inf in epoch 0"):
        train_stage(model, train, val, StageConfig(epochs=1), _training(), Exploding(), progress=False)


# ----------------------------------------------------------------------------- schedule

def test_lr_multiplier_values():
    cos = dict(total_updates=21, warmup_updates=4, schedule="cosine", min_ratio=0.01)
    assert [lr_multiplier(u, **cos) for u in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **cos) == 1.0
    assert lr_multiplier(12, **cos) == pytest.approx(0.505)  # half-way through the 16 decay updates
    assert lr_multiplier(20, **cos) == pytest.approx(0.01)
    const = dict(cos, schedule="constant")
    assert lr_multiplier(1, **const) == 0.5 and lr_multiplier(15, **const) == 1.0
    assert scaled_lr(5e-4, TrainingConfig(batch_size=64, grad_accum=4)) == pytest.approx(2.5e-4)


def test_scheduler_scales_every_group_and_the_loop_reports_it():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.4}])
    stage = StageConfig(epochs=3, lr=0.1, min_lr=0.001, warmup_epochs=1)
    sched = build_scheduler(opt, stage, updates_per_epoch=4)  # 12 updates, 4 of warm-up
    for update in range(12):
        m = lr_multiplier(update, total_updates=12, warmup_updates=4, schedule="cosine", min_ratio=0.01)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * m, 0.4 * m])
        opt.step()
        sched.step()

    model, train, val = _setup()
    training = _training()
    history = train_stage(model, train, val, stage, training, progress=False)  # 3 updates per epoch
    base = scaled_lr(stage.lr, training)
    for epoch, row in enumerate(history):
        last = 3 * epoch + 2
        m = lr_multiplier(last, total_updates=9, warmup_updates=3, schedule="cosine", min_ratio=0.01)
        assert row["lr"] == pytest.approx(base * m)


def test_weight_decay_skips_norms_biases_and_tokens():
    model, train, val = _setup()
    captured = {}

    class Grab(TrainingHooks):
        def on_train_start(self, model, optimizer):
            captured["groups"] = optimizer.param_groups

    train_stage(model, train, val, StageConfig(epochs=0), _training(), Grab(), progress=False)
    decay_of = {id(p): g["weight_decay"] for g in captured["groups"] for p in g["params"]}
    assert decay_of[id(model.pos_embed)] == decay_of[id(model.cls_token)] == 0.0
    assert decay_of[id(model.blocks[0].norm1.weight)] == decay_of[id(model.blocks[0].attn.qkv.bias)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 0.05


# ----------------------------------------------------------------------------- accumulation

def test_gradient_accumulation_matches_a_larger_batch():
    """32 x 2 accumulated vs 64 x 1: same samples, same mean loss, so the same gradient (ViTs
    have no batch-dependent layers) and the same updates up to float summation order."""
    stage = StageConfig(epochs=1, lr=1e-3)
    data = DataConfig(kind="digits", max_train_samples=128)
    runs = {}
    for batch, accum in ((32, 2), (64, 1)):
        model, train, val = _setup(batch_size=batch, data=data)
        hooks = RecordingHooks()
        history = train_stage(model, train, val, stage, _training(batch_size=batch, grad_accum=accum), hooks,
                              progress=False)
        runs[accum] = (model, hooks, history)
    (m2, h2, hist2), (m1, h1, hist1) = runs[2], runs[1]
    for name, grad in h1.first_window_grads.items():
        torch.testing.assert_close(h2.first_window_grads[name], grad, rtol=1e-4, atol=1e-6)
    for (name, p2), p1 in zip(m2.named_parameters(), m1.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5, msg=name)
    assert hist2[0]["lr"] == hist1[0]["lr"] and h2.updates == h1.updates == 2


# ----------------------------------------------------------------------------- evaluation

class _Lookup(nn.Module):
    """Returns preset logits for sample indices."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, index):
        return self.logits[index]


def test_evaluate_top1_top5_and_loss():
    logits = torch.tensor([
        [5.0, 0, 0, 0, 0, 0, 0],   # target 0: top-1
        [0, 5.0, 4, 3, 2, 1, 0],   # target 3: rank 3 -> top-5 only
        [0, 6.0, 5, 4, 3, 2, 1],   # target 0: rank 7 -> miss
        [0, 0, 0, 0, 0, 0, 9.0],   # target 6: top-1
    ])
    targets = torch.tensor([0, 3, 0, 6])
    loader = DataLoader(TensorDataset(torch.arange(4), targets), batch_size=3)
    result = evaluate(_Lookup(logits), loader)
    assert result["top1"] == 50.0 and result["top5"] == 75.0
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item())


# ----------------------------------------------------------------------------- checkpoints & resume

class _Interrupt(Exception):
    pass


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch", "epoch_seconds")} for row in rows]


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    """3 epochs straight vs 1 epoch, 'crash', resume in fresh objects for the last 2. Mixup
    (numpy RNG), drop-path (torch RNG), accumulation and method state all have to be restored."""
    stage = StageConfig(epochs=3, lr=5e-3, warmup_epochs=1)
    training = _training(grad_accum=2, mixup=0.4, cutmix=0.4, label_smoothing=0.1)

    model, train, val = _setup(drop_path=0.1)
    hooks = RecordingHooks()
    straight = train_stage(model, train, val, stage, training, hooks, progress=False)

    def crash_after_first_epoch(epoch, metrics, checkpoint_dir):
        assert (checkpoint_dir / CHECKPOINT_FILE).is_file()
        raise _Interrupt

    first, train1, val1 = _setup(drop_path=0.1)
    with pytest.raises(_Interrupt):
        train_stage(first, train1, val1, stage, training, RecordingHooks(), progress=False,
                    checkpoint_dir=tmp_path, on_epoch_end=crash_after_first_epoch)

    resumed, train2, val2 = _setup(seed=999, drop_path=0.1)  # other init and RNG: all must come from the file
    resumed_hooks = RecordingHooks()
    reported = []
    history = train_stage(resumed, train2, val2, stage, training, resumed_hooks, progress=False,
                          checkpoint_dir=tmp_path, resume_from=tmp_path, epoch_offset=10,
                          on_epoch_end=lambda e, m, d: reported.append(e))

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(hooks.extra, resumed_hooks.extra) and resumed_hooks.updates == hooks.updates
    assert _without_times(history) == _without_times(straight)
    assert reported == [11, 12] and [r["epoch"] for r in history] == [0.0, 11.0, 12.0]
    assert resumed_hooks.calls[0:2] == [("param_groups",), ("on_train_start",)]
    assert ("on_epoch_end", 0) not in resumed_hooks.calls


def test_resume_with_another_configuration_is_refused(tmp_path):
    model, train, val = _setup()
    train_stage(model, train, val, StageConfig(epochs=1), _training(), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="written with grad_accum=1, this stage has 2"):
        train_stage(model, train, val, StageConfig(epochs=1), _training(grad_accum=2), progress=False,
                    resume_from=tmp_path)


def test_checkpoint_write_interrupted_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint({"epoch": 0, "w": torch.ones(3)}, tmp_path)

    def dying_save(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)  # save_checkpoint calls torch.save
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, tmp_path)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 0 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_corrupt_or_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / CHECKPOINT_FILE)):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {tmp_path / CHECKPOINT_FILE}"):
        load_checkpoint(tmp_path)


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    seed_everything(7)
    save_checkpoint({"rng": rng_state()}, tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(8)
    set_rng_state(load_checkpoint(Path(tmp_path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="training.device='cuda' but CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda():
    dtypes = []

    class Spy(TrainingHooks):
        def extra_loss(self, info, inputs, targets, outputs):
            dtypes.append(outputs.dtype)

    model, train, val = _setup()
    history = train_stage(model, train, val, StageConfig(epochs=1), _training(device="cuda", amp=True), Spy(),
                          progress=False)
    assert set(dtypes) == {torch.bfloat16} and math.isfinite(history[0]["loss"])
