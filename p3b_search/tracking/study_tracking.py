"""MLflow as the study's tracker: the :class:`~p3b_search.study.tracking.StudyTracking` the
command line hands to the runner (the search layer never imports this package)."""
from __future__ import annotations

import logging
from pathlib import Path

from p3b_search.study.front import ParetoSummary
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig
from p3b_search.tracking.client import TrackingStoreError
from p3b_search.tracking.moved_store import follow_moved_folder
from p3b_search.tracking.study_run import StudyTracker
from p3b_search.tracking.trial_run import ChildRunFactory

logger = logging.getLogger(__name__)


class MlflowStudyTracking:
    """The study's parent run (opened by :meth:`start`), its front, its trials' child runs."""

    def __init__(self) -> None:
        self.tracker: StudyTracker | None = None

    def start(self, study: StudyConfig, resume: bool) -> ChildRunFactory:
        """Open the study's parent run (embedded store: in the study folder, its artifact
        locations moved with the folder; reopened with ``resume``). A store the user must fix
        (:class:`TrackingStoreError`) is a one-line :class:`StudyError`; any other error is
        raised with its traceback."""
        layout = study.layout
        embedded = study.tracking.uri is None
        if embedded and resume:
            moved_from = follow_moved_folder(layout.mlflow_db, study.name, layout.mlflow_artifacts)
            if moved_from is not None:
                logger.info("MLflow: the study folder moved; artifact locations %s -> %s", moved_from,
                            layout.mlflow_artifacts)
        space = {key: dim.model_dump() for key, dim in study.search_space.items()}
        try:
            self.tracker = StudyTracker(study.tracking_uri, experiment_name=study.name, study_name=study.name,
                                        artifact_location=layout.mlflow_artifacts.as_uri() if embedded else None)
            self.tracker.start(layout.study_file, space, study.sampler.name,
                               dict(zip(study.metric_names, study.directions)), resume=resume)
        except TrackingStoreError as error:
            raise StudyError(f"{study.source}: tracking: {error}") from None
        return self.tracker.run_factory()

    def publish_front(self, summary: ParetoSummary, save_to: Path | None = None) -> ParetoSummary:
        return self._started().publish_front(summary, save_to)

    def end_trial(self, number: int, state: str, reason: str | None = None) -> str | None:
        return self._started().end_trial(number, state, reason)

    def close(self, status: str = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.close(status)

    def _started(self) -> StudyTracker:
        if self.tracker is None:
            raise RuntimeError("MlflowStudyTracking.start() must run first")
        return self.tracker
