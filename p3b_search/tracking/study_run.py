"""The study's parent run on MLflow (driver side): created or reopened, the Pareto summary it is
given published on it, trials' runs ended when their workers could not, stuck runs cleaned up.

::

    tracker = StudyTracker(uri, experiment_name, study_name, artifact_location)
    with tracker:                                   # Ctrl-C / crash: leftover runs -> KILLED/FAILED
        tracker.start(study_file, space, sampler, {"top1": "maximize", "macs": "minimize"}, resume=False)
        factory = tracker.run_factory()             # the workers open their child runs with it
        ...
        tracker.publish_front(pareto_summary(trials, {"top1": "maximize", "macs": "minimize"}, [0.0, dense_macs]))
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from p3b_search.connection_errors import refused, unreachable
from p3b_search.credentials import MissingVariable, redact_secrets
from p3b_search.errors import first_line
from p3b_search.stores import open_shared_store
from p3b_search.study.front import ParetoSummary
from p3b_search.study.front_figures import save_files
from p3b_search.study.front_report import front_files
from p3b_search.study.trials_table import MLFLOW_RUN_ID, NUMBER
from p3b_search.tracking.client import (
    LOCAL_UI,
    PARENT_TAG,
    PARETO_TAG,
    REASON_TAG,
    RUN_STATUS,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TrackingStoreError,
    check_server,
    json_default,
    log_batch,
    now_ms,
    open_client,
    param,
    quote,
    search_all,
    tag,
    ui_url,
)
from p3b_search.tracking.trial_run import ChildRunFactory

#: Parent-run metrics of the hypervolume history, at step = trial-epochs spent.
HISTORY_METRICS = ("history/hypervolume", "history/hypervolume_normalized")

logger = logging.getLogger(__name__)

ARTIFACT_DIR_PARETO = "pareto"


def _user_fixable(error: BaseException) -> bool:
    """Whether the store's failure is one the user fixes: it cannot be reached, or it refused us."""
    return unreachable(error) is not None or refused(error)


def _unopenable(error: BaseException) -> bool:
    """Whether opening a client failed on the URI itself: a variable it names is unset, MLflow
    has no store for it, or its file's folder is missing."""
    return (isinstance(error, (MissingVariable, FileNotFoundError))
            or isinstance(error, MlflowException) and error.error_code == "INVALID_PARAMETER_VALUE")


class StudyTracker:
    """Driver side: the study's parent run, the Pareto summary published on it, and clean-up of stuck runs.

    ``tracking_uri``: ``sqlite:///<study>/mlflow.db`` (embedded default) or a tracking server
    URL, as the study file writes it (its ``${NAME}`` references are resolved only by the clients
    that connect, here and in the trials). ``artifact_location`` is used when the experiment is
    created (embedded default: ``<study>/mlartifacts``); an existing experiment keeps its own.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, study_name: str,
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.study_name = study_name
        self.artifact_location = artifact_location
        # an SQL store creates its tables here; another study may be creating them too
        try:
            self.client = open_shared_store(lambda: open_client(tracking_uri), tracking_uri, "MLflow tracking store")
        except Exception as error:  # noqa: BLE001  (MLflow, SQLAlchemy and the OS each raise their own)
            if not (_user_fixable(error) or _unopenable(error)):
                raise
            raise self._store_error(error) from None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._closed = False
        self._history_logged: int | None = None  # trial-epochs up to which the history is on the run
        self._child_runs: dict[int, str] = {}  # trial number -> child run id, as far as found
        self._no_child_run: set[int] = set()  # trial numbers a search of the store found no child run of
        self._tagged: set[str] | None = None  # child runs tagged pareto=true (read from the store once)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, study_file: Path, space: Mapping[str, Any], sampler: str,
              objectives: Mapping[str, str] | Sequence[tuple[str, str]], resume: bool = False) -> str:
        """Create the parent run (or, with ``resume``, reuse the study's existing one and fail its
        runs left RUNNING by the interrupted process); returns the parent run id.

        ``space``: parameter name -> its distribution/spec (logged as JSON); ``objectives``:
        name -> "maximize"/"minimize", in the study's order.
        """
        objectives = dict(objectives)
        check_server(self.tracking_uri)
        try:
            self.experiment_id = open_shared_store(self._experiment_id, self.tracking_uri, "MLflow experiment")
            existing = search_all(self.client, self.experiment_id, f"tags.`{STUDY_TAG}` = '{quote(self.study_name)}'")
        except Exception as error:  # noqa: BLE001  (MLflow, SQLAlchemy and the OS each raise their own)
            if not _user_fixable(error):
                raise
            raise self._store_error(error) from None
        if existing and not resume:
            raise TrackingStoreError(
                f"experiment {self.experiment_name!r} already holds study {self.study_name!r} "
                f"(run {existing[0].info.run_id}): resume it, or choose another study name"
            )
        if existing:
            self.parent_run_id = max(existing, key=lambda run: run.info.start_time).info.run_id
            self.fail_stuck_runs("FAILED", "the study process ended while this trial ran (marked on resume)")
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self.client.set_tag(self.parent_run_id, "p3b.resumed_at_ms", now_ms())
        else:
            if resume:
                logger.warning("MLflow: no parent run of study %r in experiment %r; starting a new one",
                               self.study_name, self.experiment_name)
            self._create_parent(Path(study_file), space, sampler, objectives)
        self._closed = False
        atexit.register(self._close_at_exit)
        return self.parent_run_id

    def _store_error(self, error: BaseException) -> TrackingStoreError:
        return TrackingStoreError(
            f"cannot use MLflow tracking store {redact_secrets(self.tracking_uri)!r}: "
            f"{redact_secrets(first_line(error))} "
            "(check tracking.uri in the study file, that the server is running and that it lets this user in)"
        )

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        if experiment.lifecycle_stage != "active":
            raise TrackingStoreError(
                f"MLflow experiment {self.experiment_name!r} is deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set another name"
            )
        return experiment.experiment_id

    def _create_parent(self, study_file: Path, space: Mapping[str, Any], sampler: str,
                       objectives: dict[str, str]) -> None:
        objectives_text = ", ".join(f"{name}:{direction}" for name, direction in objectives.items())
        run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags={
            STUDY_TAG: self.study_name, "p3b.sampler": sampler, "p3b.objectives": objectives_text,
        })
        self.parent_run_id = run.info.run_id
        space_json = {name: json.loads(json.dumps(spec, default=json_default)) for name, spec in space.items()}
        params = [param("sampler", sampler), param("objectives", objectives_text),
                  *(param(f"space.{name}", json.dumps(spec, sort_keys=True)) for name, spec in space_json.items())]
        log_batch(self.client, self.parent_run_id, params=params)
        self.client.log_artifact(self.parent_run_id, str(study_file), "study")
        self.client.log_dict(self.parent_run_id, {
            "study": self.study_name, "sampler": sampler, "objectives": objectives, "space": space_json,
        }, "study/search_space.json")

    def run_factory(self) -> ChildRunFactory:
        """What opens a trial's child run in a worker (plain, picklable)."""
        if self.parent_run_id is None:
            raise RuntimeError("StudyTracker.start() must run before run_factory()")
        return ChildRunFactory(self.tracking_uri, self.experiment_id, self.parent_run_id, self.study_name)

    def child_run_args(self, trial_number: int, params: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of :class:`MlflowTrialReporter` for one trial (plain, picklable)."""
        return self.run_factory().run_args(trial_number, params)

    def end_trial(self, trial_number: int, state: str, reason: str | None = None) -> str | None:
        """Set the end ``state`` (finished / stopped / failed) of a trial whose worker could not,
        e.g. one stopped early by the search or lost with its worker; returns its run id (None
        when the trial has no child run). A run that already ended keeps its status."""
        if state not in RUN_STATUS:
            raise ValueError(f"trial state {state!r}: use one of {', '.join(RUN_STATUS)}")
        runs = search_all(self.client, self.experiment_id,
                           f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{trial_number}'")
        for run in runs:
            if run.info.status == "RUNNING":
                tags = [tag(STATE_TAG, state)] + ([tag(REASON_TAG, reason)] if reason else [])
                log_batch(self.client, run.info.run_id, tags=tags)
                self.client.set_terminated(run.info.run_id, RUN_STATUS[state])
        return runs[0].info.run_id if runs else None

    def fail_stuck_runs(self, status: str = "KILLED", reason: str = "the study stopped before the trial ended") -> list[str]:
        """Mark this study's child runs still RUNNING as ``status`` (KILLED or FAILED), with the
        trial state and ``reason`` as tags; returns their run ids. Runs of other studies in the
        same experiment are never touched (they may be running now)."""
        state = "failed" if status == "FAILED" else "stopped"
        stuck = search_all(self.client, self.experiment_id,
                            f"tags.{PARENT_TAG} = '{self.parent_run_id}' and attributes.status = 'RUNNING'")
        for run in stuck:
            log_batch(self.client, run.info.run_id, tags=[tag(STATE_TAG, state), tag(REASON_TAG, reason)])
            self.client.set_terminated(run.info.run_id, status)
        if stuck:
            logger.warning("MLflow: marked %d run(s) of study %r left RUNNING as %s", len(stuck), self.study_name, status)
        return [run.info.run_id for run in stuck]

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run with ``status`` (FINISHED, KILLED, FAILED) after marking children
        still RUNNING as KILLED. Safe to call twice; store errors only warn."""
        if self._closed or self.parent_run_id is None:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            self.fail_stuck_runs("KILLED", f"the study ended ({status}) before the trial did")
            self.client.set_terminated(self.parent_run_id, status)
        except (MlflowException, OSError) as error:
            logger.warning("MLflow: could not close study run %s: %s", self.parent_run_id, error)

    def _close_at_exit(self) -> None:
        self.close("KILLED")

    def __enter__(self) -> "StudyTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")

    # ----------------------------------------------------------------------------- front
    def run_link(self, run_id: str) -> str:
        """Where ``run_id`` opens in the MLflow UI: on the tracking server, or for the embedded store
        on ``search.py ui``'s default address (:data:`LOCAL_UI`)."""
        server = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
        return ui_url(server, self.experiment_id, run_id)
    def publish_front(self, summary: ParetoSummary, save_to: str | Path | None = None) -> ParetoSummary:
        """Publish ``summary`` (computed by the caller) on the parent run; returns it with each
        finished row's child run id in ``mlflow_run_id``.

        ``summary.finished`` needs a ``number`` (the trial number passed to
        :meth:`child_run_args`) and/or ``mlflow_run_id`` column. Logs
        ``pareto/front.parquet|.html|.png`` and ``pareto/summary.parquet``, the metrics
        ``hypervolume``, ``hypervolume_normalized`` (when the dense accuracy is known),
        ``front_size``, ``trials_finished`` and ``trial_epochs_shared`` (trial-epochs restored
        from shared prefixes) at step = trials finished, and moves the
        ``pareto`` tags (only those of runs that entered or left the front); ``save_to``: write
        the files there (else into a temporary folder) and upload that folder. Store errors only
        warn: the study goes on.
        """
        finished = summary.finished
        if NUMBER not in finished.columns and MLFLOW_RUN_ID not in finished.columns:
            raise ValueError(f"trials table needs a {NUMBER!r} or {MLFLOW_RUN_ID!r} column to find the child runs")
        with contextlib.ExitStack() as stack:
            folder = save_to if save_to is not None else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="p3b-mlflow-"))
            try:
                summary = summary.with_columns(**{MLFLOW_RUN_ID: self._run_ids(finished)})
                self._move_pareto_tags(set(summary.front[MLFLOW_RUN_ID].dropna()))
                save_files(front_files(summary, self.study_name, self.run_link), folder)
                self._publish_front(folder, summary)
            except (MlflowException, OSError) as error:
                logger.warning("MLflow: could not publish the Pareto front of study %r: %s", self.study_name, error)
                if save_to is not None:
                    save_files(front_files(summary, self.study_name), save_to)
        return summary

    def child_run_ids(self) -> dict[int, str]:
        """Trial number -> child run id, for every trial whose worker has started its run (a
        worker learns its run id asynchronously, so the driver may not have it yet)."""
        runs = search_all(self.client, self.experiment_id, f"tags.{PARENT_TAG} = '{self.parent_run_id}'")
        return {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}

    def _run_ids(self, trials: pd.DataFrame) -> list[str | None]:
        """The child run of each row: its ``mlflow_run_id`` when given, else found by trial number
        (the store is searched only for a row whose run is not known yet and was not looked for:
        a trial that never had a run, e.g. one that failed before its first epoch, is looked for
        once, not at every publish)."""
        given = trials[MLFLOW_RUN_ID] if MLFLOW_RUN_ID in trials.columns else pd.Series([None] * len(trials))
        numbers = trials[NUMBER] if NUMBER in trials.columns else pd.Series([None] * len(trials))
        numbers = [None if pd.isna(n) else int(n) for n in numbers]
        known = [isinstance(run_id, str) and bool(run_id) for run_id in given]
        wanted = {n for k, n in zip(known, numbers) if not k and n is not None and n not in self._child_runs}
        if wanted - self._no_child_run:
            self._child_runs = self.child_run_ids()
            self._no_child_run |= wanted - self._child_runs.keys()
        return [run_id if k else self._child_runs.get(n) for run_id, k, n in zip(given, known, numbers)]

    def _move_pareto_tags(self, front_run_ids: set[str]) -> None:
        """``pareto=true`` on the front's child runs, ``pareto=false`` on those pushed off it (the
        tagged runs are read from the store once, then kept here)."""
        if self._tagged is None:
            self._tagged = {run.info.run_id for run in search_all(
                self.client, self.experiment_id,
                f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.{PARETO_TAG} = 'true'")}
        for run_id in self._tagged - front_run_ids:
            self.client.set_tag(run_id, PARETO_TAG, "false")
            self._tagged.discard(run_id)
        for run_id in front_run_ids - self._tagged:
            self.client.set_tag(run_id, PARETO_TAG, "true")
            self._tagged.add(run_id)

    def _history_metrics(self, history: pd.DataFrame, timestamp: int) -> list[Metric]:
        """The hypervolume history's new points as metrics at step = trial-epochs spent
        (``history/hypervolume``, ``history/hypervolume_normalized``), so the MLflow UI charts the
        hypervolume against compute; points already on the run (also before a resume) are skipped."""
        if self._history_logged is None:
            logged = self.client.get_metric_history(self.parent_run_id, HISTORY_METRICS[0])
            self._history_logged = max((m.step for m in logged), default=-1)
        new = history[history["trial_epochs"] > self._history_logged].drop_duplicates("trial_epochs", keep="last")
        metrics = []
        for name in HISTORY_METRICS:
            column = name.removeprefix("history/")
            metrics += [Metric(name, float(value), timestamp, int(step))
                        for step, value in zip(new["trial_epochs"], new[column]) if np.isfinite(value)]
        if len(new):
            self._history_logged = int(new["trial_epochs"].max())
        return metrics

    def _publish_front(self, folder: str | Path, state: ParetoSummary) -> None:
        n = len(state.finished)
        self.client.log_artifacts(self.parent_run_id, str(folder), ARTIFACT_DIR_PARETO)
        timestamp = now_ms()
        metrics = [Metric("hypervolume", state.hypervolume, timestamp, n),
                   Metric("front_size", float(state.on_front.sum()), timestamp, n),
                   Metric("trials_finished", float(n), timestamp, n),
                   Metric("trial_epochs_shared", float(state.trial_epochs_shared), timestamp, n)]
        if np.isfinite(state.hypervolume_normalized):
            metrics.append(Metric("hypervolume_normalized", state.hypervolume_normalized, timestamp, n))
        metrics += self._history_metrics(state.history, timestamp)
        front = state.front
        log_batch(self.client, self.parent_run_id, metrics=metrics,
                   tags=[tag("pareto.knee_run_id", run_id) for run_id in front.loc[front["knee"], MLFLOW_RUN_ID]
                         if isinstance(run_id, str)])

