"""A study's results in one object: its trials table, the Pareto summary, and how the run ended.

:func:`study_summary` reads it from the study folder (also while the study runs); the runner
returns the same :class:`StudyOutcome` when a run ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from p3b_search.study.dense import DenseReference
from p3b_search.study.front import ParetoSummary, study_pareto
from p3b_search.study.results import front, read_trials
from p3b_search.study.sections import StudyConfig
from p3b_search.study.trials_table import STATE, study_done


@dataclass
class StudyOutcome:
    """What a run left: the trials table, its :class:`ParetoSummary`, whether the run was
    interrupted (``search.py resume`` continues it: fewer than ``n_trials`` trials ran to their
    end, :func:`~p3b_search.study.trials_table.study_done`; read from the folder while the study
    runs, that is True too) and how long it ran (seconds; NaN when read from the folder)."""

    study: StudyConfig
    trials: pd.DataFrame
    pareto: ParetoSummary
    interrupted: bool
    elapsed_s: float = math.nan

    @property
    def front(self) -> pd.DataFrame:
        """The trials table's rows on the front, best first objective first."""
        return front(self.trials, self.study.metric_names) if len(self.trials) else self.trials

    @property
    def hypervolume(self) -> float:
        """Against :attr:`reference`, in objective units."""
        return self.pareto.hypervolume

    @property
    def hypervolume_normalized(self) -> float:
        """Normalised by the box up to the dense reference's ideal point (1.0 = dense accuracy at
        zero cost; NaN when the dense accuracy is unknown)."""
        return self.pareto.hypervolume_normalized

    @property
    def reference(self) -> list[float]:
        """The hypervolume's reference point, per objective."""
        return list(self.pareto.reference)

    @property
    def dense(self) -> DenseReference | None:
        return self.pareto.dense

    @property
    def trial_epochs_shared(self) -> int:
        """Trial-epochs restored from shared prefixes instead of trained (``shared_prefixes``)."""
        return self.pareto.trial_epochs_shared


def study_summary(study: StudyConfig) -> StudyOutcome:
    """The study's current trials and front, read from its folder (works while it runs)."""
    frame = read_trials(study.layout)
    return StudyOutcome(study, frame, study_pareto(study, frame), not study_done(frame[STATE], study.n_trials))


def study_finished(study: StudyConfig) -> bool:
    """Whether the study's folder holds ``n_trials`` trials that ran to their end (samples that
    never ran do not count), as the runner counts them
    (:func:`~p3b_search.study.trials_table.study_done`)."""
    return study_done(read_trials(study.layout)[STATE], study.n_trials)
