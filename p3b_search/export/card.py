"""The model card (``README.md``) of an exported folder: where the model comes from, what it
costs, how fast it runs against its dense parent, and how to load it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from p3b_search.export.bench import BenchReport
from p3b_search.units import FLOPS_PER_MAC, count_text

UNSTRUCTURED_NOTE = ("**Unstructured sparsity**: the weights keep their dense shapes and the pruned "
                     "weights are zeros, so there is no speed-up without sparse kernels; the MACs below "
                     "are the dense count, the non-zero MACs what sparse kernels could reach.")


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states. ``objectives``: the trial's recorded values (``top1``,
    ``top5`` in %, ``params``, ``macs``...); ``trial_config``: the trial configuration as JSON."""

    study: str
    study_dir: str
    trial: int
    pick: str
    model_name: str
    model_kwargs: dict[str, Any]
    method: str
    structured: bool
    objectives: dict[str, float]
    trial_config: dict[str, Any]
    preprocessing: dict[str, Any]
    classes: int | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    files: dict[str, str]
    notes: list[str]
    front_figure: str | None = None
    front_marked: bool = False
    #: how the residual width was cut (:func:`residual_text`), for structured results
    residual: str | None = None


def residual_text(kept: list[int] | None, dense: list[int]) -> str:
    """The card's line on the residual width: ``kept`` channels of each stage's shared stream
    (None: cut per block), ``dense`` the dense widths."""
    if kept is None:
        return "per block (each sub-block keeps its own residual input and output channels)"
    widths = ", ".join(f"{k} of {d}" for k, d in zip(kept, dense))
    return (f"shared: one width for the embedding, every sub-block and the head ({widths} channels"
            f"{' per stage' if len(dense) > 1 else ''})")


def _count(value: float) -> str:
    return count_text(value, digits=4)


def _figures(facts: CardFacts, bench: BenchReport) -> list[str]:
    c = bench.counts
    rows = [
        "| | pruned | dense parent | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {c.params:,} ({_count(c.params)}) | {c.dense_params:,} ({_count(c.dense_params)}) "
        f"| {c.params_ratio:.3f} |",
        f"| MACs per image | {c.macs:,} ({_count(c.macs)}) | {c.dense_macs:,} ({_count(c.dense_macs)}) "
        f"| {c.macs_ratio:.3f} |",
        f"| FLOPs per image (2 x MACs) | {_count(FLOPS_PER_MAC * c.macs)} | {_count(FLOPS_PER_MAC * c.dense_macs)} "
        f"| {c.macs_ratio:.3f} |",
    ]
    if not facts.structured:
        rows.append(f"| non-zero MACs per image | {c.nonzero_macs:,} ({_count(c.nonzero_macs)}) | "
                    f"{c.dense_macs:,} | {c.nonzero_macs / c.dense_macs:.3f} |")
    top1, top5 = facts.objectives.get("top1"), facts.objectives.get("top5")
    accuracy = [f"- top-1: **{top1:.2f} %**" if top1 is not None else "- top-1: not recorded"]
    if top5 is not None:
        accuracy.append(f"- top-5: {top5:.2f} %")
    data = facts.trial_config.get("data", {})
    accuracy.append(f"- measured by the trial on the study's validation set (data: {data.get('kind', '?')}"
                    f"{', ' + str(data['root']) if data.get('root') else ''})")
    return accuracy + [""] + rows


def _latency(bench: BenchReport) -> list[str]:
    lines = [f"Median of {bench.repeats} interleaved runs after {bench.warmup} warm-up, fp32, "
             f"{bench.cpu_threads} CPU thread(s), runtime `{bench.runtime}`; the dense parent has random weights "
             "(its shapes, not its values, set the time). The physical limit is latency ratio = MACs ratio "
             f"({bench.counts.macs_ratio:.3f}). Measure again on the deployment machine with "
             "`python search.py bench <this folder> --runtime eager|compile|onnxruntime`.", "",
             "| device | batch | runtime | pruned ms | dense ms | latency ratio | MACs ratio | pruned img/s | dense img/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t in bench.timings:
        lines.append(f"| {t.device} | {t.batch_size} | {bench.runtime} | {t.pruned_ms:.3f} | {t.dense_ms:.3f} | "
                     f"{t.latency_ratio:.3f} | {bench.counts.macs_ratio:.3f} | {t.pruned_images_per_s:.1f} | "
                     f"{t.dense_images_per_s:.1f} |")
    return lines


def _front(facts: CardFacts) -> list[str]:
    """The front figure, with what the marks mean."""
    if not facts.front_figure:
        return []
    where = ("this trial is ringed in blue" if facts.front_marked
             else "this trial is not one of its points (a dense or unfinished trial)")
    return ["## Where it sits on the study's front", "",
            f"![Pareto front of study {facts.study}]({facts.front_figure})", "",
            f"Every finished trial of the study; the front in red (a colour per method when the method was "
            f"searched), the knee as a gold star, the dense model as a black diamond; {where}.", ""]


def model_card(facts: CardFacts, bench: BenchReport) -> str:
    """The card's Markdown text."""
    p = facts.preprocessing
    method_config = facts.trial_config.get("method_config", {})
    lines = [
        f"# {facts.model_name} pruned with {facts.method}: study {facts.study}, trial {facts.trial}", "",
        f"Exported by `search.py export {facts.study} --pick {facts.pick}` from `{facts.study_dir}`.", "",
    ]
    if not facts.structured:
        lines += [UNSTRUCTURED_NOTE, ""]
    lines += ["## Accuracy and cost", ""] + _figures(facts, bench) + [""]
    lines += _front(facts)
    lines += ["## Measured latency against the dense parent", ""] + _latency(bench) + [""]
    lines += [
        "## Source", "",
        f"- study: `{facts.study}` (`{facts.study_dir}`), trial **{facts.trial}** (pick: {facts.pick})",
        f"- MLflow run: `{facts.mlflow_run_id or 'not tracked'}`"
        + (f" in `{facts.tracking_uri}`" if facts.mlflow_run_id and facts.tracking_uri else ""),
        f"- timm model: `{facts.model_name}` with `{json.dumps(facts.model_kwargs, sort_keys=True)}`"
        f"{f', {facts.classes} classes' if facts.classes else ''}", "",
        "## Method and hyperparameters", "",
        f"- method: `{facts.method}` ({'structured' if facts.structured else 'unstructured'})",
    ]
    if facts.residual is not None:
        lines.append(f"- residual width: {facts.residual}")
    lines += [f"- `{key}`: `{json.dumps(value)}`" for key, value in sorted(method_config.items())]
    lines += ["", "<details><summary>Full trial configuration</summary>", "", "```json",
              json.dumps(facts.trial_config, indent=1, sort_keys=True, default=str), "```", "", "</details>", ""]
    lines += [
        "## Preprocessing", "",
        f"- input size: {p.get('input_size')}; mean {p.get('mean')}; std {p.get('std')}; "
        f"interpolation {p.get('interpolation')}; crop_pct {p.get('crop_pct')}", "",
        "## Files and loading", "",
    ]
    lines += [f"- `{name}`: {what}" for name, what in facts.files.items()]
    lines += [
        "", "```python",
        "import p3b_search, timm",
        'model = p3b_search.load_pruned("<this folder>")          # torch + timm + safetensors, no pickle',
        "config = timm.data.resolve_model_data_config(model)     # the preprocessing above",
        "transform = timm.data.create_transform(**config)",
        "```",
    ]
    if "model.pt2" in facts.files:
        lines += ["", "```python", "import torch",
                  'model = torch.export.load("<this folder>/model.pt2").module()  # no p3b_search needed', "```"]
    if facts.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in facts.notes]
    return "\n".join(lines) + "\n"
