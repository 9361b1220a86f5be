"""MLflow logging of a study: one parent run per study (driver side), one nested child run per
trial (worker side), and the Pareto front refreshed on the parent as trials finish.

Driver::

    tracker = StudyTracker(uri, experiment_name, study_name, artifact_location)
    with tracker:                                   # Ctrl-C / crash: leftover runs -> KILLED/FAILED
        tracker.start(study_file, space, sampler, {"top1": "maximize", "macs": "minimize"}, resume=False)
        args = tracker.child_run_args(trial_number, params)   # send to the worker
        ...
        tracker.refresh_front(trials_df, {"top1": "maximize", "macs": "minimize"}, reference_point=[0.0, dense_macs])

Worker (a Ray process; nothing global is used, ``MLFLOW_RUN_ID`` is cleared)::

    with MlflowTrialReporter(**args) as reporter:   # exception -> state "failed" + reason
        run_trial(config, reporter, workdir)

Child run tags: ``trial_number``, ``state`` (running / finished / stopped / failed),
``state_reason``, ``pareto`` ("true" on the current front, "false" once pushed off it), and
the reporter's ``tags`` (the runner's: ``ray_node_id``, the node of the trial's latest attempt).
Parent run tag ``p3b.study`` names the study; filter the front in the UI with ``tags.pareto = "true"``.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from p3b_search.reporting import TrialReporter
from p3b_search.search.dense import DenseReference
from p3b_search.search.frontier import FrontState, front_state
from p3b_search.search.shared_store import open_shared_store
from p3b_search.tracking.background import BackgroundSender
from p3b_search.tracking.figures import allocation_table, check_allocation_row, keep_ratio_heatmap, sub_block_name
from p3b_search.tracking.front_figures import save_files
from p3b_search.tracking.front_report import front_files

logger = logging.getLogger(__name__)

STUDY_TAG = "p3b.study"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "trial_number"
STATE_TAG = "state"
REASON_TAG = "state_reason"
PARETO_TAG = "pareto"
FINISH_TIMEOUT_S = 180.0  # how long a trial's end waits for its buffered MLflow calls
#: Trial states and the MLflow run status each ends with.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
#: Columns of the trials table that ``refresh_front`` reads besides the objectives.
NUMBER_COLUMN, RUN_ID_COLUMN = "number", "mlflow_run_id"
ARTIFACT_DIR_PARETO = "pareto"
#: Where ``search.py ui`` serves an embedded store by default.
LOCAL_UI = "http://127.0.0.1:5000"
ARTIFACT_DIR_ALLOCATIONS = "allocations"


def ui_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """Link to an experiment's runs (or one run) in the MLflow UI at ``base_url`` (e.g.
    ``http://127.0.0.1:5000``; "" for the bare route). MLflow 3 opens on its GenAI views
    unless ``workflowType=machine_learning`` is asked for."""
    route = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    base = f"{base_url.rstrip('/')}/" if base_url else ""
    return f"{base}{route}?workflowType=machine_learning"


def _check_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """One-line error at once when a tracking server URL does not answer (MLflow's own client
    would retry for minutes first). Any HTTP answer, even 401/404, counts as reachable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except OSError as error:
        raise RuntimeError(
            f"MLflow tracking server {tracking_uri} does not answer ({getattr(error, 'reason', error)}): "
            "start it, or fix tracking.uri in the study file"
        ) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_batch(client: MlflowClient, run_id: str, metrics: Sequence[Metric] = (),
               params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
    """``log_batch`` split into chunks within MLflow's per-request limits."""
    for chunk in _chunks(list(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(list(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def _param(key: str, value: Any) -> Param:
    return Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])


def _tag(key: str, value: Any) -> RunTag:
    return RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH])


def _json_default(value: Any) -> Any:
    """JSON for search-space entries: pydantic models, Optuna distributions, paths."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dict__"):
        return {"type": type(value).__name__, **vars(value)}
    return str(value)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every active run of ``experiment_id`` matching ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _upload_files(client: MlflowClient, run_id: str, files: Mapping[str, Any], artifact_path: str) -> None:
    """Write ``{file name: DataFrame | matplotlib Figure | plotly Figure}`` to a temporary folder
    (:func:`~p3b_search.tracking.front_figures.save_files`) and log them under ``artifact_path``
    in one call (replacing earlier versions)."""
    with tempfile.TemporaryDirectory(prefix="p3b-mlflow-") as folder:
        save_files(files, folder)
        client.log_artifacts(run_id, folder, artifact_path)


@dataclass(frozen=True)
class ParetoSnapshot:
    """What one ``refresh_front`` found: ``front`` (the front's rows of the trials table, with the
    child's ``mlflow_run_id`` and a ``knee`` flag), the ``hypervolume`` against the reference point (in
    objective units), how many finished trials it covered, and the hypervolume normalised by the
    box from the reference point to the dense reference's ideal point (NaN when unknown)."""

    front: pd.DataFrame
    hypervolume: float
    trials_finished: int
    hypervolume_normalized: float = float("nan")


class StudyTracker:
    """Driver side: the study's parent run, the Pareto front on it, and clean-up of stuck runs.

    ``tracking_uri``: ``sqlite:///<study>/mlflow.db`` (embedded default) or a tracking server
    URL. ``artifact_location`` is used when the experiment is created (embedded default:
    ``<study>/mlartifacts``); an existing experiment keeps its own.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, study_name: str,
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.study_name = study_name
        self.artifact_location = artifact_location
        # an SQL store creates its tables here; another study may be creating them too
        self.client = open_shared_store(lambda: MlflowClient(tracking_uri), tracking_uri, "MLflow tracking store")
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._closed = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, study_file: Path, space: Mapping[str, Any], sampler: str,
              objectives: Mapping[str, str] | Sequence[tuple[str, str]], resume: bool = False) -> str:
        """Create the parent run (or, with ``resume``, reuse the study's existing one and fail its
        runs left RUNNING by the interrupted process); returns the parent run id.

        ``space``: parameter name -> its distribution/spec (logged as JSON); ``objectives``:
        name -> "maximize"/"minimize", in the study's order.
        """
        objectives = dict(objectives)
        _check_server(self.tracking_uri)
        try:
            self.experiment_id = open_shared_store(self._experiment_id, self.tracking_uri, "MLflow experiment")
            existing = _search_all(self.client, self.experiment_id, f"tags.`{STUDY_TAG}` = '{_quote(self.study_name)}'")
        except MlflowException as error:
            raise RuntimeError(
                f"cannot use MLflow tracking store {self.tracking_uri!r}: {error.message.splitlines()[0]} "
                "(check tracking.uri in the study file, or that the server is running)"
            ) from None
        if existing and not resume:
            raise ValueError(
                f"experiment {self.experiment_name!r} already holds study {self.study_name!r} "
                f"(run {existing[0].info.run_id}): resume it, or choose another study name"
            )
        if existing:
            self.parent_run_id = max(existing, key=lambda run: run.info.start_time).info.run_id
            self.fail_stuck_runs("FAILED", "the study process ended while this trial ran (marked on resume)")
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self.client.set_tag(self.parent_run_id, "p3b.resumed_at_ms", _now_ms())
        else:
            if resume:
                logger.warning("MLflow: no parent run of study %r in experiment %r; starting a new one",
                               self.study_name, self.experiment_name)
            self._create_parent(Path(study_file), space, sampler, objectives)
        self._closed = False
        atexit.register(self._close_at_exit)
        return self.parent_run_id

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        if experiment.lifecycle_stage != "active":
            raise ValueError(
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
        space_json = {name: json.loads(json.dumps(spec, default=_json_default)) for name, spec in space.items()}
        params = [_param("sampler", sampler), _param("objectives", objectives_text),
                  *(_param(f"space.{name}", json.dumps(spec, sort_keys=True)) for name, spec in space_json.items())]
        _log_batch(self.client, self.parent_run_id, params=params)
        self.client.log_artifact(self.parent_run_id, str(study_file), "study")
        self.client.log_dict(self.parent_run_id, {
            "study": self.study_name, "sampler": sampler, "objectives": objectives, "space": space_json,
        }, "study/search_space.json")

    def child_run_args(self, trial_number: int, params: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of :class:`MlflowTrialReporter` for one trial (plain, picklable)."""
        if self.parent_run_id is None:
            raise RuntimeError("StudyTracker.start() must run before child_run_args()")
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "run_name": f"{self.study_name}-trial-{trial_number:04d}",
            "trial_number": trial_number,
            "params": dict(params),
        }

    def end_trial(self, trial_number: int, state: str, reason: str | None = None) -> str | None:
        """Set the end ``state`` (finished / stopped / failed) of a trial whose worker could not,
        e.g. one stopped early by the search or lost with its worker; returns its run id (None
        when the trial has no child run). A run that already ended keeps its status."""
        if state not in RUN_STATUS:
            raise ValueError(f"trial state {state!r}: use one of {', '.join(RUN_STATUS)}")
        runs = _search_all(self.client, self.experiment_id,
                           f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{trial_number}'")
        for run in runs:
            if run.info.status == "RUNNING":
                tags = [_tag(STATE_TAG, state)] + ([_tag(REASON_TAG, reason)] if reason else [])
                _log_batch(self.client, run.info.run_id, tags=tags)
                self.client.set_terminated(run.info.run_id, RUN_STATUS[state])
        return runs[0].info.run_id if runs else None

    def fail_stuck_runs(self, status: str = "KILLED", reason: str = "the study stopped before the trial ended") -> list[str]:
        """Mark this study's child runs still RUNNING as ``status`` (KILLED or FAILED), with the
        trial state and ``reason`` as tags; returns their run ids. Runs of other studies in the
        same experiment are never touched (they may be running now)."""
        state = "failed" if status == "FAILED" else "stopped"
        stuck = _search_all(self.client, self.experiment_id,
                            f"tags.{PARENT_TAG} = '{self.parent_run_id}' and attributes.status = 'RUNNING'")
        for run in stuck:
            _log_batch(self.client, run.info.run_id, tags=[_tag(STATE_TAG, state), _tag(REASON_TAG, reason)])
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

    def refresh_front(self, trials: pd.DataFrame, directions: Mapping[str, str] | Sequence[tuple[str, str]],
                      reference_point: Sequence[float], dense: DenseReference | None = None,
                      save_to: str | Path | None = None) -> ParetoSnapshot:
        """Recompute the front of the finished trials and publish it on the parent run.

        ``trials``: one row per trial with the objective columns named by ``directions``
        (name -> "maximize"/"minimize"), ``number`` (the trial number passed to
        :meth:`child_run_args`) and/or ``run_id``, optionally ``state`` (only ``finished`` /
        ``complete`` rows count), ``method`` (``dense`` rows are the reference, never on the
        front) and any parameter columns (shown on hover). ``reference_point``: per objective,
        the bound of the hypervolume; ``dense``: the dense reference point (drawn, and the
        ideal point of the normalised hypervolume); ``save_to``: also write the files there.

        Logs ``pareto/front.parquet|.html|.png`` and ``pareto/summary.parquet``, the metrics
        ``hypervolume``, ``hypervolume_normalized`` (when the dense accuracy is known),
        ``front_size`` and ``trials_finished`` at step = trials finished, and moves the
        ``pareto`` tags. Store errors only warn: the study goes on.
        """
        directions = dict(directions)
        missing = [name for name in directions if name not in trials.columns]
        if missing:
            raise ValueError(f"trials table lacks objective column(s) {missing}; it has {list(trials.columns)}")
        if NUMBER_COLUMN not in trials.columns and RUN_ID_COLUMN not in trials.columns:
            raise ValueError(f"trials table needs a {NUMBER_COLUMN!r} or {RUN_ID_COLUMN!r} column to find the child runs")
        ideal = dense.ideal(list(directions)) if dense is not None else None
        state = front_state(trials, directions, reference_point, ideal)
        try:
            state = dataclasses.replace(state, finished=state.finished.assign(
                **{RUN_ID_COLUMN: self._run_ids(state.finished)}))
            self._move_pareto_tags(set(state.front[RUN_ID_COLUMN].dropna()))
            files = front_files(state, directions, reference_point, self.study_name, dense, self.run_link)
            self._publish_front(files, state)
        except (MlflowException, OSError) as error:
            logger.warning("MLflow: could not publish the Pareto front of study %r: %s", self.study_name, error)
            files = front_files(state, directions, reference_point, self.study_name, dense)
        if save_to is not None:
            save_files(files, save_to)
        return ParetoSnapshot(front=state.front.reset_index(drop=True), hypervolume=state.hypervolume,
                              trials_finished=len(state.finished),
                              hypervolume_normalized=state.hypervolume_normalized)

    def child_run_ids(self) -> dict[int, str]:
        """Trial number -> child run id, for every trial whose worker has started its run (a
        worker learns its run id asynchronously, so the driver may not have it yet)."""
        runs = _search_all(self.client, self.experiment_id, f"tags.{PARENT_TAG} = '{self.parent_run_id}'")
        return {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}

    def _run_ids(self, trials: pd.DataFrame) -> list[str | None]:
        """The child run of each row: its ``mlflow_run_id`` when given, else found by trial number."""
        by_number = self.child_run_ids()
        given = trials[RUN_ID_COLUMN] if RUN_ID_COLUMN in trials.columns else pd.Series([None] * len(trials))
        numbers = trials[NUMBER_COLUMN] if NUMBER_COLUMN in trials.columns else pd.Series([None] * len(trials))
        return [
            run_id if isinstance(run_id, str) and run_id else by_number.get(None if pd.isna(n) else int(n))
            for run_id, n in zip(given, numbers)
        ]

    def _move_pareto_tags(self, front_run_ids: set[str]) -> None:
        """``pareto=true`` on the front's child runs, ``pareto=false`` on those pushed off it."""
        tagged = {run.info.run_id for run in _search_all(
            self.client, self.experiment_id, f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.{PARETO_TAG} = 'true'")}
        for run_id in tagged - front_run_ids:
            self.client.set_tag(run_id, PARETO_TAG, "false")
        for run_id in front_run_ids - tagged:
            self.client.set_tag(run_id, PARETO_TAG, "true")

    def _publish_front(self, files: Mapping[str, Any], state: FrontState) -> None:
        n = len(state.finished)
        _upload_files(self.client, self.parent_run_id, files, ARTIFACT_DIR_PARETO)
        timestamp = _now_ms()
        metrics = [Metric("hypervolume", state.hypervolume, timestamp, n),
                   Metric("front_size", float(state.on_front.sum()), timestamp, n),
                   Metric("trials_finished", float(n), timestamp, n)]
        if np.isfinite(state.hypervolume_normalized):
            metrics.append(Metric("hypervolume_normalized", state.hypervolume_normalized, timestamp, n))
        front = state.front
        _log_batch(self.client, self.parent_run_id, metrics=metrics,
                   tags=[_tag("pareto.knee_run_id", run_id) for run_id in front.loc[front["knee"], RUN_ID_COLUMN]
                         if isinstance(run_id, str)])


class MlflowTrialReporter(TrialReporter):
    """Worker side: one nested child run per trial, fed from a background thread.

    Every call returns at once; MLflow calls are batched (one ``log_batch`` per epoch and per
    allocation report) and sent in order by a :class:`BackgroundSender` that retries while the
    store is unreachable, so logging never slows or crashes the trial. Figures and tables are
    made once, in :meth:`finish`. A retried trial (same ``trial_number`` under the same parent)
    continues its earlier child run instead of starting a second one.

    Metrics: per-epoch keys with step = epoch; ``keep_ratio/L03.attn`` etc. with step = the
    allocation row's ``step`` (mask update); ``final/<objective>``. Artifacts:
    ``allocations/allocations.parquet`` (rewritten at each report, so it survives a crash),
    ``allocations/allocations.json`` (an MLflow table) and ``allocations/keep_ratio_heatmap.png``.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, run_name: str,
                 params: Mapping[str, Any], trial_number: int | None = None,
                 finish_timeout_s: float = FINISH_TIMEOUT_S,
                 tags: Mapping[str, str] | None = None):
        super().__init__()
        # MLFLOW_RUN_ID overrides parent_run_id in mlflow.start_run (a known bug); a Ray worker may
        # inherit it from the driver's environment. This reporter uses no active run, but code in
        # the trial might: clear it.
        os.environ.pop("MLFLOW_RUN_ID", None)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.trial_number = trial_number
        self.finish_timeout_s = finish_timeout_s
        self.run_id: str | None = None  # set by the sender thread once the store answered
        self._earlier_allocations: list[dict[str, Any]] = []  # from an earlier attempt of this trial
        self._finished = False
        self._sender = BackgroundSender(tracking_uri, label=run_name)
        params, extra_tags = dict(params), dict(tags or {})
        self._sender.submit("start of the child run", lambda client: self._start_run(client, params, extra_tags))

    def _start_run(self, client: MlflowClient, params: dict[str, Any], extra_tags: dict[str, str]) -> None:
        earlier = []
        if self.trial_number is not None:
            earlier = client.search_runs([self.experiment_id], max_results=1, filter_string=(
                f"tags.{PARENT_TAG} = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{self.trial_number}'"))
        if earlier:
            run_id = earlier[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self._earlier_allocations = self._download_allocations(client, run_id)
        else:
            tags = {PARENT_TAG: self.parent_run_id}
            if self.trial_number is not None:
                tags[TRIAL_TAG] = str(self.trial_number)
            run_id = client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
        _log_batch(client, run_id, params=[_param(key, value) for key, value in params.items()],
                   tags=[_tag(STATE_TAG, "running")] + [_tag(key, value) for key, value in extra_tags.items()])
        self.run_id = run_id

    @staticmethod
    def _download_allocations(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
        names = {info.path for info in client.list_artifacts(run_id, ARTIFACT_DIR_ALLOCATIONS)}
        path = f"{ARTIFACT_DIR_ALLOCATIONS}/allocations.parquet"
        if path not in names:
            return []
        with tempfile.TemporaryDirectory(prefix="p3b-mlflow-") as folder:
            table = pd.read_parquet(client.download_artifacts(run_id, path, folder))
        return table.drop(columns="name").to_dict("records")

    # ----------------------------------------------------------------------------- reports
    def report_epoch(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        super().report_epoch(metrics, checkpoint_dir)
        step, timestamp = int(metrics.get("epoch", len(self.epochs) - 1)), _now_ms()
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items() if key != "epoch"]
        self._sender.submit(f"epoch {step} metrics", lambda client: _log_batch(client, self.run_id, metrics=batch))

    def report_allocations(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            check_allocation_row(row)
        super().report_allocations(rows)
        if not rows:
            return
        timestamp = _now_ms()
        batch = [Metric(f"keep_ratio/{sub_block_name(row['layer'], row['kind'])}", float(row["keep_ratio"]),
                        timestamp, int(row["step"])) for row in rows]
        snapshot = list(self.allocations)

        def send(client: MlflowClient) -> None:
            _log_batch(client, self.run_id, metrics=batch)
            _upload_files(client, self.run_id, {"allocations.parquet": self._allocation_table(snapshot)},
                          ARTIFACT_DIR_ALLOCATIONS)

        self._sender.submit(f"{len(rows)} allocation rows", send)

    def report_final(self, metrics: dict[str, float]) -> None:
        super().report_final(metrics)
        timestamp = _now_ms()
        batch = [Metric(f"final/{key}", float(value), timestamp, 0) for key, value in metrics.items()]
        self._sender.submit("final objectives", lambda client: _log_batch(client, self.run_id, metrics=batch))

    def _allocation_table(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """Rows of earlier attempts and of this one; a re-emitted (step, sub-block) keeps the latest."""
        table = allocation_table(self._earlier_allocations + rows)
        return table.drop_duplicates(["step", "name"], keep="last").reset_index(drop=True) if len(table) else table

    # ----------------------------------------------------------------------------- end
    def finish(self, state: str = "finished", reason: str | None = None) -> bool:
        """End the run: allocation table + heatmap, ``state`` tag (finished / stopped / failed)
        with ``reason``, run status FINISHED / KILLED / FAILED. Waits up to ``finish_timeout_s``
        for buffered calls; returns False (after a warning) if some could not be sent.

        The default wait outlasts a tracking server that is down for a minute: a call in flight when
        it went down is retried inside MLflow's client at growing intervals (2, 4, ... 64 s), so
        it may go through only a minute after the server is back."""
        if state not in RUN_STATUS:
            raise ValueError(f"trial state {state!r}: use one of {', '.join(RUN_STATUS)}")
        if self._finished:
            return True
        self._finished = True
        snapshot = list(self.allocations)

        def send(client: MlflowClient) -> None:
            table = self._allocation_table(snapshot)
            if len(table):
                existing = {info.path for info in client.list_artifacts(self.run_id, ARTIFACT_DIR_ALLOCATIONS)}
                if f"{ARTIFACT_DIR_ALLOCATIONS}/allocations.json" not in existing:  # log_table appends
                    client.log_table(self.run_id, table, f"{ARTIFACT_DIR_ALLOCATIONS}/allocations.json")
                heatmap = keep_ratio_heatmap(table, f"{self.run_name}: keep ratio per sub-block")
                _upload_files(client, self.run_id, {"allocations.parquet": table, "keep_ratio_heatmap.png": heatmap},
                              ARTIFACT_DIR_ALLOCATIONS)
            tags = [_tag(STATE_TAG, state)] + ([_tag(REASON_TAG, reason)] if reason else [])
            _log_batch(client, self.run_id, tags=tags)
            client.set_terminated(self.run_id, RUN_STATUS[state])

        self._sender.submit(f"end of the run ({state})", send)
        return self._sender.close(self.finish_timeout_s) == 0

    def __enter__(self) -> "MlflowTrialReporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("finished")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.finish("stopped", f"interrupted ({exc_type.__name__})")
        else:
            self.finish("failed", f"{exc_type.__name__}: {exc}")
