"""The driver's view of a running study: the live session, and the Ray Tune callback that keeps
the Parquet tables, the Pareto summary (study folder and tracker) and the console current.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from ray.tune import Callback

from p3b_search.credentials import redact_secrets
from p3b_search.search.driver_record import DriverRecord
from p3b_search.search.early_stopping import DominatedTrialStopper
from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import MLFLOW_RUN_ID, PREFIX_SHARED, RAY_NODE_ID, TRIAL_NUMBER
from p3b_search.study.front import ParetoSummary, study_pareto
from p3b_search.study.front_report import write_front
from p3b_search.study.results import front, merge_allocations, trials_frame, write_trials
from p3b_search.study.sections import StudyConfig
from p3b_search.study.tracking import StudyTracking
from p3b_search.units import value_text

logger = logging.getLogger(__name__)

TABLE_REFRESH_S = 2.0
HEARTBEAT_S = 60.0
#: The live sessions of this driver process, by study folder. Ray forces this registry: it
#: pickles :class:`StudyProgress` with the run config into the experiment state, and on resume
#: ``Tuner.restore`` brings the callback back from that state (it has no public way to pass a
#: new one), so the restored callback can only find the new process's session by its folder.
_SESSIONS: dict[str, "StudySession"] = {}


@dataclass
class StudySession:
    """The driver's live objects of a running study (kept out of Ray's pickled state)."""

    study: StudyConfig
    optuna_study: optuna.Study
    cost: dict[str, float]
    tracker: StudyTracking | None = None
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    printer: Callable[[str], None] = print
    #: the driver's record, rewritten as Ray spawns processes (None: no local Ray session)
    driver: DriverRecord | None = None
    started: float = field(default_factory=time.monotonic)
    #: trials Ray runs now (None before Ray's first event); Optuna's RUNNING also counts trials
    #: asked by a stopped driver that wait to run again
    running: int | None = None
    frame: pd.DataFrame | None = None
    pareto: ParetoSummary | None = None
    last_said: float = field(default_factory=time.monotonic)
    _last_write: float = 0.0

    def say(self, line: str) -> None:
        self.printer(line)
        self.last_said = time.monotonic()

    def refresh(self, force: bool = True) -> pd.DataFrame:
        """Rebuild and write ``trials.parquet`` (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and self.frame is not None and now - self._last_write < TABLE_REFRESH_S:
            return self.frame
        study = self.study
        self.frame = trials_frame(self.optuna_study.get_trials(deepcopy=False), study.metric_names,
                                  study.directions, self.annotations, default_method=study.method.name)
        write_trials(self.frame, study.layout)
        self.pareto = None  # computed once per new table, when first asked for
        self._last_write = now
        return self.frame

    def summary(self) -> ParetoSummary:
        """The Pareto summary of the current trials table (computed once per refresh)."""
        if self.pareto is None:
            frame = self.frame if self.frame is not None else self.refresh()
            self.pareto = study_pareto(self.study, frame, self.cost)
        return self.pareto

    def publish_front(self) -> None:
        """Merge the allocation parts; write ``pareto/`` in the study folder and, when tracked,
        log the same files and metrics on the parent run."""
        study = self.study
        merge_allocations(study.layout)
        if self.frame is None:
            return
        try:
            if self.tracker is not None:
                self.tracker.publish_front(self.summary(), save_to=study.layout.pareto_dir)
            else:
                write_front(study.layout.pareto_dir, self.summary(), study.name)
        except OSError as error:  # a full disk must not end the study
            logger.warning("could not write the front to %s: %s", study.layout.pareto_dir, error)

    def progress_line(self) -> str:
        frame = self.frame if self.frame is not None else pd.DataFrame(columns=["state", "pareto"])
        counts = frame["state"].value_counts() if len(frame) else {}
        names = self.study.metric_names
        points = front(frame, names) if len(frame) else frame
        shown = " ".join("/".join(value_text(n, row[n]) for n in names) for _, row in points.head(5).iterrows())
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        return (f"[{minutes:02d}:{seconds:02d}] {self.study.name}: {counts.get('COMPLETE', 0)}/{self.study.n_trials} "
                f"done, {self.running if self.running is not None else counts.get('RUNNING', 0)} running, "
                f"{counts.get('PRUNED', 0)} stopped, "
                f"{counts.get('FAIL', 0)} failed | front {int(frame['pareto'].sum()) if len(frame) else 0}"
                + (f" ({'/'.join(names)}): {shown}" if shown else ""))


def _error_line(trial: Any) -> str:
    """The last line of a Ray trial's error (its exception message)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text().strip() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.splitlines() if line.strip()]
    return redact_secrets(lines[-1])[:500] if lines else "the trial raised an error (see the Ray trial logs)"


def _trial_number(trial: Any) -> int | None:
    number = (trial.config or {}).get(TRIAL_NUMBER)
    return None if number is None else int(number)


def open_session(session: "StudySession") -> None:
    """Make ``session`` the one :class:`StudyProgress` callbacks of its study folder report to."""
    _SESSIONS[str(session.study.layout.root)] = session


def close_session(session: "StudySession") -> None:
    _SESSIONS.pop(str(session.study.layout.root), None)


class StudyProgress(Callback):
    """Ray Tune callback of the driver: keeps the Parquet tables and the tracker's front current and
    prints a progress line when a trial ends (and every ``HEARTBEAT_S`` otherwise). Ray pickles
    it with the run config, so it holds only the study folder, the stopper and the scheduler
    (whose ``reasons`` say why a trial was stopped); the live objects are in the driver's
    :class:`StudySession`."""

    def __init__(self, root: str, stopper: DominatedTrialStopper | None = None,
                 scheduler: SuccessiveHalvingScheduler | None = None):
        self.root = root
        self.stopper = stopper
        self.scheduler = scheduler

    def _stop_reason(self, trial: Any) -> str | None:
        """Why the stopper or the scheduler stopped ``trial`` (None: neither did)."""
        for source in (self.stopper, self.scheduler):
            reason = source.reasons.get(trial.trial_id) if source is not None else None
            if reason:
                return reason
        return None

    def _session(self, trials: list[Any], starting: Any = None, ending: Any = None) -> StudySession:
        """The live session, with Ray's count of running trials brought up to date (Ray calls
        back before it marks a ``starting`` trial RUNNING and before an ``ending`` one stops)."""
        session = _SESSIONS[self.root]
        running = {t.trial_id for t in trials if t.status == "RUNNING" and t is not ending}
        session.running = len(running | ({starting.trial_id} if starting is not None else set()))
        return session

    def _note(self, trials: list[Any], trial: Any, starting: bool = False, ending: bool = False,
              **notes: Any) -> StudySession:
        session = self._session(trials, trial if starting else None, trial if ending else None)
        number = _trial_number(trial)
        if number is not None:
            session.annotations.setdefault(number, {}).update(notes)
        return session

    def on_trial_start(self, iteration, trials, trial, **info):
        session = self._note(trials, trial, starting=True, ray_trial_id=trial.trial_id)
        if session.driver is not None:  # Ray may have spawned a worker for it
            try:
                session.driver.write(with_ray_session=True)
            except OSError as error:  # a full disk must not end the study
                logger.warning("could not update %s: %s", session.driver.path, error)
        session.refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        notes = {}
        if isinstance(result.get("epoch"), (int, float)) and math.isfinite(result["epoch"]):
            notes["epochs_done"] = int(result["epoch"]) + 1
            if result.get(PREFIX_SHARED) == 1:  # restored from a shared prefix: the first epochs
                notes["epochs_shared"] = int(result["epoch"]) + 1
        notes.update({key: result[key] for key in (MLFLOW_RUN_ID, RAY_NODE_ID) if result.get(key)})
        self._note(trials, trial, **notes).refresh(force=False)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # Ray registers a reported checkpoint after the result's on_trial_result; the trial's
        # last result is still the one the checkpoint was reported with.
        epoch = (trial.last_result or {}).get("epoch")
        if isinstance(epoch, (int, float)) and math.isfinite(epoch):
            self._note(trials, trial, epochs_saved=int(epoch) + 1).refresh(force=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        session = self._session(trials)
        number = _trial_number(trial)
        notes = session.annotations.setdefault(number, {}) if number is not None else {}
        notes["retries"] = int(notes.get("retries") or 0) + 1
        notes["fail_reason"] = f"retried after: {_error_line(trial)}"
        session.say(f"trial {number}: restarting from its last checkpoint after: {_error_line(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        reason = self._stop_reason(trial)
        session = self._note(trials, trial, ending=True, **({"fail_reason": reason} if reason else {}))
        number = _trial_number(trial)
        if reason and session.tracker is not None and number is not None:
            try:
                session.tracker.end_trial(number, "stopped", reason)
            except Exception as error:  # noqa: BLE001  (a tracking store error must not end the study)
                logger.warning("tracker: could not mark trial %s stopped: %s", number, error)
        self._ended(session)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(self._note(trials, trial, ending=True, fail_reason=_error_line(trial)))

    def on_step_end(self, iteration, trials, **info):
        session = self._session(trials)
        if time.monotonic() - session.last_said > HEARTBEAT_S:
            session.refresh(force=False)
            session.say(session.progress_line())

    def _ended(self, session: StudySession) -> None:
        session.refresh()
        session.publish_front()
        session.say(session.progress_line())

