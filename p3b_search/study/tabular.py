"""The tabular benchmark: every trial of a grid study with its learning curve, in one Parquet file.

A replay simulator (:mod:`p3b_search.search.replay`) runs samplers and schedulers over the table
as if its trials ran. The table has one row per COMPLETE trial per epoch (both stages)::

    trial            the study's trial number
    method           the trial's pruning method
    param.<path>     every sampled parameter but the training seed (NaN where the method lacks the knob)
    seed             the trial's training.seed
    final_top1, final_macs, final_kept_fraction
                     the trial's objectives: top-1 %, MACs per image, kept / dense parameters
    duration_s       the trial's wall seconds (Optuna's start to end: epochs, start-up, shrink, measurement)
    epoch            0-based, counted over both stages
    stage            0 prune, 1 fine-tune
    top1             validation top-1 % after the epoch
    macs, keep_ratio, kept_params
                     MACs per image, kept fraction and kept parameters of the model the epoch's
                     masks shrink to; in the fine-tune stage the pruned model's: the trial's final
    epoch_seconds    the epoch's seconds (training and validation)

The file's metadata (key ``p3b:tabular``, JSON) holds the dense reference (``dense``: its
``macs``, ``params`` and ``top1``; ``dense_source``: where the accuracy came from) and the
study that ran (``study``: its YAML), so a reader needs nothing else.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from p3b_search.errors import first_line
from p3b_search.study.dense import DenseReference, dense_accuracy, dense_cost
from p3b_search.study.dimensions import Dimension, config_key
from p3b_search.study.front import reference_point
from p3b_search.study.knobs import active_keys
from p3b_search.study.layout import StudyLayout
from p3b_search.study.loading import parse_study, study_from_folder
from p3b_search.study.messages import StudyError
from p3b_search.study.pareto import normalized_hypervolume
from p3b_search.study.results import read_epochs, read_trials, write_parquet_atomic
from p3b_search.study.sections import StudyConfig
from p3b_search.study.trials_table import DURATION_S, METHOD, NUMBER, PARAM_PREFIX, complete_rows, is_dense

SEED_KEY = "training.seed"
METADATA_KEY = b"p3b:tabular"
#: The objectives a table replays: both are recorded at every epoch.
OBJECTIVES = ("top1", "macs")
FINAL_COLUMNS = ("final_top1", "final_macs", "final_kept_fraction")
EPOCH_COLUMNS = ("epoch", "stage", "top1", "macs", "keep_ratio", "kept_params", "epoch_seconds")
#: Fine-tune epochs report no cost: the pruned model's, the trial's final value.
FINETUNE_COSTS = {"macs": "macs", "keep_ratio": "kept_fraction", "kept_params": "params"}


@dataclass(frozen=True)
class Curve:
    """One trial of the table: its learning curve (arrays of shape ``(epochs,)``) and final objectives."""

    trial: int
    seed: int
    stage: np.ndarray
    top1: np.ndarray
    macs: np.ndarray
    keep_ratio: np.ndarray
    epoch_seconds: np.ndarray
    final: tuple[float, ...]
    duration_s: float

    @property
    def epochs(self) -> int:
        return len(self.top1)


def _check_objectives(study: StudyConfig) -> None:
    if tuple(study.metric_names) != OBJECTIVES:
        raise StudyError(f"{study.source}: objectives: the tabular benchmark replays {list(OBJECTIVES)} "
                         f"(recorded at every epoch), not {study.metric_names}")


def epochs_per_trial(study: StudyConfig) -> int:
    """Epochs of a whole trial: the prune and the fine-tune stage's."""
    return study.training.prune.epochs + study.training.finetune.epochs


def build_table(study: StudyConfig, trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """The table (see the module docstring) of the COMPLETE non-dense rows of ``trials`` (a
    ``trials.parquet`` frame) and their rows of ``epochs`` (:func:`~p3b_search.study.results.read_epochs`).

    Raises :class:`StudyError` when a COMPLETE trial lacks an epoch of its curve.
    """
    _check_objectives(study)
    complete = complete_rows(trials)
    complete = complete[~is_dense(complete)]
    total = epochs_per_trial(study)
    curves = epochs[epochs["trial"].isin(complete[NUMBER])] if len(epochs) else epochs
    counts = curves.groupby("trial")["epoch"].nunique() if len(curves) else pd.Series(dtype=int)
    short = [int(n) for n in complete[NUMBER] if counts.get(n, 0) != total]
    if short:
        raise StudyError(f"{study.layout.root}: trial(s) {short[:5]} finished without all {total} epochs of their "
                         "learning curve under epochs/: the table needs whole curves (rerun those trials)")
    seed_column = PARAM_PREFIX + SEED_KEY
    params = sorted(c for c in complete.columns if c.startswith(PARAM_PREFIX) and c != seed_column)
    per_trial = complete[[NUMBER, METHOD, *params]].rename(columns={NUMBER: "trial"})
    per_trial["seed"] = (complete[seed_column] if seed_column in complete.columns
                         else pd.Series(study.training.seed, index=complete.index)).astype("int64")
    for name in ("top1", "macs", "kept_fraction"):
        per_trial[f"final_{name}"] = complete[name].astype(float)
    per_trial[DURATION_S] = complete[DURATION_S].astype(float)
    finals = complete.set_index(NUMBER)
    rows = curves.reindex(columns=["trial", *EPOCH_COLUMNS]).copy()
    rows["trial"] = rows["trial"].astype("int64")
    for column, final in FINETUNE_COSTS.items():
        fill = rows["trial"].map(finals[final].astype(float))
        rows[column] = rows[column].astype(float).where(rows["stage"] == 0, fill).fillna(fill)
    rows["epoch"] = rows["epoch"].astype("int64")
    rows["stage"] = rows["stage"].astype("int64")
    table = per_trial.merge(rows, on="trial", how="inner")
    return table.sort_values(["trial", "epoch"], ignore_index=True)


def table_from_folder(folder: str | Path, dense_top1: float | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table of the study in ``folder`` and its metadata (the dense reference and the study).

    The dense top-1 is ``dense_top1`` when given, else the study's dense reference (its file's
    ``dense_reference.top1`` or its dense trials); without either a one-line :class:`StudyError`.
    """
    study = study_from_folder(folder)
    layout = StudyLayout(Path(folder).expanduser().resolve())
    trials = read_trials(layout, must_exist=True)
    table = build_table(study, trials, read_epochs(layout))
    cost = dense_cost(study)
    if dense_top1 is not None:
        accuracy, source = float(dense_top1), "given on the command line"
    else:
        given, source = dense_accuracy(study, trials)
        if "top1" not in given:
            raise StudyError(f"{folder}: no dense top-1 (no dense_reference.top1 in the study file, no dense trial): "
                             "give the dense model's top-1 % (export --dense-top1)")
        accuracy = given["top1"]
    metadata = {"dense": {"macs": cost["macs"], "params": cost["params"], "top1": accuracy},
                "dense_source": source, "study": yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)}
    return table, metadata


def write_table(table: pd.DataFrame, metadata: Mapping[str, Any], path: Path) -> None:
    """Write ``table`` with ``metadata`` (JSON under :data:`METADATA_KEY`) to ``path``, atomically."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), METADATA_KEY: json.dumps(metadata)})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(arrow, path)


def _table_value(dim: Dimension, value: Any, key: str, trial: int) -> Any:
    """``value`` as the search space holds it (see :meth:`Dimension.from_table`)."""
    try:
        return dim.from_table(value)
    except ValueError as error:
        raise StudyError(f"table trial {trial}: {key} = {error}") from None


class TabularBenchmark:
    """A table read back: its curves by configuration and training seed, and the hypervolume.

    ``study`` is the study that ran; ``dense`` its dense reference. A configuration is the
    sampled parameters of a live trial without the training seed (what
    :func:`~p3b_search.search.space.suggest_params` returns, the seed left out).
    """

    def __init__(self, table: pd.DataFrame, study: StudyConfig, dense: DenseReference):
        _check_objectives(study)
        self.table = table
        self.study = study
        self.dense = dense
        self.directions = list(study.directions)
        self.reference = reference_point(study, {"macs": dense.get("macs")})
        self.ideal = dense.ideal(study.metric_names)
        self._curves: dict[tuple, dict[int, Curve]] = {}
        self._configs: dict[tuple, dict[str, Any]] = {}
        expected = epochs_per_trial(study)
        for trial, rows in table.groupby("trial", sort=True):
            first = rows.iloc[0]
            params = self.config_of(first)
            curve = _curve(int(trial), rows.sort_values("epoch"))
            if curve.epochs != expected:
                raise StudyError(f"table trial {trial}: {curve.epochs} epochs, the study trains {expected}")
            seeds = self._curves.setdefault(config_key(params), {})
            if curve.seed in seeds:
                raise StudyError(f"table trials {seeds[curve.seed].trial} and {trial}: the same configuration and "
                                 f"seed {curve.seed} twice")
            seeds[curve.seed] = curve
            self._configs[config_key(params)] = params

    def config_of(self, row: pd.Series) -> dict[str, Any]:
        """The configuration of a table row: ``method`` (when searched) and the keys it samples."""
        method = str(row["method"])
        params: dict[str, Any] = {"method": method} if "method" in self.study.search_space else {}
        for key in active_keys(self.study, method):
            if key != SEED_KEY:
                dim = self.study.search_space[key]
                params[key] = _table_value(dim, row[PARAM_PREFIX + key], key, int(row["trial"]))
        return params

    @property
    def configs(self) -> list[dict[str, Any]]:
        """Every configuration in the table."""
        return list(self._configs.values())

    def curves(self, params: Mapping[str, Any]) -> dict[int, Curve]:
        """The curves of configuration ``params`` by training seed (empty when not in the table)."""
        return self._curves.get(config_key(dict(params)), {})

    def all_curves(self) -> list[Curve]:
        """Every trial of the table, by trial number."""
        return sorted((c for seeds in self._curves.values() for c in seeds.values()), key=lambda c: c.trial)

    def normalized_hypervolume(self, values: np.ndarray) -> float:
        """The normalised hypervolume of final objective rows ``values`` (``(n, 2)``: top-1, MACs)."""
        values = np.asarray(values, dtype=float).reshape(-1, len(self.directions))
        return normalized_hypervolume(values, self.directions, self.reference, self.ideal)

    def best_hypervolume(self) -> float:
        """The normalised hypervolume of every trial of the table (both seeds): what no replay exceeds."""
        return self.normalized_hypervolume(np.array([c.final for c in self.all_curves()]))


def _curve(trial: int, rows: pd.DataFrame) -> Curve:
    first = rows.iloc[0]
    return Curve(trial=trial, seed=int(first["seed"]), stage=rows["stage"].to_numpy(dtype=np.int64),
                 top1=rows["top1"].to_numpy(dtype=float), macs=rows["macs"].to_numpy(dtype=float),
                 keep_ratio=rows["keep_ratio"].to_numpy(dtype=float),
                 epoch_seconds=rows["epoch_seconds"].to_numpy(dtype=float),
                 final=tuple(float(first[f"final_{name}"]) for name in OBJECTIVES),
                 duration_s=float(first["duration_s"]))


def read_table(path: str | Path) -> TabularBenchmark:
    """The table written by :func:`write_table`; one-line :class:`StudyError` when it is missing,
    unreadable or lacks the metadata or a column."""
    path = Path(path)
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise StudyError(f"{path}: cannot read the table ({first_line(error)}): write it with "
                         "`benchmarks/tabular_benchmark.py export STUDY_FOLDER`") from None
    raw = (arrow.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise StudyError(f"{path}: no {METADATA_KEY.decode()} metadata: not a tabular benchmark table "
                         "(write it with `benchmarks/tabular_benchmark.py export STUDY_FOLDER`)")
    table = arrow.to_pandas()
    needed = ["trial", "method", "seed", *FINAL_COLUMNS, "duration_s", *EPOCH_COLUMNS]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise StudyError(f"{path}: lacks column(s) {missing}")
    metadata = json.loads(raw)
    study = parse_study(metadata["study"], f"{path} (its study)")
    dense = DenseReference({k: float(v) for k, v in metadata["dense"].items() if v is not None and math.isfinite(v)},
                           metadata.get("dense_source", ""))
    return TabularBenchmark(table, study, dense)

