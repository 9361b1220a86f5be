"""The MLflow model registry step of an export (``search.py export --register NAME``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from p3b_search.credentials import MissingVariable, redact_secrets, resolve_url
from p3b_search.errors import RegistryError, first_line

BEST_ALIAS = "best"


def register_model(model: nn.Module, input_example: np.ndarray, tracking_uri: str, run_id: str, model_name: str,
                   card_files: list[Path]) -> int:
    """Log ``model`` (pt2, with ``input_example``: a batch of inputs) into run ``run_id``, log
    ``card_files`` under ``export/``, register it as ``model_name`` and point the alias ``best``
    at the new version; returns the version. The run keeps the status it ended with. Raises
    :class:`~p3b_search.errors.RegistryError`. This is the ``registrar`` that
    :func:`p3b_search.export.writer.export_trial` takes."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        resolved = resolve_url(tracking_uri, "tracking.uri")
    except MissingVariable as error:
        raise RegistryError(f"--register: {error}") from None
    client = MlflowClient(resolved)
    try:
        status = client.get_run(run_id).info.status
    except MlflowException as error:
        raise RegistryError(f"--register: MLflow run {run_id} not found in {redact_secrets(tracking_uri)} "
                            f"({redact_secrets(first_line(error))})") from None
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(resolved)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name="model", serialization_format="pt2",
                                            input_example=input_example, registered_model_name=model_name)
            for path in card_files:
                mlflow.log_artifact(str(path), "export")
        client.set_terminated(run_id, status)  # reopening the run must not change how it ended
        version = int(info.registered_model_version)
        client.set_registered_model_alias(model_name, BEST_ALIAS, version)
    except MlflowException as error:
        raise RegistryError(f"--register {model_name}: MLflow refused ({redact_secrets(first_line(error))}); the "
                            "exported folder is complete, only the registration failed") from None
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return version
