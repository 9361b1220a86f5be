"""Whether a trial starts from a prefix of its prune stage that another trial trained, and
publishing the prefix it trains itself (a study's ``shared_prefixes``).

A trial shares the first ``k`` whole epochs of its prune stage, ``k`` = the method's
:meth:`~p3b_search.methods.PruningMethod.shared_prefix` (the epochs before it first acts,
``floor(prune_start_epoch)`` for P3B and global Taylor). What the state after them depends on
is the key (:func:`prefix_inputs`): the model and its weights, the data, the training
configuration without the fine-tune stage (seed, batch size, the prune stage's LR and
schedule, ...), the method's name and its knobs that act before the start, and where the
numbers are computed (device, threads, kernels, library versions), since float sums differ
between them. A fresh trial starts from the longest published prefix of its key with at most
``k`` epochs; after its epoch ``k`` it publishes its own checkpoint as the ``k``-epoch prefix
unless that exists already.

Restoring the prefix's method state into a trial with other knobs is sound because a method's
state before it acts holds nothing derived from them (all-one gates, empty windows, no
allocation); ``tests/objectives/test_shared_prefix.py`` shows such trials end bit-identical to the same
trials trained from scratch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from p3b_search.config import TrialConfig
from p3b_search.distributed import broadcast_object, rank_and_world
from p3b_search.methods import PruningMethod
from p3b_search.training.checkpoint import checkpoint_path
from p3b_search.training.loop import resolve_device
from p3b_search.training.prefixes import Prefix, PrefixCache, prefix_key

#: ``model.weights`` values that name no local file.
_NAMED_WEIGHTS = (None, "hub", "source-pretrained")


def _weights_identity(weights: str | None) -> Any:
    """The weights source; a local file also by size and modification time (a changed file is
    another prefix)."""
    if weights in _NAMED_WEIGHTS:
        return weights
    stat = Path(weights).stat()
    return {"file": str(Path(weights).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _numerics(device_spec: str) -> dict[str, Any]:
    """Where the numbers are computed: float results differ between devices, thread counts and
    kernels, so a prefix is shared only where they agree."""
    device = resolve_device(device_spec)
    numerics: dict[str, Any] = {"device": device.type, "threads": torch.get_num_threads(),
                                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "torch": torch.__version__, "timm": timm.__version__}
    if device.type == "cuda":
        numerics["gpu"] = torch.cuda.get_device_name(device)
    return numerics


def prefix_inputs(config: TrialConfig, method: PruningMethod, steps_per_epoch: int) -> dict[str, Any]:
    """Everything the state after a shared prefix depends on (the key's inputs, JSON values)."""
    return {
        "model": config.model.model_dump(mode="json"),
        "weights": _weights_identity(config.model.weights),
        "data": config.data.model_dump(mode="json"),
        "training": config.training.model_dump(mode="json", exclude={"finetune"}),
        "steps_per_epoch": steps_per_epoch,
        "world_size": rank_and_world()[1],
        "method": config.method,
        "method_knobs": dict(method.shared_prefix().knobs),
        "numerics": _numerics(config.training.device),
    }


@dataclass(frozen=True)
class PrefixPlan:
    """One trial's use of the cache: ``epochs`` it shares (k >= 1), the ``key`` of that prefix,
    and the published prefix it starts from (``start``, None: it trains from the first epoch)."""

    cache: PrefixCache
    key: str
    inputs: dict[str, Any]
    epochs: int
    start: Prefix | None

    @property
    def restored_epochs(self) -> int:
        """Prune-stage epochs restored from the cache instead of trained."""
        return 0 if self.start is None else self.start.epochs

    def is_restored(self, epoch: int) -> bool:
        """Whether prune-stage ``epoch`` (0-based) came from the cache."""
        return epoch < self.restored_epochs

    def publish_after(self, epoch: int, checkpoint_dir: Path, source: str) -> None:
        """After prune-stage ``epoch`` (0-based) was trained and checkpointed in
        ``checkpoint_dir``: publish it when it completes this trial's prefix. A failure to
        publish (a full disk) is a warning: the trial goes on."""
        if epoch + 1 != self.epochs or self.restored_epochs >= self.epochs:
            return
        try:
            self.cache.publish(self.key, self.epochs, checkpoint_path(checkpoint_dir),
                               {"inputs": self.inputs, "source": source})
        except OSError as error:
            warnings.warn(f"could not publish the {self.epochs}-epoch prefix to {self.cache.root}: {error}",
                          RuntimeWarning, stacklevel=2)


def plan_prefix(root: Path, config: TrialConfig, method: PruningMethod, steps_per_epoch: int,
                fresh: bool) -> PrefixPlan | None:
    """The trial's :class:`PrefixPlan` for the cache at ``root`` (None: its method shares no
    whole epoch). ``fresh``: the trial starts its prune stage from the first epoch, so it may start
    from a published prefix (a trial resumed from its own checkpoint only publishes). Under
    ``torch.distributed`` rank 0 chooses the prefix for every rank."""
    epochs = min(method.shared_prefix().epochs, config.training.prune.epochs)
    if epochs < 1:
        return None
    cache = PrefixCache(root)
    inputs = prefix_inputs(config, method, steps_per_epoch)
    key = prefix_key(inputs)
    start = cache.find(key, epochs) if fresh and rank_and_world()[0] == 0 else None
    return PrefixPlan(cache, key, inputs, epochs, broadcast_object(start))
