"""What runs inside a Ray worker: one trial of the objective, its reports forwarded to Ray Tune,
the allocation Parquet parts and (when the study is tracked) its run on the tracker, opened by
the :class:`~p3b_search.study.tracking.TrialRunFactory` the driver passed in.

A trial's per-epoch results carry the objective's metrics plus ``trial_finished = False`` and
the objective keys ``objective_<name> = NaN``; only the last result, sent after the objective
returned, carries ``trial_finished = True`` and the real objective values. The searcher tells
Optuna COMPLETE only for that result (see :mod:`p3b_search.search.searcher`). The NaN
placeholders exist because Ray Tune checks that every result carries the searcher's metrics.
With ``shared_prefixes`` the objective is handed the study's ``prefixes/`` folder (``prefixes=``);
an epoch restored from a shared prefix carries ``prefix_shared = 1``.

A single-process trial reports its epochs to Ray Tune without checkpoints and keeps the ones the
driver accepted in its own folder (:mod:`p3b_search.search.saved_checkpoints`): a retried or
resumed trial starts from the newest; each result carries ``epochs_saved``, the epochs it covers.

``workers_per_trial > 1``: the Tune trial launches a Ray Train ``TorchTrainer`` whose workers
(gloo on CPU, NCCL on GPU) all run the objective under ``torch.distributed``; rank 0 forwards
reports, writes allocation parts and logs to the tracker. Reducing pruning statistics across ranks
is the methods' job (``torch.distributed.all_reduce`` when a process group exists).
"""
from __future__ import annotations

import importlib
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from p3b_search.reporting import TrialReporter
from p3b_search.search.saved_checkpoints import SAVED_DIR, SavedCheckpoints
from p3b_search.study.results import TrialPartWriter
from p3b_search.study.sections import StudyConfig
from p3b_search.study.tracking import TrialRunFactory
from p3b_search.study.trials import trial_config

# result keys named as the trials table's columns they fill: the trial's child run, the Ray node a
# trial (attempt) runs on, the epochs covered by its newest saved checkpoint when it reported
from p3b_search.study.trials_table import EPOCHS_SAVED, MLFLOW_RUN_ID, RAY_NODE_ID

TRIAL_NUMBER = "trial_number"
FINISHED = "trial_finished"
OBJECTIVE_PREFIX = "objective_"
PREFIX_SHARED = "prefix_shared"  # an epoch's metric: 1 when restored from a shared prefix, not trained
DEFAULT_OBJECTIVE = "objectives.prune_finetune:run_trial"

ReportFn = Callable[..., None]


def load_objective(reference: str) -> Callable[..., dict[str, float]]:
    """``"package.module:function"`` -> the function (imported in the worker)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name or "run_trial")


def objective_key(name: str) -> str:
    """Result key of objective ``name`` (NaN until the trial finished)."""
    return f"{OBJECTIVE_PREFIX}{name}"


class TuneTrialReporter(TrialReporter):
    """Forwards one trial's reports: per-epoch results (+ checkpoint) to Ray, allocation rows and
    the epoch's metrics to Parquet parts, everything to ``downstream`` (the tracker's trial run)
    when given.

    Allocation rows received before the report of epoch ``e`` are written as part ``e`` of
    ``writer``, the epoch's metrics as part ``e`` of ``epoch_writer``; the first epoch reported
    after a restart drops both writers' parts from that epoch on (see
    :class:`~p3b_search.study.results.TrialPartWriter`).
    """

    def __init__(self, report: ReportFn, metric_names: list[str], writer: TrialPartWriter | None = None,
                 downstream: TrialReporter | None = None, node_id: str | None = None,
                 epoch_writer: TrialPartWriter | None = None):
        super().__init__()
        self._node_id = node_id
        self._report = report
        self._metric_names = metric_names
        self._writer = writer
        self._epoch_writer = epoch_writer
        self._downstream = downstream
        self._pending: list[dict[str, Any]] = []
        self._last_epoch: int | None = None

    def _extras(self) -> dict[str, Any]:
        run_id = getattr(self._downstream, "run_id", None)
        extras = {MLFLOW_RUN_ID: run_id, RAY_NODE_ID: self._node_id}
        return {key: value for key, value in extras.items() if value}

    def report_epoch(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        super().report_epoch(metrics, checkpoint_dir)
        epoch = int(metrics.get("epoch", len(self.epochs) - 1))
        if self._last_epoch is None:
            for writer in (self._writer, self._epoch_writer):
                if writer is not None:
                    writer.clear_from(epoch)
        if self._writer is not None:
            self._writer.write(self._pending, epoch)
        if self._epoch_writer is not None:
            self._epoch_writer.write([{**metrics, "epoch": epoch}], epoch)
        self._pending = []
        self._last_epoch = epoch
        if self._downstream is not None:
            self._downstream.report_epoch(metrics, checkpoint_dir)
        result = {**metrics, FINISHED: False, **{objective_key(m): math.nan for m in self._metric_names},
                  **self._extras()}
        self._report(result, checkpoint_dir)

    def report_allocations(self, rows: list[dict[str, Any]]) -> None:
        super().report_allocations(rows)
        self._pending.extend(rows)
        if self._downstream is not None:
            self._downstream.report_allocations(rows)

    def report_final(self, metrics: dict[str, float]) -> None:
        super().report_final(metrics)
        if self._downstream is not None:
            self._downstream.report_final(metrics)

    def finish(self, objectives: dict[str, float]) -> None:
        """The trial's last result: ``trial_finished`` and the objective values."""
        if self._writer is not None:
            self._writer.write(self._pending, 0 if self._last_epoch is None else self._last_epoch + 1)
        self._pending = []
        values = {objective_key(m): float(objectives[m]) if m in objectives else math.nan
                  for m in self._metric_names}
        self._report({**objectives, FINISHED: True, **values, **self._extras()}, None)


class SavingTuneReport:
    """Ray Tune's report of a single-process trial that keeps its accepted checkpoints in
    ``saved`` (see :mod:`p3b_search.search.saved_checkpoints`): the result goes to Ray without
    the checkpoint, and once Ray's report returns (the driver accepted the epoch) the
    checkpoint folder is saved."""

    def __init__(self, saved: SavedCheckpoints):
        self.saved = saved
        latest = saved.latest()
        self.epochs_saved = latest[0] + 1 if latest is not None else 0

    def __call__(self, result: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        tune.report({**result, EPOCHS_SAVED: self.epochs_saved})
        if checkpoint_dir is not None:
            epoch = int(result["epoch"])
            self.saved.save(Path(checkpoint_dir), epoch)
            self.epochs_saved = epoch + 1


def _train_report(result: dict[str, Any], checkpoint_dir: Path | None) -> None:
    import ray.train

    rank0 = ray.train.get_context().get_world_rank() == 0
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir and rank0 else None
    ray.train.report(result, checkpoint=checkpoint)


def _ray_node_id() -> str | None:
    """Id of the Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def run_objective(
    config: dict[str, Any],
    study: StudyConfig,
    trial_runs: TrialRunFactory | None,
    objective: str,
    report: ReportFn,
    checkpoint: Any,
    lead: bool = True,
) -> None:
    """Run the objective for one trial's Ray config and report through ``report``.

    ``trial_runs``: opens the trial's run on the study tracker (None: untracked);
    ``checkpoint``: the folder (a ``Path``) or Ray checkpoint to resume from (None for a fresh
    start); ``lead``: this process writes allocation parts and the tracker's run (rank 0).
    """
    run = load_objective(objective)  # first: importing it may register methods
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER}
    number = int(config[TRIAL_NUMBER])
    trial = trial_config(study, params)
    workdir = study.layout.trial_dir(number)
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"measure_latency": True} if "latency_ms" in study.metric_names else {}
    if study.shared_prefixes:
        kwargs["prefixes"] = study.layout.prefixes
    node_id = _ray_node_id()
    with ExitStack() as stack:
        downstream = None
        if trial_runs is not None and lead:
            tags = {RAY_NODE_ID: node_id} if node_id else None
            downstream = stack.enter_context(trial_runs(number, params, tags))
        writer, epoch_writer = ((TrialPartWriter(study.layout.allocation_parts, number),
                                 TrialPartWriter(study.layout.epoch_parts, number)) if lead else (None, None))
        reporter = TuneTrialReporter(report, study.metric_names, writer, downstream, node_id, epoch_writer)
        resume_from = (checkpoint if isinstance(checkpoint, Path) or checkpoint is None
                       else Path(stack.enter_context(checkpoint.as_directory())))
        objectives = run(trial, reporter, workdir, resume_from, **kwargs)
        reporter.finish(objectives)


def tune_trainable(config: dict[str, Any], study: StudyConfig, trial_runs: TrialRunFactory | None,
                   objective: str) -> None:
    """The Ray Tune function trainable of a single-process trial: it starts from the trial's
    newest saved checkpoint (a retried or resumed trial) or from scratch."""
    import torch

    torch.set_num_threads(max(1, int(study.resources_per_trial.cpu)))
    saved = SavedCheckpoints(study.layout.trial_dir(int(config[TRIAL_NUMBER])) / SAVED_DIR)
    latest = saved.latest()
    run_objective(config, study, trial_runs, objective, SavingTuneReport(saved), latest[1] if latest else None)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial."""
    import ray.train
    import torch

    study = loop_config["study"]
    torch.set_num_threads(max(1, int(study.resources_per_trial.cpu)))
    rank0 = ray.train.get_context().get_world_rank() == 0
    run_objective(loop_config["config"], study, loop_config["trial_runs"], loop_config["objective"],
                  _train_report, ray.train.get_checkpoint(), lead=rank0)


def data_parallel_trainable(config: dict[str, Any], study: StudyConfig, trial_runs: TrialRunFactory | None,
                            objective: str) -> None:
    """The Ray Tune trainable of a ``workers_per_trial > 1`` trial: a ``TorchTrainer`` run.

    Ray Train V2 restores the run's latest checkpoint by itself when a run of the same name and
    storage path exists (a retried or resumed trial), and retries failed workers up to
    ``max_failures`` times; rank 0's results reach Tune through ``TuneReportCallback``.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = study.resources_per_trial
    number = int(config[TRIAL_NUMBER])
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": dict(config), "study": study,
                           "trial_runs": trial_runs, "objective": objective},
        torch_config=TorchConfig(backend="nccl" if resources.gpu > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=study.workers_per_trial, use_gpu=resources.gpu > 0,
                                     resources_per_worker={"CPU": resources.cpu, "GPU": resources.gpu}),
        run_config=RunConfig(name=f"trial-{number:05d}", storage_path=str(study.layout.ray_storage / "train"),
                             failure_config=FailureConfig(max_failures=study.max_failures),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
