"""Parameters and MACs of a timm model, dense vs a random structured mask: analytic vs counted.

    python benchmarks/cost_table.py --model deit_small_patch16_224 --keep 0.5

"Counted" parameters are the shrunk model's real ``numel``; counted MACs come from
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2, fused attention off). Writes a
Markdown table to stdout (and to ``--out`` when given).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from p3b_search.cost import model_cost, torch_macs
from p3b_search.surgery import get_adapter, random_masks, shrink_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep", type=float, default=0.5, help="probability that a unit is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    masks = random_masks(get_adapter(model), keep=args.keep, seed=args.seed)
    shrunk = shrink_model(model, masks)
    rows = []
    for label, net, analytic in (("dense", model, model_cost(model)),
                                 (f"random mask keep={args.keep}", shrunk, model_cost(model, masks))):
        counted_params = sum(p.numel() for p in net.parameters())
        counted_macs = torch_macs(net)
        rows.append(f"| {label} | {analytic.params / 1e6:.3f} M | {counted_params / 1e6:.3f} M | "
                    f"{analytic.macs / 1e9:.4f} G | {counted_macs / 1e9:.4f} G | "
                    f"{100 * (analytic.macs / counted_macs - 1):+.3f}% |")
    table = "\n".join([
        f"{args.model}, 224 px, batch 1 (MACs = FLOPs / 2)\n",
        "| model | params (analytic) | params (counted) | MACs (analytic) | MACs (FlopCounterMode) | difference |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
