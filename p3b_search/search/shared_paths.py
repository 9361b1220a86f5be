"""Check, when a study joins a Ray cluster, that every node sees the files its trials use at the
same paths: the study folder (Ray's storage path with the experiment state and the trial
checkpoints a retried trial resumes from on another node, the trial folders, the allocation
parts the driver merges), ``data.root`` and a local ``model.weights`` file; and that every node
has the environment variables ``tracking.uri`` refers to (``${NAME}``: the trials log to the
tracking store with it, and take it from their node's environment, never from the driver).

A probe task with no resources runs on each alive node that can run trials (it has CPUs) and
reports which of those paths it cannot see and which variables are unset; the first miss is a
one-line :class:`StudyError` naming the setting, the node and the fix, before any trial starts.
"""
from __future__ import annotations

import os
from pathlib import Path

from p3b_search.config import EMBEDDED_TASKS
from p3b_search.credentials import references
from p3b_search.study.messages import StudyError
from p3b_search.study.sections import StudyConfig

PROBE_TIMEOUT_S = 120.0


def shared_paths(study: StudyConfig) -> dict[str, str]:
    """Setting -> path every node must see (the study file stands for the study folder)."""
    paths = {"output_dir": str(study.layout.study_file)}
    if study.data.kind not in EMBEDDED_TASKS and study.data.root is not None:
        paths["data.root"] = str(study.data.root)
    if study.model.weights not in (None, "hub", "source-pretrained"):
        paths["model.weights"] = str(study.model.weights)
    return paths


def trial_variables(study: StudyConfig) -> list[str]:
    """The environment variables a trial reads: those ``tracking.uri`` refers to, when tracked."""
    return references(study.tracking.uri) if study.tracking.enabled and study.tracking.uri else []


def missing_here(paths: dict[str, str], variables: list[str]) -> tuple[list[str], list[str]]:
    """The settings among ``paths`` whose path does not exist on this machine, and the
    ``variables`` its environment does not set."""
    return ([setting for setting, path in paths.items() if not Path(path).exists()],
            [name for name in variables if name not in os.environ])


def check_shared_paths(study: StudyConfig) -> None:
    """One-line :class:`StudyError` when a node of the joined cluster misses a shared path or a
    variable of ``tracking.uri``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths, variables = shared_paths(study), trial_variables(study)
    probe = ray.remote(num_cpus=0)(missing_here)
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    pending = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
               .remote(paths, variables) for node in nodes]
    try:
        answers = ray.get(pending, timeout=PROBE_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise StudyError(f"{study.source}: a node of the Ray cluster cannot run the study's code ({reason[:300]}): "
                         "install the project (pip install -e .) on every node") from None
    for node, (missing, unset) in zip(nodes, answers):
        where = f"the Ray node at {node['NodeManagerAddress']} (node {node['NodeID'][:12]})"
        if missing:
            setting = missing[0]
            raise StudyError(f"{study.source}: {setting}: {paths[setting]} does not exist on {where}: put it on "
                             "storage every node mounts at the same path (NFS), or start Ray only on nodes that do")
        if unset:
            raise StudyError(f"{study.source}: tracking.uri: environment variable {unset[0]} is not set on {where}: "
                             "export it where `ray start` runs on every node (the trials log to the tracking "
                             "store with it)")


__all__ = ["check_shared_paths", "missing_here", "shared_paths", "trial_variables"]
