"""Run a study: Optuna proposes, Ray Tune runs the trials, the driver records everything.

Driver-side flow of :func:`run_study`::

    preflight checks (paths, resources, objective importable,
                      the cluster's address answers)          -> StudyError before any compute
    Ray (local, or --address to join a cluster)                -> StudyError if the cluster refuses us
    Optuna study in its storage (reference trial enqueued)     -> searcher.open_optuna_study
    MLflow parent run (optional)                               -> tracking.mlflow_tracker.StudyTracker
    Tuner(FrontSafeOptunaSearch behind a ConcurrencyLimiter, per-trial resources,
          FailureConfig retries from the last checkpoint, DominatedTrialStopper)
      or Tuner.restore(...) to resume an interrupted study
    StudyProgress callback: trials.parquet / allocations.parquet, the front on MLflow,
                            one progress line per event

Resume: ``Tuner.restore`` brings back Ray's trials and the searcher's Ray -> Optuna mapping,
so in-flight trials continue from their last checkpoint under their own Optuna numbers (no
trial lost, none duplicated). An Optuna trial that Ray never recorded (the driver died between
asking Optuna and saving its state) is marked FAIL once the study has ended.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from ray import tune
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter

from p3b_search.config import EMBEDDED_TASKS
from p3b_search.search.early_stopping import DominatedTrialStopper
from p3b_search.search.layout import StudyLayout
from p3b_search.search.dense import DenseReference, dense_reference
from p3b_search.search.frontier import FrontState, front_state
from p3b_search.search.results import (
    annotations_of,
    front,
    merge_allocations,
    read_trials,
    trials_frame,
    write_trials,
)
from p3b_search.search.schema import MAXIMIZED, StudyConfig, StudyError, load_study, trial_budget
from p3b_search.search.searcher import FrontSafeOptunaSearch, open_optuna_study
from p3b_search.search.shared_paths import check_shared_paths
from p3b_search.search.stores_preflight import check_stores
from p3b_search.search.trainable import (
    DEFAULT_OBJECTIVE,
    MLFLOW_RUN_ID,
    RAY_NODE_ID,
    TRIAL_NUMBER,
    data_parallel_trainable,
    tune_trainable,
)
from p3b_search.tracking.front_report import write_front
from p3b_search.units import FLOPS_PER_MAC, value_text

logger = logging.getLogger(__name__)

TABLE_REFRESH_S = 2.0
HEARTBEAT_S = 60.0
DRIVER_CPU = 0.01  # CPU reserved by a data-parallel trial's own process (it launches the workers)
_SESSIONS: dict[str, "StudySession"] = {}


# ----------------------------------------------------------------------------- checks

def _class_count(study: StudyConfig) -> int:
    """Classes of the target data set (for the dense model's cost)."""
    if study.model.num_classes is not None:
        return study.model.num_classes
    data = study.data
    if data.kind in EMBEDDED_TASKS:
        from p3b_search.data.loaders import embedded_class_count

        return embedded_class_count(data.kind)
    if data.kind in ("cifar10", "cifar100"):
        return 10 if data.kind == "cifar10" else 100
    return sum(1 for p in (data.root / "train").iterdir() if p.is_dir())


def dense_cost(study: StudyConfig) -> dict[str, float]:
    """``params``, ``macs`` and ``flops`` (= 2 x MACs) per image of the dense model, counted on
    the meta device."""
    import torch

    from p3b_search.cost import model_cost
    from p3b_search.models import create_timm_model

    with torch.device("meta"):
        model = create_timm_model(study.model, _class_count(study))
    cost = model_cost(model)
    return {"params": float(cost.params), "macs": float(cost.macs), "flops": float(FLOPS_PER_MAC * cost.macs)}


def reference_point(study: StudyConfig, cost: dict[str, float] | None = None) -> list[float]:
    """The hypervolume reference per objective: the stated ``reference``, else 0 % for
    accuracies and the dense model's value for ``macs``/``flops``/``params`` (``cost``: the
    :func:`dense_cost`, counted here when not given)."""
    point = []
    for objective in study.objectives:
        if objective.reference is not None:
            point.append(objective.reference)
        elif objective.name in MAXIMIZED:
            point.append(0.0)
        else:
            cost = cost or dense_cost(study)
            point.append(cost[objective.name])
    return point


def front_of(study: StudyConfig, frame: pd.DataFrame, reference: list[float],
             cost: dict[str, float]) -> tuple[FrontState, DenseReference]:
    """The study's current front (dense trials left out) and its dense reference point."""
    dense = dense_reference(study, frame, cost)
    directions = dict(zip(study.metric_names, study.directions))
    return front_state(frame, directions, reference, dense.ideal(study.metric_names)), dense


def _check_image_folder(source: str, root: Path) -> None:
    """``root/train`` and ``root/val`` (or ``validation``) exist and each holds an image in a class folder."""
    from timm.data.readers.img_extensions import get_img_extensions

    layout = "expected root/train/<class>/*.jpg and root/val/<class>/*.jpg"
    suffixes = get_img_extensions(as_set=True)
    for names in (("train",), ("val", "validation")):
        split = next((root / name for name in names if (root / name).is_dir()), None)
        if split is None:
            raise StudyError(f"{source}: data.root: {root} has no {names[0]}/ folder: {layout}")
        images = (f for d in split.iterdir() if d.is_dir() for f in d.rglob("*") if f.suffix.lower() in suffixes)
        if next(images, None) is None:
            raise StudyError(f"{source}: data.root: {split} holds no images in class folders: {layout}")


def preflight(study: StudyConfig, objective: str, address: str | None, num_cpus: int | None = None) -> None:
    """Machine-side checks before anything starts; one-line :class:`StudyError` on failure."""
    import timm

    source = study.source
    if not timm.is_model(study.model.name):
        raise StudyError(f"{source}: model.name: {study.model.name!r} is not a timm model: pick one from "
                         "timm.list_models()")
    if study.data.kind not in EMBEDDED_TASKS and not study.data.root.is_dir():
        raise StudyError(f"{source}: data.root: folder {study.data.root} does not exist: point it at the data set")
    if study.data.kind == "imagefolder":
        _check_image_folder(source, study.data.root)
    weights = study.model.weights
    if weights not in (None, "hub", "source-pretrained"):
        if not Path(weights).is_file():
            raise StudyError(f"{source}: model.weights: file {weights} does not exist: set a local .pth/.safetensors")
        from p3b_search.weights import WeightsError, read_state_dict

        try:  # read it once here: a corrupt file fails now, not in every trial
            read_state_dict(weights)
        except WeightsError as error:
            raise StudyError(f"{source}: model.weights: {error}") from None
    module = objective.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise StudyError(f"{source}: cannot find the objective module {module!r} (from {objective!r}): "
                         "is the project installed (pip install -e .)?")
    if study.tracking.enabled:
        try:
            import p3b_search.tracking.mlflow_tracker  # noqa: F401
        except ImportError as error:
            raise StudyError(f"{source}: tracking.enabled: MLflow tracking is unavailable ({error}): "
                             "install mlflow or set tracking.enabled: false") from None
    check_stores(study)
    if address:
        _check_reachable(address)
        return
    needed_cpus, needed_gpus = trial_needs(study)
    cpus = num_cpus or os.cpu_count() or 1
    if needed_cpus > cpus:
        raise StudyError(f"{source}: resources_per_trial.cpu: a trial needs {needed_cpus:g} CPUs, local Ray has "
                         f"{cpus}: lower it (or join a cluster with --address)")
    if needed_gpus > 0:
        import torch

        if torch.cuda.device_count() * 1.0 < needed_gpus:
            raise StudyError(f"{source}: resources_per_trial.gpu: this machine has "
                             f"{torch.cuda.device_count()} GPU(s): set gpu: 0 to run on CPU")


def trial_needs(study: StudyConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it runs, all its data-parallel workers included."""
    resources, workers = study.resources_per_trial, study.workers_per_trial
    return resources.cpu * workers + (DRIVER_CPU if workers > 1 else 0), resources.gpu * workers


def cluster_lines(study: StudyConfig, address: str) -> list[str]:
    """What the joined cluster offers, and a warning when one trial needs more than that now
    (its trials then wait for nodes to join, e.g. from an autoscaler)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    lines = [f"joined the Ray cluster at {address}: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs"]
    needed_cpus, needed_gpus = trial_needs(study)
    if needed_cpus > cpus or needed_gpus > gpus:
        lines.append(f"warning: one trial needs {needed_cpus:g} CPUs and {needed_gpus:g} GPUs, more than the "
                     "cluster has now: trials wait until nodes join (or lower resources_per_trial)")
    return lines


# ----------------------------------------------------------------------------- the live study

@dataclass
class StudySession:
    """The driver's live objects of a running study (kept out of Ray's pickled state)."""

    study: StudyConfig
    optuna_study: optuna.Study
    reference: list[float]
    cost: dict[str, float]
    tracker: Any = None
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    printer: Callable[[str], None] = print
    started: float = field(default_factory=time.monotonic)
    frame: pd.DataFrame | None = None
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
        self._last_write = now
        return self.frame

    def publish_front(self) -> None:
        """Merge the allocation parts; write ``pareto/`` in the study folder and, when tracked,
        log the same files and metrics on the parent run."""
        study = self.study
        merge_allocations(study.layout)
        if self.frame is None:
            return
        directions = dict(zip(study.metric_names, study.directions))
        try:
            if self.tracker is not None:  # the tracker computes the front itself
                dense = dense_reference(study, self.frame, self.cost)
                self.tracker.refresh_front(self.frame, directions, self.reference, dense, save_to=study.layout.pareto_dir)
            else:
                state, dense = front_of(study, self.frame, self.reference, self.cost)
                write_front(study.layout.pareto_dir, state, directions, self.reference, study.name, dense)
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
                f"done, {counts.get('RUNNING', 0)} running, {counts.get('PRUNED', 0)} stopped, "
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
    return lines[-1][:500] if lines else "the trial raised an error (see the Ray trial logs)"


def _trial_number(trial: Any) -> int | None:
    number = (trial.config or {}).get(TRIAL_NUMBER)
    return None if number is None else int(number)


class StudyProgress(Callback):
    """Ray Tune callback of the driver: keeps the Parquet tables and the MLflow front current and
    prints a progress line when a trial ends (and every ``HEARTBEAT_S`` otherwise). Ray pickles
    it with the run config, so it holds only the study folder and the stopper; the live objects
    are in the driver's :class:`StudySession`."""

    def __init__(self, root: str, stopper: DominatedTrialStopper | None = None):
        self.root = root
        self.stopper = stopper

    def _note(self, trial: Any, **notes: Any) -> StudySession:
        session = _SESSIONS[self.root]
        number = _trial_number(trial)
        if number is not None:
            session.annotations.setdefault(number, {}).update(notes)
        return session

    def on_trial_start(self, iteration, trials, trial, **info):
        self._note(trial, ray_trial_id=trial.trial_id).refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        notes = {}
        if isinstance(result.get("epoch"), (int, float)) and math.isfinite(result["epoch"]):
            notes["epochs_done"] = int(result["epoch"]) + 1
        notes.update({key: result[key] for key in (MLFLOW_RUN_ID, RAY_NODE_ID) if result.get(key)})
        self._note(trial, **notes).refresh(force=False)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # Ray registers a reported checkpoint after the result's on_trial_result; the trial's
        # last result is still the one the checkpoint was reported with.
        epoch = (trial.last_result or {}).get("epoch")
        if isinstance(epoch, (int, float)) and math.isfinite(epoch):
            self._note(trial, epochs_saved=int(epoch) + 1).refresh(force=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        session = _SESSIONS[self.root]
        number = _trial_number(trial)
        notes = session.annotations.setdefault(number, {}) if number is not None else {}
        notes["retries"] = int(notes.get("retries") or 0) + 1
        notes["fail_reason"] = f"retried after: {_error_line(trial)}"
        session.say(f"trial {number}: restarting from its last checkpoint after: {_error_line(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        reason = self.stopper.reasons.get(trial.trial_id) if self.stopper is not None else None
        session = self._note(trial, **({"fail_reason": reason} if reason else {}))
        number = _trial_number(trial)
        if reason and session.tracker is not None and number is not None:
            try:
                session.tracker.end_trial(number, "stopped", reason)
            except Exception as error:  # noqa: BLE001  (a tracking store error must not end the study)
                logger.warning("MLflow: could not mark trial %s stopped: %s", number, error)
        self._ended(session)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(self._note(trial, fail_reason=_error_line(trial)))

    def on_step_end(self, iteration, trials, **info):
        session = _SESSIONS[self.root]
        if time.monotonic() - session.last_said > HEARTBEAT_S:
            session.refresh(force=False)
            session.say(session.progress_line())

    def _ended(self, session: StudySession) -> None:
        session.refresh()
        session.publish_front()
        session.say(session.progress_line())


# ----------------------------------------------------------------------------- running

@dataclass
class StudyOutcome:
    """What a run left: the trials table, its front, the hypervolume against ``reference``
    (objective units) and normalised by the box up to the dense reference's ideal point
    (1.0 = dense accuracy at zero cost; NaN when the dense accuracy is unknown), and the dense
    reference point itself."""

    study: StudyConfig
    trials: pd.DataFrame
    front: pd.DataFrame
    hypervolume: float
    reference: list[float]
    interrupted: bool
    elapsed_s: float
    hypervolume_normalized: float = math.nan
    dense: DenseReference | None = None


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


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens at ``address`` (``ray.init`` would wait for minutes).

    ``address``: ``HOST:PORT`` or ``ray://HOST:PORT``; ``auto`` (find the local node's cluster) is
    left to Ray, which fails fast when there is none."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address {address}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                         "ray://HOST:10001 or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise StudyError(f"--address {address}: nothing answers at {host}:{port} ({error.strerror or error}): "
                         f"start the head node with `ray start --head --port {port}`, or fix --address") from None


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


def _write_study_file(study: StudyConfig) -> None:
    data = study.model_dump(mode="json", exclude_defaults=False)
    study.layout.root.mkdir(parents=True, exist_ok=True)
    study.layout.study_file.write_text(yaml.safe_dump(data, sort_keys=False))


def _start_tracker(study: StudyConfig, resume: bool) -> tuple[Any, dict[str, Any] | None]:
    if not study.tracking.enabled:
        return None, None
    from p3b_search.tracking.mlflow_tracker import StudyTracker

    embedded = study.tracking.uri is None
    tracker = StudyTracker(study.tracking_uri, experiment_name=study.name, study_name=study.name,
                           artifact_location=study.layout.mlflow_artifacts.as_uri() if embedded else None)
    space = {key: dim.model_dump() for key, dim in study.search_space.items()}
    try:
        parent = tracker.start(study.layout.study_file, space, study.sampler.name,
                               dict(zip(study.metric_names, study.directions)), resume=resume)
    except (RuntimeError, ValueError) as error:  # the tracker's one-line messages
        raise StudyError(f"{study.source}: tracking: {error}") from None
    return tracker, {"tracking_uri": study.tracking_uri, "experiment_id": tracker.experiment_id,
                     "parent_run_id": parent}


def _fail_orphans(session: StudySession) -> None:
    """Optuna trials still RUNNING after Ray ended every trial: asked, never run."""
    for trial in session.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        session.annotations.setdefault(trial.number, {})["fail_reason"] = (
            "lost: the driver stopped before Ray recorded this trial")
        session.optuna_study.tell(trial.number, state=TrialState.FAIL)


def _trials_ended(optuna_study: optuna.Study) -> int:
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in optuna_study.get_trials(deepcopy=False, states=ended) if "ray_trial_id" in t.user_attrs)


def _ray_trials_started(optuna_study: optuna.Study) -> int:
    return sum(1 for t in optuna_study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs)


def _trainable(study: StudyConfig, tracking: dict[str, Any] | None, objective: str) -> Any:
    """The Ray Tune trainable of the study's trials, with its resources."""
    fn = tune_trainable if study.workers_per_trial == 1 else data_parallel_trainable
    trainable = tune.with_parameters(fn, study=study, tracking=tracking, objective=objective)
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
    if resume:  # the driver died before Ray saved its state: what Optuna asked is lost
        _fail_orphans(session)
    stopper = DominatedTrialStopper(study.early_stopping, budget_of=partial(trial_budget, study))
    searcher = ConcurrencyLimiter(FrontSafeOptunaSearch(study), max_concurrent=study.concurrency)
    remaining = max(0, study.n_trials - _ray_trials_started(session.optuna_study))
    return tune.Tuner(
        trainable,
        # reuse_actors: a finished trial's worker process runs the next trial (no new process,
        # no second import of torch and timm: seconds per trial on small studies)
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, reuse_actors=True),
        run_config=tune.RunConfig(
            name=layout.ray_experiment.name,
            storage_path=str(layout.ray_storage),
            # data-parallel trials retry inside Ray Train (see trainable.data_parallel_trainable)
            failure_config=tune.FailureConfig(max_failures=study.max_failures if study.workers_per_trial == 1 else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[StudyProgress(str(layout.root), stopper)],
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
) -> StudyOutcome:
    """Run ``study`` (or, with ``resume``, continue it) until ``n_trials`` trials ended.

    ``objective``: ``"module:function"`` with the ``run_trial`` signature (the default is the
    shipped prune+fine-tune objective); ``address``: a Ray cluster to join (``"auto"``,
    ``"ray://host:10001"``) instead of local Ray with ``num_cpus`` (default: all cores).
    A Ctrl-C stops gracefully: ``interrupted`` is then True and ``resume`` continues.
    """
    layout = study.layout
    if not resume and (layout.study_file.exists() or layout.ray_experiment.exists()):
        raise StudyError(f"{study.source}: name: study {study.name!r} already exists in {layout.root}: continue it "
                         f"with `python search.py resume {layout.root}`, or pick another --name")
    preflight(study, objective, address, num_cpus)
    quiet = _quiet_libraries(verbose)
    tracker, started_ray, interrupted = None, False, True
    try:
        # Ray first: a cluster that refuses us is an error before the study leaves any trace
        started_ray = _init_ray(study, address, num_cpus, verbose)
        _write_study_file(study)
        if address:  # after the study file exists: it stands for the study folder
            check_shared_paths(study)
        optuna_study = open_optuna_study(study)
        cost = dense_cost(study)
        reference = reference_point(study, cost)
        tracker, tracking = _start_tracker(study, resume)
        session = StudySession(study, optuna_study, reference, cost, tracker, annotations_of(read_trials(layout)),
                               printer)
        _SESSIONS[str(layout.root)] = session
        if address:
            for line in cluster_lines(study, address):
                session.say(line)
        tuner = _tuner(study, session, _trainable(study, tracking, objective), resume)
        session.say(f"study {study.name}: {study.n_trials} trials, {study.concurrency} at a time, "
                    f"results in {layout.root}")
        tuner.fit()
        interrupted = _trials_ended(optuna_study) < study.n_trials
        if not interrupted:
            _fail_orphans(session)
        frame = session.refresh()
        session.publish_front()
    finally:
        if tracker is not None:
            tracker.close("KILLED" if interrupted else "FINISHED")
        _SESSIONS.pop(str(layout.root), None)
        if started_ray:
            import ray

            ray.shutdown()
        quiet()
    state, dense = front_of(study, frame, reference, cost)
    return StudyOutcome(study, frame, front(frame, study.metric_names), state.hypervolume, reference,
                        interrupted, time.monotonic() - session.started, state.hypervolume_normalized, dense)


def study_from_folder(folder: str | Path) -> StudyConfig:
    """The study saved in a study folder (``<output_dir>/<name>``) by :func:`run_study`."""
    layout = StudyLayout(Path(folder).expanduser().resolve())
    if not layout.study_file.exists():
        raise StudyError(f"{folder}: not a study folder (no study.yaml): give the folder printed by "
                         "`search.py run`, e.g. runs/quickstart")
    study = load_study(layout.study_file)
    if study.layout.root != layout.root:  # the folder was moved or renamed since the study ran
        study = study.with_overrides(output_dir=layout.root.parent, name=layout.root.name)
    return study


def study_summary(study: StudyConfig) -> StudyOutcome:
    """The study's current trials and front, read from its folder (works while it runs)."""
    frame = read_trials(study.layout)
    cost = dense_cost(study)
    reference = reference_point(study, cost)
    state, dense = front_of(study, frame, reference, cost)
    running = bool(len(frame)) and bool((frame["state"] == "RUNNING").any())
    return StudyOutcome(study, frame, front(frame, study.metric_names) if len(frame) else frame, state.hypervolume,
                        reference, running, float("nan"), state.hypervolume_normalized, dense)


def study_finished(study: StudyConfig) -> bool:
    """Whether the study's folder holds ``n_trials`` trials, none of them still running."""
    if not study.layout.trials_table.exists():
        return False
    frame = read_trials(study.layout)
    return len(frame) >= study.n_trials and not (frame["state"] == "RUNNING").any()


__all__ = ["StudyOutcome", "dense_cost", "preflight", "reference_point", "run_study", "study_finished",
           "study_from_folder", "study_summary"]
