"""MLflow client helpers shared by the study's parent run and the trials' child runs: tags,
batched logging within MLflow's request limits, paged search, file upload, UI links.

Child run tags: ``trial_number``, ``state`` (running / finished / stopped / failed),
``state_reason``, ``pareto`` ("true" on the current front, "false" once pushed off it).
Parent run tag ``p3b.study`` names the study; filter the front in the UI with ``tags.pareto = "true"``.
"""
from __future__ import annotations

import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from p3b_search.credentials import redact_secrets, resolve_url
from p3b_search.study.front_figures import save_files
from p3b_search.study.trials_table import PARETO

STUDY_TAG = "p3b.study"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "trial_number"
STATE_TAG = "state"
REASON_TAG = "state_reason"
PARETO_TAG = PARETO  # the trials table's column name: "true" on the current front
#: Trial states and the MLflow run status each ends with.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
#: Where ``search.py ui`` serves an embedded store by default.
LOCAL_UI = "http://127.0.0.1:5000"


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be used for a reason the user fixes (it does not answer, it
    refuses us, MLflow cannot open its URI, the study's name is taken there); the message is one
    line naming the fix. Any other failure is raised as it is, with its traceback."""


def ui_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """Link to an experiment's runs (or one run) in the MLflow UI at ``base_url`` (e.g.
    ``http://127.0.0.1:5000``; "" for the bare route). MLflow 3 opens on its GenAI views
    unless ``workflowType=machine_learning`` is asked for."""
    route = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    base = f"{base_url.rstrip('/')}/" if base_url else ""
    return f"{base}{route}?workflowType=machine_learning"


def open_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client of the store at ``tracking_uri`` as the study file writes it: its
    ``${NAME}`` references are resolved from this process's environment now, and only the
    client holds the result (see :mod:`p3b_search.credentials`)."""
    return MlflowClient(resolve_url(tracking_uri, "tracking.uri"))


def check_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """One-line error at once when a tracking server URL does not answer (MLflow's own client
    would retry for minutes first). Any HTTP answer, even 401/404, counts as reachable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{resolve_url(tracking_uri, 'tracking.uri').rstrip('/')}/health",
                               timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except OSError as error:
        raise TrackingStoreError(
            f"MLflow tracking server {redact_secrets(tracking_uri)} does not answer "
            f"({redact_secrets(str(getattr(error, 'reason', error)))}): start it, or fix tracking.uri in the study file"
        ) from None


def now_ms() -> int:
    return int(time.time() * 1000)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_batch(client: MlflowClient, run_id: str, metrics: Sequence[Metric] = (),
               params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
    """``log_batch`` split into chunks within MLflow's per-request limits."""
    for chunk in chunks(list(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    for chunk in chunks(list(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)
    for chunk in chunks(list(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def param(key: str, value: Any) -> Param:
    return Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])


def tag(key: str, value: Any) -> RunTag:
    return RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH])


def json_default(value: Any) -> Any:
    """JSON for search-space entries: pydantic models, Optuna distributions, paths."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dict__"):
        return {"type": type(value).__name__, **vars(value)}
    return str(value)


def quote(value: str) -> str:
    return value.replace("'", "\\'")


def search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every active run of ``experiment_id`` matching ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def upload_files(client: MlflowClient, run_id: str, files: Mapping[str, Any], artifact_path: str) -> None:
    """Write ``{file name: DataFrame | matplotlib Figure | plotly Figure}`` to a temporary folder
    (:func:`~p3b_search.study.front_figures.save_files`) and log them under ``artifact_path``
    in one call (replacing earlier versions)."""
    with tempfile.TemporaryDirectory(prefix="p3b-mlflow-") as folder:
        save_files(files, folder)
        client.log_artifacts(run_id, folder, artifact_path)

