"""The sections of a study file (``studies/*.yaml``), one pydantic model per section.

A study composes the fixed trial configuration (``model``, ``data``, ``training``, ``method``)
with a **search space** whose keys are dotted paths into the trial configuration
(:class:`p3b_search.config.TrialConfig`)::

    search_space:
      method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}
      method_config.prune_start_epoch: {type: int, low: 0, high: 4}
      training.prune.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
      method: {type: categorical, choices: [p3b, uniform-magnitude]}

Each entry is a dimension of :mod:`p3b_search.study.dimensions`, which knows its checks, grid
and Optuna distribution.

Fixed knobs of the method are written ``method: {config: {knob: value}}`` in the file and
searched ones ``method_config.<knob>``: the search-space key is the path of the knob in the
trial configuration (``TrialConfig.method_config``), where both end up. With ``method``
searched, a knob is sampled only for the methods that have it (and do not fix it: dense
ignores a searched ``prune_ratio``).

The models here check single fields; the checks across fields and sections run in
:mod:`p3b_search.study.checks`, and :func:`p3b_search.study.loading.load_study` runs both.

``storage`` and ``tracking.uri`` never hold a password: a URL gives it by reference
(``postgresql://p3b:${P3B_DB_PASSWORD}@db:5432/optuna``, resolved only where a connection
opens), and a password written into the URL is lifted out when the study is read: it moves to
this process's environment under the name :data:`LIFTED_PASSWORDS` gives, and the URL refers to
that (see :mod:`p3b_search.credentials`). So the config, the study folder's copy and whatever Ray
pickles hold no password.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, field_validator

from p3b_search.config import DataConfig, ModelConfig, StrictModel, TrainingConfig
from p3b_search.credentials import lift_password
from p3b_search.study.dimensions import SearchDimension
from p3b_search.study.layout import StudyLayout

MAXIMIZED = ("top1", "top5")
#: Setting -> the environment variable that holds a password written into its URL.
LIFTED_PASSWORDS = {"storage": "P3B_STORAGE_PASSWORD", "tracking.uri": "P3B_TRACKING_PASSWORD"}


def _lifted(url: str | None, setting: str) -> str | None:
    """``url`` with a written password replaced by ``${NAME}`` (NAME: ``LIFTED_PASSWORDS[setting]``),
    which then holds it in this process's environment (local Ray's workers inherit it)."""
    if url is None:
        return None
    name = LIFTED_PASSWORDS[setting]
    url, password = lift_password(url, name)
    if password is not None:
        os.environ[name] = password
    return url


class MethodSection(StrictModel):
    """The pruning method (a registered name) and its fixed knobs (validated by its config_cls)."""

    name: str = "p3b"
    config: dict[str, Any] = Field(default_factory=dict)


class Objective(StrictModel):
    """One entry of the study's ``objectives`` list: a metric to optimise. ``direction`` follows from the name (accuracies maximized, costs minimized).

    ``reference``: the hypervolume reference value (a value every useful trial beats);
    default 0 % for accuracies and the dense model's value for ``macs``/``flops``/``params``;
    ``latency_ms`` has no default. ``flops`` = 2 x ``macs`` (torch's counting convention).
    """

    name: Literal["top1", "top5", "macs", "flops", "params", "latency_ms"]
    direction: Literal["maximize", "minimize"] | None = None
    reference: float | None = None

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("maximize" if self.name in MAXIMIZED else "minimize")


class DenseReferenceSection(StrictModel):
    """The dense (unpruned) model's accuracy in %, drawn as the reference point of the front and
    the top of the normalised hypervolume's box. A figure given here wins; without one the mean
    of the study's finished ``dense`` trials is used (see :mod:`p3b_search.study.dense`)."""

    top1: float | None = Field(None, ge=0, le=100)
    top5: float | None = Field(None, ge=0, le=100)


class SamplerConfig(StrictModel):
    """Optuna sampler: ``tpe`` (default; multivariate, constant liar), ``nsga2``, ``gp``, ``random``,
    ``grid`` (each distinct configuration of the grid once, in an order shuffled by ``seed``) or a
    user's ``module:Class``; ``options``: keyword arguments of its constructor (see
    :mod:`p3b_search.search.samplers`, which checks the name before compute)."""

    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = {}


class Resources(StrictModel):
    """Resources of one trial worker: CPUs and (fractional) GPUs."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class TrackingConfig(StrictModel):
    """MLflow tracking: ``uri`` None = the embedded SQLite store in the study folder."""

    enabled: bool = True
    uri: str | None = None

    @field_validator("uri")
    @classmethod
    def _no_written_password(cls, value: str | None) -> str | None:
        return _lifted(value, "tracking.uri")


class EarlyStopping(StrictModel):
    """Stop a trial that another trial dominates at the same epoch of the same stage.

    Fine-tune stage (``finetune`` in ``stages``): from fine-tune epoch ``grace_epochs`` on, a
    trial stops when some other trial had, at the same fine-tune epoch, top-1 at least
    ``margin`` points higher with no more MACs (both pruned models measured).
    Prune stage (``prune`` in ``stages``): from prune-stage epoch ``grace_epochs`` on, a trial
    stops when some other trial had, at the same prune-stage epoch, top-1 at least ``margin``
    points higher with a budget (kept fraction 1 - prune_ratio) no larger and, where both report
    it, no larger a kept fraction at that epoch (so a trial that has not pruned yet cannot
    stop one that has). This saves the expensive part of a trial.
    A stopped trial is recorded as PRUNED in Optuna and never appears on the front.
    """

    enabled: bool = False
    stages: list[Literal["prune", "finetune"]] = Field(
        default_factory=lambda: ["finetune"], min_length=1,
        description="Stages whose epochs are compared: finetune, prune, or both.")
    grace_epochs: int = Field(1, ge=0, description="Epochs of each stage before a trial may be stopped.")
    margin: float = Field(5.0, ge=0, description="Top-1 points by which the other trial must be better.")


class SuccessiveHalving(StrictModel):
    """Multi-objective successive halving (asynchronous, as MO-ASHA): at each rung the trials
    that reached it are ranked by non-dominated sorting on the study's objectives at that epoch
    (ties by crowding distance); a trial continues only when it is in the top ``1 / eta`` of
    the trials recorded there so far (at least one continues).

    ``rungs`` are epoch counts over both stages (1-based: with 4 prune and 2 fine-tune epochs,
    4 is the end of the prune stage and 5 the first fine-tune epoch), each below the trial's
    last epoch. A rung ranks on the objectives every epoch reports (``top1``, ``top5``,
    ``macs``, ``flops``, ``params``; ``latency_ms`` is measured only when a trial ends), so
    the objectives must hold a cost among ``macs``, ``flops`` and ``params``. A stopped trial is
    recorded as PRUNED in Optuna and never appears on the front. Not with ``early_stopping``.
    """

    name: Literal["successive-halving"]
    rungs: list[int] = Field(min_length=1, description="Epoch counts (both stages, 1-based) where trials are ranked.")
    eta: int = Field(3, description="The top 1/eta of each rung continue (>= 2).")


def method_pair(text: str) -> tuple[str, str]:
    """``"A:B"`` as ``(A, B)``: two method names; ValueError (the instruction) when it is not."""
    first, colon, second = text.partition(":")
    if not colon or not first.strip() or not second.strip() or ":" in second:
        raise ValueError(f"must be two method names as A:B, e.g. p3b:global-taylor (got {text!r})")
    return first.strip(), second.strip()


def _pair_text(text: str) -> str:
    method_pair(text)
    return text


#: A study file's ``"A:B"`` pair of method names (checked by :func:`method_pair`).
MethodPairText = Annotated[str, AfterValidator(_pair_text)]


class CompareSection(StrictModel):
    """What ``search.py compare`` tests besides every pair of methods (its ``--primary``,
    ``--margin`` and ``--equivalence`` win over these).

    ``primary``: the declared primary comparison ``"A:B"`` (A the method studied, B its
    comparator): reported first, tested for equivalence, and the MACs of A are where every
    method's top-1 is read for the matched-MACs column. ``margin``: the equivalence margin in
    top-1 points. ``equivalence``: further ``"A:B"`` pairs whose equivalence within the margin
    is tested (two one-sided tests)."""

    primary: MethodPairText | None = None
    margin: float = Field(1.0, gt=0)
    equivalence: list[MethodPairText] = Field(default_factory=list)

    @property
    def primary_pair(self) -> tuple[str, str] | None:
        return method_pair(self.primary) if self.primary else None

    @property
    def equivalence_pairs(self) -> list[tuple[str, str]]:
        return [method_pair(text) for text in self.equivalence]


class StudyConfig(StrictModel):
    """A whole study; see the module docstring and ``studies/*.yaml``."""

    name: str
    output_dir: Path = Path("runs")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    method: MethodSection = MethodSection()
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(name="top1"), Objective(name="macs")], min_length=1
    )
    dense_reference: DenseReferenceSection = DenseReferenceSection()
    sampler: SamplerConfig = SamplerConfig()
    n_trials: int = Field(20, ge=1)
    concurrency: int = Field(1, ge=1)
    resources_per_trial: Resources = Resources()
    workers_per_trial: int = Field(1, ge=1, description=">1: data-parallel trial (Ray Train TorchTrainer).")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial from its last checkpoint.")
    storage: str | None = Field(None, description="Optuna storage URL; None: SQLite in the study folder.")
    tracking: TrackingConfig = TrackingConfig()
    early_stopping: EarlyStopping = EarlyStopping()
    scheduler: SuccessiveHalving | None = Field(None, description="Stop trials at rungs: successive halving.")
    shared_prefixes: bool = Field(
        False, description="Trials whose prune stage trains alike up to an epoch (same model, weights, data, "
        "training and seed, same method and knobs that act before pruning starts) start from one cached "
        "checkpoint of it in <study>/prefixes/ instead of training it again; their results are unchanged.")
    compare: CompareSection = CompareSection()
    enqueue_reference: bool = Field(True, description="Run the methods' default knobs as the first trial "
                                                      "(not with sampler grid: every trial is a grid point).")

    _source: str = PrivateAttr("study.yaml")

    @field_validator("storage")
    @classmethod
    def _no_written_password(cls, value: str | None) -> str | None:
        return _lifted(value, "storage")

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_shorthand(cls, value: Any) -> Any:
        """Allow ``objectives: [top1, macs]`` for ``[{name: top1}, {name: macs}]``."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def source(self) -> str:
        """The file this study was loaded from (for messages)."""
        return self._source

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.output_dir / self.name)

    @property
    def storage_url(self) -> str:
        """Optuna's storage URL as written (a password as ``${NAME}``: resolve it with
        :func:`p3b_search.credentials.resolve_url` where a connection opens)."""
        return self.storage or self.layout.default_storage_url()

    @property
    def tracking_uri(self) -> str:
        """MLflow's tracking URI as written (a password as ``${NAME}``, as :attr:`storage_url`)."""
        return self.tracking.uri or self.layout.default_tracking_uri()

    @property
    def metric_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objectives]

    def candidate_methods(self) -> list[str]:
        """The methods trials may use: the searched choices, else ``method.name``."""
        dim = self.search_space.get("method")
        listed = None if dim is None else dim.listed()
        return [self.method.name] if listed is None else [str(c) for c in listed]
