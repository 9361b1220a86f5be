"""P3B vs its baselines on the embedded digits transfer task (issue 3 evidence).

    python benchmarks/methods.py                     # full run: 3 seeds, p = 0.5 and 0.75
    python benchmarks/methods.py --seeds 1 --prune-epochs 6 --finetune-epochs 3   # quick look
    python benchmarks/methods.py --methods --variant p3b:aux_head_lr=0.005 --name p3b_variants

Every trial goes through ``objectives.prune_finetune.run_trial``: the source-pretrained
digits ViT (:data:`p3b_search.models.DIGITS_VIT`, trained on digits 0-4) is transferred to
digits 5-9 by a prune stage (constant LR, as the reference) and a fine-tune stage of the
pruned model (cosine). Methods: ``dense`` (no pruning; its prune stage is plain fine-tuning, so
every method trains for the same total epochs), ``p3b``, ``uniform-magnitude`` and
``global-taylor``, ``dimap`` (unstructured) and ``dimap-structured``, ``svite`` (unstructured)
and ``s2vite``, each at the given prune ratios and seeds. ``--model swin`` transfers a small
source-pretrained Swin instead (e.g. ``--methods dense dimap dimap-structured --model swin
--name dimap_swin``). Trials run in parallel worker processes with one thread each.

Writes to ``--out`` (default ``benchmarks/results``):

* ``methods.parquet``: one row per trial (method, prune_ratio, seed, top1, top5, params, macs,
  seconds, best prune-stage top1);
* ``methods.md``: top-1 mean +- std over seeds, parameters and MACs per image, per method and ratio;
* ``methods_allocations.parquet``: the allocation rows of the last mask update of every trial;
* ``p3b_depth.png``: keep ratio per sub-block vs depth at the end of pruning (mean over seeds).
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

METHODS = ("dense", "p3b", "uniform-magnitude", "global-taylor", "dimap", "dimap-structured", "svite", "s2vite")


@dataclass(frozen=True)
class Trial:
    """One run: a registered ``method`` with ``overrides`` of its knobs, shown as ``label``."""

    method: str
    prune_ratio: float
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.overrides)])


def parse_variant(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``"p3b:aux_head_lr=0.005,gamma=0.5"`` -> ("p3b", (("aux_head_lr", 0.005), ("gamma", 0.5)))."""
    import yaml

    method, _, options = text.partition(":")
    if method not in METHODS:
        raise SystemExit(f"--variant {text!r}: method must be one of {', '.join(METHODS)}")
    pairs = [item.split("=", 1) for item in options.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--variant {text!r}: write options as key=value separated by commas")
    return method, tuple((key, yaml.safe_load(value)) for key, value in pairs)


@dataclass(frozen=True)
class Recipe:
    """What every trial shares (epochs per stage, LRs for a batch of 512, mask-update period)."""

    prune_epochs: int
    finetune_epochs: int
    prune_lr: float
    finetune_lr: float
    batch_size: int
    update_every: int
    model: str = "vit"


def trial_config(trial: Trial, recipe: Recipe):
    from p3b_search.config import StageConfig, TrainingConfig, TrialConfig
    method_config: dict[str, Any] = {}
    if trial.method != "dense":
        method_config["prune_ratio"] = trial.prune_ratio
    if trial.method in ("p3b", "global-taylor"):
        method_config["prune_steps_update_mask"] = recipe.update_every
    if trial.method in ("svite", "s2vite"):  # prune-and-grow every update_every micro-batches
        method_config["update_interval"] = recipe.update_every
    method_config.update(trial.overrides)
    training = TrainingConfig(
        prune=StageConfig(epochs=recipe.prune_epochs, lr=recipe.prune_lr, schedule="constant"),
        finetune=StageConfig(epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, schedule="cosine"),
        batch_size=recipe.batch_size, seed=trial.seed, device="cpu", amp=False,
    )
    return TrialConfig(model=digits_model(recipe.model), training=training, method=trial.method,
                       method_config=method_config)


def run_one(job: tuple[Trial, Recipe]) -> dict[str, Any]:
    """One trial in a worker process: objectives, timing and the last update's allocation rows."""
    import torch

    from objectives.prune_finetune import run_trial
    from p3b_search.methods import get_method
    from p3b_search.reporting import TrialReporter

    torch.set_num_threads(1)
    trial, recipe = job
    reporter = TrialReporter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        objectives = run_trial(trial_config(trial, recipe), reporter, Path(workdir))
    prune_top1 = [e["top1"] for e in reporter.epochs if e["stage"] == 0]
    last_step = max((r["step"] for r in reporter.allocations), default=None)
    allocations = [dict(r, method=trial.label, prune_ratio=trial.prune_ratio, seed=trial.seed)
                   for r in reporter.allocations if r["step"] == last_step]
    return {
        "method": trial.label, "prune_ratio": trial.prune_ratio, "seed": trial.seed,
        "top1": objectives["top1"], "top5": objectives["top5"], "params": objectives["params"],
        "macs": objectives["macs"], "nonzero_macs": objectives["nonzero_macs"],
        "structured": get_method(trial.method).structured,
        "prune_stage_top1": prune_top1[-1] if prune_top1 else float("nan"),
        "seconds": time.perf_counter() - started, "allocations": allocations,
    }


def digits_model(key: str):
    """The transferred model: ``vit`` is :data:`p3b_search.models.DIGITS_VIT`; ``swin`` a small
    Swin (56 px, patch 4, width 32, 2+2 blocks with 2 and 4 heads, window 7), source-pretrained
    the same way (DIMAP's hierarchical case)."""
    from p3b_search.config import ModelConfig
    from p3b_search.models import DIGITS_VIT, SOURCE_PRETRAINED

    if key == "vit":
        return DIGITS_VIT
    return ModelConfig(name="swin_tiny_patch4_window7_224", weights=SOURCE_PRETRAINED,
                       overrides=dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7))


def dense_params(model: str = "vit") -> int:
    """Parameters of the unpruned digits model with the target domain's 5 classes."""
    from p3b_search.cost import model_cost
    from p3b_search.models import create_timm_model

    return model_cost(create_timm_model(digits_model(model), 5)).params


def summary_table(results: pd.DataFrame, recipe: Recipe) -> str:
    """Markdown: top-1 mean +- std, params (and kept fraction) and MACs per (method, ratio)."""
    dense = dense_params(recipe.model)
    lines = [
        f"Digits transfer (source digits 0-4 -> target 5-9), "
        f"{'DIGITS_VIT' if recipe.model == 'vit' else 'small Swin'}, "
        f"{recipe.prune_epochs} prune + "
        f"{recipe.finetune_epochs} fine-tune epochs for every method (base LR {recipe.prune_lr:g} / "
        f"{recipe.finetune_lr:g} per 512 images), mask update every {recipe.update_every} "
        f"micro-batches, {results.seed.nunique()} seeds.\n",
        "Structured rows are physically smaller (a real speed-up); unstructured rows keep dense shapes: their "
        "params count non-zeros, their MACs stay dense and the non-zero MACs need sparse kernels to pay off.\n",
        "| method | structured | prune ratio | top-1 % (mean ± std) | prune-stage top-1 % | params | kept "
        "| MACs / image | non-zero MACs / image | trials |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, ratio), group in results.groupby(["method", "prune_ratio"], sort=False):
        structured = "—" if ratio == 0 else ("yes" if group.structured.all() else "no")
        lines.append(
            f"| {method} | {structured} | {ratio:g} | {group.top1.mean():.2f} ± {group.top1.std(ddof=1):.2f} | "
            f"{group.prune_stage_top1.mean():.2f} | {group.params.mean() / 1e3:.1f} K | "
            f"{group.params.mean() / dense:.3f} | {group.macs.mean() / 1e6:.3f} M | "
            f"{group.nonzero_macs.mean() / 1e6:.3f} M | {len(group)} |"
        )
    return "\n".join(lines) + "\n"


def depth_figure(allocations: pd.DataFrame, path: Path) -> None:
    """Keep ratio per sub-block vs depth at the end of pruning, one panel per prune ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(allocations.prune_ratio.unique())
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), sharey=True, squeeze=False)
    styles = {"global-taylor": "--s", "uniform-magnitude": ":^"}
    for ax, ratio in zip(axes[0], ratios):
        for (method, kind), group in allocations[allocations.prune_ratio == ratio].groupby(["method", "kind"]):
            mean = group.groupby("layer").keep_ratio.agg(["mean", "std"]).reset_index()
            ax.errorbar(mean.layer + (0.08 if kind == "mlp" else -0.08), mean["mean"], yerr=mean["std"].fillna(0),
                        fmt=styles.get(method, "-o"), capsize=2, label=f"{method} {kind}",
                        alpha=1.0 if method.startswith("p3b") else 0.6)
        ax.set_title(f"prune ratio {ratio:g}")
        ax.set_xlabel("layer (depth)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("keep ratio at the end of pruning")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variant", action="append", default=[], metavar="METHOD:KEY=VALUE,...",
                        help="an extra method configuration, e.g. p3b:aux_head_lr=0.005 (repeatable)")
    parser.add_argument("--name", default="methods", help="stem of the output files")
    parser.add_argument("--prune-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--prune-lr", type=float, default=1e-2,
                        help="base LR for a batch of 512 (default 1e-2, as studies/quickstart.yaml)")
    parser.add_argument("--finetune-lr", type=float, default=1e-2, help="base LR for a batch of 512")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--update-every", type=int, default=4,
                        help="micro-batches between P3B mask updates (about 3 per epoch, as the README run)")
    parser.add_argument("--model", choices=("vit", "swin"), default="vit",
                        help="vit: DIGITS_VIT; swin: a small hierarchical Swin (e.g. for dimap)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from p3b_search.training.pretrain import source_pretrained_weights

    recipe = Recipe(args.prune_epochs, args.finetune_epochs, args.prune_lr, args.finetune_lr,
                    args.batch_size, args.update_every, args.model)
    source_pretrained_weights(digits_model(args.model))  # fill the cache once, before the workers start
    configurations = [(m, ()) for m in args.methods] + [parse_variant(v) for v in args.variant]
    trials = [Trial(m, 0.0 if m == "dense" else r, s, overrides)
              for m, overrides in configurations for r in ([0.0] if m == "dense" else args.ratios)
              for s in range(args.seeds)]
    trials.sort(key=lambda t: t.method != "p3b")  # the slowest first, for a better packing
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = []
        for result in pool.imap_unordered(run_one, [(t, recipe) for t in trials]):
            results.append(result)
            print(f"[{time.perf_counter() - started:6.0f}s] {result['method']:>17} p={result['prune_ratio']:<4g} "
                  f"seed={result['seed']} top1={result['top1']:.2f} params={result['params']:.0f} "
                  f"({result['seconds']:.0f}s)", flush=True)
    allocations = pd.DataFrame([row for r in results for row in r.pop("allocations")])
    order = {Trial(m, 0.0, 0, overrides).label: i for i, (m, overrides) in enumerate(configurations)}
    frame = pd.DataFrame(results).sort_values(["method", "prune_ratio", "seed"], key=lambda c: c.map(order)
                                              if c.name == "method" else c).reset_index(drop=True)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.out / f"{args.name}.parquet", index=False)
    allocations.to_parquet(args.out / f"{args.name}_allocations.parquet", index=False)
    table = summary_table(frame, recipe) + f"\nWall time: {time.perf_counter() - started:.0f} s on {args.workers} workers.\n"
    (args.out / f"{args.name}.md").write_text(table)
    if not allocations.empty:
        depth_figure(allocations, args.out / ("p3b_depth.png" if args.name == "methods" else f"{args.name}_depth.png"))
    print(table)


if __name__ == "__main__":
    main()
