"""``dense``: fine-tuning without pruning, the reference every pruned row is compared with."""
from __future__ import annotations

from torch import nn

from p3b_search.cost import model_cost
from p3b_search.method_specs.dense import DENSE_SPEC
from p3b_search.methods.base import PrunedModel, PruningMethod, register_method


@register_method
class Dense(PruningMethod):
    """Both stages train the full model; ``finalize`` returns it unchanged."""

    spec = DENSE_SPEC

    def prepare(self, model: nn.Module) -> None:
        cost = model_cost(model)
        self._epoch_cost = {"kept_params": float(cost.params), "keep_ratio": 1.0, "macs": float(cost.macs)}

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """The dense model's ``kept_params``, ``keep_ratio`` (1) and ``macs`` per image, as every
        pruning method reports its model's each prune-stage epoch."""
        return dict(self._epoch_cost)

    def finalize(self, model: nn.Module) -> PrunedModel:
        return PrunedModel(model, structured=True)
