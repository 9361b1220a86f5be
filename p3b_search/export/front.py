"""The study's front with the exported trial marked: ``front.png`` of an exported folder, shown
in its model card."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from p3b_search.study.front import study_pareto
from p3b_search.study.front_figures import pareto_png
from p3b_search.study.loading import study_from_folder
from p3b_search.study.results import read_trials
from p3b_search.study.trials_table import NUMBER

FRONT_FILE = "front.png"


def front_with_choice(study_dir: str | Path, trial: int) -> tuple[Figure, bool]:
    """The front figure of the study in ``study_dir`` (dense reference, knee) with trial
    ``trial`` ringed; returns (figure, whether the trial is a point of the figure: a dense
    or unfinished trial is not)."""
    study = study_from_folder(study_dir)
    summary = study_pareto(study, read_trials(study.layout))
    finished = summary.finished
    rows = finished.index[finished[NUMBER] == trial] if len(finished) else []
    chosen = int(rows[0]) if len(rows) else None
    title = f"{study.name}: exported trial {trial} on the front of {len(finished)} finished trials"
    return pareto_png(finished, dict(summary.directions), summary.on_front, summary.knee, title, dense=summary.dense,
                      chosen=chosen), chosen is not None
