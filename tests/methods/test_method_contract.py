"""The method contract, checked on every registered method (as timm tests every registered
model): on a tiny ViT driven through a short prune stage by the training loop's hooks,

* the hooks run: every hook returns, each epoch's metrics are numbers, and a pruning method
  records allocation rows in the schema of :mod:`p3b_search.method_specs.allocation`;
* its state survives a checkpoint: ``state_dict`` goes through ``torch.save`` /
  ``torch.load(weights_only=True)``, and a fresh method loaded from it, on a model with the
  same weights, finalizes to the same model;
* the model ``finalize`` returns computes the logits of the masked model it came from, and is
  structured exactly when the method's spec says so;
* it meets its budget: it keeps ``1 - prune_ratio`` of all the parameters, within
  :data:`~p3b_search.methods.target.TOLERANCE`.

Methods with gates are checked per block and with a shared residual (``<name>+shared``).

Method-specific behaviour stays in each method's own test file.
"""
from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from p3b_search.method_specs import method_names, method_spec
from p3b_search.method_specs.allocation import ALLOCATION_KEYS, REQUIRED_ALLOCATION_KEYS
from p3b_search.methods import PrunedModel, PruningMethod, available_methods, get_method
from p3b_search.methods.target import TOLERANCE, kept_params
from tests.method_support import batch, drive, make, single_thread, tiny_vit  # noqa: F401 (autouse fixture)

EPOCHS, STEPS_PER_EPOCH = 2, 4
PRUNE_RATIO = 0.5
SHARED = "+shared"


def has_gates(name: str) -> bool:
    """Whether method ``name`` has P3B's gates (and so the ``residual`` knob)."""
    return "residual" in method_spec(name).config_cls.model_fields


#: every registered method, and the gated ones again with a shared residual
CASES = available_methods() + [name + SHARED for name in available_methods() if has_gates(name)]


def test_every_spec_is_implemented_and_every_implementation_has_its_spec():
    """The study layer knows the methods by their specs, the trial workers by their
    implementations: the same names, and each implementation registered against its own spec."""
    assert available_methods() == method_names()
    for name in method_names():
        assert get_method(name).spec is method_spec(name), name


class EpochMetrics:
    """Wraps a method's ``on_epoch_end`` to keep what it returns (the loop logs it)."""

    def __init__(self, method: PruningMethod):
        self.returned: list[Any] = []
        hook = method.on_epoch_end

        def on_epoch_end(epoch: int) -> dict[str, float]:
            metrics = hook(epoch)
            self.returned.append(metrics)
            return metrics

        method.on_epoch_end = on_epoch_end


def new_method(case: str) -> PruningMethod:
    """Method of ``case`` (a name, ``+shared`` for a shared residual) for an 8-step prune stage
    (prune-and-grow methods update every 2 steps)."""
    name = case.removesuffix(SHARED)
    method_cls = get_method(name)
    fields = method_cls.spec.config_cls.model_fields
    config: dict[str, Any] = {"prune_ratio": 0.0 if name == "dense" else PRUNE_RATIO}
    if "update_interval" in fields:
        config["update_interval"] = 2
    if case.endswith(SHARED):
        config["residual"] = "shared"
    return make(method_cls, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, **config)


def through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a checkpoint stores and reads it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(restored: Any, original: Any, where: str = "state") -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, tensors exactly."""
    if isinstance(original, torch.Tensor):
        assert isinstance(restored, torch.Tensor) and torch.equal(restored, original), where
    elif isinstance(original, dict):
        assert set(restored) == set(original), where
        for key in original:
            assert_same_state(restored[key], original[key], f"{where}[{key!r}]")
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), where
        for index, (a, b) in enumerate(zip(restored, original)):
            assert_same_state(a, b, f"{where}[{index}]")
    elif original != original:  # NaN
        assert restored != restored, where
    else:
        assert restored == original, where


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module", params=CASES)
def driven(request) -> dict[str, Any]:
    """Method ``request.param`` after its prune stage on a tiny ViT, with what the checks compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine
    try:
        yield prune_stage(request.param)
    finally:
        torch.set_num_threads(threads)


def prune_stage(name: str) -> dict[str, Any]:
    """Drive method ``name`` through its prune stage on a tiny ViT; returns what the checks compare."""
    model = tiny_vit(seed=1)
    dense_params = sum(p.numel() for p in model.parameters())
    twin, twin_method = copy.deepcopy(model), new_method(name)  # restored from the checkpoint below
    twin_method.prepare(twin)
    method = new_method(name)
    method.prepare(model)
    epochs = EpochMetrics(method)
    drive(method, model, steps=EPOCHS * STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH)
    rows = method.pop_allocation_rows()
    x = batch(model, size=8, seed=99)[0]
    masked = logits(model, x)
    state = through_checkpoint(method.state_dict())
    twin.load_state_dict(model.state_dict())
    twin_method.load_state_dict(state)
    pruned = method.finalize(model)
    return dict(name=name, method=method, state=state, rows=rows, epochs=epochs.returned, x=x, masked=masked,
                pruned=pruned, dense_params=dense_params, twin=twin, twin_method=twin_method)


def test_hooks_run_and_report_epoch_metrics_and_allocation_rows(driven):
    assert len(driven["epochs"]) == EPOCHS
    for metrics in driven["epochs"]:
        assert isinstance(metrics, dict) and all(isinstance(v, float) for v in metrics.values()), metrics
    rows = driven["rows"]
    if driven["name"] != "dense":
        assert rows, "a pruning method records allocation rows during its prune stage"
    for row in rows:
        keys = tuple(row)
        assert keys == tuple(k for k in ALLOCATION_KEYS if k in row), keys
        assert set(REQUIRED_ALLOCATION_KEYS) <= set(keys), keys


def test_state_round_trips_through_a_checkpoint(driven):
    restored = driven["twin_method"]
    assert_same_state(through_checkpoint(restored.state_dict()), driven["state"])
    again = restored.finalize(driven["twin"])
    torch.testing.assert_close(logits(again.model, driven["x"]), logits(driven["pruned"].model, driven["x"]),
                               rtol=0, atol=0)


def test_finalized_model_computes_the_masked_logits(driven):
    pruned: PrunedModel = driven["pruned"]
    torch.testing.assert_close(logits(pruned.model, driven["x"]), driven["masked"], rtol=1e-4, atol=1e-5)


def test_finalized_model_is_as_structured_as_the_spec_says(driven):
    """The study layer reads ``structured`` from the method's spec (torch-free): the model says the same."""
    assert driven["pruned"].structured is driven["method"].spec.structured, driven["name"]


def test_finalized_model_meets_the_budget(driven):
    ratio = 0.0 if driven["name"] == "dense" else PRUNE_RATIO
    kept = kept_params(driven["pruned"]) / driven["dense_params"]
    assert abs(kept - (1.0 - ratio)) <= TOLERANCE, (driven["name"], kept)
