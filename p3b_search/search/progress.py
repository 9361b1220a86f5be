"""The driver's view of a running study: the live session, and the Ray Tune callback that keeps
the Parquet tables, the Pareto summary (study folder and tracker) and the console current.

What the driver does per trial does not grow with the number of trials: each event updates
only the rows that changed (written as update parts, see :mod:`p3b_search.study.live_table`)
and the front as the trial ends. What is built from every trial is rewritten at a cadence
instead, while trials keep ending: ``trials.parquet`` whole and ``allocations.parquet`` at most
every :data:`TABLES_REFRESH_S` seconds, the ``pareto/`` files, figures and the tracker's front
(metrics, ``pareto`` tags) at most every :data:`FRONT_REFRESH_S` seconds; and everything once
more when the study ends or is interrupted (:meth:`StudySession.flush`).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from ray.tune import Callback

from p3b_search.credentials import redact_secrets
from p3b_search.search.driver_record import DriverRecord
from p3b_search.search.early_stopping import DominatedTrialStopper
from p3b_search.search.session import live_session
from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import FINISHED, MLFLOW_RUN_ID, PREFIX_SHARED, RAY_NODE_ID, TRIAL_NUMBER
from p3b_search.study.front import ParetoSummary, reference_point, study_pareto
from p3b_search.study.front_report import write_front
from p3b_search.study.live_table import LiveTrialsTable
from p3b_search.study.results import PartsMerger
from p3b_search.study.sections import StudyConfig
from p3b_search.study.tracking import StudyTracking
from p3b_search.study.trials_table import (
    COMPLETE,
    EPOCHS_DONE,
    EPOCHS_SAVED,
    EPOCHS_SHARED,
    FAIL,
    FAIL_REASON,
    NEVER_RAN,
    PRUNED,
    RAY_TRIAL_ID,
    RETRIES,
    RUNNING,
)
from p3b_search.units import value_text

logger = logging.getLogger(__name__)

#: Seconds the rows of running trials may lag behind their reports in
#: :func:`~p3b_search.study.results.read_trials` (an ended trial's row never lags).
TABLE_REFRESH_S = 2.0
#: Seconds ``trials.parquet`` (read whole, e.g. with pandas) and ``allocations.parquet`` may lag.
TABLES_REFRESH_S = 10.0
#: Seconds ``pareto/`` (files and figures) and the tracker's front (files, metrics, ``pareto``
#: tags) may lag: drawing the figures costs the more the more trials there are.
FRONT_REFRESH_S = 30.0
HEARTBEAT_S = 60.0


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
    #: Ray's trials that started and have not ended, by trial id (its running count is theirs)
    live: dict[str, Any] = field(default_factory=dict)
    last_said: float = field(default_factory=time.monotonic)
    table: LiveTrialsTable = field(init=False)
    allocations: PartsMerger = field(init=False)
    _noted: set[int] = field(default_factory=set)
    _last_update: float = -math.inf
    _tables_at: tuple[float, int] = (-math.inf, -1)  # when trials.parquet was rewritten, the table's version
    _front_at: tuple[float, int] = (-math.inf, -1)  # when the front was published, the table's version
    _pareto: tuple[int, ParetoSummary] | None = None

    def __post_init__(self) -> None:
        study = self.study
        self.table = LiveTrialsTable(study.layout, study.metric_names, study.directions,
                                     reference_point(study, self.cost), study.method.name)
        self.allocations = PartsMerger(study.layout.allocation_parts, study.layout.allocations_table)

    def say(self, line: str) -> None:
        self.printer(line)
        self.last_said = time.monotonic()

    def note(self, number: int, **notes: Any) -> None:
        """Record the driver's ``notes`` on trial ``number`` (epoch counts, retries, reasons, run ids)."""
        self.annotations.setdefault(number, {}).update(notes)
        self._noted.add(number)

    def refresh(self, force: bool = True) -> None:
        """Bring the trials table's rows up to date (throttled to :data:`TABLE_REFRESH_S` unless
        ``force``): only the rows that changed are written."""
        now = time.monotonic()
        if not force and now - self._last_update < TABLE_REFRESH_S:
            return
        noted, self._noted = self._noted, set()
        self.table.update(self.optuna_study.get_trials(deepcopy=False), self.annotations, noted)
        self._last_update = now

    @property
    def frame(self) -> pd.DataFrame:
        """The whole trials table as of the last :meth:`refresh`."""
        return self.table.frame()

    def summary(self) -> ParetoSummary:
        """The Pareto summary of the trials table (computed once per change of the table)."""
        version = self.table.version
        if self._pareto is None or self._pareto[0] != version:
            self._pareto = version, study_pareto(self.study, self.frame, self.cost, front=self.table.front)
        return self._pareto[1]

    def _due(self, last: tuple[float, int], every_s: float, final: bool) -> bool:
        """Whether the table changed since ``last`` (time, version) and ``every_s`` passed (or ``final``)."""
        at, version = last
        return self.table.version != version and (final or time.monotonic() - at >= every_s)

    def publish(self, final: bool = False) -> None:
        """Rewrite ``trials.parquet`` whole and merge the allocation parts, and publish the front
        (``pareto/`` in the study folder and, when tracked, on the parent run), each when the
        table changed since its last time and its cadence (:data:`TABLES_REFRESH_S`,
        :data:`FRONT_REFRESH_S`) passed; with ``final``, both now."""
        study = self.study
        if self._last_update == -math.inf:
            return  # no rows read yet: nothing to rewrite the files of an earlier run with
        if self._due(self._tables_at, TABLES_REFRESH_S, final):
            self._tables_at = time.monotonic(), self.table.version
            try:  # a full disk must not end the study
                self.table.rewrite()
                self.allocations.merge(final_trials=self.table.ended)
            except OSError as error:
                logger.warning("could not rewrite the tables of %s: %s", study.layout.root, error)
        if self._due(self._front_at, FRONT_REFRESH_S, final):
            self._front_at = time.monotonic(), self.table.version
            try:
                if self.tracker is not None:
                    self.tracker.publish_front(self.summary(), save_to=study.layout.pareto_dir)
                else:
                    write_front(study.layout.pareto_dir, self.summary(), study.name)
            except OSError as error:
                logger.warning("could not write the front to %s: %s", study.layout.pareto_dir, error)

    def flush(self) -> None:
        """Everything up to date now: the rows, then the tables and the front (the end of a run)."""
        self.refresh()
        self._tables_at, self._front_at = (-math.inf, -1), (-math.inf, -1)
        self.publish(final=True)

    def progress_line(self, running: int | None = None) -> str:
        """``[mm:ss] name: 5/8 done, 2 running, ... | front 3 (top1/macs): ...``; ``running``:
        Ray's count of running trials (None: the table's RUNNING rows)."""
        counts, names = self.table.counts, self.study.metric_names
        shown = " ".join("/".join(value_text(n, row[n]) for n in names) for row in self.table.front_rows(5))
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        never_ran = f", {counts[NEVER_RAN]} never ran" if counts[NEVER_RAN] else ""
        return (f"[{minutes:02d}:{seconds:02d}] {self.study.name}: {counts[COMPLETE]}/{self.study.n_trials} "
                f"done, {running if running is not None else counts[RUNNING]} running, "
                f"{counts[PRUNED]} stopped, {counts[FAIL]} failed{never_ran} | front {len(self.table.front.numbers)}"
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


class StudyProgress(Callback):
    """Ray Tune callback of the driver: keeps the Parquet tables and the tracker's front current and
    prints a progress line when a trial ends (and every ``HEARTBEAT_S`` otherwise). Ray pickles
    it with the run config, so it holds only the study's name, the stopper and the scheduler
    (whose ``reasons`` say why a trial was stopped); the live objects are in the driver's
    :class:`StudySession` of that name, opened with :func:`~p3b_search.search.session.open_session`
    (a restored callback finds it there, wherever the study folder is now)."""

    def __init__(self, study_name: str, stopper: DominatedTrialStopper | None = None,
                 scheduler: SuccessiveHalvingScheduler | None = None):
        self.study_name = study_name
        self.stopper = stopper
        self.scheduler = scheduler

    def _stop_reason(self, trial: Any) -> str | None:
        """Why the stopper or the scheduler stopped ``trial`` (None: neither did)."""
        for source in (self.stopper, self.scheduler):
            reason = source.reasons.get(trial.trial_id) if source is not None else None
            if reason:
                return reason
        return None

    @property
    def session(self) -> StudySession:
        return live_session(self.study_name)

    def _note(self, trial: Any, **notes: Any) -> StudySession:
        session = self.session
        number = _trial_number(trial)
        if number is not None:
            session.note(number, **notes)
        return session

    def on_trial_start(self, iteration, trials, trial, **info):
        session = self._note(trial, **{RAY_TRIAL_ID: trial.trial_id})
        session.live[trial.trial_id] = trial
        if session.driver is not None:  # Ray may have spawned a worker for it
            try:
                session.driver.write(with_ray_session=True)
            except OSError as error:  # a full disk must not end the study
                logger.warning("could not update %s: %s", session.driver.path, error)
        session.refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        notes = {}
        if isinstance(result.get("epoch"), (int, float)) and math.isfinite(result["epoch"]):
            notes[EPOCHS_DONE] = int(result["epoch"]) + 1
            if result.get(PREFIX_SHARED) == 1:  # restored from a shared prefix: the first epochs
                notes[EPOCHS_SHARED] = int(result["epoch"]) + 1
        if isinstance(result.get(EPOCHS_SAVED), (int, float)):  # a single-process trial's own checkpoints
            notes[EPOCHS_SAVED] = int(result[EPOCHS_SAVED])
        identity = {key: result[key] for key in (MLFLOW_RUN_ID, RAY_NODE_ID) if result.get(key)}
        number = _trial_number(trial)
        known = self.session.annotations.get(number, {}) if number is not None else {}
        # Written now, not at the cadence: the finishing result (Optuna hears COMPLETE right after
        # it, and a resumed driver never reruns a COMPLETE trial to learn its notes again) and a
        # trial's first run or node id.
        durable = result.get(FINISHED) is True or any(known.get(k) != v for k, v in identity.items())
        self._note(trial, **notes, **identity).refresh(force=durable)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # A data-parallel trial's checkpoints are Ray Train's, registered with Ray Tune: Ray
        # registers one after the result's on_trial_result; the trial's last result is still
        # the one the checkpoint was reported with.
        epoch = (trial.last_result or {}).get("epoch")
        if isinstance(epoch, (int, float)) and math.isfinite(epoch):
            self._note(trial, **{EPOCHS_SAVED: int(epoch) + 1}).refresh(force=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        session = self.session
        number = _trial_number(trial)
        if number is not None:
            retries = int(session.annotations.get(number, {}).get(RETRIES) or 0) + 1
            session.note(number, **{RETRIES: retries, FAIL_REASON: f"retried after: {_error_line(trial)}"})
        session.say(f"trial {number}: restarting from its last checkpoint after: {_error_line(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        reason = self._stop_reason(trial)
        session = self._note(trial, **({FAIL_REASON: reason} if reason else {}))
        number = _trial_number(trial)
        if reason and session.tracker is not None and number is not None:
            try:
                session.tracker.end_trial(number, "stopped", reason)
            except Exception as error:  # noqa: BLE001  (a tracking store error must not end the study)
                logger.warning("tracker: could not mark trial %s stopped: %s", number, error)
        self._ended(session, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(self._note(trial, **{FAIL_REASON: _error_line(trial)}), trial)

    def on_step_end(self, iteration, trials, **info):
        session = self.session
        session.publish()  # what a burst of trial ends left to rewrite, once the cadence allows
        if time.monotonic() - session.last_said > HEARTBEAT_S:
            session.refresh(force=False)
            session.say(session.progress_line(_running(session.live.values())))

    def _ended(self, session: StudySession, trial: Any) -> None:
        session.live.pop(trial.trial_id, None)
        session.refresh()
        session.publish()
        session.say(session.progress_line(_running(session.live.values())))


def _running(trials: Iterable[Any]) -> int:
    """How many of Ray's ``trials`` are running."""
    return sum(1 for t in trials if t.status == t.RUNNING)
