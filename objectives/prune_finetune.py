"""One trial: build the model -> prune stage (the method's hooks) -> finalize (shrink) ->
fine-tune stage of the pruned model -> measure -> save.

It runs the same under Ray Tune, in a test or by hand (``python -m objectives.prune_finetune``):
what it produces goes through a :class:`~p3b_search.reporting.TrialReporter`.

The working folder (``workdir``) is written through :class:`~p3b_search.trial_folder.TrialFolder`
(its layout is documented there), so ``search.py export`` reads what this objective wrote.

``resume_from`` is such a ``checkpoint`` folder (or a copy of it): the trial continues after
the epoch it holds, in the stage it names, and ends exactly as an uninterrupted run would.

``prefixes`` is the study's cache of shared prefixes (``shared_prefixes: true``; see
:mod:`objectives.shared_prefix`): a fresh trial starts from the longest prefix of its prune
stage another trial published, reports those epochs' metrics from it (``prefix_shared`` = 1),
and publishes its own prefix; it ends exactly as it would have without the cache.

Under ``torch.distributed`` (a ``workers_per_trial > 1`` trial) every rank trains its shard of
the data (see :mod:`p3b_search.distributed`) and takes the same mask decisions; only rank 0
writes to ``workdir``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from objectives.shared_prefix import PrefixPlan, plan_prefix
from p3b_search.config import TrialConfig
from p3b_search.cost import kept_cost, model_cost
from p3b_search.data import build_loaders, resolve_input_config
from p3b_search.distributed import rank_and_world
from p3b_search.files import atomic_write
from p3b_search.methods import PrunedModel, PruningMethod, get_method
from p3b_search.models import create_timm_model
from p3b_search.reporting import TrialReporter
from p3b_search.surgery import ArchSpec
from p3b_search.timing import time_models
from p3b_search.training.build import build_model
from p3b_search.training.loop import evaluate, train_stage
from p3b_search.training.rng import seed_everything
from p3b_search.trial_folder import FINISHED, CheckpointFolder, ModelFolder, TrialFolder
from p3b_search.units import FLOPS_PER_MAC


def _model_kwargs(config: TrialConfig, num_classes: int) -> dict[str, Any]:
    kwargs = {**config.model.overrides, "num_classes": num_classes}
    if config.training.drop_path:
        kwargs["drop_path_rate"] = config.training.drop_path
    return kwargs


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))


def _save_pruned(pruned: PrunedModel, config: TrialConfig, num_classes: int, folder: ModelFolder,
                 **extra: Any) -> None:
    """The architecture (+ the unstructured weight masks) of ``pruned`` in ``folder``."""
    folder.root.mkdir(parents=True, exist_ok=True)
    spec = ArchSpec.from_model(pruned.model, config.model.name, _model_kwargs(config, num_classes),
                               extra={"structured": pruned.structured, "method": config.method, **extra})
    spec.save(folder.arch)
    if pruned.weight_masks:
        save_file({k: v.contiguous() for k, v in pruned.weight_masks.items()}, folder.masks)


def _load_pruned_structure(folder: ModelFolder) -> PrunedModel:
    """The pruned architecture saved by :func:`_save_pruned` (weights come from the checkpoint)."""
    spec = ArchSpec.load(folder.arch)
    masks = {k: v.bool() for k, v in load_file(folder.masks).items()} if folder.masks.exists() else {}
    return PrunedModel(spec.build(), structured=spec.extra["structured"], weight_masks=masks)


def _measure_latency_ms(model: nn.Module, input_size: tuple[int, ...], repeats: int = 20) -> float:
    """Median wall time (ms) of one batch-1 forward pass on the model's device, after 5 warm-up passes."""
    x = torch.randn(1, *input_size, device=next(model.parameters()).device)
    model.eval()
    return time_models({"model": model}, x, warmup=5, repeats=repeats)["model"]


def objectives_of(pruned: PrunedModel, metrics: dict[str, float], dense_params: int) -> dict[str, float]:
    """The trial's objectives: accuracy, and the cost of what was really kept
    (:func:`~p3b_search.cost.kept_cost`: ``params`` counts non-zeros, ``macs`` the shapes, and
    ``nonzero_macs`` what sparse kernels could reach). ``flops`` = 2 x ``macs`` (torch's counting
    convention); ``kept_fraction`` = ``params`` / ``dense_params`` (the unpruned model's parameters)."""
    kept = kept_cost(pruned.model, pruned.weight_masks)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "params": float(kept.params),
            "kept_fraction": kept.params / dense_params, "macs": float(kept.macs),
            "flops": float(FLOPS_PER_MAC * kept.macs), "nonzero_macs": float(kept.nonzero_macs)}


def finetune_epoch_cost(pruned: PrunedModel, dense_params: int) -> dict[str, float]:
    """The pruned model's cost, reported with every fine-tune epoch under the prune stage's names
    and meanings: ``macs`` per image, ``kept_params`` (non-zeros when unstructured) and
    ``keep_ratio`` = ``kept_params`` / ``dense_params`` (so every epoch of both stages carries
    the cost a scheduler ranks on)."""
    kept = kept_cost(pruned.model, pruned.weight_masks)
    return {"macs": float(kept.macs), "kept_params": float(kept.params), "keep_ratio": kept.params / dense_params}


def run_trial(config: TrialConfig, reporter: TrialReporter, workdir: Path,
              resume_from: Path | None = None, measure_latency: bool = False,
              prefixes: Path | None = None) -> dict[str, float]:
    """Run one trial (both stages) and return its objectives: ``top1``, ``top5`` (percent),
    ``params``, ``kept_fraction``, ``macs`` and ``flops`` (per image), ``nonzero_macs``, and ``latency_ms``
    when asked. ``prefixes``: the folder of shared prefixes (None: none are used or published);
    every epoch's metrics then carry ``prefix_shared`` (1: restored from a prefix, not trained)."""
    folder = TrialFolder(Path(workdir))
    checkpoint = folder.checkpoint
    checkpoint_dir = checkpoint.root
    lead = rank_and_world()[0] == 0
    method_cls = get_method(config.method)
    method_config = method_cls.spec.config_cls(**config.method_config)
    training = config.training
    stage = "prune"
    if resume_from is not None:
        resumed = CheckpointFolder(Path(resume_from))
        stage = json.loads(resumed.stage_file.read_text())["stage"]

    seed_everything(training.seed)
    with torch.device("meta"):  # only its input config is read: costs nothing
        probe = create_timm_model(config.model, config.model.num_classes or 2)
    train_loader, val_loader, num_classes = build_loaders(config.data, probe, training.batch_size, training.seed)
    with torch.device("meta"):
        dense_params = model_cost(create_timm_model(config.model, num_classes)).params
    method: PruningMethod = method_cls(method_config, num_classes=num_classes, epochs=training.prune.epochs,
                                       steps_per_epoch=len(train_loader))

    plan: PrefixPlan | None = None
    if prefixes is not None and stage == "prune":
        plan = plan_prefix(Path(prefixes), config, method, len(train_loader), fresh=resume_from is None)

    def on_epoch_end(stage_index: int, cost: dict[str, float] | None = None):
        def report(epoch: int, metrics: dict[str, float], folder: Path | None) -> None:
            if plan is not None and lead and folder is not None and stage_index == 0:
                plan.publish_after(epoch, folder, source=str(folder))
            reporter.report_allocations(method.pop_allocation_rows())
            shared = {} if prefixes is None else {
                "prefix_shared": float(plan is not None and stage_index == 0 and plan.is_restored(epoch))}
            reporter.report_epoch({**metrics, **(cost or {}), "stage": float(stage_index), **shared}, folder)
        return report

    if stage == "prune":
        model = build_model(config.model, num_classes, drop_path_rate=training.drop_path or None,
                            source_task=config.data.source_task)
        method.prepare(model)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if lead:
            _write_json(checkpoint.stage_file, {"stage": "prune"})
        start = plan.start if plan is not None else None
        train_stage(model, train_loader, val_loader, training.prune, training, method,
                    on_epoch_end=on_epoch_end(0), checkpoint_dir=checkpoint_dir,
                    resume_from=start.checkpoint if start is not None else resume_from,
                    report_resumed=start is not None)
        pruned = method.finalize(model)
        reporter.report_allocations(method.pop_allocation_rows())
        if lead:
            _save_pruned(pruned, config, num_classes, checkpoint.pruned)
            _write_json(checkpoint.stage_file, {"stage": "finetune"})
        finetune_resume = None
    else:
        pruned = _load_pruned_structure(resumed.pruned)
        if lead and resumed.root.resolve() != checkpoint_dir.resolve():
            _copy_pruned(resumed.pruned.root, checkpoint.pruned.root)
            _write_json(checkpoint.stage_file, {"stage": "finetune"})
        finetune_resume = resume_from  # its model state is loaded by the training loop
    history = train_stage(pruned.model, train_loader, val_loader, training.finetune, training,
                          method.finetune_hooks(pruned),
                          on_epoch_end=on_epoch_end(1, finetune_epoch_cost(pruned, dense_params)),
                          checkpoint_dir=checkpoint_dir, resume_from=finetune_resume,
                          epoch_offset=training.prune.epochs)
    final = history[-1] if history else evaluate(pruned.model, val_loader, amp=training.amp)
    objectives = objectives_of(pruned, final, dense_params)
    if measure_latency and lead:
        objectives["latency_ms"] = _measure_latency_ms(pruned.model, (3, *resolve_input_config(config.data, probe)["input_size"][1:]))
    if lead:
        _save_final(pruned, config, num_classes, probe, folder, objectives)
    reporter.report_final(objectives)
    return objectives


def _copy_pruned(source: Path, target: Path) -> None:
    import shutil

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def _save_final(pruned: PrunedModel, config: TrialConfig, num_classes: int, probe: nn.Module,
                folder: TrialFolder, objectives: dict[str, float]) -> None:
    input_config = resolve_input_config(config.data, probe)
    preprocessing = {k: input_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    _save_pruned(pruned, config, num_classes, folder.model, classes=num_classes, preprocessing=preprocessing)
    state = {k: v.detach().cpu().contiguous() for k, v in pruned.model.state_dict().items()}
    save_file(state, folder.model.weights)
    _write_json(folder.result, {"state": FINISHED, "objectives": objectives,
                                "config": config.model_dump(mode="json")})
