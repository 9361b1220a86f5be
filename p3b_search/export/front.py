"""The study's front with the exported trial marked: ``front.png`` of an exported folder, shown
in its model card."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

FRONT_FILE = "front.png"


def front_with_choice(study_dir: str | Path, trial: int) -> tuple[Figure, bool]:
    """The front figure of the study in ``study_dir`` (dense reference, knee) with trial
    ``trial`` ringed; returns (figure, whether the trial is a point of the figure: a dense
    or unfinished trial is not)."""
    from p3b_search.search.results import read_trials
    from p3b_search.search.runner import dense_cost, front_of, reference_point, study_from_folder
    from p3b_search.tracking.front_figures import pareto_png

    study = study_from_folder(study_dir)
    frame = read_trials(study.layout)
    cost = dense_cost(study)
    state, dense = front_of(study, frame, reference_point(study, cost), cost)
    rows = state.finished.index[state.finished["number"] == trial] if len(state.finished) else []
    chosen = int(rows[0]) if len(rows) else None
    title = f"{study.name}: exported trial {trial} on the front of {len(state.finished)} finished trials"
    directions = dict(zip(study.metric_names, study.directions))
    return pareto_png(state.finished, directions, state.on_front, state.knee, title, dense=dense,
                      chosen=chosen), chosen is not None
