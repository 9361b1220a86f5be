"""``bench``: latency and throughput of an exported model against its dense parent.

Both models run the same inputs (random, the model's input size) on the same device and batch
sizes, in fp32 under ``torch.inference_mode``: a few warm-up passes, then ``repeats`` timed
passes that alternate between the two models (so drift on a shared machine hits both alike);
the figure is the median. The dense parent is timm's model of the same name and kwargs with
random weights (weights do not change the time of dense kernels). The physical limit of a
structured model is latency ratio = MACs ratio; unstructured models keep dense shapes, so their
latency ratio stays near 1 without sparse kernels. ``runtime`` (``eager``, ``compile``,
``onnxruntime``; see :mod:`p3b_search.export.runtimes`) runs both models the same way.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from p3b_search.export.counts import ModelCounts, count_model, read_weight_masks
from p3b_search.export.load import load_pruned, read_arch_spec
from p3b_search.export.runtimes import check_runtime, prepare
from p3b_search.surgery import get_adapter
from p3b_search.timing import Forward, forward_ms, time_models

DEFAULT_BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class Timing:
    """Median wall time (ms) of one forward pass of ``batch_size`` images, pruned and dense."""

    device: str
    batch_size: int
    pruned_ms: float
    dense_ms: float

    @property
    def latency_ratio(self) -> float:
        return self.pruned_ms / self.dense_ms

    @property
    def pruned_images_per_s(self) -> float:
        return self.batch_size * 1e3 / self.pruned_ms

    @property
    def dense_images_per_s(self) -> float:
        return self.batch_size * 1e3 / self.dense_ms


@dataclass(frozen=True)
class BenchReport:
    """Timings of one exported folder and the counts they compare against."""

    folder: str
    model_name: str
    structured: bool
    counts: ModelCounts
    cpu_threads: int
    warmup: int
    repeats: int
    timings: list[Timing] = field(default_factory=list)
    runtime: str = "eager"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["timings"] = [{**asdict(t), "latency_ratio": t.latency_ratio} for t in self.timings]
        data["macs_ratio"] = self.counts.macs_ratio
        return data

    def table(self) -> str:
        """Plain-text report: counts, then one line per (device, batch size)."""
        c = self.counts
        kind = "structured (physically smaller)" if self.structured else "UNSTRUCTURED (dense shapes, zeros)"
        lines = [
            f"{self.folder}: {self.model_name}, {kind}",
            f"params {c.params:,} / {c.dense_params:,} dense (ratio {c.params_ratio:.3f}); "
            f"MACs/image {c.macs:,} / {c.dense_macs:,} dense (ratio {c.macs_ratio:.3f})",
        ]
        if not self.structured:
            lines.append(f"non-zero MACs/image {c.nonzero_macs:,} (ratio {c.nonzero_macs / c.dense_macs:.3f}): "
                         "no speed-up without sparse kernels")
        lines.append(f"median of {self.repeats} runs after {self.warmup} warm-up, fp32, "
                     f"{self.cpu_threads} CPU thread(s), runtime {self.runtime}")
        header = (f"{'device':<8}{'batch':>6}{'pruned ms':>12}{'dense ms':>12}{'latency ratio':>15}"
                  f"{'MACs ratio':>12}{'pruned img/s':>14}{'dense img/s':>13}")
        lines.append(header)
        for t in self.timings:
            lines.append(f"{t.device:<8}{t.batch_size:>6}{t.pruned_ms:>12.3f}{t.dense_ms:>12.3f}"
                         f"{t.latency_ratio:>15.3f}{c.macs_ratio:>12.3f}{t.pruned_images_per_s:>14.1f}"
                         f"{t.dense_images_per_s:>13.1f}")
        return "\n".join(lines)


def dense_parent(folder: str | Path) -> nn.Module:
    """The dense timm model the export in ``folder`` was cut from (random weights), eval mode."""
    import timm

    spec = read_arch_spec(folder)
    return timm.create_model(spec.model_name, pretrained=False, **spec.model_kwargs).eval()


def _fitting_batch(dense: nn.Module, input_size: tuple[int, ...], device: torch.device, batch_size: int,
                   repeats: int, budget_s: float) -> int:
    """``batch_size`` halved until the dense model runs it in memory and ``repeats`` passes of
    both models fit in ``budget_s``."""
    while batch_size > 1:
        try:
            x = torch.randn(batch_size, *input_size, device=device)
            dense(x)  # first pass: allocations, kernel selection
            if 2 * repeats * forward_ms(dense, x) / 1e3 <= budget_s:
                return batch_size
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
        batch_size //= 2
    return 1


@torch.inference_mode()
def time_pair(pruned: Forward, dense: Forward, device: str | torch.device, batch_size: int,
              warmup: int = 3, repeats: int = 10, input_size: tuple[int, ...] | None = None) -> Timing:
    """:class:`Timing` of both models (modules already on ``device``, or callables from
    :func:`~p3b_search.export.runtimes.prepare` with ``input_size`` given) at ``batch_size``,
    interleaved."""
    device = torch.device(device)
    x = torch.randn(batch_size, *(input_size or get_adapter(pruned).input_size()), device=device)
    times = time_models({"pruned": pruned, "dense": dense}, x, warmup, repeats)
    return Timing(str(device.type), batch_size, times["pruned"], times["dense"])


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def bench(folder: str | Path, *, devices: list[str] | None = None,
          batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, warmup: int = 3, repeats: int = 10,
          budget_s: float = 60.0, runtime: str = "eager") -> BenchReport:
    """Time the exported model in ``folder`` against its dense parent.

    ``devices``: default CPU, plus CUDA when present. ``batch_sizes``: latency at batch 1,
    throughput at 64; a batch above 1 is halved until the dense model fits in memory and its
    ``repeats`` timed passes (both models) take at most ``budget_s`` seconds. ``runtime``:
    ``eager``, ``compile`` or ``onnxruntime`` (CPU), both models alike.
    """
    devices = devices or default_devices()
    check_runtime(runtime, devices)
    folder = Path(folder)
    spec = read_arch_spec(folder)
    pruned = load_pruned(folder)
    dense = dense_parent(folder)
    counts = count_model(pruned, dense, read_weight_masks(folder))
    input_size = get_adapter(pruned).input_size()
    timings = []
    with tempfile.TemporaryDirectory(prefix="p3b-bench-") as workdir:
        for device in devices:
            pruned, dense = pruned.to(device), dense.to(device)
            example = torch.randn(2, *input_size, device=device)
            runs = [prepare(model, runtime, example, workdir) for model in (pruned, dense)]
            for batch_size in batch_sizes:
                if batch_size > 1:
                    with torch.inference_mode():
                        batch_size = _fitting_batch(dense, input_size, torch.device(device), batch_size, repeats,
                                                    budget_s)
                timings.append(time_pair(*runs, device, batch_size, warmup, repeats, input_size))
    return BenchReport(str(folder), spec.model_name, bool(spec.extra.get("structured", True)), counts,
                       torch.get_num_threads(), warmup, repeats, timings, runtime)
