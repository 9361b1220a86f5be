"""Running a study as the command line does: the search layer's runner, handed the study's
tracker. Search and tracking never import each other; this module (the command-line level)
puts them together."""
from __future__ import annotations

from typing import Any

from p3b_search.search import runner
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig
from p3b_search.study.summary import StudyOutcome
from p3b_search.study.tracking import StudyTracking


def study_tracking(study: StudyConfig) -> StudyTracking | None:
    """MLflow tracking when ``tracking.enabled`` (None otherwise); a one-line error when MLflow
    cannot be imported."""
    if not study.tracking.enabled:
        return None
    try:
        from p3b_search.tracking.study_tracking import MlflowStudyTracking
    except ImportError as error:  # MLflow is an install away: say so before any compute
        raise StudyError(f"{study.source}: tracking.enabled: MLflow tracking is unavailable ({error}): "
                         "install mlflow or set tracking.enabled: false") from None
    return MlflowStudyTracking()


def run_study(study: StudyConfig, **options: Any) -> StudyOutcome:
    """:func:`p3b_search.search.runner.run_study` with the study's own tracker; ``options``:
    that function's keyword arguments (``resume``, ``address``, ``objective``, ``num_cpus``,
    ``verbose``, ``printer``)."""
    return runner.run_study(study, tracking=study_tracking(study), **options)
