"""The replay simulator of the tabular benchmark: a sampler and a scheduler over a recorded table,
as if its trials ran.

An *arm* is an Optuna sampler of the registry (:mod:`p3b_search.search.samplers`) with a
scheduler, or the reference recipe. A replay of an arm with a seed runs ``trials`` trials:

* **Sampling.** The Optuna study is created as a live one is
  (:func:`~p3b_search.search.searcher.open_optuna_study`: the reference trial enqueued first),
  in memory, over the study's search space without the training seed, with the arm's sampler
  seeded by the replay seed and ``n_trials`` = ``trials`` (TPE's and GP's random start-up
  follows from it as in a live study); each trial is asked and sampled by
  :func:`~p3b_search.search.space.suggest_params`. The sampled configuration is looked up in
  the table and one of its recorded training seeds is drawn by the replay's generator
  (``numpy.random.default_rng(seed)``); a configuration missing from the table is an error.
* **Clock.** ``concurrency`` workers; a trial's epochs end at its recorded cumulative
  ``epoch_seconds`` after its start (the seconds outside the epochs, ``duration_s`` minus their
  sum, are not emulated). A worker asks for its next trial when its trial ends, so the sampler
  sees the other workers' trials RUNNING (TPE's constant liar) as in a live study. Events at the
  same second are handled in the order they were scheduled.
* **Schedulers.** ``none``; ``early-stopping``: the prune-stage rule of
  :class:`~p3b_search.study.stopping.DominationRule` (a trial's budget ``1 - prune_ratio`` and
  kept fraction at the epoch, ``margin`` top-1 points, ``grace_epochs``);
  ``successive-halving``: :class:`~p3b_search.study.rungs.SuccessiveHalvingRule` on (top-1,
  MACs) at each rung (epochs done, 1-based over both stages). Decisions are taken as each epoch
  ends on the clock, against what was recorded before; a stopped trial is told PRUNED, its
  epochs so far are spent, and it is never on the front. The last epoch is never stopped.
* **Reference recipe.** P3B's paper settings (:data:`PAPER_RECIPE`) at the prune ratios of
  :data:`LADDER`, cycled, with no scheduler.

The trajectory is one row per trial end (see :func:`replay`): the normalised hypervolume of the
COMPLETE trials' final objectives against the trial-epochs spent and the emulated seconds.
"""
from __future__ import annotations

import heapq
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from p3b_search.search.samplers import available_samplers, create_sampler
from p3b_search.search.searcher import open_optuna_study
from p3b_search.search.space import suggest_params
from p3b_search.study.loading import with_overrides
from p3b_search.study.messages import StudyError, format_params
from p3b_search.study.rungs import SuccessiveHalvingRule
from p3b_search.study.sections import SamplerConfig, StudyConfig
from p3b_search.study.stopping import DominationRule, Standing
from p3b_search.study.tabular import SEED_KEY, Curve, TabularBenchmark, epochs_per_trial
from p3b_search.study.trials import trial_budget, trial_config

REFERENCE = "reference"
NO_SCHEDULER, EARLY_STOPPING, SUCCESSIVE_HALVING = "none", "early-stopping", "successive-halving"
SCHEDULERS = (NO_SCHEDULER, EARLY_STOPPING, SUCCESSIVE_HALVING)
#: P3B's paper settings on the tabular recipe (a mask update every 27 of 81 steps: about 3 per
#: epoch; pruning from the prune stage's epoch 1).
PAPER_RECIPE: dict[str, Any] = {"method": "p3b", "method_config.alpha": 0.5, "method_config.gamma": 0.2,
                                "method_config.prune_steps_update_mask": 27,
                                "method_config.prune_start_epoch": 1.0}
LADDER = (0.5, 0.625, 0.75, 0.875)
#: Samples of configurations missing from the table tolerated per trial with ``allow_missing``.
MISSING_PER_TRIAL = 50


@dataclass(frozen=True)
class Arm:
    """A sampler name of the registry (or :data:`REFERENCE`) and a scheduler of :data:`SCHEDULERS`."""

    sampler: str
    scheduler: str = NO_SCHEDULER

    def __post_init__(self) -> None:
        if self.sampler != REFERENCE and self.sampler not in available_samplers():
            raise ValueError(f"sampler {self.sampler!r}: choose {REFERENCE} or one of {available_samplers()}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r}: choose one of {SCHEDULERS}")
        if self.sampler == REFERENCE and self.scheduler != NO_SCHEDULER:
            raise ValueError("the reference recipe runs without a scheduler")

    @property
    def name(self) -> str:
        return REFERENCE if self.sampler == REFERENCE else f"{self.sampler}/{self.scheduler}"


@dataclass(frozen=True)
class ReplaySettings:
    """What every arm shares: the trial budget, the workers, the schedulers' settings, and
    ``sampler_options`` by sampler name (a study file's ``sampler.options``; default: the
    registry's, as a live study without options).

    ``trials`` (default 40, about a third of the tabular grid's 132 configurations: a search
    that cannot afford the grid; TPE and GP then sample 10 at random first), ``concurrency``
    workers (2, as the tabular study ran). Early stopping: ``grace_epochs`` and ``margin``
    (top-1 points; 3, as ``studies/prune_stage_stopping.yaml``). Successive halving: ``rungs``
    (epochs done, 1-based over both stages; default 1 and 3: ASHA's ladder from one epoch with
    ``eta`` 3 below a trial's 6 epochs) and ``eta``.

    ``allow_missing``: a sampled configuration missing from the table (a table still being
    built) is told FAIL and another is asked, spending nothing and not counted in ``trials``
    (:data:`MISSING_PER_TRIAL` such samples per trial at most); otherwise it is an error.
    """

    trials: int = 40
    concurrency: int = 2
    grace_epochs: int = 1
    margin: float = 3.0
    rungs: tuple[int, ...] = (1, 3)
    eta: int = 3
    allow_missing: bool = False
    sampler_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("trials", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: give 1 or more")
        if self.grace_epochs < 0 or self.margin < 0:
            raise ValueError(f"grace_epochs={self.grace_epochs}, margin={self.margin}: give 0 or more")
        if self.eta < 2 or not self.rungs or min(self.rungs) < 1:
            raise ValueError(f"rungs={list(self.rungs)}, eta={self.eta}: give rungs >= 1 (epochs done) and eta >= 2")


class _Proposer(Protocol):
    def ask(self) -> tuple[int, dict[str, Any]]: ...

    def tell(self, number: int, state: TrialState, values: tuple[float, ...] | None = None) -> None: ...


def replay_study(study: StudyConfig, sampler: str, seed: int, settings: ReplaySettings) -> StudyConfig:
    """``study`` as a live search over its space without the training seed: ``sampler`` seeded
    with ``seed`` and given its ``settings.sampler_options``, ``n_trials`` = ``settings.trials``."""
    space = {key: dim for key, dim in study.search_space.items() if key != SEED_KEY}
    options = dict(settings.sampler_options.get(sampler, {}))
    return with_overrides(study, search_space=space, n_trials=settings.trials,
                          sampler=SamplerConfig(name=sampler, seed=seed, options=options))


def check_arms(bench: TabularBenchmark, arms: list[Arm], settings: ReplaySettings) -> None:
    """Build what every arm needs once (its sampler with its options, the reference recipe, the
    scheduler) so that a bad setting is a one-line error before any replay."""
    unknown = sorted(set(settings.sampler_options) - {arm.sampler for arm in arms})
    if unknown:
        raise ValueError(f"sampler_options: {unknown} is no sampler of the arms: give options of "
                         f"{sorted({arm.sampler for arm in arms} - {REFERENCE})}")
    for arm in arms:
        if arm.sampler == REFERENCE:
            _LadderProposer(bench.study)
        else:
            create_sampler(replay_study(bench.study, arm.sampler, 0, settings))
        _scheduler(arm, bench, settings)


class _OptunaProposer:
    """Asks a live study's way: Optuna's ask, then define-by-run sampling."""

    def __init__(self, study: StudyConfig):
        self.study = study
        with warnings.catch_warnings():  # Optuna flags set_metric_names as experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.optuna = open_optuna_study(study, sampler=create_sampler(study),
                                            storage=optuna.storages.InMemoryStorage())

    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.optuna.ask()
        return trial.number, suggest_params(trial, self.study)

    def tell(self, number: int, state: TrialState, values: tuple[float, ...] | None = None) -> None:
        self.optuna.tell(number, list(values) if values is not None else None, state=state)


def reference_recipe(study: StudyConfig, prune_ratio: float) -> dict[str, Any]:
    """The configuration of :data:`PAPER_RECIPE` at ``prune_ratio``: its entries in the search
    space; one-line :class:`StudyError` when the study fixes an entry it lacks to another value."""
    recipe = {**PAPER_RECIPE, "method_config.prune_ratio": prune_ratio}
    params = {key: value for key, value in recipe.items() if key in study.search_space}
    method_config = trial_config(study, params).method_config
    for key, value in recipe.items():
        knob = key.removeprefix("method_config.")
        if key not in params and key != "method" and method_config.get(knob) != value:
            raise StudyError(f"{study.source}: the reference recipe needs {key} = {value}, the study fixes "
                             f"{method_config.get(knob)!r} and does not search it")
    if "method" not in params and study.method.name != recipe["method"]:
        raise StudyError(f"{study.source}: the reference recipe needs method {recipe['method']}, the study runs "
                         f"{study.method.name}")
    return params


class _LadderProposer:
    """The reference recipe at the prune ratios of :data:`LADDER`, cycled."""

    def __init__(self, study: StudyConfig) -> None:
        self.ladder = [reference_recipe(study, ratio) for ratio in LADDER]
        self.count = 0

    def ask(self) -> tuple[int, dict[str, Any]]:
        number, self.count = self.count, self.count + 1
        return number, self.ladder[number % len(self.ladder)]

    def tell(self, number: int, state: TrialState, values: tuple[float, ...] | None = None) -> None:
        """Nothing learns from results."""


class _Scheduler(Protocol):
    def continues(self, number: int, params: dict[str, Any], curve: Curve, epoch: int) -> bool: ...


class _NoScheduler:
    def continues(self, number: int, params: dict[str, Any], curve: Curve, epoch: int) -> bool:
        return True


class _PruneStageStopping:
    """The live prune-stage early stopping: costs (budget, kept fraction at the epoch)."""

    def __init__(self, study: StudyConfig, grace_epochs: int, margin: float):
        self.study = study
        self.rule = DominationRule(grace_epochs, margin)
        self._budgets: dict[int, float] = {}

    def continues(self, number: int, params: dict[str, Any], curve: Curve, epoch: int) -> bool:
        if curve.stage[epoch] != 0:
            return True
        if number not in self._budgets:
            self._budgets[number] = trial_budget(self.study, params)
        kept = float(curve.keep_ratio[epoch])
        standing = Standing(number, float(curve.top1[epoch]),
                            (self._budgets[number], kept if math.isfinite(kept) else None))
        return self.rule.dominator(number, "prune", epoch, standing) is None


class _SuccessiveHalving:
    """Asynchronous multi-objective successive halving on (top-1, MACs) at the epoch."""

    def __init__(self, rungs: tuple[int, ...], eta: int, directions: list[str]):
        self.rule = SuccessiveHalvingRule(rungs, eta, directions)

    def continues(self, number: int, params: dict[str, Any], curve: Curve, epoch: int) -> bool:
        return self.rule.decide(number, epoch + 1, (float(curve.top1[epoch]), float(curve.macs[epoch])))


def _scheduler(arm: Arm, bench: TabularBenchmark, settings: ReplaySettings) -> _Scheduler:
    if arm.scheduler == EARLY_STOPPING:
        return _PruneStageStopping(bench.study, settings.grace_epochs, settings.margin)
    if arm.scheduler == SUCCESSIVE_HALVING:
        epochs = epochs_per_trial(bench.study)
        if max(settings.rungs) >= epochs:
            raise ValueError(f"rungs={list(settings.rungs)}: a trial ends after epoch {epochs}: give rungs below it")
        return _SuccessiveHalving(settings.rungs, settings.eta, bench.directions)
    return _NoScheduler()


@dataclass
class _Running:
    number: int
    params: dict[str, Any]
    curve: Curve
    start: float


def replay(bench: TabularBenchmark, arm: Arm, seed: int, settings: ReplaySettings = ReplaySettings()) -> pd.DataFrame:
    """Run ``arm`` over ``bench`` with ``seed``; one row per trial end, in the order they ended:

    ``sampler``, ``scheduler``, ``seed``; ``trial`` (the replay's Optuna number), ``table_trial``
    (the table's trial that gave its curve), ``method``, ``state`` (COMPLETE or PRUNED),
    ``epochs`` (its epochs), ``top1`` and ``macs`` (its final objectives, NaN when PRUNED),
    ``start_s`` (when it started, emulated seconds), ``trial_epochs`` (epochs ended over all
    trials so far), ``wall_s`` (emulated seconds: when it ended),
    ``completed`` (COMPLETE trials so far), ``hypervolume`` (their normalised hypervolume) and
    ``missing`` (samples not in the table so far, with ``settings.allow_missing``).
    """
    proposer: _Proposer = (_LadderProposer(bench.study) if arm.sampler == REFERENCE
                           else _OptunaProposer(replay_study(bench.study, arm.sampler, seed, settings)))
    scheduler = _scheduler(arm, bench, settings)
    rng = np.random.default_rng(seed)
    events: list[tuple[float, int, int, _Running, int]] = []  # (time, order, worker, trial, epoch)
    started = missing = spent = 0
    finals: list[tuple[float, ...]] = []
    rows: list[dict[str, Any]] = []

    order = itertools.count()  # ties on the clock: the order events were scheduled in

    def schedule(time: float, worker: int, running: _Running, epoch: int) -> None:
        heapq.heappush(events, (time, next(order), worker, running, epoch))

    def start(worker: int, now: float) -> None:
        nonlocal started, missing
        while True:
            number, params = proposer.ask()
            curves = bench.curves(params)
            if curves:
                break
            if not settings.allow_missing:
                raise StudyError(f"replay {arm.name} seed {seed}: trial {number} sampled {format_params(params)}, "
                                 "which is not in the table: export the whole grid study (or allow missing "
                                 "configurations while the table is built)")
            proposer.tell(number, TrialState.FAIL)
            missing += 1
            if missing > MISSING_PER_TRIAL * settings.trials:
                raise StudyError(f"replay {arm.name} seed {seed}: {missing} samples were not in the table: "
                                 "the table is too incomplete to replay")
        seeds = sorted(curves)
        curve = curves[seeds[int(rng.integers(len(seeds)))]]
        started += 1
        running = _Running(number, params, curve, now)
        schedule(now + float(curve.epoch_seconds[0]), worker, running, 0)

    def end(running: _Running, state: TrialState, epochs: int, now: float) -> None:
        values = running.curve.final if state == TrialState.COMPLETE else None
        proposer.tell(running.number, state, values)
        if values is not None:
            finals.append(values)
        rows.append({"sampler": arm.sampler, "scheduler": arm.scheduler, "seed": seed, "trial": running.number,
                     "table_trial": running.curve.trial, "method": str(running.params.get("method", "")),
                     "state": state.name, "epochs": epochs,
                     "top1": values[0] if values else math.nan, "macs": values[1] if values else math.nan,
                     "start_s": running.start, "trial_epochs": spent, "wall_s": now, "completed": len(finals),
                     "hypervolume": bench.normalized_hypervolume(np.array(finals)) if finals else 0.0,
                     "missing": missing})

    for worker in range(min(settings.concurrency, settings.trials)):
        start(worker, 0.0)
    while events:
        now, _, worker, running, epoch = heapq.heappop(events)
        spent += 1
        curve = running.curve
        if epoch == curve.epochs - 1:
            end(running, TrialState.COMPLETE, epoch + 1, now)
        elif scheduler.continues(running.number, running.params, curve, epoch):
            schedule(now + float(curve.epoch_seconds[epoch + 1]), worker, running, epoch + 1)
            continue
        else:
            end(running, TrialState.PRUNED, epoch + 1, now)
        if started < settings.trials:
            start(worker, now)
    return pd.DataFrame(rows)
