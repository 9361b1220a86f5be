"""``search.py ui``: where a study's runs open in the MLflow UI, and the local UI server."""
from __future__ import annotations

import os
import subprocess
import sys

from p3b_search.credentials import resolve_url
from p3b_search.tracking.client import open_client, ui_url


def experiment_route(tracking_uri: str, experiment_name: str) -> str:
    """The UI route of the experiment's runs ("" when the store holds no such experiment)."""
    experiment = open_client(tracking_uri).get_experiment_by_name(experiment_name)
    return ui_url("", experiment.experiment_id) if experiment is not None else ""


def serve_ui(tracking_uri: str, port: int) -> int:
    """Run ``mlflow ui`` on 127.0.0.1:``port`` for the store at ``tracking_uri`` until Ctrl-C;
    returns its exit status (0 after Ctrl-C). The resolved URI reaches it in its environment
    (``MLFLOW_BACKEND_STORE_URI``), never on its command line, which every user can list."""
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "MLFLOW_BACKEND_STORE_URI": resolve_url(tracking_uri, "tracking.uri")}
    try:
        return subprocess.call(command, env=environment)
    except KeyboardInterrupt:
        return 0
