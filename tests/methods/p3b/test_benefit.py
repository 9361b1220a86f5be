"""Block benefit (docs/methods.md, section 1.1): auxiliary heads on the detached residual stream and Delta Psi."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from p3b_search.methods.p3b.benefit import BlockBenefit, TokenLayout
from p3b_search.surgery import get_adapter
from tests.method_support import NUM_CLASSES, single_thread, tiny_swin, tiny_vit  # noqa: F401 (autouse fixture)


class _InjectLabels(nn.Module):
    """Stands in for an attention branch: adds a class-specific vector to every token (helps)."""

    def __init__(self, dim: int, labels: dict):
        super().__init__()
        self.codes = torch.randn(NUM_CLASSES, dim) * 3
        self.labels = labels

    def forward(self, x, **kwargs):
        return self.codes[self.labels["y"]][:, None, :].expand_as(x)


class _Destroy(nn.Module):
    """Stands in for an MLP branch whose input is the raw stream: replaces it with noise (hurts)."""

    def forward(self, x):
        return -x + torch.randn_like(x)


class _Nothing(nn.Module):
    def forward(self, x, **kwargs):
        return torch.zeros_like(x)


def _synthetic_stream(labels: dict):
    """Depth-2 ViT fed with label-free noise: sub-block 0 helps, 1 and 2 do nothing, 3 hurts.
    Returns the model and its adapter (listed before the branches are replaced)."""
    model = tiny_vit(depth=2, embed_dim=32)
    adapter = get_adapter(model)
    first, second = model.blocks
    first.attn = _InjectLabels(32, labels)
    first.mlp = _Nothing()
    second.attn = _Nothing()
    second.norm2 = nn.Identity()
    second.mlp = _Destroy()
    return model.train(), adapter


def test_benefit_is_positive_where_a_block_helps_negative_where_it_hurts_zero_where_idle():
    torch.manual_seed(0)
    labels: dict = {}
    model, adapter = _synthetic_stream(labels)
    benefit = BlockBenefit(adapter, NUM_CLASSES)
    benefit.attach(model)
    optimizer = torch.optim.Adam(benefit.parameters(), lr=1e-2)
    deltas = []
    for _ in range(60):
        labels["y"] = torch.randint(0, NUM_CLASSES, (32,))
        model(torch.randn(32, 3, 16, 16))
        step = benefit.step(labels["y"])
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        deltas.append(torch.stack([step.delta_cls, step.delta_patch]))
    late = torch.stack(deltas[-15:]).mean(0)  # (2, 2L): cls and patch
    assert bool((late[:, 0] > 0.5).all()), late
    assert bool((late[:, 3] < -0.5).all()), late
    assert torch.count_nonzero(torch.stack(deltas)[:, :, 1:3]) == 0  # x_{j+1} == x_j: the same CE


def test_no_gradient_reaches_the_backbone():
    model = tiny_vit(depth=2, embed_dim=32).train()
    benefit = BlockBenefit(get_adapter(model), NUM_CLASSES)
    benefit.attach(model)
    model(torch.randn(4, 3, 16, 16))
    benefit.step(torch.arange(4) % NUM_CLASSES).loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters())
    assert all(p.grad is not None for p in benefit.cls_heads.parameters())
    assert all(p.grad is not None for p in benefit.patch_heads.parameters())


def test_soft_targets_are_accepted():
    model = tiny_vit(depth=1, embed_dim=32).train()
    benefit = BlockBenefit(get_adapter(model), NUM_CLASSES)
    benefit.attach(model)
    model(torch.randn(4, 3, 16, 16))
    soft = torch.softmax(torch.randn(4, NUM_CLASSES), dim=1)
    step = benefit.step(soft)
    assert step.delta_cls.shape == (2,) and torch.isfinite(step.loss)


def test_features_are_captured_only_in_training_mode():
    model = tiny_vit(depth=1, embed_dim=32).eval()
    benefit = BlockBenefit(get_adapter(model), NUM_CLASSES)
    benefit.attach(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="no features were captured"):
        benefit.step(torch.zeros(2, dtype=torch.long))
    benefit.remove_hooks()
    model.train()(torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="not attached"):
        benefit.step(torch.zeros(2, dtype=torch.long))


def test_prefix_tokens_are_excluded_from_the_patch_grid():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=32, depth=1, num_heads=2, num_classes=NUM_CLASSES)
    layout = TokenLayout.of(get_adapter(model))
    assert layout == TokenLayout(prefix=2, class_token=True, grid=(4, 4))
    tokens = torch.arange(2 * 18 * 3, dtype=torch.float32).view(2, 18, 3)
    cls_vector, grid = layout.split(tokens)
    torch.testing.assert_close(cls_vector, tokens[:, 0])
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[:, :, 0, 0], tokens[:, 2])
    torch.testing.assert_close(grid[:, :, 3, 3], tokens[:, 17])
    benefit = BlockBenefit(get_adapter(model), NUM_CLASSES)
    benefit.attach(model.train())
    model(torch.randn(3, 3, 16, 16))
    assert benefit.step(torch.zeros(3, dtype=torch.long)).delta_patch.shape == (2,)


def test_model_without_class_token_reads_the_average_patch_token():
    model = tiny_vit(depth=1, embed_dim=32, class_token=False, global_pool="avg")
    layout = TokenLayout.of(get_adapter(model))
    tokens = torch.randn(2, 16, 32)
    cls_vector, grid = layout.split(tokens)
    torch.testing.assert_close(cls_vector, tokens.mean(dim=1))


def test_swin_cls_head_reads_the_average_pooled_token():
    model = tiny_swin().train()
    adapter = get_adapter(model)
    layout = TokenLayout.of(adapter)
    assert layout == TokenLayout(prefix=0, class_token=False, grid=None)
    maps = torch.randn(2, 8, 8, 16)
    cls_vector, grid = layout.split(maps)
    torch.testing.assert_close(cls_vector, maps.mean(dim=(1, 2)))
    torch.testing.assert_close(grid, maps.permute(0, 3, 1, 2))
    flat_cls, flat_grid = layout.split(maps.reshape(2, 64, 16), map_hw=(8, 8))  # the MLP's (B, H*W, C) input
    torch.testing.assert_close(flat_grid, grid)
    torch.testing.assert_close(flat_cls, cls_vector)
    benefit = BlockBenefit(adapter, NUM_CLASSES)
    benefit.attach(model)
    model(torch.randn(2, 3, 32, 32))
    step = benefit.step(torch.tensor([0, 1]))
    assert step.delta_cls.shape == (4,) and step.delta_patch.shape == (4,) and torch.isfinite(step.loss)
    assert [h.in_features for h in benefit.cls_heads] == [16, 16, 32, 32]


def _straightforward_step(benefit: BlockBenefit, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/methods.md, section 1.1 written plainly: every head called once per side, the patch head as
    ``Sequential`` + ``mean`` pooling; returns (loss, Delta Psi cls, Delta Psi patch)."""
    ce = nn.functional.cross_entropy
    losses, deltas_cls, deltas_patch = [], [], []
    for j, (cls_head, patch_head) in enumerate(zip(benefit.cls_heads, benefit.patch_heads)):
        (x_in, x_out), map_hw = benefit._stream(j)
        terms = {}
        for side, x in (("in", x_in), ("out", x_out)):
            cls_vector, grid = benefit.layout.split(x, map_hw)
            terms["cls", side] = ce(cls_head(cls_vector), targets)
            terms["patch", side] = ce(patch_head.fc(patch_head.convs(grid.contiguous()).mean(dim=(2, 3))), targets)
        losses.append(sum(terms.values()))
        deltas_cls.append(terms["cls", "in"] - terms["cls", "out"])
        deltas_patch.append(terms["patch", "in"] - terms["patch", "out"])
    return torch.stack(losses).sum(), torch.stack(deltas_cls).detach(), torch.stack(deltas_patch).detach()


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_stacked_sides_compute_what_separate_head_calls_compute(model_fn):
    """The optimised step (both sides as one batch, per-side BatchNorm, sum pooling) gives the
    straightforward formulation's losses, Delta Psi, head gradients and BN running statistics."""
    torch.manual_seed(0)
    model = model_fn().train()
    adapter = get_adapter(model)
    optimised = BlockBenefit(adapter, NUM_CLASSES)
    plain = BlockBenefit(adapter, NUM_CLASSES)
    plain.load_state_dict(optimised.state_dict())
    optimised.attach(model)
    plain.attach(model)
    images = torch.randn(6, 3, *(16, 16) if model_fn is tiny_vit else (32, 32))
    targets = torch.arange(6) % NUM_CLASSES
    for _ in range(2):  # the second pass runs on running statistics the first one updated
        model(images)
        optimised.zero_grad()
        plain.zero_grad()
        fast = optimised.step(targets)
        loss, delta_cls, delta_patch = _straightforward_step(plain, targets)
        fast.loss.backward()
        loss.backward()
        torch.testing.assert_close(fast.loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.delta_cls, delta_cls, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.delta_patch, delta_patch, atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(optimised.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
        for (name, a), b in zip(optimised.named_buffers(), plain.buffers()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert int(optimised.patch_heads[0].convs[1].num_batches_tracked) == 4  # once per side per pass


@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_heads_read_the_stream_through_a_shared_residual_gate(model_fn):
    """With a stream gate the heads see pruned channels as zeros: their first layers get no
    gradient there (without it they do)."""
    model = model_fn().train()
    adapter = get_adapter(model)
    widths = adapter.stream_widths()
    gates = {stage: torch.arange(width) % 3 != 0 for stage, width in widths.items()}
    grads = {}
    for gated in (False, True):
        benefit = BlockBenefit(adapter, NUM_CLASSES, (lambda stage: gates[stage].float()) if gated else None)
        benefit.attach(model)
        model(torch.randn(2, 3, *model.patch_embed.img_size))
        benefit.step(torch.tensor([0, 1])).loss.backward()
        benefit.remove_hooks()
        grads[gated] = [(sb.stage, head.weight.grad) for sb, head in zip(adapter.sub_blocks, benefit.cls_heads)]
    for (stage, plain), (_, gated) in zip(grads[False], grads[True]):
        pruned = ~gates[stage]
        assert plain[:, pruned].abs().sum() > 0 and not gated[:, pruned].any()
        assert gated[:, ~pruned].abs().sum() > 0
