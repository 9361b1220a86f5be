"""Ray Tune's search algorithm around the study's searcher, restored where the study folder is now.

Tune wraps a ``Searcher`` in a :class:`~ray.tune.search.SearchGenerator`, which creates each new
trial from its ``Experiment`` (and that experiment's storage: the absolute path of the study's
``ray/`` folder). It saves that experiment with its state, and on resume ``set_state`` brings it
back as it was saved: after the study folder moved, the trials it creates would point at the old
folder (and fail there, or write there). :class:`StudySearchGenerator` re-creates the restored
experiment, through Tune's public ``Experiment`` API, in the Ray folder of the driver's live
study (:class:`~p3b_search.search.session.LiveStudy`); trials restored from Ray's own state are
moved by ``Tuner.restore`` itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Experiment
from ray.tune.search import Searcher, SearchGenerator

from p3b_search.search.session import LiveStudy
from p3b_search.study.sections import StudyConfig


class StudySearchGenerator(SearchGenerator):
    """``SearchGenerator(searcher)`` whose restored experiment lies in the study's current folder."""

    def __init__(self, searcher: Searcher, study: StudyConfig):
        super().__init__(searcher)
        self.study = LiveStudy(study)

    def set_state(self, state: dict[str, Any]) -> None:
        experiment = state.get("experiment")
        folder = self.study.config.layout.ray_experiment
        if isinstance(experiment, Experiment) and Path(experiment.path) != folder:
            spec = {key: value for key, value in experiment.spec.items() if key != "storage"}
            state = {**state, "experiment": Experiment.from_json(folder.name, {**spec, "storage_path": str(folder.parent)})}
        super().set_state(state)


__all__ = ["StudySearchGenerator"]
