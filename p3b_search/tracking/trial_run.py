"""A trial's nested child run on MLflow (worker side, a Ray process; nothing global is used,
``MLFLOW_RUN_ID`` is cleared)::

    with ChildRunFactory(...)(number, params) as reporter:   # exception -> state "failed" + reason
        run_trial(config, reporter, workdir)

:class:`ChildRunFactory` is what the driver sends to the workers to open it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from p3b_search.reporting import TrialReporter
from p3b_search.tracking.background import BackgroundSender
from p3b_search.tracking.client import (
    PARENT_TAG,
    REASON_TAG,
    RUN_STATUS,
    STATE_TAG,
    TRIAL_TAG,
    log_batch,
    now_ms,
    param,
    tag,
    upload_files,
)
from p3b_search.tracking.figures import allocation_table, check_allocation_row, keep_ratio_heatmap, sub_block_name

ARTIFACT_DIR_ALLOCATIONS = "allocations"
#: How long a trial's end waits for its buffered MLflow calls (s). It outlasts a tracking server
#: that is down for a minute: a call in flight when it went down is retried inside MLflow's client
#: at growing intervals (2, 4, ... 64 s), so it may go through a minute after the server is back.
FINISH_TIMEOUT_S = 180.0


class MlflowTrialReporter(TrialReporter):
    """Worker side: one nested child run per trial, fed from a background thread.

    Every call returns at once; MLflow calls are batched (one ``log_batch`` per epoch and per
    allocation report) and sent in order by a :class:`BackgroundSender` that retries while the
    store is unreachable, so logging never slows or crashes the trial. Figures and tables are
    made once, in :meth:`finish`. A retried trial (same ``trial_number`` under the same parent)
    continues its earlier child run instead of starting a second one. ``tags`` are set on the run
    when it starts (the runner's: ``ray_node_id``, the node of the trial's latest attempt).

    Metrics: per-epoch keys with step = epoch; ``keep_ratio/L03.attn`` etc. with step = the
    allocation row's ``step`` (mask update); ``final/<objective>``. Artifacts:
    ``allocations/allocations.parquet`` (rewritten at each report, so it survives a crash),
    ``allocations/allocations.json`` (an MLflow table) and ``allocations/keep_ratio_heatmap.png``.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, run_name: str,
                 params: Mapping[str, Any], trial_number: int | None = None,
                 finish_timeout_s: float = FINISH_TIMEOUT_S, tags: Mapping[str, str] | None = None):
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
        log_batch(client, run_id, params=[param(key, value) for key, value in params.items()],
                  tags=[tag(STATE_TAG, "running")] + [tag(key, value) for key, value in extra_tags.items()])
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
        step, timestamp = int(metrics.get("epoch", len(self.epochs) - 1)), now_ms()
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items() if key != "epoch"]
        self._sender.submit(f"epoch {step} metrics", lambda client: log_batch(client, self.run_id, metrics=batch))

    def report_allocations(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            check_allocation_row(row)
        super().report_allocations(rows)
        if not rows:
            return
        timestamp = now_ms()
        batch = [Metric(f"keep_ratio/{sub_block_name(row['layer'], row['kind'])}", float(row["keep_ratio"]),
                        timestamp, int(row["step"])) for row in rows]
        snapshot = list(self.allocations)

        def send(client: MlflowClient) -> None:
            log_batch(client, self.run_id, metrics=batch)
            upload_files(client, self.run_id, {"allocations.parquet": self._allocation_table(snapshot)},
                          ARTIFACT_DIR_ALLOCATIONS)

        self._sender.submit(f"{len(rows)} allocation rows", send)

    def report_final(self, metrics: dict[str, float]) -> None:
        super().report_final(metrics)
        timestamp = now_ms()
        batch = [Metric(f"final/{key}", float(value), timestamp, 0) for key, value in metrics.items()]
        self._sender.submit("final objectives", lambda client: log_batch(client, self.run_id, metrics=batch))

    def _allocation_table(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """Rows of earlier attempts and of this one; a re-emitted (step, sub-block) keeps the latest."""
        table = allocation_table(self._earlier_allocations + rows)
        return table.drop_duplicates(["step", "name"], keep="last").reset_index(drop=True) if len(table) else table

    # ----------------------------------------------------------------------------- end
    def finish(self, state: str = "finished", reason: str | None = None) -> bool:
        """End the run: allocation table + heatmap, ``state`` tag (finished / stopped / failed)
        with ``reason``, run status FINISHED / KILLED / FAILED. Waits up to ``finish_timeout_s``
        for buffered calls; returns False (after a warning) if some could not be sent."""
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
                upload_files(client, self.run_id, {"allocations.parquet": table, "keep_ratio_heatmap.png": heatmap},
                              ARTIFACT_DIR_ALLOCATIONS)
            tags = [tag(STATE_TAG, state)] + ([tag(REASON_TAG, reason)] if reason else [])
            log_batch(client, self.run_id, tags=tags)
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


@dataclass(frozen=True)
class ChildRunFactory:
    """Opens a trial's :class:`MlflowTrialReporter` under the study's parent run (plain fields:
    Ray pickles it to the workers). Implements ``p3b_search.study.tracking.TrialRunFactory``."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_name: str

    def run_args(self, number: int, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`MlflowTrialReporter` for trial ``number``."""
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "run_name": f"{self.study_name}-trial-{number:04d}",
                "trial_number": number, "params": dict(params), "tags": dict(tags or {})}

    def __call__(self, number: int, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None) -> MlflowTrialReporter:
        return MlflowTrialReporter(**self.run_args(number, params, tags))
