"""Where a study keeps its files: one folder ``<output_dir>/<study name>/``.

::

    study.yaml           the effective study file (after command-line overrides)
    optuna.db            Optuna storage (SQLite) unless ``storage`` names another database
    mlflow.db, mlartifacts/   embedded MLflow store unless ``tracking.uri`` names a server
    trials.parquet       one row per trial (see :mod:`p3b_search.study.results`)
    trial_updates/       rows changed since trials.parquet was last rewritten (read_trials merges them)
    allocations.parquet  one row per sub-block per mask update, merged from allocations/
    allocations/         per-trial parts written by the trials themselves
    epochs/              per-trial parts: one row of metrics per epoch (the learning curves)
    pareto/              the front: front.png, front.html, front.parquet, summary.parquet
                         (hypervolume, normalised hypervolume, dense reference)
    trials/<number>/     a trial's working folder: its final model in ``model/``, the checkpoint the
                         driver last accepted in ``saved/`` (where a retried or resumed trial starts)
    ray/                 Ray Tune's storage_path (experiment state, trial checkpoints)
    prefixes/<key>/epoch-<k>/   with ``shared_prefixes``: the state after the first k prune-stage
                         epochs that trials of one key share (see :mod:`p3b_search.training.prefixes`)
    driver.json          the running driver's process and its local Ray session's processes

Multi-node runs need this folder on storage every node sees (NFS, a shared volume).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p3b_search.trial_folder import TrialFolder

RAY_EXPERIMENT = "tune"


@dataclass(frozen=True)
class StudyLayout:
    """Paths inside one study folder ``root``."""

    root: Path

    @property
    def study_file(self) -> Path:
        return self.root / "study.yaml"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def trials_table(self) -> Path:
        return self.root / "trials.parquet"

    @property
    def trial_updates(self) -> Path:
        """``trial_updates/part-<seq>.parquet``: the rows of ``trials.parquet`` changed since the
        driver last rewrote it (see :func:`~p3b_search.study.results.read_trials`)."""
        return self.root / "trial_updates"

    @property
    def allocations_table(self) -> Path:
        return self.root / "allocations.parquet"

    @property
    def allocation_parts(self) -> Path:
        return self.root / "allocations"

    @property
    def epoch_parts(self) -> Path:
        """``epochs/<number>/part-<epoch>.parquet``: each trial's metrics of each epoch."""
        return self.root / "epochs"

    @property
    def pareto_dir(self) -> Path:
        return self.root / "pareto"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def ray_experiment(self) -> Path:
        """Ray Tune's experiment folder (what ``Tuner.restore`` reads)."""
        return self.ray_storage / RAY_EXPERIMENT

    @property
    def prefixes(self) -> Path:
        """``prefixes/``: the shared prefixes of the trials' prune stages (``shared_prefixes``)."""
        return self.root / "prefixes"

    @property
    def driver_record(self) -> Path:
        """``driver.json``: which process drives the study, and the processes of the local Ray
        session it started (what ``resume`` ends when that driver was killed)."""
        return self.root / "driver.json"

    def trial_dir(self, number: int) -> Path:
        """Working folder of Optuna trial ``number``; the final model lands in ``model/``."""
        return self.root / "trials" / f"{number:05d}"

    def trial_folder(self, number: int) -> TrialFolder:
        """The files of trial ``number``'s working folder (what export reads)."""
        return TrialFolder(self.trial_dir(number))

    def default_storage_url(self) -> str:
        return f"sqlite:///{self.optuna_db}"

    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"
