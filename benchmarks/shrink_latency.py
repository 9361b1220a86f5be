"""Latency of shrunk models vs their dense parent, next to the MACs ratio (the physical limit).

    python benchmarks/shrink_latency.py --model deit_small_patch16_224 --threads 1 2

For each prune ratio p (fraction of parameters removed) every unit group of every sub-block
keeps the same fraction k of its units (k solved so the model keeps 1-p of its parameters,
counted by ``p3b_search.cost``); the shrunk model is timed against the dense one, interleaved,
median of repeats (``p3b_search.export.bench.time_pair``). Writes a Markdown table to stdout
and, with ``--out``, to a file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from p3b_search.cost import model_cost
from p3b_search.export.bench import time_pair
from p3b_search.surgery import BlockMasks, ModelAdapter, ResidualMasks, get_adapter, shrink_model
from p3b_search.surgery.gates import inner_groups


def _random_subset(size: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    """A bool mask (size,) keeping ``round(keep * size)`` (>= 1) random units."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=gen)[:max(1, round(keep * size))]] = True
    return mask


def uniform_masks(adapter: ModelAdapter, keep: float, seed: int = 0, shared: bool = False) -> BlockMasks:
    """Every group keeps ``round(keep * size)`` (>= 1) random units; whole heads are kept.
    ``shared``: the inner groups only (a shared residual sets ``in``/``out``: :func:`uniform_residual`)."""
    gen = torch.Generator().manual_seed(seed)
    return {sb.index: {group: torch.ones(size, dtype=torch.bool) if group == "heads" else _random_subset(size, keep, gen)
                       for group, size in (inner_groups(sb) if shared else sb.groups).items()}
            for sb in adapter.sub_blocks}


def uniform_residual(adapter: ModelAdapter, keep: float, seed: int = 0) -> ResidualMasks:
    """A shared residual keeping ``round(keep * C)`` (>= 1) random channels of every stage's stream."""
    gen = torch.Generator().manual_seed(seed)
    return {stage: _random_subset(width, keep, gen) for stage, width in adapter.stream_widths().items()}


def masks_for_prune_ratio(model: torch.nn.Module, prune_ratio: float) -> BlockMasks:
    """Uniform masks keeping ``1 - prune_ratio`` of the parameters (bisection on the fraction)."""
    adapter = get_adapter(model)
    target = (1 - prune_ratio) * model_cost(model).params
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if model_cost(model, uniform_masks(adapter, mid)).params < target:
            low = mid
        else:
            high = mid
    return uniform_masks(adapter, high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--prune-ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    dense_cost = model_cost(dense)
    rows = []
    for prune_ratio in args.prune_ratios:
        shrunk = shrink_model(dense, masks_for_prune_ratio(dense, prune_ratio)).eval()
        cost = model_cost(shrunk)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch_sizes:
                t = time_pair(shrunk, dense, "cpu", batch, warmup=2, repeats=args.repeats)
                rows.append(f"| {prune_ratio} | {cost.params / dense_cost.params:.3f} | "
                            f"{cost.macs / dense_cost.macs:.3f} | {threads} | {batch} | {t.pruned_ms:.2f} | "
                            f"{t.dense_ms:.2f} | **{t.latency_ratio:.3f}** |")
                print(rows[-1], flush=True)
    table = "\n".join([
        f"{args.model}, 224 px, CPU fp32, median of {args.repeats} interleaved runs\n",
        "| prune ratio | params ratio | MACs ratio | threads | batch | shrunk ms | dense ms | latency ratio |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
