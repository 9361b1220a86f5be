"""Run a study: Optuna proposes, Ray Tune runs the trials, the driver records everything.

Driver-side flow of :func:`run_study`::

    preflight checks (paths, resources, objective importable,
                      the cluster's address answers; the model, weights, GPUs
                      and the dense cost in a child process: the driver
                      imports no torch)                        -> search.preflight, StudyError before any compute
    Ray (local, or --address to join a cluster)                -> StudyError if the cluster refuses us
    shared_prefixes: incomplete prefixes a killed trial left removed -> training.prefixes
    Optuna study in its storage (reference trial enqueued)     -> searcher.open_optuna_study
    the study tracker, when one is given (MLflow parent run)   -> study.tracking.StudyTracking
    Tuner(FrontSafeOptunaSearch behind a ConcurrencyLimiter and a StudySearchGenerator, per-trial resources,
          FailureConfig retries from the last checkpoint, DominatedTrialStopper,
          SuccessiveHalvingScheduler when the study has a scheduler section, else LiveFIFOScheduler)
      or Tuner.restore(...) to resume an interrupted study
    StudyProgress callback: trials.parquet / allocations.parquet, the Pareto summary in pareto/
                            and on the tracker, one progress line per event  -> search.progress
    the end (finished, Ctrl-C, or an error): every table and the front written once more

Resume: ``Tuner.restore`` brings back Ray's trials and the searcher's Ray -> Optuna mapping,
so in-flight trials continue from their last checkpoint under their own Optuna numbers (no
trial lost, none duplicated); the successive-halving scheduler rebuilds its rungs' records from
the study's learning curves. An Optuna trial that Ray never recorded (the driver died between
asking Optuna and saving its state) is run again by the searcher with the same number and
parameters; one still RUNNING once the study has ended is told FAIL, and reads ``NEVER_RAN`` in
the trials table when Ray never had it. Before anything else,
``resume`` ends the processes a killed driver's local Ray session left behind, by the ids in
its ``driver.json`` (see :mod:`p3b_search.search.driver_record`).

The study folder may have moved since the driver stopped: the restored searcher, scheduler,
stopper and callback pickle no path of it and read the study from the driver's session, loaded
from the folder ``resume`` was given (:mod:`p3b_search.search.session`); ``Tuner.restore``
points Ray's trials and their checkpoints at the experiment folder it is given, and the search
algorithm creates new trials there too (:mod:`p3b_search.search.generator`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from p3b_search.search.driver_record import DriverRecord
from p3b_search.search.early_stopping import DominatedTrialStopper, StudyBudget
from p3b_search.search.generator import StudySearchGenerator
from p3b_search.search.live_fifo import LiveFIFOScheduler
from p3b_search.search.preflight import DRIVER_CPU, cluster_lines, preflight
from p3b_search.search.progress import StudyProgress, StudySession
from p3b_search.search.searcher import FrontSafeOptunaSearch, open_optuna_study
from p3b_search.search.session import close_session, open_session
from p3b_search.search.shared_paths import check_shared_paths
from p3b_search.search.successive_halving import SuccessiveHalvingScheduler
from p3b_search.search.trainable import DEFAULT_OBJECTIVE, data_parallel_trainable, tune_trainable
from p3b_search.study.messages import StudyError
from p3b_search.study.results import annotations_of, read_trials
from p3b_search.study.sections import StudyConfig
from p3b_search.study.summary import StudyOutcome
from p3b_search.study.tracking import StudyTracking, TrialRunFactory
from p3b_search.study.trials_table import FAIL_REASON, ended_count, row_state, study_done
from p3b_search.training.prefixes import PrefixCache

logger = logging.getLogger(__name__)
#: Ray Tune's switch off of its default loggers (see :func:`_no_ray_loggers`)
NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def _init_ray(study: StudyConfig, address: str | None, num_cpus: int | None, verbose: bool) -> bool:
    """Start local Ray (or join ``address``); returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        _join_cluster(address, common)
        return True
    project_root = str(Path(__file__).resolve().parents[2])
    paths = [project_root, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    ray.init(num_cpus=num_cpus or os.cpu_count(),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}, **common)
    return True


def _join_cluster(address: str, options: dict[str, Any]) -> None:
    """``ray.init(address=...)``, with a one-line :class:`StudyError` when the cluster refuses us."""
    import ray

    try:
        ray.init(address=address, **options)
    except ConnectionError as error:
        if _refused_token(error):
            # Ray sends a token to an explicitly named cluster only in token mode: a local token
            # is never handed to another cluster by default
            raise StudyError(f"--address {address}: the cluster refused our authentication token: export "
                             "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or "
                             "RAY_AUTH_TOKEN") from None
        raise StudyError(f"--address {address}: cannot join the Ray cluster ({error}): check that "
                         "`ray start --head` runs there") from None


def _refused_token(error: BaseException | None) -> bool:
    """Whether ``error`` or one of its causes is Ray's authentication failure (Ray passes it on
    as an exception object or only as the text of a RuntimeError)."""
    from ray.exceptions import AuthenticationError

    while error is not None:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False



def _quiet_libraries(verbose: bool) -> Callable[[], None]:
    """Silence Ray Tune's tables and Optuna's and MLflow's info lines (the progress line replaces
    them) unless ``verbose``; returns the function that restores the previous settings."""
    if verbose:
        return lambda: None
    previous_env, previous_level = os.environ.get("RAY_AIR_NEW_OUTPUT"), optuna.logging.get_verbosity()
    mlflow_logger = logging.getLogger("mlflow")
    previous_mlflow = mlflow_logger.level
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the old reporter honours verbose=0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow_logger.setLevel(logging.WARNING)

    def restore() -> None:
        optuna.logging.set_verbosity(previous_level)
        mlflow_logger.setLevel(previous_mlflow)
        if previous_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous_env

    return restore


@contextmanager
def _no_ray_loggers() -> Iterator[None]:
    """Ray Tune adds no loggers of its own while this holds. Its TensorBoard logger imports
    tensorboardX, which imports torch (about 1.1 GiB of the driver); its CSV and JSON loggers
    write each trial's results into the driver's copy of the experiment folder, which Ray copies
    whole to the study folder at every save of its experiment state: O(trials) files per save.
    The study folder's tables hold every result (``epochs/``, ``trials.parquet``) instead."""
    previous = os.environ.get(NO_AUTO_LOGGERS)
    os.environ[NO_AUTO_LOGGERS] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NO_AUTO_LOGGERS, None)
        else:
            os.environ[NO_AUTO_LOGGERS] = previous


def _write_study_file(study: StudyConfig) -> None:
    data = study.model_dump(mode="json", exclude_defaults=False)
    study.layout.root.mkdir(parents=True, exist_ok=True)
    study.layout.study_file.write_text(yaml.safe_dump(data, sort_keys=False))



def _fail_orphans(session: StudySession) -> None:
    """Optuna trials still RUNNING once the study has ended: asked, never run (the searcher re-runs
    a trial lost before Ray recorded it, so normally there are none)."""
    for trial in session.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        session.note(trial.number, **{FAIL_REASON: "lost: the driver stopped before Ray recorded this trial"})
        session.optuna_study.tell(trial.number, state=TrialState.FAIL)


def _flush_quietly(session: StudySession) -> None:
    """:meth:`StudySession.flush` while another error ends the run (which it must not hide)."""
    try:
        session.flush()
    except Exception as error:  # noqa: BLE001
        logger.warning("could not write the study's tables at its end: %s", error)


def _row_states(optuna_study: optuna.Study) -> list[str | None]:
    """The trials-table state of each of Optuna's trials (None: no row), so the runner counts
    ended trials as every reader of the table does (samples that never ran do not count)."""
    return [row_state(t) for t in optuna_study.get_trials(deepcopy=False)]


def _trainable(study: StudyConfig, trial_runs: TrialRunFactory | None, objective: str) -> Any:
    """The Ray Tune trainable of the study's trials, with its resources."""
    fn = tune_trainable if study.workers_per_trial == 1 else data_parallel_trainable
    trainable = tune.with_parameters(fn, study=study, trial_runs=trial_runs, objective=objective)
    if study.workers_per_trial == 1:
        resources = {"cpu": study.resources_per_trial.cpu, "gpu": study.resources_per_trial.gpu}
    else:  # the TorchTrainer's workers reserve their own resources; the trial itself only waits
        resources = {"cpu": DRIVER_CPU}
    return tune.with_resources(trainable, resources)


def _tuner(study: StudyConfig, session: StudySession, trainable: Any, resume: bool) -> tune.Tuner:
    """A new Tuner, or with ``resume`` the interrupted one restored from the study folder."""
    layout = study.layout
    if resume and tune.Tuner.can_restore(str(layout.ray_experiment)):
        return tune.Tuner.restore(str(layout.ray_experiment), trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    stopper = DominatedTrialStopper(study.early_stopping, budget_of=StudyBudget(study))
    halving = SuccessiveHalvingScheduler(study) if study.scheduler is not None else None
    searcher = StudySearchGenerator(ConcurrencyLimiter(FrontSafeOptunaSearch(study), max_concurrent=study.concurrency),
                                    study)
    # trials asked but never ended (the driver died before Ray saved its state) run again: see the searcher
    remaining = max(0, study.n_trials - ended_count(_row_states(session.optuna_study)))
    return tune.Tuner(
        trainable,
        # reuse_actors: a finished trial's worker process runs the next trial (no new process,
        # no second import of torch and timm: seconds per trial on small studies)
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=halving or LiveFIFOScheduler(),
                                    num_samples=remaining, reuse_actors=True),
        run_config=tune.RunConfig(
            name=layout.ray_experiment.name,
            storage_path=str(layout.ray_storage),
            # data-parallel trials retry inside Ray Train (see trainable.data_parallel_trainable)
            failure_config=tune.FailureConfig(max_failures=study.max_failures if study.workers_per_trial == 1 else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[StudyProgress(study.name, stopper, halving)],
            stop=stopper,
            verbose=0,
        ),
    )


def run_study(
    study: StudyConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    num_cpus: int | None = None,
    verbose: bool = False,
    printer: Callable[[str], None] = print,
    tracking: StudyTracking | None = None,
) -> StudyOutcome:
    """Run ``study`` (or, with ``resume``, continue it) until ``n_trials`` trials ended.

    ``tracking``: the study tracker (the command line passes MLflow's when
    ``tracking.enabled``); None: the study is recorded in its folder only.
    ``objective``: ``"module:function"`` with the ``run_trial`` signature (the default is the
    shipped prune+fine-tune objective); ``address``: a Ray cluster to join (``"auto"``,
    ``"ray://host:10001"``) instead of local Ray with ``num_cpus`` (default: all cores).
    A Ctrl-C stops gracefully: ``interrupted`` is then True and ``resume`` continues.
    """
    layout = study.layout
    if not resume and (layout.study_file.exists() or layout.ray_experiment.exists()):
        raise StudyError(f"{study.source}: name: study {study.name!r} already exists in {layout.root}: continue it "
                         f"with `python search.py resume {layout.root}`, or pick another --name")
    driver = DriverRecord(layout.driver_record)
    if resume:  # a killed driver's Ray processes go first (an error if that driver still runs)
        ended = driver.end_leftovers()
        if ended:
            printer(f"ended {len(ended)} process(es) the stopped driver's Ray session left: "
                    + ", ".join(p.describe() for p in ended))
    cost = preflight(study, objective, address, num_cpus)  # the dense model's, counted in a child process
    quiet = _quiet_libraries(verbose)
    started_ray, interrupted, session, started_tracker, flushed = False, True, None, None, False
    try:
        # Ray first: a cluster that refuses us is an error before the study leaves any trace
        started_ray = _init_ray(study, address, num_cpus, verbose)
        _write_study_file(study)
        local_session = started_ray and not address  # its Ray processes are this driver's to record
        driver.write(with_ray_session=local_session)
        if address:  # after the study file exists: it stands for the study folder
            check_shared_paths(study)
        if study.shared_prefixes:  # before any trial runs: what a killed publisher left goes
            removed = PrefixCache(layout.prefixes).clean_incomplete()
            if removed:
                printer(f"removed {len(removed)} incomplete shared prefix(es) a stopped trial left in "
                        f"{layout.prefixes}")
        optuna_study = open_optuna_study(study)
        trial_runs = tracking.start(study, resume) if tracking is not None else None
        started_tracker = tracking  # closed however the run ends
        session = StudySession(study, optuna_study, cost, tracking, annotations_of(read_trials(layout)), printer,
                               driver=driver if local_session else None)
        open_session(session)
        session.refresh()  # the rows of the trials an earlier run left (resume)
        if address:
            for line in cluster_lines(study, address):
                session.say(line)
        tuner = _tuner(study, session, _trainable(study, trial_runs, objective), resume)
        session.say(f"study {study.name}: {study.n_trials} trials, {study.concurrency} at a time, "
                    f"results in {layout.root}")
        with _no_ray_loggers():
            tuner.fit()
        interrupted = not study_done(_row_states(optuna_study), study.n_trials)
        if not interrupted:
            _fail_orphans(session)
        session.flush()
        flushed = True
    finally:
        if session is not None and len(session.table) and not flushed:  # an error, a second Ctrl-C
            _flush_quietly(session)
        if started_tracker is not None:
            started_tracker.close("KILLED" if interrupted else "FINISHED")
        if session is not None:
            close_session(session)
        if started_ray:
            import ray

            ray.shutdown()
        if layout.root.exists():
            driver.remove()
        quiet()
    return StudyOutcome(study, session.frame, session.summary(), interrupted, time.monotonic() - session.started)


__all__ = ["run_study"]
