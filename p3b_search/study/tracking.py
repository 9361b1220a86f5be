"""What the search layer needs from a study tracker, so that it never imports one.

The runner (``p3b_search.search.runner``) drives a :class:`StudyTracking` it is given; the
MLflow implementation lives in ``p3b_search.tracking`` and the command line
(``p3b_search.launch``) passes it in. A tracker receives a computed
:class:`~p3b_search.study.front.ParetoSummary` and publishes it; it never computes a front.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from p3b_search.reporting import TrialReporter
from p3b_search.study.front import ParetoSummary
from p3b_search.study.sections import StudyConfig


class TrialRunFactory(Protocol):
    """Picklable (Ray sends it to every worker): ``factory(trial_number, params, tags)`` opens the
    trial's run, with ``tags`` (e.g. the Ray node), as a :class:`TrialReporter` context manager
    that ends the run on exit."""

    def __call__(self, number: int, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None) -> AbstractContextManager[TrialReporter]: ...


class StudyTracking(Protocol):
    """The driver's side of a study tracker.

    ``start`` opens (or, with ``resume``, reopens) the study's record and returns the factory
    of its trial runs; ``publish_front`` shows the summary (and writes the same files into
    ``save_to``); ``end_trial`` ends a trial's run its worker could not end (stopped early);
    ``close`` ends the study's record with ``status`` (FINISHED, KILLED, FAILED).
    ``start`` raises :class:`~p3b_search.study.messages.StudyError` for a store it cannot use.
    """

    def start(self, study: StudyConfig, resume: bool) -> TrialRunFactory: ...

    def publish_front(self, summary: ParetoSummary, save_to: Path | None = None) -> ParetoSummary: ...

    def end_trial(self, number: int, state: str, reason: str | None = None) -> Any: ...

    def close(self, status: str = "FINISHED") -> None: ...
