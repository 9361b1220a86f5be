"""Exported latency with its spread: dense deit_small, the project's exports per block and with a
shared residual, and Torch-Pruning's at matched MACs, in one process.

    pip install -e ".[bench]"     # torch-pruning, onnxruntime
    python search.py export runs/quickstart --pick knee --out quickstart-knee/
    python -m benchmarks.export_latency --threads 2 --repeats 30 --exports quickstart-knee \\
        --out benchmarks/results/export_latency_deit_small.md

Cases: ``--model`` at each ``--prune-ratios`` p, then each folder of ``--exports`` (timed against
its own dense parent). Rows of a case:

* dense: the dense parent, re-timed in every case.
* per-block: the project's export cutting each sub-block's residual channels on its own. For
  ``--model``: every unit group of every sub-block keeps the same fraction of its units, solved
  so the model keeps 1 - p of its parameters (``shrink_latency.masks_for_prune_ratio``); the
  embedding width C stays, branches gather their inputs and add their outputs into the
  full-width residual. For an export cut per block: the export as cut.
* shared: the project's export with one residual width for the whole model
  (``shrink_model(dense, masks, residual)``, the model ``residual: shared`` exports). Every group
  keeps the same random fraction k of its units (heads whole), the residual stream (and with it
  the patch embedding, every norm and the head's input) included; k is bisected on the analytic
  MACs (``p3b_search.cost.model_cost``) until they match the per-block row's within 0.5 %. When
  the residual's whole channels cannot get that close (a narrow C), the residual keeps the
  closest k and the inner groups' fraction alone is bisected again. For an export cut with a
  shared residual: the export as cut (no re-cut).
* round N: the per-block row (or a shared export) with its kept widths rounded up to multiples
  of N by zero units (``p3b_search.surgery.rounding``; same logits, the rounded model's MACs).
* Torch-Pruning (``tp.pruner.MetaPruner``, L1 magnitude, uniform ratio per layer, no head
  removal): shrinks the embedding width C itself, its ratio bisected until its MACs
  (``torch.utils.flop_counter``) match the per-block row's within 0.5 %.

All models of a case are timed round-robin (``p3b_search.timing.time_runs``: each repeat runs
every model once) at each batch size, fp32, ``--threads`` CPU threads, under ``--runtime``
(eager, compile, onnxruntime). Per model and batch: the median and interquartile range (p25-p75)
of the per-repeat ms; the latency ratio to dense is the median of the per-repeat ratios (the
i-th passes of two models ran back to back) with the distribution-free 95 % interval of that
median (binomial order statistics, ``scipy.stats.quantile_test``; none below 6 repeats). A second
table checks the goals: shared / Torch-Pruning (its interval includes or is below 1.0), shared
latency / MACs <= 1.2 at batch 64, and each export faster than dense at batch 1 (interval below 1.0).
"""
from __future__ import annotations

import argparse
import copy
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from scipy import stats
from torch import nn

from benchmarks.shrink_latency import masks_for_prune_ratio, uniform_masks, uniform_residual
from benchmarks.study_variants import REPO, load_line
from p3b_search.cost import model_cost, torch_macs
from p3b_search.export.runtimes import RUNTIMES, check_runtime, prepare
from p3b_search.surgery import ArchSpec, BlockMasks, ModelAdapter, ResidualMasks, get_adapter, shrink_model
from p3b_search.surgery.rounding import round_widths
from p3b_search.timing import time_runs

MATCH_TOLERANCE = 0.005
CONFIDENCE = 0.95
DENSE, PER_BLOCK, SHARED, TORCH_PRUNING = "dense", "per-block", "shared", "Torch-Pruning"
#: goals: shared / Torch-Pruning interval reaching 1.0; shared latency / MACs at GOAL_BATCH; exports vs dense at batch 1
SHARED_VS_TP_MAX, LATENCY_PER_MAC_MAX, GOAL_BATCH = 1.0, 1.2, 64


def closest_keep(measure: Callable[[float], float], target: float, low: float, high: float, steps: int) -> float:
    """The ``x`` in [``low``, ``high``] whose ``measure(x)`` (non-decreasing in ``x``) comes closest to
    ``target``, by bisection; stops once within ``MATCH_TOLERANCE``."""
    best, best_gap = high, math.inf
    for _ in range(steps):
        mid = (low + high) / 2
        value = measure(mid)
        if abs(value - target) < best_gap:
            best, best_gap = mid, abs(value - target)
        if best_gap < MATCH_TOLERANCE * target:
            break
        low, high = (low, mid) if value > target else (mid, high)
    return best


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
    """Torch-Pruning's model whose MACs come closest to ``target_macs`` (bisection on its kept
    channel fraction, 14 steps), with its channel ratio."""
    keep = closest_keep(lambda k: torch_macs(torch_pruning_model(dense, 1 - k)), target_macs, 0.05, 1.0, 14)
    return torch_pruning_model(dense, 1 - keep), 1 - keep


def shared_masks(adapter: ModelAdapter, residual_keep: float, inner_keep: float) -> tuple[BlockMasks, ResidualMasks]:
    """Uniform masks of a shared residual model: the stream keeps ``residual_keep`` of its channels,
    every inner group (head dims, hidden units) ``inner_keep`` of its units, heads whole."""
    return uniform_masks(adapter, inner_keep, shared=True), uniform_residual(adapter, residual_keep)


def matched_shared(dense: nn.Module, target_macs: float) -> tuple[nn.Module, str]:
    """The project's shared residual export of ``dense`` whose analytic MACs come closest to
    ``target_macs`` (see the module docstring), with its row label."""
    adapter = get_adapter(dense)

    def macs(residual_keep: float, inner_keep: float) -> float:
        return model_cost(dense, *shared_masks(adapter, residual_keep, inner_keep)).macs

    residual_keep = inner_keep = closest_keep(lambda k: macs(k, k), target_macs, 0.0, 1.0, 30)
    if abs(macs(residual_keep, inner_keep) / target_macs - 1) >= MATCH_TOLERANCE:
        inner_keep = closest_keep(lambda k: macs(residual_keep, k), target_macs, 0.0, 1.0, 30)
    masks, residual = shared_masks(adapter, residual_keep, inner_keep)
    widths = [f"C {int(mask.sum())}/{mask.numel()}" for mask in residual.values()]
    label = f"{SHARED} ({', '.join(widths)}" + (")" if inner_keep == residual_keep else f", inner x {inner_keep:.3f})")
    return shrink_model(dense, masks, residual).eval(), label


@dataclass
class Case:
    """One case's models by role (dense, per-block, shared, round N, Torch-Pruning), each with its row label."""

    name: str
    models: dict[str, tuple[str, nn.Module]]
    export: bool  # a folder of --exports: its as-cut model must beat dense at batch 1


def make_case(name: str, dense: nn.Module, cut: nn.Module, spec: ArchSpec, round_to: Sequence[int], export: bool) -> Case:
    """The rows timed beside ``dense`` for the project's model ``cut`` (described by ``spec``): the
    other residual mode at its MACs when ``cut`` is per block, its rounded widths, Torch-Pruning's."""
    as_cut = " (as cut)" if export else ""
    target = model_cost(cut).macs
    models = {DENSE: (DENSE, dense)}
    if spec.residual_mode == SHARED:
        models[SHARED] = (SHARED + as_cut, cut)
    else:
        models[PER_BLOCK] = (PER_BLOCK + as_cut, cut)
        shared, label = matched_shared(dense, target)
        models[SHARED] = (label, shared)
    for multiple in round_to:
        models[f"round {multiple}"] = (f"{spec.residual_mode} round {multiple}", round_widths(cut, spec, multiple)[0])
    tp_model, ratio = matched_torch_pruning(dense, target)
    models[TORCH_PRUNING] = (f"{TORCH_PRUNING} (C x {1 - ratio:.3f})", tp_model)
    return Case(name, models, export)


def cases(args: argparse.Namespace) -> list[Case]:
    """Every case: ``--model`` at each prune ratio (uniform per-block cut), then each export folder."""
    from p3b_search.export.bench import dense_parent
    from p3b_search.export.load import load_pruned, read_arch_spec

    found = []
    if args.prune_ratios:
        dense = timm.create_model(args.model, pretrained=False).eval()
        for prune_ratio in args.prune_ratios:
            cut = shrink_model(dense, masks_for_prune_ratio(dense, prune_ratio)).eval()
            found.append(make_case(f"{args.model} p={prune_ratio}", dense, cut, ArchSpec.from_model(cut, args.model, {}),
                                   args.round_to, export=False))
    for folder in args.exports:
        found.append(make_case(folder.name, dense_parent(folder), load_pruned(folder).eval(), read_arch_spec(folder),
                               args.round_to, export=True))
    return found


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range (p25, p75) of per-repeat latencies (ms)."""

    median: float
    p25: float
    p75: float


def spread(ms: Sequence[float]) -> Spread:
    """:class:`Spread` of ``ms`` (numpy's linear-interpolation percentiles)."""
    p25, median, p75 = np.percentile(np.asarray(ms, dtype=float), [25, 50, 75])
    return Spread(float(median), float(p25), float(p75))


@dataclass(frozen=True)
class Ratio:
    """Median of per-repeat ratios with its ``CONFIDENCE`` interval ``[low, high]`` (NaN when too few repeats)."""

    median: float
    low: float
    high: float

    def scaled(self, factor: float) -> Ratio:
        return Ratio(self.median * factor, self.low * factor, self.high * factor)

    def text(self, digits: int = 3) -> str:
        interval = "n/a" if math.isnan(self.low) else f"{self.low:.{digits}f}, {self.high:.{digits}f}"
        return f"{self.median:.{digits}f} [{interval}]"


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = CONFIDENCE) -> Ratio:
    """Median of ``numerator[i] / denominator[i]`` (the i-th repeat of each) and the distribution-free
    interval of that median from the ratios' order statistics (binomial; NaN below 6 repeats at 95 %)."""
    ratios = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    interval = stats.quantile_test(ratios, p=0.5).confidence_interval(confidence)
    return Ratio(float(np.median(ratios)), float(interval.low), float(interval.high))


def goal_row(case: str, batch: int, goal: str, value: Ratio, met: bool) -> str:
    state = "n/a (too few repeats)" if math.isnan(value.low) else ("**met**" if met else "not met")
    return f"| {case} | {batch} | {goal} | {value.text()} | {state} |"


def case_rows(case: Case, runs: dict[str, list[float]], costs: dict[str, tuple[float, int]],
              batch: int) -> tuple[list[str], list[str]]:
    """The table's rows and the goals' rows of ``case`` at ``batch`` from per-repeat ``runs`` (ms by
    role) and ``costs`` (MACs, parameters by role)."""
    dense_macs, dense_params = costs[DENSE]
    rows = []
    for role, (label, _) in case.models.items():
        macs_ratio = costs[role][0] / dense_macs
        s = spread(runs[role])
        ratio = paired_ratio(runs[role], runs[DENSE])
        rows.append(f"| {case.name} | {label} | {macs_ratio:.3f} | {costs[role][1] / dense_params:.3f} | {batch} | "
                    f"{s.median:.2f} | {s.p25:.2f}-{s.p75:.2f} | {'1' if role == DENSE else ratio.text()} | "
                    f"**{ratio.median / macs_ratio:.2f}** |")
    vs_tp = paired_ratio(runs[SHARED], runs[TORCH_PRUNING])
    goals = [goal_row(case.name, batch, f"shared / Torch-Pruning <= {SHARED_VS_TP_MAX}", vs_tp,
                      vs_tp.low <= SHARED_VS_TP_MAX)]
    if batch == GOAL_BATCH:
        per_mac = paired_ratio(runs[SHARED], runs[DENSE]).scaled(dense_macs / costs[SHARED][0])
        goals.append(goal_row(case.name, batch, f"shared latency / MACs <= {LATENCY_PER_MAC_MAX}", per_mac,
                              per_mac.median <= LATENCY_PER_MAC_MAX))
    if case.export and batch == 1:
        role = PER_BLOCK if PER_BLOCK in case.models else SHARED
        vs_dense = paired_ratio(runs[role], runs[DENSE])
        goals.append(goal_row(case.name, batch, f"{case.models[role][0]} / dense < 1", vs_dense, vs_dense.high < 1.0))
    return rows, goals


def code_version() -> str:
    """``git describe --always --dirty`` of the repository (``unknown`` outside git)."""
    result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or "unknown"


def markdown(args: argparse.Namespace, header: str, rows: list[str], goals: list[str]) -> str:
    return "\n".join([
        header,
        f"CPU fp32, {args.threads} thread(s), runtime {args.runtime}, {args.repeats} round-robin repeats (every model "
        f"once per repeat) after {args.warmup} warm-up, dense re-timed in every case. Median and IQR (p25-p75) of "
        "the per-repeat ms; latency ratio = median of the per-repeat ratios to dense with its 95 % order-statistic "
        "interval; latency / MACs ratio = that median / the MACs ratio (1.0 = as fast as the MACs promise). "
        "MACs: torch's counter.\n",
        "| case | model | MACs ratio | params ratio | batch | median ms | IQR ms | latency ratio [95 % CI] "
        "| latency / MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Goals (median of per-repeat ratios [95 % CI]): shared / Torch-Pruning is met when its interval includes or "
        f"is below {SHARED_VS_TP_MAX}; shared latency / MACs at batch {GOAL_BATCH} when the median is <= "
        f"{LATENCY_PER_MAC_MAX}; an export / dense at batch 1 when the whole interval is below 1.\n",
        "| case | batch | goal | value [95 % CI] | met |", "|---|---|---|---|---|", *goals])


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
    parser.add_argument("--round-to", type=int, nargs="*", default=[8, 16], help="empty: no rounded rows")
    parser.add_argument("--runtime", choices=RUNTIMES, default="eager")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    check_runtime(args.runtime, ["cpu"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    began, load_before = time.monotonic(), load_line()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, goals = [], []
    with tempfile.TemporaryDirectory(prefix="p3b-export-latency-") as workdir:
        for case in cases(args):
            costs = {role: (torch_macs(m), sum(p.numel() for p in m.parameters())) for role, (_, m) in case.models.items()}
            input_size = get_adapter(case.models[DENSE][1]).input_size()
            example = torch.randn(2, *input_size)
            forwards = {role: prepare(m, args.runtime, example, workdir) for role, (_, m) in case.models.items()}
            for batch in args.batch_sizes:
                runs = time_runs(forwards, torch.randn(batch, *input_size), args.warmup, args.repeats)
                case_table, case_goals = case_rows(case, runs, costs, batch)
                rows += case_table
                goals += case_goals
                print("\n".join(case_table + case_goals), flush=True)
    header = (f"# Exported latency: dense, per-block, shared and Torch-Pruning at matched MACs\n\n"
              f"Command: `python -m benchmarks.export_latency {shlex.join(sys.argv[1:])}`\n"
              f"Code {code_version()}, torch {torch.__version__}. Started {started} ({load_before}); ended "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({load_line()}); "
              f"{time.monotonic() - began:.0f} s in all.\n")
    table = markdown(args, header, rows, goals)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
