"""``search.py ui``: where a study's runs open in the MLflow UI, and the local UI server."""
from __future__ import annotations

import subprocess
import sys

from mlflow import MlflowClient

from p3b_search.tracking.client import ui_url


def experiment_route(tracking_uri: str, experiment_name: str) -> str:
    """The UI route of the experiment's runs ("" when the store holds no such experiment)."""
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(experiment_name)
    return ui_url("", experiment.experiment_id) if experiment is not None else ""


def serve_ui(tracking_uri: str, port: int) -> int:
    """Run ``mlflow ui`` on 127.0.0.1:``port`` for the store at ``tracking_uri`` until Ctrl-C;
    returns its exit status (0 after Ctrl-C)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
               "--port", str(port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
