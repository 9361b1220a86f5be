"""Machine-side checks before a study starts: paths, the model, weights, the objective, resources,
the cluster's address. Each failure is a one-line :class:`~p3b_search.study.messages.StudyError`
before any compute (the study file itself was checked when it was loaded). What needs torch
and timm runs in a child process (:func:`model_checks`): the driver never imports them."""
from __future__ import annotations

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

from p3b_search.config import EMBEDDED_TASKS
from p3b_search.search.samplers import create_sampler
from p3b_search.search.stores_preflight import check_stores
from p3b_search.study.dense import dense_cost
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig

DRIVER_CPU = 0.01  # CPU reserved by a data-parallel trial's own process (it launches the workers)


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


def preflight(study: StudyConfig, objective: str, address: str | None, num_cpus: int | None = None) -> dict[str, float]:
    """Machine-side checks before anything starts; one-line :class:`StudyError` on failure.
    Returns the dense model's cost (:func:`~p3b_search.study.dense.dense_cost`), counted by
    the checks that need torch and timm (:func:`model_checks`) in a short child process: the
    driver runs for the whole study and imports neither (they would hold about 1.1 GiB of it)."""
    source = study.source
    create_sampler(study)  # an unknown sampler, or options it refuses: StudyError naming sampler.*
    if study.data.kind not in EMBEDDED_TASKS and not study.data.root.is_dir():
        raise StudyError(f"{source}: data.root: folder {study.data.root} does not exist: point it at the data set")
    weights = study.model.weights
    if weights not in (None, "hub", "source-pretrained") and not Path(weights).is_file():
        raise StudyError(f"{source}: model.weights: file {weights} does not exist: set a local .pth/.safetensors")
    module = objective.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise StudyError(f"{source}: cannot find the objective module {module!r} (from {objective!r}): "
                         "is the project installed (pip install -e .)?")
    check_stores(study)
    needed_cpus, needed_gpus = trial_needs(study)
    cpus = num_cpus or os.cpu_count() or 1
    if address:
        check_reachable(address)
        needed_gpus = 0.0  # the cluster's nodes have them, not this machine
    elif needed_cpus > cpus:
        raise StudyError(f"{source}: resources_per_trial.cpu: a trial needs {needed_cpus:g} CPUs, local Ray has "
                         f"{cpus}: lower it (or join a cluster with --address)")
    return _model_checks_in_a_child(study, needed_gpus)


def model_checks(study: StudyConfig, needed_gpus: float) -> dict[str, float]:
    """The checks that import torch and timm (:func:`preflight` runs them in a child process):
    the model is a timm model, an image folder holds images, the weights file reads, this
    machine has ``needed_gpus`` GPUs (0: no check). Returns the dense model's cost."""
    import timm

    source = study.source
    if not timm.is_model(study.model.name):
        raise StudyError(f"{source}: model.name: {study.model.name!r} is not a timm model: pick one from "
                         "timm.list_models()")
    if study.data.kind == "imagefolder":
        _check_image_folder(source, study.data.root)
    weights = study.model.weights
    if weights not in (None, "hub", "source-pretrained"):
        from p3b_search.weights import WeightsError, read_state_dict

        try:  # read it once here: a corrupt file fails now, not in every trial
            read_state_dict(weights)
        except WeightsError as error:
            raise StudyError(f"{source}: model.weights: {error}") from None
    if needed_gpus > 0:
        import torch

        if torch.cuda.device_count() * 1.0 < needed_gpus:
            raise StudyError(f"{source}: resources_per_trial.gpu: this machine has "
                             f"{torch.cuda.device_count()} GPU(s): set gpu: 0 to run on CPU")
    return dense_cost(study)


#: The child of :func:`_model_checks_in_a_child`, a fresh interpreter (``-c``: multiprocessing's
#: spawn would import the caller's ``__main__`` again): the parent's ``sys.path``, then the
#: checks' arguments, both pickled on stdin.
_CHILD = ("import pickle, sys\n"
          "sys.path[:0] = pickle.load(sys.stdin.buffer)\n"
          "from p3b_search.search.preflight import model_checks_child\n"
          "model_checks_child()\n")


def _model_checks_in_a_child(study: StudyConfig, needed_gpus: float) -> dict[str, float]:
    """:func:`model_checks` in a short child process (it imports torch and timm, this one does
    not); what it raises is raised here."""
    payload = pickle.dumps(sys.path) + pickle.dumps((study, needed_gpus))
    done = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True)
    if done.returncode != 0 or not done.stdout:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        raise RuntimeError(f"the model checks' child process failed (exit {done.returncode}): {lines[-1]}")
    outcome = pickle.loads(done.stdout)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def model_checks_child() -> None:
    """The child's side of :func:`_model_checks_in_a_child`: :func:`model_checks` of the
    arguments on stdin; the cost, or the exception raised, pickled on stdout (anything else
    printed goes to stderr)."""
    result = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    study, needed_gpus = pickle.load(sys.stdin.buffer)
    try:
        outcome: dict[str, float] | Exception = model_checks(study, needed_gpus)
    except Exception as error:  # noqa: BLE001  (raised again in the parent)
        outcome = error
    with result:
        pickle.dump(outcome, result)


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



def check_reachable(address: str, timeout_s: float = 5.0) -> None:
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

