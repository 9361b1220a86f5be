"""``export_trial``: write one trial's fine-tuned pruned model to a self-contained folder.

::

    <out>/model.safetensors   the shrunk weights (tensors only)
    <out>/arch.json           ArchSpec: timm name + kwargs, kept units per sub-block, classes,
                              preprocessing, structured flag, method, source (study, trial, run)
    <out>/weight_masks.safetensors   unstructured results only: the zero patterns
    <out>/README.md           model card (figures, bench table, the front with this trial marked)
    <out>/front.png           the study's front, dense reference and knee, this trial ringed
    <out>/model.pt2           torch.export program (dynamic batch), where the model allows it
    <out>/model.onnx          ONNX (torch.onnx.export, dynamo), when onnx is installed and it works

The folder is written next to ``out`` under a temporary name and renamed at the end, so a
failed export leaves nothing half-written. The model is the trial's own ``model/`` folder,
checked against the trial's recorded parameters and MACs; a trial that is not fine-tuned or
whose model is gone is an error that names the command finishing it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from p3b_search.cost import model_cost
from p3b_search.credentials import redact_secrets
from p3b_search.errors import RegistryError, first_line
from p3b_search.export.bench import BenchReport, bench, dense_parent
from p3b_search.export.card import CardFacts, model_card, residual_text
from p3b_search.export.counts import count_model, read_weight_masks
from p3b_search.export.front import FRONT_FILE, front_with_choice
from p3b_search.export.load import ExportError, load_pruned, read_arch_spec
from p3b_search.export.picks import Pick, check_exportable, select_trial
from p3b_search.study.layout import StudyLayout
from p3b_search.study.loading import study_from_folder
from p3b_search.study.messages import StudyError
from p3b_search.study.results import read_trials
from p3b_search.study.trials_table import MLFLOW_RUN_ID, NUMBER, TOP1
from p3b_search.surgery import ArchSpec, get_adapter
from p3b_search.surgery.rounding import round_widths
from p3b_search.trial_folder import ARCH_FILE, MASKS_FILE, MODEL_DIR, RESULT_FILE, WEIGHTS_FILE

#: Registers an exported model: (model, input example batch, tracking URI, run id, model name,
#: card files) -> registered version; raises :class:`~p3b_search.errors.RegistryError`.
#: The command line passes :func:`p3b_search.tracking.registry.register_model`.
ModelRegistrar = Callable[[nn.Module, Any, str, str, str, list[Path]], int]

PT2_FILE, ONNX_FILE, CARD_FILE = "model.pt2", "model.onnx", "README.md"
_MAX_BATCH = 4096
#: Below this size the ONNX weights are stored inside model.onnx (protobuf's limit is 2 GiB).
_ONNX_INLINE_BYTES = 1 << 30


@dataclass(frozen=True)
class StudyInfo:
    """What export needs from the study file: its name, objectives and MLflow store."""

    name: str
    layout: StudyLayout
    objectives: list[tuple[str, str]]
    tracking_uri: str | None

    @property
    def resume_command(self) -> str:
        return f"python search.py resume {self.layout.root}"


def read_study(study_dir: str | Path) -> StudyInfo:
    """:class:`StudyInfo` of the study folder ``study_dir``, read as ``search.py resume`` reads it."""
    try:
        study = study_from_folder(study_dir)
    except StudyError as error:
        raise ExportError(str(error)) from None
    return StudyInfo(study.name, study.layout, list(zip(study.metric_names, study.directions, strict=True)),
                     study.tracking_uri if study.tracking.enabled else None)


@dataclass
class ExportResult:
    """The written folder, the trial it holds, its files, the bench figures, notes, and the
    registered model version when ``register`` was given."""

    folder: Path
    trial: int
    files: list[str]
    bench: BenchReport
    notes: list[str] = field(default_factory=list)
    registered_version: int | None = None


def _read_result(workdir: Path) -> dict[str, Any]:
    path = workdir / RESULT_FILE
    try:
        result = json.loads(path.read_text())
        if not isinstance(result.get("objectives"), dict):
            raise ValueError("no 'objectives' mapping")
    except (OSError, ValueError, AttributeError) as error:
        raise ExportError(f"{path}: corrupt result file ({first_line(error)})") from None
    return result


def _check_same_model(row: pd.Series, recorded: dict[str, float], counted: dict[str, int], workdir: Path) -> None:
    """The model folder must be the one the trial's figures describe (never a different model)."""
    for key, value in counted.items():
        if key in recorded and int(round(recorded[key])) != value:
            raise ExportError(f"{workdir / MODEL_DIR} holds {key}={value:,} but {workdir / RESULT_FILE} records "
                              f"{int(round(recorded[key])):,}: the model folder is not the trial's result; "
                              "nothing was exported")
    table_top1 = row.get(TOP1)
    if pd.notna(table_top1) and "top1" in recorded and abs(float(table_top1) - recorded["top1"]) > 1e-6:
        raise ExportError(f"trial {int(row[NUMBER])}: trials.parquet records top-1 {float(table_top1):.4f} but "
                          f"{workdir / RESULT_FILE} {recorded['top1']:.4f}: the trial folder was overwritten; "
                          "nothing was exported")


def _example(model: nn.Module, batch_size: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *get_adapter(model).input_size(), generator=generator)


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=_MAX_BATCH)}}


@torch.no_grad()
def _export_pt2(model: nn.Module, folder: Path) -> str | None:
    """Write ``model.pt2`` (batch dimension dynamic) and check its logits; a note when impossible."""
    example = _example(model)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
        torch.export.save(program, folder / PT2_FILE)
        check = _example(model, 3)
        reloaded = torch.export.load(folder / PT2_FILE).module()
        torch.testing.assert_close(reloaded(check), model(check), rtol=1e-4, atol=1e-5)
    except Exception as error:  # torch.export raises many types for unsupported code
        (folder / PT2_FILE).unlink(missing_ok=True)
        return f"model.pt2 not written: torch.export failed for this model ({first_line(error)})"
    return None


@torch.no_grad()
def _export_onnx(model: nn.Module, folder: Path) -> str | None:
    """Write ``model.onnx`` with torch's dynamo exporter and check it; a note when impossible."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        return "model.onnx not written: onnx/onnxscript are not installed (pip install 'p3b-search[onnx]')"
    try:
        inline = sum(p.numel() * p.element_size() for p in model.parameters()) < _ONNX_INLINE_BYTES
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (_example(model),), str(folder / ONNX_FILE), dynamo=True,
                              dynamic_shapes=_dynamic_batch(), external_data=not inline, verbose=False)
        onnx.checker.check_model(str(folder / ONNX_FILE))
    except Exception as error:  # the exporter raises many types for unsupported ops
        for path in folder.glob(ONNX_FILE + "*"):
            path.unlink()
        return f"model.onnx not written: torch.onnx.export(dynamo=True) failed for this model ({first_line(error)})"
    return None


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"--out {out_dir}: exists and is not empty: choose another folder or pass --overwrite")


@dataclass
class ChosenTrial:
    """The picked trial's model and records, checked against each other."""

    number: int
    run_id: str | None
    model_dir: Path
    result: dict[str, Any]
    spec: ArchSpec
    model: nn.Module
    weight_masks: dict[str, torch.Tensor]
    rounded_from_macs: int | None = None  # the trained model's MACs when widths were rounded

    @property
    def structured(self) -> bool:
        return bool(self.spec.extra.get("structured", True))

    @property
    def method(self) -> str:
        return str(self.spec.extra.get("method", self.result.get("config", {}).get("method", "?")))


def choose_trial(study: StudyInfo, pick: Pick) -> ChosenTrial:
    """The trial ``pick`` names, loaded and verified (fine-tuned, same counts as recorded)."""
    try:
        trials = read_trials(study.layout, must_exist=True)
    except StudyError as error:
        raise ExportError(str(error)) from None
    row = select_trial(trials, pick, study.objectives)
    model_dir = check_exportable(study.layout, row, trials, study.resume_command)
    result = _read_result(model_dir.parent)
    spec = read_arch_spec(model_dir)
    if not spec.extra.get("preprocessing"):
        raise ExportError(f"{model_dir / ARCH_FILE}: records no preprocessing (input size, mean/std): the trial "
                          "was saved by an older objective; nothing was exported")
    model = load_pruned(model_dir)
    masks = read_weight_masks(model_dir)
    counts = count_model(model, dense_parent(model_dir), masks)
    _check_same_model(row, result["objectives"], {"params": counts.params, "macs": counts.macs}, model_dir.parent)
    run_id = row.get(MLFLOW_RUN_ID)
    return ChosenTrial(int(row[NUMBER]), run_id if isinstance(run_id, str) and run_id else None, model_dir,
                       result, spec, model, masks)


def _write_folder(folder: Path, study: StudyInfo, chosen: ChosenTrial, pick: Pick, onnx: bool,
                  bench_repeats: int) -> tuple[dict[str, str], BenchReport, list[str]]:
    """Fill ``folder``; returns (file name -> description, CPU bench, notes)."""
    if chosen.rounded_from_macs is None:
        shutil.copyfile(chosen.model_dir / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    else:  # widths rounded: the weights are the rounded model's
        save_file({k: v.contiguous() for k, v in chosen.model.state_dict().items()}, folder / WEIGHTS_FILE)
    files = {WEIGHTS_FILE: "the pruned weights (safetensors: tensors only)",
             ARCH_FILE: "architecture: timm name + kwargs, kept units per sub-block, preprocessing"}
    if chosen.weight_masks:
        shutil.copyfile(chosen.model_dir / MASKS_FILE, folder / MASKS_FILE)
        files[MASKS_FILE] = "the unstructured zero patterns (True = kept weight)"
    spec = dataclasses.replace(chosen.spec, extra={
        **chosen.spec.extra, "structured": chosen.structured, "method": chosen.method,
        "source": {"study": study.name, "trial": chosen.number, "mlflow_run_id": chosen.run_id,
                   "pick": pick.describe(), "objectives": chosen.result["objectives"]}})
    spec.save(folder / ARCH_FILE)

    report = bench(folder, devices=["cpu"], repeats=bench_repeats)
    figure, marked = front_with_choice(study.layout.root, chosen.number)
    figure.savefig(folder / FRONT_FILE, dpi=110)
    files[FRONT_FILE] = ("the study's Pareto front (dense reference, knee) with this trial ringed" if marked else
                         "the study's Pareto front (this trial is not one of its points)")
    notes = [note for note in (_export_pt2(chosen.model, folder),
                               _export_onnx(chosen.model, folder) if onnx else None) if note]
    if chosen.rounded_from_macs is not None:
        notes.insert(0, f"kept widths rounded up to multiples of {chosen.spec.extra['round_to']} with zero units "
                        f"(same logits): MACs per image {chosen.rounded_from_macs:,} as trained, "
                        f"{report.counts.macs:,} as exported")
    if (folder / PT2_FILE).exists():
        files[PT2_FILE] = "torch.export program (batch dimension dynamic), torch.export.load(...).module()"
    if (folder / ONNX_FILE).exists():
        files[ONNX_FILE] = "ONNX graph (torch.onnx.export, dynamo), batch dimension dynamic"
    if (folder / f"{ONNX_FILE}.data").exists():
        files[f"{ONNX_FILE}.data"] = "the ONNX graph's weights (external data: keep it next to model.onnx)"
    files[CARD_FILE] = "this card"
    facts = CardFacts(
        study=study.name, study_dir=str(study.layout.root), trial=chosen.number, pick=pick.describe(),
        model_name=spec.model_name, model_kwargs=spec.model_kwargs, method=chosen.method,
        structured=chosen.structured, objectives=chosen.result["objectives"],
        trial_config=chosen.result.get("config", {}), preprocessing=spec.extra["preprocessing"],
        classes=spec.extra.get("classes"), mlflow_run_id=chosen.run_id,
        tracking_uri=redact_secrets(study.tracking_uri) if study.tracking_uri else None,
        files=files, notes=notes, front_figure=FRONT_FILE, front_marked=marked,
        residual=_residual(chosen) if chosen.structured else None,
    )
    (folder / CARD_FILE).write_text(model_card(facts, report))
    return files, report, notes


def _residual(chosen: ChosenTrial) -> str:
    """The card's line on how the residual width was cut (arch.json's ``residual``)."""
    dense = list(get_adapter(chosen.model).stream_widths().values())
    if chosen.spec.residual is None:
        return residual_text(None, dense)
    kept = [d if k is None else len(k) for k, d in zip(chosen.spec.residual, dense)]
    return residual_text(kept, dense)


def _rounded(chosen: ChosenTrial, round_to: int) -> ChosenTrial:
    """``chosen`` with its kept widths rounded up to multiples of ``round_to`` (zero units, same
    logits; :func:`p3b_search.surgery.rounding.round_widths`)."""
    if not chosen.structured:
        raise ExportError(f"--round-to {round_to}: trial {chosen.number} is unstructured (dense shapes): rounding "
                          "applies to structured models; export without --round-to")
    model, spec = round_widths(chosen.model, chosen.spec, round_to)
    return dataclasses.replace(chosen, model=model, spec=spec, rounded_from_macs=model_cost(chosen.model).macs)


def export_trial(study_dir: str | Path, pick: Pick, out_dir: str | Path, register: str | None = None, *,
                 overwrite: bool = False, onnx: bool = True, bench_repeats: int = 10,
                 round_to: int = 1, registrar: ModelRegistrar | None = None) -> ExportResult:
    """Export the trial of ``study_dir`` chosen by ``pick`` to ``out_dir`` (see the module docstring).

    ``register``: also log the model to the trial's MLflow run and register it under this name
    with the alias ``best``, through ``registrar`` (the tracking layer's). ``onnx``: also try ``model.onnx``. ``bench_repeats``: timed runs of
    the CPU latency measurement in the card. ``round_to`` > 1: kept widths rounded up to its
    multiples with zero units (same logits, MACs of the rounded model reported).
    """
    if round_to < 1:
        raise ExportError(f"--round-to: must be a whole number >= 1, e.g. 8 or 16 (got {round_to})")
    if register and registrar is None:
        raise ExportError(f"--register {register}: no model registry was given: pass "
                          "registrar=p3b_search.tracking.registry.register_model (search.py export does)")
    study = read_study(study_dir)
    out_dir = Path(out_dir).resolve()
    _check_target(out_dir, overwrite)
    chosen = choose_trial(study, pick)
    if round_to > 1:
        chosen = _rounded(chosen, round_to)
    if register and (study.tracking_uri is None or chosen.run_id is None):
        raise ExportError(f"--register {register}: trial {chosen.number} has no MLflow run (tracking disabled in "
                          "the study): export without --register")
    staging = out_dir.parent / f".{out_dir.name}.partial"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        files, report, notes = _write_folder(staging, study, chosen, pick, onnx, bench_repeats)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    version = None
    if register:
        try:
            version = registrar(chosen.model, _example(chosen.model).numpy(), study.tracking_uri,
                                     chosen.run_id, register, [out_dir / CARD_FILE, out_dir / ARCH_FILE])
        except RegistryError as error:
            raise ExportError(str(error)) from None
    return ExportResult(out_dir, chosen.number, sorted(files), dataclasses.replace(report, folder=str(out_dir)),
                        notes, version)
