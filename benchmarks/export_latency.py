"""Exported latency side by side: dense deit_small, the project's shrunk export (as cut, and
with its widths rounded up to multiples), and Torch-Pruning's at matched MACs, in one process.

    pip install -e ".[bench]"     # torch-pruning, onnxruntime
    python search.py export runs/quickstart --pick knee --out quickstart-knee/
    python benchmarks/export_latency.py --threads 2 --repeats 30 --exports quickstart-knee \\
        --out benchmarks/results/export_latency_deit_small.md

``--exports`` adds exported folders (each timed against its own dense parent, with its rounded
widths and Torch-Pruning's model of the same dense parent at its MACs).

* project: every unit group of every sub-block keeps the same fraction of its units (solved
  so the model keeps 1 - p of its parameters; ``shrink_latency.masks_for_prune_ratio``); the
  embedding width C stays, branch outputs are added into the residual at their channels.
* project round N: the same model with its kept widths rounded up to multiples of N by zero
  units (``p3b_search.surgery.rounding``; same logits, MACs of the rounded model).
* Torch-Pruning (``tp.pruner.MetaPruner``, L1 magnitude, uniform ratio per layer, no head
  removal): shrinks the embedding width C itself, with its ratio bisected until its MACs
  (``torch.utils.flop_counter``) match the project's export within 0.5 %.

All models are timed round-robin (``p3b_search.timing.time_models``: each repeat runs
every model once) at each batch size, fp32, ``--threads`` CPU threads, under ``--runtime``
(eager, compile, onnxruntime). Writes a Markdown table: MACs and parameter ratios to dense,
median ms, latency ratio, and latency ratio / MACs ratio (1.0 = as fast as the MACs promise).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import timm
import torch
from shrink_latency import masks_for_prune_ratio
from torch import nn

from p3b_search.cost import model_cost, torch_macs
from p3b_search.export.runtimes import RUNTIMES, check_runtime, prepare
from p3b_search.surgery import ArchSpec, get_adapter, shrink_model
from p3b_search.surgery.rounding import round_widths
from p3b_search.timing import time_models

MATCH_TOLERANCE = 0.005


def torch_pruning_model(dense: nn.Module, channel_ratio: float) -> nn.Module:
    """Torch-Pruning's deit: L1 magnitude, the same channel ratio in every layer, embedding
    width pruned, heads kept (their dims pruned); timm's attention told its new head dim."""
    import torch_pruning as tp
    from timm.layers import Attention

    model = copy.deepcopy(dense)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    example = torch.randn(1, *get_adapter(model).input_size())
    pruner = tp.pruner.MetaPruner(
        model, example, global_pruning=False, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=channel_ratio, ignored_layers=[model.head], num_heads={m.qkv: m.num_heads for m in attentions},
        prune_num_heads=False, prune_head_dims=True,
        unwrapped_parameters=[(model.cls_token, 2), (model.pos_embed, 2)])  # (1, tokens, C): C is pruned
    pruner.step()
    for m in attentions:
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim = m.num_heads * m.head_dim
        m.scale = m.head_dim ** -0.5
    return model.eval()


def matched_torch_pruning(dense: nn.Module, target_macs: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's model whose MACs match ``target_macs`` (bisection on its channel ratio)."""
    low, high = 0.0, 0.95
    best = None
    for _ in range(14):
        ratio = (low + high) / 2
        model = torch_pruning_model(dense, ratio)
        macs = torch_macs(model)
        best = (model, ratio) if best is None or abs(macs - target_macs) < abs(torch_macs(best[0]) - target_macs) else best
        if abs(macs / target_macs - 1) < MATCH_TOLERANCE:
            break
        low, high = (ratio, high) if macs > target_macs else (low, ratio)
    return best


def uniform_export(dense: nn.Module, name: str, prune_ratio: float) -> tuple[nn.Module, ArchSpec]:
    """The project's shrunk model keeping ``1 - prune_ratio`` of the parameters, uniformly."""
    shrunk = shrink_model(dense, masks_for_prune_ratio(dense, prune_ratio)).eval()
    return shrunk, ArchSpec.from_model(shrunk, name, {})


def candidates(dense: nn.Module, shrunk: nn.Module, spec: ArchSpec, round_to: list[int]) -> dict[str, nn.Module]:
    """The models timed beside ``dense``: the project's ``shrunk`` export, its rounded widths,
    and Torch-Pruning's at its MACs, by row label."""
    models = {"dense": dense, "project": shrunk}
    for multiple in round_to:
        models[f"project round {multiple}"] = round_widths(shrunk, spec, multiple)[0]
    tp_model, ratio = matched_torch_pruning(dense, model_cost(shrunk).macs)
    models[f"Torch-Pruning (C x {1 - ratio:.3f})"] = tp_model
    return models


def cases(args: argparse.Namespace) -> list[tuple[str, dict[str, nn.Module]]]:
    """(row label, models) of every case: deit_small at each prune ratio, then each export."""
    from p3b_search.export.bench import dense_parent
    from p3b_search.export.load import load_pruned, read_arch_spec

    found = []
    if args.prune_ratios:
        dense = timm.create_model(args.model, pretrained=False).eval()
        for prune_ratio in args.prune_ratios:
            found.append((f"{args.model} p={prune_ratio}", candidates(dense, *uniform_export(dense, args.model, prune_ratio),
                                                                      args.round_to)))
    for folder in args.exports:
        found.append((f"{folder.name}", candidates(dense_parent(folder), load_pruned(folder).eval(),
                                                   read_arch_spec(folder), args.round_to)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--prune-ratios", type=float, nargs="*", default=[0.5, 0.75])
    parser.add_argument("--exports", type=Path, nargs="*", default=[],
                        help="folders written by `search.py export` (e.g. the quickstart knee), timed the same way")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--round-to", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--runtime", choices=RUNTIMES, default="eager")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    check_runtime(args.runtime, ["cpu"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="p3b-export-latency-") as workdir:
        for case, models in cases(args):
            costs = {label: (torch_macs(m), sum(p.numel() for p in m.parameters())) for label, m in models.items()}
            dense_macs, dense_params = costs["dense"]
            input_size = get_adapter(models["dense"]).input_size()
            example = torch.randn(2, *input_size)
            runs = {label: prepare(m, args.runtime, example, workdir) for label, m in models.items()}
            for batch in args.batch_sizes:
                x = torch.randn(batch, *input_size)
                times = time_models(runs, x, args.warmup, args.repeats)
                for label, ms in times.items():
                    macs_ratio = costs[label][0] / dense_macs
                    latency_ratio = ms / times["dense"]
                    rows.append(f"| {case} | {label} | {macs_ratio:.3f} | {costs[label][1] / dense_params:.3f} | "
                                f"{batch} | {ms:.2f} | {latency_ratio:.3f} | **{latency_ratio / macs_ratio:.2f}** |")
                    print(rows[-1], flush=True)
    table = "\n".join([
        f"CPU fp32, {args.threads} thread(s), runtime {args.runtime}, median of "
        f"{args.repeats} round-robin runs after {args.warmup} warm-up; {time.monotonic() - began:.0f} s in all\n",
        "| case | model | MACs ratio | params ratio | batch | ms | latency ratio | latency / MACs ratio |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
