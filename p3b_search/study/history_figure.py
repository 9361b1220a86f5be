"""The hypervolume history as a figure (``<study>/pareto/history.png`` beside ``front.png``):
the front's hypervolume after each ended trial against the trial-epochs spent, with the trials
that ended without a point (stopped early, failed) marked where they spent their epochs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from p3b_search.study.front_figures import DOMINATED_GREY, FRONT_RED
from p3b_search.study.trials_table import COMPLETE, FAIL, PRUNED, STATE

_STATE_MARKERS = {COMPLETE: ("o", FRONT_RED, "finished"), PRUNED: ("x", "#1f4eb4", "stopped early (e.g. at a rung)"),
                  FAIL: ("v", DOMINATED_GREY, "failed")}


def history_png(history: pd.DataFrame, title: str) -> Figure:
    """Step plot of the (normalised, when known) hypervolume against cumulative trial-epochs."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    normalized = len(history) and np.isfinite(history["hypervolume_normalized"].to_numpy(float)).all()
    column = "hypervolume_normalized" if normalized else "hypervolume"
    xs = np.concatenate([[0], history["trial_epochs"].to_numpy(float)])
    ys = np.concatenate([[0.0], history[column].to_numpy(float)])
    ax.step(xs, ys, where="post", c="black", lw=1.2, zorder=2, label="front's hypervolume")
    for state, (marker, colour, label) in _STATE_MARKERS.items():
        rows = history[history[STATE] == state]
        if len(rows):
            ax.scatter(rows["trial_epochs"], rows[column], marker=marker, c=colour, s=22, zorder=3,
                       label=f"{label} ({len(rows)})")
    ax.set_xlabel("trial-epochs spent (epochs trained, summed over the trials in the order they ended)")
    ax.set_ylabel("normalised hypervolume\n(1 = dense accuracy at zero cost)" if normalized
                  else "hypervolume (objective units)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if len(history):
        last = history.iloc[-1]
        value = last[column]
        title += (f": {value:.3f} after {int(last['trial_epochs'])} trial-epochs" if math.isfinite(value) else "")
    else:
        ax.text(0.5, 0.5, "no trial has ended yet", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return fig
